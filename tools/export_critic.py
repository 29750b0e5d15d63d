#!/usr/bin/env python
"""PPO's critic (the value model trained beside the policy) -> a reward-style checkpoint.

    python tools/export_critic.py --ckpt runs/ppo --out /ckpt/ppo-critic
    python tools/convert_mcore_to_hf.py --ckpt /ckpt/ppo-critic --out /models/ppo-critic   # + value_head.safetensors

``--ckpt`` is a PPO training checkpoint or save directory (its latest iteration). The output
is a Megatron-Core checkpoint of the value model (backbone + ``value_head.weight``, with
``model_spec.json`` and ``tokenizer/``), like one written by ``rlhf_type=rm``: it can be
exported to HF, scored with ``mcore_align.score``, or used as a ``reward_model`` /
``value_model``. Runs in one process (dist_checkpointing reads any saved layout); the output
loads at any layout.
"""
import argparse
import sys


def main(argv=None) -> int:
    from mcore_align.parallel.quiet import quiet_library_warnings

    quiet_library_warnings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="PPO checkpoint dir or training save dir")
    p.add_argument("--out", required=True, help="output checkpoint directory (must be empty or absent)")
    p.add_argument("--name", default="critic", help="the companion model's name in the checkpoint")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)

    from megatron.core import dist_checkpointing

    from mcore_align.checkpoint import load_model_weights, read_model_spec, resolve_checkpoint_dir
    from mcore_align.checkpoint.layout import (CheckpointError, atomic_output_dir, copy_tokenizer,
                                               init_single_process, read_checkpoint_dtype, tokenizer_dir,
                                               write_model_spec)
    from mcore_align.models.provider import ModelOptions, build_model
    from mcore_align.parallel import destroy

    rt = init_single_process()
    path = resolve_checkpoint_dir(a.ckpt)
    common = dist_checkpointing.load_common_state_dict(str(path))
    if f"{a.name}_scheduler" not in common:
        raise CheckpointError(f"{path} holds no {a.name} model (not a PPO checkpoint?)")
    spec = read_model_spec(path)
    chunks = build_model(spec, rt, role="reference", opts=ModelOptions(head="value", core_attention="megatron"))
    load_model_weights(chunks, path, prefix=f"{a.name}.")
    (model,) = chunks
    with atomic_output_dir(a.out, a.overwrite) as tmp:  # nothing half-written at --out
        dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
        write_model_spec(tmp, spec, read_checkpoint_dtype(path))
        copy_tokenizer(tokenizer_dir(path), tmp)
    print(f"wrote {a.out}")
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
