"""Reward scores for a dataset of conversations, from a reward model checkpoint.

    # Megatron checkpoint (an RM run's save dir or iteration), any TP/PP layout:
    torchrun --nproc-per-node 2 -m mcore_align.score --ckpt runs/rm --dataset convs.jsonl \\
        --out scores.jsonl --tp 2
    # the exported HF model (AutoModelForSequenceClassification, or backbone + value_head.safetensors):
    python -m mcore_align.score --hf /models/my-rm --dataset convs.jsonl --out scores.jsonl

Records are read and tokenised by the training data pipeline (any format it reads:
`messages`, sharegpt, alpaca, TRL...), so a conversation gets exactly the tokens it
had in training. The score of a sequence is the value head at its LAST token (the
final assistant turn's end-of-turn token), as in training. Paired records (with a
rejected response) are scored on both responses and the accuracy is printed.

Vision-language reward models (e.g. LLaVA): image records are expanded with the
checkpoint's processor exactly as in training (images relative to the dataset file, bytes
in parquet/arrow, ms-swift ``rejected_images``), and each sequence is scored with its own
images (the Megatron model merges the features on the first pipeline stage; the exported
HF backbone gets ``pixel_values``).

Output: one JSON line per kept record, ``{"index": i, "score": s}`` or
``{"index": i, "chosen": s_c, "rejected": s_r}``, where ``index`` is the record's
position among the records the pipeline kept (records over ``--max-length`` are
dropped and counted, as in training).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def tokenized_records(tokenizer, dataset: list[str], *, paired: bool, max_length: int,
                      cache_dir: str | None = None, vision=None, with_images: bool = False):
    """Token ids of each kept record: [chosen] or [chosen, rejected] (1-D int64 arrays).

    ``vision``: a vision model's ``images.VisionProcessor`` (image placeholders expanded as in
    training). ``with_images``: also return, per record and sequence, its image paths."""
    from mcore_align.data.config import DataConfig
    from mcore_align.data.store import load_or_build_store

    kw = {"cache_dir": cache_dir} if cache_dir else {}
    cfg = DataConfig(dataset=list(dataset), max_length=max_length, **kw)
    vkw = {"vision": vision, "model_kind": "vision"} if vision is not None else {}
    store = load_or_build_store(cfg, tokenizer, "paired" if paired else "sft", **vkw)
    seqs = store.rec_seq[: store.num_records, : 2 if paired else 1]
    records = [[store.seq(int(s))[0].astype(np.int64) for s in row] for row in seqs]
    if not with_images:
        return records
    return records, [[store.seq_images(int(s)) for s in row] for row in seqs]


def _vision_processor(model_dir: str | Path):
    """The processor of a vision-language model directory (HF export, or a checkpoint's
    ``tokenizer/`` folder), else None."""
    from mcore_align.models.vision import vision_processor

    cfg = Path(model_dir) / "config.json"
    spec = Path(model_dir).parent / "model_spec.json"
    if cfg.is_file() and "vision_config" in json.loads(cfg.read_text()):
        # the family's processor (Qwen-VL: the stand-in; AutoProcessor needs torchvision there)
        return vision_processor(model_dir)
    vision = json.loads(spec.read_text()).get("model_spec", {}).get("vision") if spec.is_file() else None
    return vision_processor(model_dir, vision["family"]) if vision else None


def _micro_batches(records: list[list[np.ndarray]], pad_multiple: int, pad_id: int, per_mb: int,
                   images: list | None = None, image_encoder=None):
    """Packed micro-batches of `per_mb` records (the data pipeline's collation), in order.
    ``images`` (per record and sequence, image paths) with ``image_encoder``: each
    micro-batch carries its images (``MicroBatch.images``), as in training."""
    from mcore_align.data.batch import ROLE_UNPAIRED, collate

    class _Store:  # collate() reads sequences through store.seq()
        def __init__(self, flat):
            self.flat = flat

        def seq(self, i):
            t = self.flat[i]
            return t, np.zeros_like(t, dtype=np.uint8)

    flat = [t for rec in records for t in rec]
    flat_images = [p for rec in images for p in rec] if images is not None else None
    store = _Store(flat)
    from mcore_align.data.batch import SeqRef, micro_batch_images

    out, i = [], 0
    max_len = max(len(t) for t in flat)
    per_rec = len(records[0])
    while i < len(flat):
        n = min(per_mb * per_rec, len(flat) - i)
        refs = [SeqRef(k, ROLE_UNPAIRED, k, False, len(flat[k])) for k in range(i, i + n)]
        out.append(collate(store, refs, True, pad_multiple, pad_id, max_len))
        if image_encoder is not None:
            out[-1].images = micro_batch_images([flat_images[k] for k in range(i, i + n)], image_encoder)
        i += n
    return out


def score_megatron(ckpt: str | Path, dataset: list[str], runtime, *, paired: bool, max_length: int = 2048,
                   cache_dir: str | None = None, per_mb: int = 8) -> list[list[float]]:
    """Scores with the Megatron RM at `runtime`'s layout; every rank gets them. Collective."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoTokenizer

    from mcore_align.checkpoint import load_model_weights, read_model_spec, resolve_checkpoint_dir
    from mcore_align.data.batch import required_pad_multiple
    from mcore_align.data.tokenization import padding_id
    from mcore_align.models.heads import sequence_rewards
    from mcore_align.models.provider import ModelOptions, build_model

    path = resolve_checkpoint_dir(ckpt)
    spec = read_model_spec(path)
    tok = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    vision = _vision_processor(path / "tokenizer") if spec.vision is not None else None
    records, images = tokenized_records(tok, dataset, paired=paired, max_length=max_length, cache_dir=cache_dir,
                                        vision=vision, with_images=True)
    chunks = build_model(spec, runtime, role="reference", opts=ModelOptions(head="value"))
    load_model_weights(chunks, path)  # strict: an RM checkpoint must hold value_head.weight
    par = runtime.parallel
    if par.context_parallel_size > 1:
        raise ValueError("scoring runs without context parallelism (set CP=1)")
    from mcore_align.data.images import ImageEncoder
    from mcore_align.models.vision import multimodal_forward

    mbs = _micro_batches(records, required_pad_multiple(par.tensor_model_parallel_size, 1, par.sequence_parallel),
                         padding_id(tok), per_mb, images, ImageEncoder(vision) if vision is not None else None)

    def step(data_iterator, model):
        mb = next(data_iterator)
        # (text models: the plain forward; vision models: features merged on the first stage)
        out = multimodal_forward(model, mb.tokens.to(runtime.device), mb.position_ids.to(runtime.device), None,
                                 image_inputs={k: v.to(runtime.device) for k, v in mb.images.items()},
                                 packed_seq_params=mb.packed_seq_params())

        def loss_fn(values_BS1):
            r = sequence_rewards(values_BS1, mb.position_ids, mb.seq_lengths, mb.cu_seqlens.to(values_BS1.device))
            return values_BS1.new_zeros(()), torch.tensor(1, dtype=torch.int), {"r": r.detach().cpu()}

        return out, loss_fn

    vpp = len(chunks)
    with torch.no_grad():
        outs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=[iter(mbs) for _ in chunks] if vpp > 1 else iter(mbs),
            model=chunks if vpp > 1 else chunks[0], num_microbatches=len(mbs),
            seq_length=max(int(m.tokens.shape[-1]) for m in mbs), micro_batch_size=1, forward_only=True)
    local = torch.cat([o["r"] for o in outs]).double().tolist() if outs else None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    flat = next(g for g in gathered if g is not None)  # the last PP stage's ranks hold them
    k = 2 if paired else 1
    return [flat[i:i + k] for i in range(0, len(flat), k)]


def _mrope_inputs(model, ids_1S: torch.Tensor, image_inputs: dict) -> dict:
    """Qwen-VL (``image_grid_thw``): add ``mm_token_type_ids`` ``[1, S]`` (1 at image tokens), from
    which transformers builds the M-RoPE positions; without it Qwen2-VL raises and Qwen2.5-VL
    silently falls back to 1-D positions (other scores than the Megatron model's)."""
    if "image_grid_thw" not in image_inputs or "mm_token_type_ids" in image_inputs:
        return image_inputs
    return {**image_inputs, "mm_token_type_ids": (ids_1S == model.config.image_token_id).int()}


def load_hf_reward_model(hf_dir: str | Path, dtype=torch.float32):
    """``score(input_ids_1S) -> float`` from an exported RM directory: the
    AutoModelForSequenceClassification when config.json says so, else the backbone
    (AutoModel) plus ``value_head.safetensors`` applied to the last hidden state."""
    from transformers import AutoConfig

    from mcore_align.models.heads import VALUE_HEAD_FILE, VALUE_HEAD_KEY

    hf_dir = Path(hf_dir)
    arch = (AutoConfig.from_pretrained(hf_dir).architectures or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(hf_dir, dtype=dtype).eval()

        def score(ids_1S, **image_inputs):  # HF pools the last non-pad token; ours end in a non-pad token
            return float(model(ids_1S, **_mrope_inputs(model, ids_1S, image_inputs)).logits[0, 0])

        return score
    from safetensors.torch import load_file
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(hf_dir, dtype=dtype).eval()
    head_1H = load_file(hf_dir / VALUE_HEAD_FILE)[VALUE_HEAD_KEY].to(dtype)

    def score(ids_1S, **image_inputs):  # vision backbones (LlavaModel) also take pixel_values
        h_1SH = backbone(ids_1S, **_mrope_inputs(backbone, ids_1S, image_inputs)).last_hidden_state
        return float(h_1SH[0, -1].float() @ head_1H[0].float())

    return score


def score_hf(hf_dir: str | Path, dataset: list[str], *, paired: bool, max_length: int = 2048,
             cache_dir: str | None = None) -> list[list[float]]:
    """Scores with an exported HF reward model, one unpadded sequence at a time (with its
    images' ``pixel_values`` for a vision-language model)."""
    from transformers import AutoTokenizer

    from mcore_align.data.images import ImageEncoder

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    vision = _vision_processor(hf_dir)
    records, images = tokenized_records(tok, dataset, paired=paired, max_length=max_length, cache_dir=cache_dir,
                                        vision=vision, with_images=True)
    enc = ImageEncoder(vision) if vision is not None else None
    score = load_hf_reward_model(hf_dir)
    with torch.no_grad():
        return [[score(torch.from_numpy(t)[None], **(enc.sequence_inputs(p) if enc and p else {}))
                 for t, p in zip(rec, paths)] for rec, paths in zip(records, images)]


def write_scores(scores: list[list[float]], out: str | Path | None) -> dict:
    lines = [{"index": i, **({"chosen": s[0], "rejected": s[1]} if len(s) == 2 else {"score": s[0]})}
             for i, s in enumerate(scores)]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    if out:
        Path(out).write_text(text)
    summary = {"records": len(scores)}
    if scores and len(scores[0]) == 2:
        summary["accuracy"] = float(np.mean([s[0] > s[1] for s in scores]))
        summary["margin"] = float(np.mean([s[0] - s[1] for s in scores]))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="Megatron RM checkpoint or save dir (run under torchrun)")
    src.add_argument("--hf", help="exported HF reward model directory")
    p.add_argument("--dataset", required=True, nargs="+")
    p.add_argument("--out", default=None, help="scores jsonl (default: print a summary only)")
    p.add_argument("--pairs", action="store_true", help="records are preference pairs: score both responses")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    if a.hf:
        print(json.dumps(write_scores(score_hf(a.hf, a.dataset, paired=a.pairs, max_length=a.max_length), a.out)))
        return 0
    from mcore_align.parallel.runtime import ParallelConfig, destroy, initialize

    rt = initialize(ParallelConfig(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp),
                    device=a.device)
    scores = score_megatron(a.ckpt, a.dataset, rt, paired=a.pairs, max_length=a.max_length)
    if rt.rank == 0:
        print(json.dumps(write_scores(scores, a.out)))
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
