"""MoE at EP=2, TP=2+SP, PP=2 (one 2-rank launch) and TP=2 x EP=2 (one 4-rank launch), all
from checkpoints converted once at EP=1; logits against transformers. The 2-rank launch also
trains DPO through the real trainer at DP=2 and at EP=2 (same losses and grad norms)."""
import json

import pytest

from mcore_align.checkpoint import convert_hf_to_mcore
from mcore_align.demo import HELDOUT_TOPICS, make_task
from mcore_align.models.tiny import make_tiny_model
from tests.conftest import shared_data_dir
from tests.dist_utils import dist_cases, run_dist_module
from tests.unit.test_moe import MODELS

WORKER = "tests.distributed.workers.moe_worker"
WORKER4 = "tests.distributed.workers.moe4_worker"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_dist")
    for name, (family, overrides) in MODELS.items():
        make_tiny_model(root / name / "hf", family, hf_overrides=overrides)
        convert_hf_to_mcore(root / name / "hf", root / name / "mc", dtype="fp32")
    for src, dst in (("dpo_en_demo.json", "dpo_subset.json"), ("kto_en_demo.json", "kto_subset.json"),
                     ("alpaca_en_demo.json", "sft_subset.json")):
        data = shared_data_dir() / src
        if data.exists():  # 16 real records, the shortest (the cases that need them skip without)
            recs = sorted(json.loads(data.read_text()), key=lambda r: len(json.dumps(r)))
            (root / dst).write_text(json.dumps(recs[:16]))
    # The demo's learnable preference task; held-out pairs on topics never trained on.
    make_task(root / "task.jsonl", 160, seed=0)
    make_task(root / "heldout.jsonl", 24, seed=99, topics=HELDOUT_TOPICS)
    return root


@pytest.fixture(scope="module")
def results(root):
    return run_dist_module(WORKER, nproc=2, env={"MCA_MOE_ROOT": str(root)})


@pytest.fixture(scope="module")
def results4(root, results):  # after the 2-rank launch: its DP=2 DPO history is the reference
    return run_dist_module(WORKER4, nproc=4, env={"MCA_MOE_ROOT": str(root)})


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_case(results, case):
    results.check(case)


@pytest.mark.parametrize("case", dist_cases(WORKER4))
def test_case_4_ranks(results4, case):
    results4.check(case)


def test_export_of_checkpoint_saved_at_ep2_matches_trained_model(results, root, tmp_path):
    """The DPO run saved at EP=2; its HF export computes the trained megatron model's logits
    in transformers (and training moved them away from the base model's)."""
    import torch
    from transformers import AutoModelForCausalLM

    from mcore_align.checkpoint import convert_mcore_to_hf

    results.check("case_dpo_moe_ep2_matches_dp2")
    saved = torch.load(root / "dpo_ep2_logits.pt")
    convert_mcore_to_hf(root / "dpo_ep2_save", tmp_path / "hf")
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()(saved["tokens"]).logits
        base = AutoModelForCausalLM.from_pretrained(root / "qwen3_moe" / "hf",
                                                    dtype=torch.float32).eval()(saved["tokens"]).logits
    scale = ref.abs().max()
    assert (saved["logits"] - ref).abs().max() / scale < 1e-4
    assert (base - ref).abs().max() / scale > 1e-3


def test_lora_exports_of_ep2_checkpoint_match_trained_model(results, root, tmp_path):
    """LoRA DPO with expert adapters saved at EP=2: merged HF weights (expert adapters folded
    into each expert's gate/up/down) and base + PEFT adapters (experts through
    target_parameters) both compute the trained megatron model's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mcore_align.checkpoint.lora_export import export_merged, export_peft

    results.check("case_lora_dpo_moe_ep2_matches_dp2")
    saved = torch.load(root / "lora_ep2_logits.pt")
    tokens, expected = saved["tokens"], saved["logits"]
    scale = expected.abs().max()
    export_merged(saved["save"], tmp_path / "merged")
    export_peft(saved["save"], tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"], cfg
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"} and cfg["lora_dropout"] == 0.0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(tokens).logits
        base_model = AutoModelForCausalLM.from_pretrained(root / "qwen3_moe" / "hf", dtype=torch.float32).eval()
        base = base_model(tokens).logits
        peft = PeftModel.from_pretrained(base_model, tmp_path / "peft").eval()(tokens).logits
    assert (merged - expected).abs().max() / scale < 1e-4
    assert (peft - expected).abs().max() / scale < 1e-4
    assert (base - expected).abs().max() / scale > 1e-3  # training moved the adapters
