"""Preference training on images through the Trainer (2 gloo ranks, one launch).

The task (built by tests/e2e/test_vision_train_e2e.py): each record shows one solid-colour
32x32 image (jittered shade, its own file) and asks for its colour; the chosen answer names
the image's colour, the rejected one another colour. Every colour is chosen as often as it
is rejected, so the text alone cannot tell them apart: the policy has to read the image.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.config import build_config
from mcore_align.data.batch import ROLE_CHOSEN
from mcore_align.trainer.trainer import Trainer

CKPT = os.environ.get("MA_TEST_CKPT", "")
WORK = Path(os.environ.get("MA_TEST_WORK", "/tmp/ma_vision_train"))
DATA = os.environ.get("MA_TEST_DATA", "")
NEXT_CKPT = os.environ.get("MA_TEST_NEXT_CKPT", "")
NEXT_DATA = os.environ.get("MA_TEST_NEXT_DATA", "")
INTERNVL_CKPT = os.environ.get("MA_TEST_INTERNVL_CKPT", "")


def _cfg(algo: str, save: str | None, *overrides: str):
    raw = {
        "model": {"load": CKPT},
        "data": {"dataset": [DATA], "max_length": 96, "max_tokens_per_micro_batch": 384, "val_fraction": 0.25,
                 "cache_dir": str(WORK / "cache")},
        "optim": {"learning_rate": 1e-2, "lr_decay_style": "constant", "clip_grad": 1.0},
        "train": {"global_batch_size": 8, "train_iters": 14, "device": "cpu", "progress_bar": False,
                  "save": save, "plot": False, "seed": 7, "eval_iters": 3},
        "algo": {"rlhf_type": algo},
    }
    return build_config(raw, overrides)


def _save_dir(name: str) -> str:
    path = WORK / name
    if dist.get_rank() == 0 and path.exists():
        import shutil

        shutil.rmtree(path)
    dist.barrier()
    return str(path)


def _train(name: str, algo: str, *overrides: str, before=None) -> tuple[Trainer, dict]:
    tr = Trainer(_cfg(algo, _save_dir(name), *overrides))
    if before is not None:
        before(tr, name)
    assert tr.data.train.image_encoder is not None, "the loader did not find the vision checkpoint"
    first = tr.evaluate()
    res = tr.train()
    last = res["eval"]
    a0, a1 = first["rewards/accuracies"], last["rewards/accuracies"]
    if dist.get_rank() == 0:
        (WORK / f"{name}_history.json").write_text(json.dumps({"history": res["history"], "eval0": first,
                                                               "eval": last}))
    assert a1 > 0.9 and a1 > a0 + 0.2, f"{name}: held-out reward accuracy {a0:.3f} -> {a1:.3f}"
    return tr, res


LORA_DPO = ("train_type=lora", "lora_rank=8", "lora_alpha=16", "lora_dropout=0.0", "lora_target_modules=DEFAULT",
            "beta=0.1", "rpo_alpha=null")


def case_dpo_lora_tp2_learns_image_task():
    _train("dpo_lora_tp2", "dpo", "tensor_model_parallel_size=2", *LORA_DPO)


def case_dpo_lora_cp2_matches_tp2():
    """Context parallelism with images (the merge runs on the whole row, then this rank's
    tokens are picked): the same global batches give the TP=2 run's losses and metrics."""
    tr = Trainer(_cfg("dpo", None, "context_parallel_size=2", "train_iters=4", *LORA_DPO))
    h = tr.train()["history"]
    ref = json.loads((WORK / "dpo_lora_tp2_history.json").read_text())["history"][:4]
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        torch.testing.assert_close(torch.tensor([x[key] for x in h], dtype=torch.float64),
                                   torch.tensor([x[key] for x in ref], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def case_dpo_lora_pp2_learns_image_task():
    _train("dpo_lora_pp2", "dpo", "pipeline_model_parallel_size=2", *LORA_DPO)


NEXT = (f"load={NEXT_CKPT}", f"dataset=[{NEXT_DATA}]", f"cache_dir={WORK / 'cache_next'}", "max_length=160",
        "max_tokens_per_micro_batch=640")


def case_llava_next_dpo_lora_tp2_learns_image_task():
    """LLaVA-NeXT: the same task with images of three sizes (anyres: 3 or 5 tiles, 36 to 88
    image tokens), so micro-batches mix token and tile counts."""
    _train("next_dpo_lora_tp2", "dpo", "tensor_model_parallel_size=2", *NEXT, *LORA_DPO)


def case_internvl_dpo_lora_tp2_learns_image_task():
    """InternVL through the trainer: the cache expands with the processor stand-in (images of
    three sizes: 1, 3 or 5 tiles of 4 tokens between <img> and </img>)."""
    _train("internvl_dpo_lora_tp2", "dpo", "tensor_model_parallel_size=2", f"load={INTERNVL_CKPT}",
           f"dataset=[{NEXT_DATA}]", f"cache_dir={WORK / 'cache_internvl'}", *LORA_DPO)


def _image_inputs(images: dict, idx: list[int]) -> dict:
    """The HF model's image inputs for images ``idx`` of a micro-batch: ``pixel_values`` rows
    (LLaVA: ``[k, 3, H, W]``; LLaVA-NeXT: ``[k, tiles, 3, H, W]`` + ``image_sizes``; Qwen-VL: the
    images' patches ``[sum t*h*w, D]`` + ``image_grid_thw`` ``[k, 3]``)."""
    if "image_grid_thw" in images:  # patches of all images on dim 0: slice each image's rows
        grid = images["image_grid_thw"]
        ends = grid.prod(-1).cumsum(0).tolist()
        rows = [images["pixel_values"][(ends[i - 1] if i else 0):ends[i]] for i in idx]
        return {"pixel_values": torch.cat(rows).clone(), "image_grid_thw": grid[idx].clone()}
    return {k: images[k][idx].clone() for k in ("pixel_values", "image_sizes") if k in images}


def _sequences(mb, image_token_id: int) -> list[dict]:
    """Each sequence of a packed micro-batch: its tokens and the HF image inputs of its images
    (one image per run of image tokens, in ``image_index`` order)."""
    idx, run, out = mb.images["image_index"].tolist(), 0, []
    for i in range(mb.num_sequences):
        a, n = int(mb.cu_seqlens[i]), int(mb.seq_lengths[i])
        tok = mb.tokens.reshape(-1)[a:a + n]
        is_img = (tok == image_token_id).int()
        k = int(is_img[0]) + int((is_img[1:] - is_img[:-1] == 1).sum())  # runs of image tokens
        inputs = _image_inputs(mb.images, idx[run:run + k])
        out.append({"tokens": tok.clone(), **inputs, "image_inputs": inputs,
                    "role": int(mb.seq_role[i]), "pair": int(mb.pair_index[i]),
                    "loss_mask": mb.loss_mask.reshape(-1)[a:a + n].clone()})
        run += k
    return out


def _dump_first_batch(tr: Trainer, name: str) -> None:
    """The sequences of the first training batch and the freshly initialised value head, for
    the step-1 loss check against transformers in float64 (TP=2: DP=1, every micro-batch here)."""
    from mcore_align.models.heads import value_head_weight
    from mcore_align.models.vision import unwrap

    state = tr.data.train.state_dict()
    gb = next(tr.data.train)
    tr.data.train.load_state_dict(state)  # training starts from this same batch
    rows = [r for mb in gb.micro_batches for r in _sequences(mb, tr.spec.vision.image_token_id)]
    head = value_head_weight([unwrap(m) for m in tr.policy])
    if dist.get_rank() == 0:
        torch.save({"rows": rows, "head": head.detach().clone(), "num_pairs": gb.num_pairs},
                   WORK / f"{name}_first_batch.pt")


def _dump_scores(tr: Trainer, name: str) -> None:
    """Held-out sequences (tokens, pixels) and the Megatron RM's score of each, for the export check."""
    rows = []
    for bi, gb in enumerate(tr.data.eval):
        batches = tr.stepper.to_device(gb.micro_batches)
        scores = tr.stepper.forward_only_values(tr.policy, batches, last_token=True)
        if scores is None:  # not the last pipeline stage (which still needs this stage's forward)
            continue
        for mb, s in zip(gb.micro_batches, scores):
            for i, r in enumerate(_sequences(mb, tr.spec.vision.image_token_id)):
                rows.append({**r, "score": float(s[i]), "chosen": r["role"] == ROLE_CHOSEN, "pair": (bi, r["pair"])})
    if rows and tr.rt.pgs.tp.rank() == 0 and tr.rt.dp_rank == 0:
        torch.save(rows, WORK / f"{name}_scores.pt")


# Full fine-tuning of the reward model: it has to compare the colour named in the answer with
# the image's, at the last token, which takes more (and gentler) steps than DPO's LoRA.
RM = ("learning_rate=3e-4", "train_iters=40")


def case_rm_tp2_learns_image_task():
    tr, _ = _train("rm_tp2", "rm", "tensor_model_parallel_size=2", *RM, before=_dump_first_batch)
    _dump_scores(tr, "rm_tp2")


def case_rm_pp2_learns_image_task():
    tr, _ = _train("rm_pp2", "rm", "pipeline_model_parallel_size=2", *RM)
    _dump_scores(tr, "rm_pp2")


def case_llava_next_rm_tp2_learns_image_task():
    """LLaVA-NeXT reward model (full fine-tuning, TP=2) on images of three sizes; held-out scores
    dumped for the export check (tests/e2e/test_vision_train_e2e.py)."""
    tr, _ = _train("llava_next_rm_tp2", "rm", "tensor_model_parallel_size=2", *NEXT, *RM, "train_iters=70")
    _dump_scores(tr, "llava_next_rm_tp2")


def case_trainable_projector_with_text_only_micro_batches():
    """freeze_aligner=false, DP=2, one pair per micro-batch, half the records without image: the
    projector trains (its weights move), the tower stays frozen, every step is finite. Text-only
    micro-batches give the projector a zero gradient (models/vision.py::multimodal_forward)."""
    from mcore_align.models.vision import unwrap

    mixed = WORK / "mixed.jsonl"
    if dist.get_rank() == 0:
        recs = [json.loads(x) for x in Path(DATA).read_text().splitlines()]
        base = Path(DATA).parent
        for i, r in enumerate(recs):
            if i % 2:  # text only
                r["query"], r["images"] = r["query"].replace("<image>", "") + " (no picture)", []
            else:
                r["images"] = [str(base / p) for p in r["images"]]
        mixed.write_text("".join(json.dumps(r) + "\n" for r in recs))
    dist.barrier()
    tr = Trainer(_cfg("dpo", None, f"dataset=[{mixed}]", "freeze_aligner=false", "max_tokens_per_micro_batch=192",
                      "train_iters=4", "beta=0.1", "rpo_alpha=null", "learning_rate=1e-3"))
    vision = unwrap(tr.policy[0]).vision
    gb = tr.data.train.make_global_batch(tr.data.train.record_ids[:8])
    n_text = torch.tensor([sum(not mb.images for mb in gb.micro_batches),
                           sum(bool(mb.images) for mb in gb.micro_batches)])
    dist.all_reduce(n_text)
    assert n_text[0] > 0 and n_text[1] > 0, n_text  # both kinds of micro-batch occur
    proj0 = [p.detach().clone() for p in vision.multi_modal_projector.parameters()]
    tower0 = [p.detach().clone() for p in vision.vision_tower.parameters()]
    assert all(p.requires_grad for p in vision.multi_modal_projector.parameters())
    assert not any(p.requires_grad for p in vision.vision_tower.parameters())
    res = tr.train()
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in res["history"])
    assert all(not h.get("skipped") for h in res["history"])
    assert any(not torch.equal(a, b) for a, b in zip(proj0, vision.multi_modal_projector.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(tower0, vision.vision_tower.parameters()))
    # DP ranks hold the same (replicated) projector after the reduced updates
    w = torch.cat([p.detach().reshape(-1) for p in vision.multi_modal_projector.parameters()])
    other = w.clone()
    dist.broadcast(other, src=0)
    torch.testing.assert_close(w, other, rtol=0, atol=0)


def case_vit_lr_param_group_scales_the_tower_update_and_follows_the_schedule():
    """freeze_vit=false with model.vit_lr (TP=2): megatron's optimizer puts the tower in param
    groups whose peak is vit_lr. One Adam step (its first: update = -lr_g * g / (|g| + eps), g the
    clipped gradient each parameter holds) moves every tower element by vit_lr's amount and every
    LM / projector element by learning_rate's; over a warmup + linear decay schedule every group's
    learning rate equals the independent formula scaled to its own peak and end value."""
    from mcore_align.models.vision import unwrap
    from mcore_align.trainer.setup import build_optimizer

    lr, vit_lr, eps = 1e-3, 2.5e-4, 1e-8
    cfg = _cfg("dpo", None, "tensor_model_parallel_size=2", "freeze_vit=false", "freeze_aligner=false",
               f"vit_lr={vit_lr}", f"learning_rate={lr}", "beta=0.1", "rpo_alpha=null", "train_iters=1")
    tr = Trainer(cfg)
    vision = unwrap(tr.policy[0]).vision
    tower = {id(p) for p in vision.vision_tower.parameters()}
    assert tower and all(p.requires_grad for p in vision.vision_tower.parameters())
    groups = [g for g in tr.optimizer.param_groups if g["params"]]
    for g in groups:
        assert {id(p) in tower for p in g["params"]} in ({True}, {False}), "a group mixes tower and LM parameters"
        assert g["max_lr"] == (vit_lr if id(g["params"][0]) in tower else lr)
    assert any(g["max_lr"] == vit_lr for g in groups) and any(g["max_lr"] == lr for g in groups)
    params = [p for m in tr.policy for p in m.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    res = tr.stepper.train_step(next(tr.data.train), tr.optimizer, tr.scheduler)
    assert not res.skipped
    moved = {"tower": 0, "lm": 0}
    for p, p0 in zip(params, before):
        g = p.main_grad.detach()  # the reduced, clipped gradient Adam used (zeroed only at the next step)
        peak = vit_lr if id(p) in tower else lr
        want = p0 - peak * g / (g.abs() + eps)
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=peak * 1e-4)
        moved["tower" if id(p) in tower else "lm"] += int((g.abs() > 1e-5).sum())
    assert moved["tower"] > 100 and moved["lm"] > 100, moved  # both sides really stepped
    # the schedule: warmup 2 steps from 0, then linear decay to min_lr over 10 steps, per group
    min_lr, T, W = 1e-4, 10, 2
    cfg2 = _cfg("dpo", None, "tensor_model_parallel_size=2", "freeze_vit=false", f"vit_lr={vit_lr}",
                f"learning_rate={lr}", f"min_lr={min_lr}", "warmup_ratio=0.2", "lr_decay_style=linear",
                f"train_iters={T}")
    opt, sched = build_optimizer(tr.policy, tr.rt, cfg2, T)
    for k in range(1, T + 1):
        sched.step(increment=1)
        for g in (g for g in opt.param_groups if g["params"]):
            scale = vit_lr / lr if id(g["params"][0]) in tower else 1.0
            peak, end = lr * scale, min_lr * scale
            want = peak * k / W if k <= W else end + (peak - end) * (1 - (k - W) / (T - W))
            assert abs(g["lr"] - want) <= 1e-12, (k, scale, g["lr"], want)


# ---- other objectives with images (each against an independent reference) --------------------
# Step-1 losses of SFT, CPO, ORPO and SimPO (full fine-tuning, TP=2) are compared with transformers'
# LLaVA in float64 on the same first batch (tests/e2e/test_vision_train_e2e.py).
OBJECTIVES_STEP1 = {"sft": (), "cpo": ("beta=0.1", "cpo_alpha=1.0"), "orpo": ("beta=0.1",),
                    "simpo": ("beta=2.0", "simpo_gamma=1.0", "cpo_alpha=0.5")}


def _first_step(name: str, algo: str, *overrides: str) -> None:
    tr = Trainer(_cfg(algo, None, "tensor_model_parallel_size=2", "train_iters=2", "learning_rate=1e-4", *overrides))
    assert tr.data.train.image_encoder is not None
    state = tr.data.train.state_dict()
    gb = next(tr.data.train)
    tr.data.train.load_state_dict(state)  # training starts from this same batch
    rows = [r for mb in gb.micro_batches for r in _sequences(mb, tr.spec.vision.image_token_id)]
    h = tr.train()["history"]
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) for x in h), h
    if dist.get_rank() == 0:
        torch.save({"rows": rows, "num_pairs": gb.num_pairs, "history": h}, WORK / f"{name}_step1.pt")


def case_sft_cpo_orpo_simpo_first_steps_on_images():
    for algo, extra in OBJECTIVES_STEP1.items():
        _first_step(f"{algo}_tp2", algo, *extra)


def _kto_dataset() -> str:
    """The colour task as unpaired KTO records: chosen answers desirable, rejected undesirable."""
    path = WORK / "kto.jsonl"
    if dist.get_rank() == 0:
        base, out = Path(DATA).parent, []
        for r in (json.loads(x) for x in Path(DATA).read_text().splitlines()):
            for resp, label in ((r["response"], True), (r["rejected_response"], False)):
                out.append({"messages": [{"role": "user", "content": r["query"]}, {"role": "assistant", "content": resp}],
                            "label": label, "images": [str(base / p) for p in r["images"]]})
        path.write_text("".join(json.dumps(r) + "\n" for r in out))
    dist.barrier()
    return str(path)


def case_kto_with_images_pp2_matches_tp2():
    """KTO on image records (each KL sequence takes its prompt's image): PP=2 gives the TP=2 run's
    losses, KL estimates and grad norms over 3 steps; step 1 (policy == reference) is exactly
    desirable/undesirable weight * (1 - sigmoid(0)) = 0.5."""
    ds = _kto_dataset()
    hist = {}
    for layout in ("tensor_model_parallel_size=2", "pipeline_model_parallel_size=2"):
        tr = Trainer(_cfg("kto", None, f"dataset=[{ds}]", layout, "train_iters=3", "learning_rate=1e-4", "beta=0.1"))
        hist[layout] = tr.train()["history"]
    tp, pp = hist.values()
    assert abs(tp[0]["loss"] - 0.5) < 1e-6, tp[0]
    for key in ("loss", "kl", "grad_norm"):
        torch.testing.assert_close(torch.tensor([x[key] for x in pp], dtype=torch.float64),
                                   torch.tensor([x[key] for x in tp], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert len({round(x["loss"], 6) for x in tp}) > 1  # it trains


def _matches_tp2(*overrides: str) -> None:
    tr = Trainer(_cfg("dpo", None, "train_iters=4", *LORA_DPO, *overrides))
    h = tr.train()["history"]
    ref = json.loads((WORK / "dpo_lora_tp2_history.json").read_text())["history"][:4]
    for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        torch.testing.assert_close(torch.tensor([x[key] for x in h], dtype=torch.float64),
                                   torch.tensor([x[key] for x in ref], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")


def case_dpo_lora_sequence_parallel_matches_tp2():
    """TP=2 with sequence parallelism (the SP split after the image merge): the TP=2 run's losses,
    margins, log-probs and grad norms over 4 steps."""
    _matches_tp2("tensor_model_parallel_size=2", "sequence_parallel=true")


def case_dpo_lora_padded_batches_match_packed_tp2():
    """Padded (non-packed) micro-batches of 4 pairs with images ([B, S] rows, images row-major):
    the packed TP=2 run's losses, margins, log-probs and grad norms over 4 steps."""
    _matches_tp2("tensor_model_parallel_size=2", "packing=false", "micro_batch_size=4")


def case_dpo_lora_on_the_vision_side():
    """train_type=lora with freeze_vit=false and freeze_aligner=false (TP=2): every nn.Linear of the
    tower and the projector gets a replicated adapter (ms-swift's LoRA on the ViT/aligner), their
    B factors train while the base stays frozen, the TP ranks keep identical vision adapters, and
    the Megatron policy's per-sequence log-prob sums of the first held-out batch are dumped for
    the check against the merged and PEFT exports in transformers."""
    from mcore_align.models.lora import LoRA
    from mcore_align.models.vision import unwrap

    name = "dpo_lora_vision"
    tr = Trainer(_cfg("dpo", _save_dir(name), "tensor_model_parallel_size=2", *LORA_DPO, "freeze_vit=false",
                      "freeze_aligner=false", "train_iters=3"))
    vision = unwrap(tr.policy[0]).vision
    linears = [m for m in vision.modules() if type(m) is torch.nn.Linear]
    assert linears and all(isinstance(getattr(m, "lora", None), LoRA) for m in linears)
    base0 = [p.detach().clone() for p in vision.parameters()]
    assert not any(p.requires_grad for n, p in vision.named_parameters() if ".lora." not in n)
    tr.train()
    B = torch.cat([m.lora.B.detach().reshape(-1) for m in linears])
    assert B.abs().max() > 0, "the vision adapters did not train"
    base1 = [p.detach() for p in vision.parameters()]
    # only adapter factors moved (the base vision weights are frozen)
    names = [n for n, _ in vision.named_parameters()]
    for n, a, b in zip(names, base0, base1):
        if ".lora." not in n:
            assert torch.equal(a, b), n
    other = B.clone()
    dist.broadcast(other, src=0)  # TP=2, DP=1: both ranks hold the (replicated) vision adapters
    torch.testing.assert_close(B, other, rtol=0, atol=0)
    gb = next(iter(tr.data.eval))
    sums = tr.stepper.forward_only_sums(tr.policy, tr.stepper.to_device(gb.micro_batches))
    rows = [r for mb in gb.micro_batches for r in _sequences(mb, tr.spec.vision.image_token_id)]
    if dist.get_rank() == 0:
        torch.save({"rows": rows, "sums": torch.cat([s.double().cpu() for s in sums])}, WORK / f"{name}_sums.pt")
