#!/usr/bin/env python
"""Check that a megatron checkpoint computes the HF model's logits, at any TP/PP layout.

    python tools/verify_conversion.py --hf /models/tiny --ckpt /ckpt/tiny-mcore
    torchrun --nproc-per-node 2 tools/verify_conversion.py --hf ... --ckpt ... --tp 2
    torchrun --nproc-per-node 2 tools/verify_conversion.py --hf ... --ckpt ... --pp 2
    python tools/verify_conversion.py --hf /models/llava --ckpt /ckpt/llava --image cat.jpg   # vision-language

Prints max |logit diff|, the logit scale (max |HF logit|) and mean KL(HF || mcore);
exits 1 when max|diff| / scale exceeds --tol.
"""
import argparse
import sys


def main() -> int:
    from mcore_align.parallel.quiet import quiet_library_warnings

    quiet_library_warnings()
    from mcore_align.checkpoint.layout import DTYPES
    from mcore_align.checkpoint.verify import verify_checkpoint
    from mcore_align.parallel import ParallelConfig, destroy, initialize

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="the HF checkpoint the megatron one was converted from")
    p.add_argument("--ckpt", required=True, help="converted or training checkpoint (or save dir)")
    p.add_argument("--tol", type=float, default=1e-4, help="max |diff| / max |HF logit| allowed")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=None)
    p.add_argument("--sp", action="store_true", help="sequence parallelism (needed by MoE at TP > 1)")
    p.add_argument("--ep", type=int, default=1, help="expert model parallel size (MoE)")
    p.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (MoE; default: TP)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="compute dtype of both models")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--image", action="append", default=[],
                   help="vision-language checkpoints: an image to compare on (repeatable; required for them)")
    p.add_argument("--prompt", default=None, help="user turn for --image (default: one <image> per image + a question)")
    a = p.parse_args()
    from mcore_align.checkpoint.layout import read_model_spec

    if read_model_spec(a.ckpt).vision is not None and not a.image:
        p.error(f"{a.ckpt} is a vision-language checkpoint: pass --image PATH (a real image to compare on)")
    rt = initialize(ParallelConfig(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                   virtual_pipeline_model_parallel_size=a.vpp, sequence_parallel=a.sp,
                                   expert_model_parallel_size=a.ep, expert_tensor_parallel_size=a.etp),
                    device=a.device)
    if a.image:
        from mcore_align.checkpoint.verify_vision import verify_vision_checkpoint

        prompt = a.prompt or "<image>" * len(a.image) + "What is in the picture?"
        res = verify_vision_checkpoint(a.hf, a.ckpt, rt, a.image, prompt, dtype=DTYPES[a.dtype])
    else:
        res = verify_checkpoint(a.hf, a.ckpt, rt, seq_len=a.seq_len, batch=a.batch, dtype=DTYPES[a.dtype])
    ok = res.ok(a.tol)
    if rt.rank == 0:
        print(f"[tp={a.tp} pp={a.pp} vpp={a.vpp} ep={a.ep}] {res} -> {'OK' if ok else 'FAIL'} (tol {a.tol:g})")
    destroy()
    return 0 if ok else 1


if __name__ == "__main__":  # guard: dist_checkpointing spawns processes that re-import this file
    sys.exit(main())
