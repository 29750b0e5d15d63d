"""Output heads: the reward model's value head (hidden -> 1) on megatron's ``GPTModel``.

A reward model is the policy network with its vocabulary projection replaced by a
scalar head. We build the ordinary ``GPTModel(post_process=True)`` (so the decoder keeps
its final norm) and swap ``model.output_layer`` for a :class:`ValueHead`: GPTModel calls
``output_layer(hidden_SBH, weight=..., runtime_gather_output=...)`` and, without labels,
returns its output transposed to ``[B, S, 1]``. Nothing else in GPTModel's training path
touches ``output_layer``; the LM weight is never built on the RM, and word embeddings are
built untied (the LM head is gone, so there is nothing to tie).

Parallelism:
  * TP: the head's weight ``[1, H]`` is replicated on every TP rank, kept in fp32 and
    initialised from a fixed seed (identical everywhere). Without sequence parallelism
    every TP rank sees the full hidden states after the final norm and computes the same
    loss, so its gradients are already identical across TP (no reduction).
    With sequence parallelism each TP rank holds ``S/TP`` positions: the head is applied
    to the local positions and the values are all-gathered with a *split* backward
    (``tensor_parallel_output_grad=False``: the loss is replicated, each rank keeps the
    gradient of its own positions); the weight's gradient is then a partial sum, and the
    ``sequence_parallel`` attribute makes megatron's ``finalize_model_grads`` all-reduce
    it over TP, exactly as for the layernorm weights.
  * PP: only the last stage has ``output_layer``; the head lives there.
  * CP: per-sequence rewards are read with a segment sum (see :func:`sequence_rewards`),
    all-reduced over the CP group like the log-prob sums.

Checkpoint key: ``value_head.weight`` (a ShardedTensor replicated over TP and DP). The
state-dict *path* stays ``output_layer.weight`` (the module's name inside GPTModel).
Loading a checkpoint that may lack the head, and the HF exports of the head, live in
``checkpoint/heads.py`` (this module imports nothing from ``checkpoint/``).
"""
from __future__ import annotations

import torch
from torch import nn


HEADS = ("lm", "value")
VALUE_HEAD_KEY = "value_head.weight"
"""Key of the head in megatron checkpoints (and its tensor name in value_head.safetensors)."""
VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_SEED = 20240611
"""The head is initialised from this seed (the same weight on every rank and every layout)."""


class ValueHead(nn.Module):
    """``values_SB1 = hidden_SBH @ weight_1H^T`` in fp32 (no bias, like HF's ``score``)."""

    def __init__(self, hidden_size: int, *, init_std: float, sequence_parallel: bool, tp_group):
        super().__init__()
        gen = torch.Generator().manual_seed(VALUE_HEAD_SEED)
        weight = torch.randn(1, hidden_size, generator=gen, dtype=torch.float32) * init_std
        self.weight = nn.Parameter(weight)
        # finalize_model_grads sums grads over TP for params marked like this (SP only).
        self.weight.sequence_parallel = sequence_parallel
        self.sequence_parallel = sequence_parallel  # read by GPTModel's inference path
        self.tp_group = tp_group

    def forward(self, hidden_SBH: torch.Tensor, weight=None, runtime_gather_output=None):
        del weight, runtime_gather_output  # GPTModel's output-layer signature; nothing to tie or gather
        values_SB1 = torch.nn.functional.linear(hidden_SBH.float(), self.weight)
        if self.sequence_parallel:
            from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

            # [S/TP, B, 1] -> [S, B, 1]; backward keeps this rank's slice (loss is replicated over TP).
            values_SB1 = gather_from_sequence_parallel_region(
                values_SB1, tensor_parallel_output_grad=False, group=self.tp_group)
        return values_SB1, None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        from megatron.core.utils import make_sharded_tensor_for_checkpoint

        # Replicated: replica_id (0, tp_rank, dp_rank) from parallel_state; one copy is written.
        return {f"{prefix}weight": make_sharded_tensor_for_checkpoint(self.weight, VALUE_HEAD_KEY)}


def attach_value_head(model, runtime) -> None:
    """Replace the last stage's vocabulary projection by a :class:`ValueHead` (in place)."""
    if not model.post_process:
        return
    cfg = model.config
    model.output_layer = ValueHead(cfg.hidden_size, init_std=cfg.init_method_std,
                                   sequence_parallel=cfg.sequence_parallel, tp_group=runtime.pgs.tp)
    if not runtime.is_cpu:
        model.output_layer.cuda(torch.cuda.current_device())


def has_value_head(chunks) -> bool:
    return any(isinstance(getattr(c, "output_layer", None), ValueHead) for c in chunks)


def value_head_weight(chunks) -> torch.Tensor | None:
    """The head's weight ``[1, H]`` on the last stage, else None."""
    for c in chunks:
        head = getattr(c, "output_layer", None)
        if isinstance(head, ValueHead):
            return head.weight
    return None


def sequence_rewards(values_BS1: torch.Tensor, position_ids: torch.Tensor, seq_lengths: torch.Tensor,
                     cu_seqlens: torch.Tensor, cp_group=None) -> torch.Tensor:
    """Per-sequence reward ``[N]``: the value at each sequence's LAST real token.

    Sequence i occupies flat positions ``cu_seqlens[i]:cu_seqlens[i+1]`` and has
    ``seq_lengths[i]`` real tokens, so its last token is the one whose position id is
    ``seq_lengths[i] - 1``. Example (packed, pad_multiple 4, lengths 5 and 3)::

        cu_seqlens = [0, 8, 12]; position_ids = [0 1 2 3 4 5 6 7 | 0 1 2 3]
        last-token mask                      = [0 0 0 0 1 0 0 0 | 0 0 1 0]

    A masked segment sum picks that one value per sequence; it works unchanged on a
    context-parallel slice (pass this rank's position ids and LOCAL cu_seqlens; the rank
    holding the token supplies it and the sums are all-reduced over CP), and in the padded
    [B, S] layout (cu_seqlens = [0, S, 2S, ...]).
    """
    from mcore_align.ops.segments import allreduce_segment_sums, segment_of_token, segment_sums

    values_T = values_BS1.reshape(-1)
    pos_T = position_ids.reshape(-1)
    seg_T = segment_of_token(cu_seqlens, values_T.shape[0])
    last_T = pos_T == (seq_lengths.to(pos_T.device)[seg_T] - 1)
    rewards_N, found_N = segment_sums(values_T, last_T, cu_seqlens)
    rewards_N, found_N = allreduce_segment_sums(rewards_N, found_N, cp_group)
    assert bool((found_N == 1).all()), f"expected one last token per sequence, found {found_N.tolist()}"
    return rewards_N


# -- the LM head without logits: hidden states out, log-probs fused in the loss ----------------
def _emit_hidden_forward(self, hidden_SBH: torch.Tensor, weight=None, runtime_gather_output=None):
    """``ColumnParallelLinear.forward`` replacement: return the final hidden states.

    GPTModel calls ``output_layer(hidden_SBH, weight=shared_embedding_or_None, ...)`` and
    returns the result transposed to ``[B, S(/TP with SP), H]``; the loss then runs
    :func:`lm_logprobs`, so the ``[tokens, V/TP]`` logits exist one chunk at a time, never whole.
    """
    del weight, runtime_gather_output  # the weight is read by lm_output_weight in the loss
    return hidden_SBH, None


def emit_hidden_states(model) -> None:
    """Make the last stage's LM output layer return hidden states (in place).

    Only the instance's ``forward`` changes: the module, its weight and its checkpoint key
    (``output_layer.weight``) stay, so checkpoints and export are unaffected.
    """
    if not model.post_process:
        return
    layer = model.output_layer
    layer.forward = _emit_hidden_forward.__get__(layer)
    layer.emits_hidden_states = True


def emits_hidden_states(model) -> bool:
    """True when ``model``'s (DDP-unwrapped) output is hidden states, not logits."""
    from megatron.core.utils import unwrap_model

    return getattr(getattr(unwrap_model(model), "output_layer", None), "emits_hidden_states", False)


def lm_output_weight(model) -> torch.Tensor:
    """The vocabulary projection ``[V/TP, H]`` of the last stage: the tied embedding copy or
    the output layer's own weight (the one GPTModel would use)."""
    from megatron.core.utils import unwrap_model

    m = unwrap_model(model)
    return m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else m.output_layer.weight


def lm_logprobs(model, hidden_BSH: torch.Tensor, labels_BS: torch.Tensor, return_entropy: bool = False):
    """Fused head: target log-probs ``[B, S]`` from the hidden states ``model`` returned, with
    the output layer's own weight, TP group and sequence-parallel setting; with
    ``return_entropy`` also the (detached) entropy ``[B, S]`` of each position's distribution."""
    from megatron.core.utils import unwrap_model

    from mcore_align.ops.logprobs import fused_linear_logprobs

    layer = unwrap_model(model).output_layer
    out = fused_linear_logprobs(hidden_BSH.transpose(0, 1), lm_output_weight(model), labels_BS.t(),
                                layer.tp_group, sequence_parallel=layer.sequence_parallel,
                                return_entropy=return_entropy)
    if return_entropy:
        return out[0].t(), out[1].t()
    return out.t()


def lm_logits(model, output_BSX: torch.Tensor) -> torch.Tensor:
    """Vocab-parallel logits ``[B, S, V/TP]`` from what ``model`` returned: its logits, or (fused
    head) its hidden states ``[B, S(/TP with SP), H]`` times the output weight. For tools and
    tests that need whole logits; training never builds them."""
    if not emits_hidden_states(model):
        return output_BSX
    from megatron.core.utils import unwrap_model

    from mcore_align.ops.collectives import all_gather_dim0

    layer = unwrap_model(model).output_layer
    hidden_SBH = output_BSX.transpose(0, 1)
    if layer.sequence_parallel:  # [S/TP, B, H] -> [S, B, H]
        hidden_SBH = all_gather_dim0(hidden_SBH, layer.tp_group)
    return (hidden_SBH @ lm_output_weight(model).t()).transpose(0, 1)
