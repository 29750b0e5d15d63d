"""Preference metrics of a trained policy against a reference on a dataset.

    torchrun --nproc-per-node 2 -m mcore_align.evaluate --policy runs/dpo --reference ckpt/base \\
        --dataset prefs.jsonl [--rlhf-type dpo] [key=value ...]

Runs one pass (whole global batches) over the dataset with the objective's metrics
(``rewards/accuracies``, ``rewards/margins``, ``logps/*``, the loss) and prints them
as JSON on rank 0, so runs can be compared. Any TP/PP/DP layout works. A LoRA policy
checkpoint (adapters only) is evaluated as its base (the run's ``model.load``) + adapters.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from mcore_align.parallel.quiet import quiet_library_warnings


def evaluate(policy: str, reference: str, dataset: list[str], overrides: list[str], rlhf_type: str = "dpo") -> dict:
    from transformers import AutoTokenizer

    from mcore_align.algorithms import build_objective
    from mcore_align.checkpoint import load_model_weights, read_model_spec, resolve_checkpoint_dir
    from mcore_align.checkpoint.lora_export import is_lora_checkpoint, load_lora_model
    from mcore_align.config import build_config, check_layout
    from mcore_align.data.batch import layout_multiples
    from mcore_align.data.loader import build_data
    from mcore_align.models.provider import build_model
    from mcore_align.parallel.runtime import initialize
    from mcore_align.trainer.reference import FrozenModel
    from mcore_align.trainer.setup import model_options
    from mcore_align.trainer.step import Stepper, add_metric_sums, finalize_metrics, pooled_counts

    cfg = build_config({"model": {"load": reference}, "data": {"dataset": dataset}, "algo": {"rlhf_type": rlhf_type}},
                       overrides)
    rt = initialize(cfg.parallel, device=cfg.train.device, seed=cfg.train.seed)
    ref_dir = resolve_checkpoint_dir(reference)
    spec = read_model_spec(ref_dir)
    check_layout(cfg, spec, rank=rt.rank)
    tokenizer = AutoTokenizer.from_pretrained(str(ref_dir / "tokenizer"))
    objective = build_objective(cfg.algo.rlhf_type, **cfg.algo.params)
    data = build_data(cfg.data, tokenizer, objective.data_kind, dp_rank=rt.dp_rank, dp_size=rt.dp_size,
                      global_batch_size=cfg.train.global_batch_size, **layout_multiples(cfg.parallel))
    opts = model_options(cfg, objective.head)
    lora = is_lora_checkpoint(policy)
    # frozen: evaluation only; adapters wrap the local spec's linears
    pol = build_model(spec, rt, role="reference", opts=dataclasses.replace(opts, lora=lora))
    if lora:  # adapters only: base (the run's model.load) + adapters
        load_lora_model(pol, policy)
    else:
        load_model_weights(pol, policy)
    ref = None
    if objective.needs_reference:
        ref = FrozenModel(build_model(spec, rt, role="reference", opts=opts))
        load_model_weights(ref.chunks, reference)
    stepper = Stepper(rt, objective, pol, ref)
    # The whole set is one global batch: the loss normalised by its counts, metrics pooled.
    batches = [next(data.train) for _ in range(data.train.batches_per_epoch)]
    counts = pooled_counts(batches)
    sums: dict[str, tuple[float, float]] = {}
    for gb in batches:
        add_metric_sums(sums, stepper.eval_sums(gb, counts=counts))
    return {"batches": len(batches), **finalize_metrics(sums)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="checkpoint (or save dir) of the trained policy")
    p.add_argument("--reference", required=True, help="checkpoint of the reference (e.g. the converted base)")
    p.add_argument("--dataset", required=True, nargs="+")
    p.add_argument("--rlhf-type", default="dpo")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. tensor_model_parallel_size=2 beta=0.1")
    a = p.parse_args(argv)
    quiet_library_warnings()
    logging.basicConfig(level=logging.WARNING)
    import torch.distributed as dist

    from mcore_align.parallel.runtime import destroy

    result = evaluate(a.policy, a.reference, a.dataset, a.overrides, a.rlhf_type)
    if dist.get_rank() == 0:
        print(json.dumps(result, indent=1))
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
