"""Prove a converted checkpoint computes what the HF model computes, at any TP/PP layout.

:func:`megatron_logits` runs megatron's own schedule (forward only, one micro-batch)
so pipeline stages pass activations exactly as in training, then gathers the
vocab-parallel logits over the TP group on the last stage. :func:`compare_logits`
reports the numbers ``tools/verify_conversion.py`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F


def megatron_logits(chunks, tokens_BS: torch.Tensor, runtime) -> torch.Tensor | None:
    """Full-vocab logits ``[B, S, V]`` (fp32) on last-stage ranks; None elsewhere. Collective."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mcore_align.models.heads import lm_logits

    b, s = tokens_BS.shape
    position_ids_1S = torch.arange(s)[None]
    # One sequence per micro-batch, so stages overlap (the interleaved schedule needs
    # at least PP micro-batches).
    micro = [tokens_BS[i:i + 1] for i in range(b)]

    def forward_step(data_iterator, model):
        tokens_1S = next(data_iterator)
        # attention_mask=None: megatron's default causal mask (padding-free batch).
        out = model(tokens_1S, position_ids_1S, attention_mask=None)
        return out, lambda output, non_loss_data=True: lm_logits(model, output)  # fused head: hidden -> logits

    vpp = len(chunks)
    data = [iter(micro) for _ in range(vpp)] if vpp > 1 else iter(micro)
    with torch.no_grad():
        store = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=chunks if vpp > 1 else chunks[0],
            num_microbatches=b, seq_length=s, micro_batch_size=1, forward_only=True,
            collect_non_loss_data=True,
        )
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits_local = torch.cat(store, dim=0).float()  # [B, S, V/TP], micro-batches in order
    tp = runtime.pgs.tp
    parts = [torch.empty_like(logits_local) for _ in range(tp.size())]
    torch.distributed.all_gather(parts, logits_local.contiguous(), group=tp)
    return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class LogitComparison:
    max_abs_diff: float
    """max |logits_mcore - logits_hf| over batch, positions and vocab."""
    logit_scale: float
    """max |logits_hf|: the scale the tolerance is relative to."""
    mean_kl: float
    """mean over tokens of KL(p_hf || p_mcore) in nats."""

    @property
    def rel_diff(self) -> float:
        return self.max_abs_diff / max(self.logit_scale, 1e-12)

    def ok(self, tol: float) -> bool:
        return self.rel_diff <= tol

    def __str__(self) -> str:
        return (f"max|diff|={self.max_abs_diff:.3e} logit scale={self.logit_scale:.3e} "
                f"relative={self.rel_diff:.3e} mean KL(HF||mcore)={self.mean_kl:.3e}")


def compare_logits(hf_BSV: torch.Tensor, mcore_BSV: torch.Tensor) -> LogitComparison:
    assert hf_BSV.shape == mcore_BSV.shape, (hf_BSV.shape, mcore_BSV.shape)
    hf, mc = hf_BSV.double(), mcore_BSV.double()
    logp_hf, logp_mc = F.log_softmax(hf, -1), F.log_softmax(mc, -1)
    kl_BS = (logp_hf.exp() * (logp_hf - logp_mc)).sum(-1)
    return LogitComparison(
        max_abs_diff=(hf - mc).abs().max().item(),
        logit_scale=hf.abs().max().item(),
        mean_kl=kl_BS.mean().item(),
    )


def hf_logits(hf_dir: str | Path, tokens_BS: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).eval()
    with torch.no_grad():
        return model(tokens_BS).logits.float()


def verify_checkpoint(hf_dir: str | Path, ckpt_dir: str | Path, runtime, *, seq_len: int = 64, batch: int = 2,
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> LogitComparison:
    """Build the model at ``runtime``'s layout, load ``ckpt_dir``, compare with HF on one
    random batch. Collective; every rank gets the same result."""
    import torch.distributed as dist

    from mcore_align.checkpoint.layout import read_model_spec
    from mcore_align.checkpoint.loading import load_model_weights
    from mcore_align.models.provider import ModelOptions, build_model

    spec = read_model_spec(ckpt_dir)
    chunks = build_model(spec, runtime, role="reference",
                         opts=ModelOptions(params_dtype=dtype, core_attention="megatron"))
    load_model_weights(chunks, ckpt_dir)
    gen = torch.Generator().manual_seed(seed)  # same batch on every rank
    tokens = torch.randint(0, spec.vocab_size, (batch, seq_len), generator=gen)
    logits = megatron_logits(chunks, tokens, runtime)
    # One rank (the first holding full logits) runs HF and compares; all get the answer.
    holders = [None] * dist.get_world_size()
    dist.all_gather_object(holders, logits is not None)
    reporter = holders.index(True)
    result = [None]
    if dist.get_rank() == reporter:
        result[0] = compare_logits(hf_logits(hf_dir, tokens, dtype), logits)
    dist.broadcast_object_list(result, src=reporter)
    return result[0]
