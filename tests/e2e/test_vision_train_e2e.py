"""DPO (LoRA) and a reward model trained on an image preference task through the Trainer, at
TP=2 and PP=2 (one 2-rank gloo launch, tests/distributed/workers/vision_train_worker.py), then
the reward model exported to HF: the exported LLaVA loads with transformers and, with
value_head.safetensors, scores the held-out sequences as the Megatron model did."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tests.dist_utils import _free_port, dist_cases, run_dist_module

WORKER = "tests.distributed.workers.vision_train_worker"
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 220), "yellow": (230, 210, 30)}
QUESTIONS = ["What colour is this picture?", "Which colour do you see?", "Name the colour of the image.",
             "Tell me the colour shown.", "What is the main colour here?", "Say which colour this is."]


def make_colour_task(root, sizes=((32, 32),)) -> str:
    """72 ms-swift records: one jittered solid-colour image each (relative path), chosen names
    its colour, rejected another; each (colour, wrong colour, question) once. ``sizes``: image
    (width, height), cycled over the records (LLaVA-NeXT: different sizes, different token counts)."""
    from PIL import Image

    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for q in QUESTIONS:
        for c, rgb in COLOURS.items():
            for w in COLOURS:
                if w == c:
                    continue
                name = f"images/{len(recs)}.png"
                shade = tuple(max(0, min(255, v + rng.randint(-25, 25))) for v in rgb)
                Image.new("RGB", sizes[len(recs) % len(sizes)], shade).save(root / name)
                recs.append({"query": f"<image>{q}", "response": f"It is {c}.", "rejected_response": f"It is {w}.",
                             "images": [name]})
    rng.shuffle(recs)
    path = root / "colours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from mcore_align.checkpoint import convert_hf_to_mcore
    from mcore_align.models.tiny_vision import make_tiny_internvl, make_tiny_llava, make_tiny_llava_next

    root = tmp_path_factory.mktemp("vision_train")
    make_tiny_llava(root / "hf", "qwen2")
    convert_hf_to_mcore(root / "hf", root / "mc", dtype="fp32")
    make_tiny_llava_next(root / "next_hf", "qwen2")
    convert_hf_to_mcore(root / "next_hf", root / "next_mc", dtype="fp32")
    make_tiny_internvl(root / "internvl_hf")
    convert_hf_to_mcore(root / "internvl_hf", root / "internvl_mc", dtype="fp32")
    (root / "data").mkdir()
    return root


@pytest.fixture(scope="module")
def results(work):
    env = {"MA_TEST_CKPT": str(work / "mc"), "MA_TEST_WORK": str(work), "MA_TEST_DATA": make_colour_task(work / "data"),
           # LLaVA-NeXT: 32x32 -> 3 tiles, 36 image tokens; 64x32 -> 3 tiles, 52; 64x64 -> 5 tiles, 88
           "MA_TEST_NEXT_CKPT": str(work / "next_mc"), "MA_TEST_INTERNVL_CKPT": str(work / "internvl_mc"),
           "MA_TEST_NEXT_DATA": make_colour_task(work / "data_next", sizes=((32, 32), (64, 32), (64, 64)))}
    return run_dist_module(WORKER, nproc=2, env=env)


@pytest.mark.parametrize("case", dist_cases(WORKER))
def test_case(results, case):
    results.check(case)


def hf_backbone_inputs(model, r) -> dict:
    """transformers' backbone inputs for a dumped sequence (float64 pixels; Qwen-VL also needs
    ``mm_token_type_ids``, 1 at image tokens, to build its M-RoPE positions)."""
    ids = r["tokens"][None]
    kw = {k: (v.double() if v.is_floating_point() else v) for k, v in r["image_inputs"].items()}
    if "image_grid_thw" in kw:
        kw["mm_token_type_ids"] = (ids == model.config.image_token_id).int()
    return {"input_ids": ids, **kw}


def check_rm_export(results, work, run: str, hf_class: str) -> None:
    """The RM run ``run`` exported by tools/convert_mcore_to_hf.py loads with
    AutoModelForImageTextToText as ``hf_class``; transformers' backbone (float64, last hidden
    state at the last token) x value_head.safetensors gives the Megatron scores of the held-out
    sequences (1e-4) and separates their pairs."""
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    results.check(f"case_{run}_learns_image_task")
    out = work / f"{run}_hf"
    proc = subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(work / run), "--out", str(out),
                           "--overwrite"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    head = load_file(out / "value_head.safetensors")["value_head.weight"].double()  # [1, H]
    model = getattr(transformers, hf_class).from_pretrained(out, dtype=torch.float64).eval()
    auto = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert type(auto).__name__ == hf_class
    rows = torch.load(work / f"{run}_scores.pt")
    assert len(rows) >= 8
    got, want = [], []
    with torch.no_grad():
        for r in rows:
            # the backbone's final (normed) hidden state at the last token, as score.score_hf reads it
            h = model.model(**hf_backbone_inputs(model, r)).last_hidden_state
            got.append(float(h[0, -1] @ head[0]))
            want.append(r["score"])
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=0, atol=1e-4)
    # the held-out pairs are separated by the exported model too
    by_pair = {}
    for r, g in zip(rows, got):
        by_pair.setdefault(r["pair"], {})[r["chosen"]] = g
    acc = sum(p[True] > p[False] for p in by_pair.values()) / len(by_pair)
    assert acc > 0.9, acc


@pytest.mark.parametrize("run,hf_class", [("rm_tp2", "LlavaForConditionalGeneration"),
                                          ("rm_pp2", "LlavaForConditionalGeneration"),
                                          ("llava_next_rm_tp2", "LlavaNextForConditionalGeneration")])
def test_rm_export_loads_in_transformers_and_scores_like_megatron(results, work, run, hf_class):
    check_rm_export(results, work, run, hf_class)


def test_rm_step1_loss_matches_transformers_float64(results, work):
    """The logged loss of the RM's first step (TP=2) equals the Bradley-Terry loss computed by
    transformers' LLaVA (the converted HF weights, float64) with the same initial value head
    on the same first global batch, images included."""
    import torch.nn.functional as F
    from transformers import LlavaForConditionalGeneration

    results.check("case_rm_tp2_learns_image_task")
    first = torch.load(work / "rm_tp2_first_batch.pt")
    head = first["head"].double()[0]
    model = LlavaForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float64).eval()
    rewards = {}
    with torch.no_grad():
        for r in first["rows"]:
            h = model.model(input_ids=r["tokens"][None], pixel_values=r["pixel_values"].double()).last_hidden_state
            rewards[(r["pair"], r["role"])] = h[0, -1] @ head
    pairs = sorted({p for p, _ in rewards})
    assert len(pairs) == first["num_pairs"] == 8
    expected = float(sum(-F.logsigmoid(rewards[(p, 0)] - rewards[(p, 1)]) for p in pairs) / len(pairs))
    step1 = json.loads((work / "rm_tp2_history.json").read_text())["history"][0]
    assert abs(step1["loss"] - expected) <= 2e-5 * max(1.0, abs(expected)), (step1["loss"], expected)
    # the mean rewards themselves (not only their differences), image features included
    for role, key in ((0, "rewards/chosen"), (1, "rewards/rejected")):
        want = float(sum(rewards[(p, role)] for p in pairs) / len(pairs))
        assert abs(step1[key] - want) <= 1e-5 * max(1.0, abs(want)), (key, step1[key], want)


@pytest.fixture(scope="module")
def hf64(work):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float64).eval()


def _hf_sequence_logps(model, r) -> tuple[torch.Tensor, ...]:
    """One sequence through transformers' LLaVA (float64, its image): (sum of the scored tokens'
    log-probs, their count, sum over every predicted token, the count of those)."""
    tok = r["tokens"]
    logits = model(input_ids=tok[None], pixel_values=r["pixel_values"].double()).logits[0]
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, tok[1:, None])[:, 0]  # log p(tok[t+1]) at t
    mask = r["loss_mask"][:len(tok) - 1].double()  # loss_mask[t] = 1: tok[t+1] is a response token
    return (lp * mask).sum(), mask.sum(), lp.sum(), torch.tensor(float(len(tok) - 1), dtype=torch.float64)


@pytest.mark.parametrize("algo", ["sft", "cpo", "orpo", "simpo"])
def test_step1_loss_on_images_matches_transformers_float64(results, work, hf64, algo):
    """The logged step-1 loss (TP=2, full fine-tuning) equals the objective's formula evaluated
    on transformers' LLaVA in float64 on the same first global batch, images included
    (settings in the worker's OBJECTIVES_STEP1)."""
    import torch.nn.functional as F

    results.check("case_sft_cpo_orpo_simpo_first_steps_on_images")
    d = torch.load(work / f"{algo}_tp2_step1.pt")
    with torch.no_grad():
        s = {(r["pair"], r["role"]): _hf_sequence_logps(hf64, r) for r in d["rows"]}
    assert len(s) == len(d["rows"]) and d["num_pairs"] == 8
    if algo == "sft":  # token-mean NLL over every response token of the batch
        expected = -sum(v[0] for v in s.values()) / sum(v[1] for v in s.values())
    else:
        pairs = sorted({p for p, _ in s})
        assert len(pairs) == 8
        c, rj = [s[(p, 0)] for p in pairs], [s[(p, 1)] for p in pairs]
        lp_c, lp_r = torch.stack([x[0] for x in c]), torch.stack([x[0] for x in rj])
        a_c, a_r = lp_c / torch.stack([x[1] for x in c]), lp_r / torch.stack([x[1] for x in rj])
        nll = -lp_c.sum() / sum(x[1] for x in c)  # token mean over the chosen responses
        if algo == "cpo":  # beta 0.1, cpo_alpha 1
            expected = (-F.logsigmoid(0.1 * (lp_c - lp_r))).mean() + 1.0 * nll
        elif algo == "simpo":  # beta 2, gamma 1, cpo_alpha 0.5
            expected = (-F.logsigmoid(2.0 * (a_c - a_r) - 1.0)).mean() + 0.5 * nll
        else:  # orpo, lambda 0.1: NLL over the chosen's prompt and response tokens + odds ratio
            log_odds = (a_c - a_r) - (torch.log(-torch.expm1(a_c)) - torch.log(-torch.expm1(a_r)))
            nll_seq = -sum(x[2] for x in c) / sum(x[3] for x in c)
            expected = nll_seq - 0.1 * F.logsigmoid(log_odds).mean()
    expected = float(expected)
    got = d["history"][0]["loss"]
    assert abs(got - expected) <= 2e-5 * max(1.0, abs(expected)), (algo, got, expected)


def test_score_cli_scores_image_records_like_transformers(results, work):
    """``python -m mcore_align.score`` on image records: the Megatron RM (TP=2, torchrun) and the
    exported HF model (``--hf``) both give, for every chosen and rejected sequence, the score of
    transformers' LLaVA in float64 (backbone last hidden state at the last token x
    value_head.safetensors) on token ids expanded independently by the HF processor."""
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    results.check("case_rm_tp2_learns_image_task")
    data = work / "data"
    recs = [json.loads(x) for x in (data / "colours.jsonl").read_text().splitlines()[:6]]
    ds = work / "score_records.jsonl"
    ds.write_text("".join(json.dumps({**r, "images": [str(data / p) for p in r["images"]]}) + "\n" for r in recs))
    out = work / "rm_tp2_score_hf"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, *a], cwd=ROOT, capture_output=True, text=True, env=env)  # noqa: E731
    p = run("tools/convert_mcore_to_hf.py", "--ckpt", str(work / "rm_tp2"), "--out", str(out), "--overwrite")
    assert p.returncode == 0, p.stderr[-4000:]
    p = run("-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
            "-m", "mcore_align.score", "--ckpt", str(work / "rm_tp2"), "--dataset", str(ds), "--pairs",
            "--out", str(work / "scores_mc.jsonl"), "--tp", "2", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-4000:]
    p = run("-m", "mcore_align.score", "--hf", str(out), "--dataset", str(ds), "--pairs",
            "--out", str(work / "scores_hf.jsonl"))
    assert p.returncode == 0, p.stderr[-4000:]
    # independent reference: HF processor expansion + transformers float64
    proc = AutoProcessor.from_pretrained(out)
    model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float64).eval()
    head = load_file(out / "value_head.safetensors")["value_head.weight"].double()[0]
    want = []
    with torch.no_grad():
        for r in recs:
            img = Image.open(data / r["images"][0]).convert("RGB")
            pair = []
            for resp in (r["response"], r["rejected_response"]):
                text = proc.tokenizer.apply_chat_template([{"role": "user", "content": r["query"]},
                                                           {"role": "assistant", "content": resp}], tokenize=False)
                enc = proc(text=[text], images=[img], return_tensors="pt", add_special_tokens=False)
                h = model.model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"].double()).last_hidden_state
                pair.append(float(h[0, -1] @ head))
            want.append(pair)
    want = torch.tensor(want, dtype=torch.float64)
    for name in ("scores_mc.jsonl", "scores_hf.jsonl"):
        rows = [json.loads(x) for x in (work / name).read_text().splitlines()]
        got = torch.tensor([[x["chosen"], x["rejected"]] for x in rows], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["merged", "peft"])
def test_lora_on_the_vision_side_exports_to_transformers(results, work, kind):
    """A DPO-LoRA run with adapters on the tower and projector (freeze_vit / freeze_aligner false):
    the merged export, and the PEFT export applied to the base HF model, give transformers' LLaVA
    (float64) the Megatron policy's per-sequence log-prob sums on held-out image pairs."""
    from transformers import LlavaForConditionalGeneration

    results.check("case_dpo_lora_on_the_vision_side")
    out = work / f"dpo_lora_vision_{kind}"
    p = subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", str(work / "dpo_lora_vision"),
                        "--out", str(out), "--lora", kind, "--overwrite"]
                       + (["--base", str(work / "hf")] if kind == "peft" else []),
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    if kind == "merged":
        model = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float64).eval()
    else:
        from peft import PeftModel

        cfg = json.loads((out / "adapter_config.json").read_text())
        assert any("vision_tower" in t for t in cfg["target_modules"]), cfg["target_modules"]
        base = LlavaForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float64)
        model = PeftModel.from_pretrained(base, out).eval()
    d = torch.load(work / "dpo_lora_vision_sums.pt")
    with torch.no_grad():
        got = torch.stack([_hf_sequence_logps(model, r)[0] for r in d["rows"]])
    torch.testing.assert_close(got, d["sums"], rtol=1e-5, atol=1e-4)
    if kind == "merged":  # control: the vision adapters matter (base tower and projector put back)
        base = LlavaForConditionalGeneration.from_pretrained(work / "hf", dtype=torch.float64)
        model.model.vision_tower.load_state_dict(base.model.vision_tower.state_dict())
        model.model.multi_modal_projector.load_state_dict(base.model.multi_modal_projector.state_dict())
        with torch.no_grad():
            plain = torch.stack([_hf_sequence_logps(model, r)[0] for r in d["rows"]])
        assert (plain - d["sums"]).abs().max() > 1e-2, (plain - d["sums"]).abs().max()
