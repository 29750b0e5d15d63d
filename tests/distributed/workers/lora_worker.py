"""LoRA on 2 gloo ranks: adapter maths at TP=2 (+SP) vs TP=1, and LoRA DPO through the Trainer.

The pytest side (tests/e2e/test_lora_e2e.py) converts a tiny HF model once and passes
paths through the environment; merged / PEFT exports and `transformers` comparisons
happen there.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.config import build_config
from mcore_align.trainer.trainer import Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_lora_worker"))
DATA = os.environ.get("MA_TEST_DATA", "")
TOKENS = Path(os.environ.get("MA_TEST_TOKENS", "/nonexistent"))
# Dropout off: the layout comparison and exact resume need deterministic steps.
LORA = ("train_type=lora", "lora_rank=4", "lora_alpha=8", "lora_dropout=0.0", "lora_target_modules=ALL")


def _cfg(save: str | None, *overrides: str):
    raw = {
        "model": {"load": CKPT},
        "data": {"dataset": [DATA], "max_length": 320, "truncation_strategy": "right", "max_tokens_per_micro_batch": 1280,
                 "cache_dir": str(WORK / "cache")},
        "optim": {"learning_rate": 1e-2, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 8, "device": "cpu", "progress_bar": False,
                  "save": save, "plot": False, "seed": 7},
        "algo": {"rlhf_type": "dpo", "beta": 0.1, "rpo_alpha": None},
    }
    return build_config(raw, (*LORA, *overrides))


def _save_dir(name: str) -> str:
    path = WORK / name
    if dist.get_rank() == 0 and path.exists():
        import shutil

        shutil.rmtree(path)
    dist.barrier()
    return str(path)


def _losses(result) -> list[float]:
    return [h["loss"] for h in result["history"]]


# -- adapter maths, no trainer --------------------------------------------------------------
def _model(tp: int, sp: bool = False):
    from mcore_align.checkpoint import load_model_weights, read_model_spec
    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.parallel.runtime import ParallelConfig, initialize

    rt = initialize(ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp), device="cpu", seed=1)
    chunks = build_model(read_model_spec(CKPT), rt, role="policy", opts=ModelOptions(core_attention="megatron"))
    load_model_weights(chunks, CKPT)
    return chunks, rt


def _set_full_adapters(chunks, seed: int = 3) -> None:
    """Random full A/B per adapter (the same on every rank), this rank's slice copied in."""
    from mcore_align.models.lora import global_module_name, lora_modules, shard_adapter

    for chunk in chunks:
        for name, lora in lora_modules(chunk):
            g = global_module_name(chunk, name)
            gen = torch.Generator().manual_seed(seed + sum(map(ord, g)))
            t, T = lora.tp_group.rank(), lora.tp_group.size()
            r = lora.A.shape[0]
            in_f = lora.A.shape[1] * (T if lora.kind == "row" else 1)
            out_f = lora.B.shape[0] * (T if lora.kind == "column" else 1)
            A, B = torch.randn(r, in_f, generator=gen) * 0.1, torch.randn(out_f, r, generator=gen) * 0.1
            a, b = shard_adapter(lora.kind, name.rsplit(".", 1)[-1], A, B, t, T)
            with torch.no_grad():
                lora.A.copy_(a)
                lora.B.copy_(b)


def case_adapter_b0_is_base_and_tp2_equals_tp1():
    from mcore_align.checkpoint.verify import megatron_logits
    from mcore_align.models.lora import LoRAConfig, PRESETS, adapters_disabled, apply_lora

    tokens = torch.load(TOKENS)
    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=PRESETS["ALL"])
    results = {}
    for tp, sp in ((1, False), (2, False)):
        chunks, rt = _model(tp, sp)
        trainable = megatron_logits(chunks, tokens, rt)
        apply_lora(chunks, cfg, seed=0)
        with adapters_disabled(chunks):
            base = megatron_logits(chunks, tokens, rt)
        # Megatron computes frozen linears with another matmul (linear_with_frozen_weight): ~1e-7.
        torch.testing.assert_close(base, trainable, rtol=0, atol=1e-5)
        # B = 0: the adapted model is the (frozen) base model, bit for bit.
        assert torch.equal(megatron_logits(chunks, tokens, rt), base)
        _set_full_adapters(chunks)
        adapted = megatron_logits(chunks, tokens, rt)
        assert (adapted - base).abs().max() > 1e-2  # the adapters do something
        with adapters_disabled(chunks):
            assert torch.equal(megatron_logits(chunks, tokens, rt), base)
        results[(tp, sp)] = adapted
    torch.testing.assert_close(results[(2, False)], results[(1, False)], rtol=1e-5, atol=1e-5)
    if dist.get_rank() == 0:
        torch.save(results[(1, False)], WORK / "random_adapters_logits.pt")


def case_column_row_adapters_match_float64_with_and_without_sp():
    """Column -> row linears with adapters at TP=2 (SP off and on) vs an unsharded float64
    computation: outputs and every gradient (input, A and B of both adapters)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    from mcore_align.models.lora import LoRAConfig, attach_lora, shard_adapter
    from mcore_align.parallel.runtime import ParallelConfig, initialize

    S, Bt, H, F, r = 8, 2, 16, 24, 4
    cfg = LoRAConfig(rank=r, alpha=8, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    x_SBH = torch.randn(S, Bt, H, generator=gen, dtype=torch.float64)
    W1, W2 = torch.randn(F, H, generator=gen, dtype=torch.float64), torch.randn(H, F, generator=gen, dtype=torch.float64)
    A1, B1 = torch.randn(r, H, generator=gen, dtype=torch.float64), torch.randn(F, r, generator=gen, dtype=torch.float64)
    A2, B2 = torch.randn(r, F, generator=gen, dtype=torch.float64), torch.randn(H, r, generator=gen, dtype=torch.float64)
    g_SBH = torch.randn(S, Bt, H, generator=gen, dtype=torch.float64)  # dL/dy
    # Reference, unsharded float64.
    ref = {k: v.clone().requires_grad_(True) for k, v in dict(x=x_SBH, A1=A1, B1=B1, A2=A2, B2=B2).items()}
    h = ref["x"] @ W1.T + cfg.scaling * (ref["x"] @ ref["A1"].T @ ref["B1"].T)
    y = h @ W2.T + cfg.scaling * (h @ ref["A2"].T @ ref["B2"].T)
    (y * g_SBH).sum().backward()
    for sp in (False, True):
        rt = initialize(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=sp), device="cpu", seed=1)
        tp = rt.pgs.tp
        t, T = tp.rank(), tp.size()
        tcfg = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, tensor_model_parallel_size=T,
                                 sequence_parallel=sp, use_cpu_initialization=True, params_dtype=torch.float64,
                                 gradient_accumulation_fusion=False)
        init = lambda w: None  # noqa: E731 - weights are copied in below
        col = ColumnParallelLinear(H, F, config=tcfg, init_method=init, bias=False, gather_output=False, tp_group=tp)
        row = RowParallelLinear(F, H, config=tcfg, init_method=init, bias=False, input_is_parallel=True,
                                skip_bias_add=True, tp_group=tp)
        with torch.no_grad():
            col.weight.copy_(W1.chunk(T, 0)[t])
            row.weight.copy_(W2.chunk(T, 1)[t])
        col.requires_grad_(False)
        row.requires_grad_(False)
        lc, lr = attach_lora(col, "col", cfg, seed=0), attach_lora(row, "row", cfg, seed=0)
        with torch.no_grad():
            for lora, A, B in ((lc, A1, B1), (lr, A2, B2)):
                a, b = shard_adapter(lora.kind, "x", A, B, t, T)
                lora.A.copy_(a)
                lora.B.copy_(b)
        x = (x_SBH.chunk(T, 0)[t] if sp else x_SBH).clone().requires_grad_(True)
        out, _ = row(col(x)[0])
        g = g_SBH.chunk(T, 0)[t] if sp else g_SBH
        # megatron's own SP layers allocate backward buffers on torch.cuda.current_device(), and the
        # CPU mode's device redirect is not active inside autograd's backward: point it at the CPU here.
        current_device = torch.cuda.current_device
        torch.cuda.current_device = lambda: torch.device("cpu")
        try:
            (out * g).sum().backward()
        finally:
            torch.cuda.current_device = current_device
        # What finalize_model_grads does for params tagged sequence_parallel (SP only).
        for p in (lc.A, lc.B, lr.A, lr.B):
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=tp)
        y_want = y.detach().chunk(T, 0)[t] if sp else y.detach()
        torch.testing.assert_close(out, y_want)
        torch.testing.assert_close(x.grad, ref["x"].grad.chunk(T, 0)[t] if sp else ref["x"].grad)
        for lora, kA, kB in ((lc, "A1", "B1"), (lr, "A2", "B2")):
            a, b = shard_adapter(lora.kind, "x", ref[kA].grad, ref[kB].grad, t, T)
            torch.testing.assert_close(lora.A.grad, a, msg=f"sp={sp} {lora.kind} A")
            torch.testing.assert_close(lora.B.grad, b, msg=f"sp={sp} {lora.kind} B")


# -- LoRA DPO through the Trainer --------------------------------------------------------------
def _frozen_state(tr) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(tr.policy)
            for n, p in m.module.named_parameters() if not p.requires_grad}


def _train_and_check(name: str, *layout: str, iters: int = 8) -> None:
    from mcore_align.checkpoint.verify import megatron_logits
    from mcore_align.models.lora import LoRA

    save = _save_dir(name)
    tr = Trainer(_cfg(save, f"train_iters={iters}", *layout))
    from mcore_align.trainer.reference import PolicyWithoutAdapters

    # LoRA: no second copy of the weights, the reference is the policy with adapters off.
    assert isinstance(tr.reference, PolicyWithoutAdapters) and tr.reference.policy is tr.policy
    adapters = {n: p for m in tr.policy for n, p in m.module.named_parameters() if p.requires_grad}
    assert adapters and all(".lora." in n for n in adapters), sorted(adapters)
    # Megatron DDP and the optimizer see the adapters only: no grads or Adam state for the base.
    assert sum(b.numel_unpadded for m in tr.policy for b in m.buffers) == sum(p.numel() for p in adapters.values())
    opt_params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    assert len(opt_params) == len(adapters)
    frozen = _frozen_state(tr)
    before = {n: p.detach().clone() for n, p in adapters.items()}
    res = tr.train()
    h = res["history"]
    first, last = h[0]["loss"], sum(x["loss"] for x in h[-3:]) / 3
    assert last < first - 0.1, f"{name}: loss did not fall: {[round(x['loss'], 4) for x in h]}"
    assert all(math.isfinite(x["grad_norm"]) for x in h)
    after = _frozen_state(tr)
    assert all(torch.equal(frozen[k], after[k]) for k in frozen), "a base weight changed"
    assert all(not torch.equal(before[n], p) for n, p in adapters.items() if n.endswith(".B")), "an adapter B did not train"
    assert sum(isinstance(m, LoRA) for c in tr.policy for m in c.modules()) > 0
    tokens = torch.load(TOKENS)
    logits = megatron_logits([m.module for m in tr.policy], tokens, tr.rt)
    if logits is not None and tr.rt.pgs.tp.rank() == 0 and tr.rt.dp_rank == 0:  # the last stage holds them
        torch.save({"tokens": tokens, "logits": logits, "save": save}, WORK / f"{name}_logits.pt")
    if dist.get_rank() == 0:
        (WORK / f"{name}_losses.json").write_text(json.dumps(_losses(res)))


def case_lora_dpo_tp2_learns():
    _train_and_check("tp2", "tensor_model_parallel_size=2")


def case_lora_dpo_pp2_learns():
    _train_and_check("pp2", "pipeline_model_parallel_size=2")


def case_layouts_give_same_losses():
    # Adapters start identical at every layout (seeded by global name), so do the runs.
    tp2, pp2 = (json.loads((WORK / f"{n}_losses.json").read_text()) for n in ("tp2", "pp2"))
    for a, b in zip(tp2, pp2):
        assert abs(a - b) < 2e-3 * max(1.0, abs(a)), (tp2, pp2)


def case_checkpoint_holds_adapters_only():
    from torch.distributed.checkpoint import FileSystemReader

    from mcore_align.trainer.checkpointing import latest_checkpoint

    path = latest_checkpoint(WORK / "tp2")
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    tensors = [k for k in keys if not k.startswith(("optimizer.", "rng_state"))]
    assert tensors and all(".lora_" in k for k in tensors), sorted(tensors)[:10]
    assert not any(k.startswith("optimizer.") and ".lora_" not in k for k in keys
                   if "state." in k), "optimizer state for a base weight"


def case_step0_reference_is_policy():
    # B = 0 at step 0: the policy (adapters on) and the reference (adapters off) agree exactly.
    tr = Trainer(_cfg(None, "train_iters=1", "tensor_model_parallel_size=2"))
    m = tr.stepper.eval_step(next(tr.data.train))
    assert m["rewards/chosen"] == 0.0 and m["rewards/rejected"] == 0.0, m


def case_resume_is_exact():
    full = _losses(Trainer(_cfg(_save_dir("resume_a"), "train_iters=4", "tensor_model_parallel_size=2")).train())
    save_b = _save_dir("resume_b")
    first = Trainer(_cfg(save_b, "train_iters=4", "exit_after_steps=2", "tensor_model_parallel_size=2")).train()
    assert first["stopped"] and first["step"] == 2
    save_c = _save_dir("resume_c")  # the same step-2 adapters checkpoint, resumed at PP=2 below
    if dist.get_rank() == 0:
        import shutil

        shutil.copytree(save_b, save_c, dirs_exist_ok=True)
    dist.barrier()
    second = Trainer(_cfg(save_b, "train_iters=4", "tensor_model_parallel_size=2"))
    assert second.step == 2, second.step
    rest = _losses(second.train())
    torch.testing.assert_close(torch.tensor(_losses(first) + rest), torch.tensor(full), rtol=0, atol=1e-6)
    # Another layout: adapters and their Adam state are stored unsharded, so PP=2 continues the
    # same run (float summation order differs across layouts only).
    other = Trainer(_cfg(save_c, "train_iters=4", "pipeline_model_parallel_size=2"))
    assert other.step == 2, other.step
    torch.testing.assert_close(torch.tensor(_losses(other.train())), torch.tensor(full[2:]), rtol=0, atol=1e-3)


def case_evaluate_tool_reads_lora_checkpoint():
    """mcore_align.evaluate on an adapters-only checkpoint: base (model.load) + adapters, at a
    layout other than the training one; the trained policy prefers its training pairs."""
    from mcore_align.evaluate import evaluate

    common = ["pipeline_model_parallel_size=2", "max_length=320", "truncation_strategy=right",
              "max_tokens_per_micro_batch=1280", "global_batch_size=8", "device=cpu",
              f"data.cache_dir={WORK / 'cache'}", "rpo_alpha=null"]
    base = evaluate(CKPT, CKPT, [DATA], common)
    assert abs(base["rewards/margins"]) < 1e-5, base
    trained = evaluate(str(WORK / "tp2"), CKPT, [DATA], common)
    assert trained["rewards/accuracies"] > 0.7 and trained["rewards/margins"] > 0.1, trained
    # The loaded adapters are frozen and in eval mode (no LoRA dropout while evaluating).
    from mcore_align.checkpoint import read_model_spec
    from mcore_align.checkpoint.lora_export import load_lora_model
    from mcore_align.models.lora import LoRA
    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.parallel.runtime import ParallelConfig, initialize

    rt = initialize(ParallelConfig(tensor_model_parallel_size=2), device="cpu")
    chunks = build_model(read_model_spec(CKPT), rt, role="reference", opts=ModelOptions(core_attention="megatron"))
    load_lora_model(chunks, WORK / "tp2")
    loras = [m for c in chunks for m in c.modules() if isinstance(m, LoRA)]
    assert loras and not any(m.training for c in chunks for m in c.modules())
    assert not any(p.requires_grad for c in chunks for p in c.parameters())
