"""Core attention for packed (THD) sequences and context parallelism, without Transformer Engine.

megatron-core's local ``DotProductAttention`` asserts ``packed_seq_params is None`` and
``context_parallel_size == 1``; only TE's attention handles either. :class:`PackedCoreAttention`
is a drop-in ``core_attention`` for the local layer spec (same constructor and forward
signature) that handles both:

* padded ``[s, b]`` batches: causal attention, AND-ed with megatron's ``attention_mask``
  (``True`` = masked out) when one is given;
* packed ``[t, np, hn]`` (or ``[t, 1, np, hn]``) batches with ``PackedSeqParams``: a
  document-causal mask from ``cu_seqlens`` (block-diagonal causal; zero-length padding
  segments are fine). ``cu_seqlens_q_padded`` is used when set, exactly as megatron's
  rotary embedding does, so RoPE positions and the mask agree;
* context parallelism for packed batches (see :mod:`mcore_align.ops.context_parallel`):
  K/V are all-gathered over the CP group (backward: reduce-scatter) and this rank's queries
  attend with the document-causal mask in GLOBAL positions.

Why all-gather rather than ring attention: each rank holds the K/V of the whole packed
micro-batch for one layer at a time (``2 * T * ng/TP * hn`` elements, freed after the layer;
the attention scores stay ``(T/CP) x L`` per document). It is exact, easy to verify and
communicates once per layer; activations of everything else (MLP, norms, logits) still
shrink by CP. Ring attention (TE's "p2p") overlaps K/V passing with compute and never holds
the full K/V, so it is the choice for very long sequences on large CP groups. See
``docs/context_parallel.md``.

Backends, chosen once at one place (:func:`select_backend`, logged at the first build):

* ``"flex"``: ``torch.nn.attention.flex_attention`` (compiled) with a document-causal
  ``BlockMask`` on CUDA; fully-masked blocks are skipped. No dropout.
* ``"sdpa"``: ``torch.nn.functional.scaled_dot_product_attention`` per document (a loop
  over ``cu_seqlens``): the block-diagonal causal mask without ever materialising a
  ``[T, T]`` mask, so memory is ``O(sum L_i^2)`` instead of ``O(T^2)``. Used on CPU
  (FlexAttention has no backward on CPU) and on CUDA when flex is unavailable.
* Transformer Engine: when TE imports and CUDA is present the provider builds megatron's TE
  layer spec, whose ``TEDotProductAttention`` does THD + CP itself; this module is not used.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from mcore_align.ops.collectives import group_size
from mcore_align.ops.context_parallel import all_gather_cp, check_cp_divisible

log = logging.getLogger(__name__)

BACKENDS = ("flex", "sdpa")
_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


def _have_flex() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def select_backend(device_type: str) -> str:
    """The single backend choice for ``device_type`` ("cpu"/"cuda"), logged once."""
    backend = "flex" if device_type == "cuda" and _have_flex() else "sdpa"
    log.info(
        "packed core attention backend on %s: %s (Transformer Engine not used by this module)",
        device_type, backend,
    )
    return backend


def _model_device_type() -> str:
    from mcore_align.parallel.cpu_mode import is_cpu_mode

    return "cpu" if is_cpu_mode() or not torch.cuda.is_available() else "cuda"


# ---------------------------------------------------------------------------------------
# Layout: which global positions this rank's queries and the gathered keys have.
# ---------------------------------------------------------------------------------------


def _query_positions(n: int, cp_rank: int, cp_size: int, device) -> torch.Tensor:
    """In-sequence positions of this rank's ``n / cp_size`` query tokens of a length-``n`` sequence.

    ``n = 8, CP = 2``: rank 0 -> [0 1 6 7], rank 1 -> [2 3 4 5] (chunks r and 2CP-1-r).
    """
    if cp_size == 1:
        return torch.arange(n, device=device)
    c = n // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c, device=device)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c, device=device)
    return torch.cat([first, second])


class PackedAttentionKernels:
    """Named static helpers: per-backend attention over a packed batch.

    Shapes: ``q_TND`` this rank's queries ``[T/CP, N, D]``; ``k_SGD`` / ``v_SGD`` the keys and
    values of the WHOLE packed batch in global order ``[T, G, D]`` / ``[T, G, Dv]`` (G = kv
    groups, N % G == 0; Dv = D except for multi-head latent attention). Returns ``[T/CP, N, Dv]``.
    """

    @staticmethod
    def sdpa(q_TND, k_SGD, v_SGD, cu_seqlens, *, scale, dropout_p, cp_rank, cp_size):
        seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        gstarts = cu_seqlens[:-1].tolist()
        gqa = q_TND.shape[1] != k_SGD.shape[1]
        out, lstart = [], 0
        for gstart, n in zip(gstarts, seqlens):
            if n == 0:  # an empty padding segment holds no tokens on any rank
                continue
            nq = n // cp_size
            q = q_TND[lstart:lstart + nq].transpose(0, 1).unsqueeze(0)  # [1, N, nq, D]
            k = k_SGD[gstart:gstart + n].transpose(0, 1).unsqueeze(0)  # [1, G, n, D]
            v = v_SGD[gstart:gstart + n].transpose(0, 1).unsqueeze(0)
            if cp_size == 1:
                mask, causal = None, True
            else:
                # Query at position p may see keys 0..p of its own document.
                pos_q = _query_positions(n, cp_rank, cp_size, q.device)
                mask = torch.arange(n, device=q.device)[None, :] <= pos_q[:, None]  # [nq, n]
                causal = False
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa
            )
            out.append(o[0].transpose(0, 1))  # [nq, N, D]
            lstart += nq
        if lstart != q_TND.shape[0]:
            raise ValueError(f"cu_seqlens cover {lstart} local tokens but the query has {q_TND.shape[0]}")
        if not out:
            return q_TND.new_zeros((*q_TND.shape[:2], v_SGD.shape[-1]))
        return torch.cat(out)

    @staticmethod
    def document_ids_positions(cu_seqlens, cp_rank, cp_size):
        """(doc_q, pos_q) for this rank's queries and (doc_k, pos_k) for all tokens, global order."""
        dev = cu_seqlens.device
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        doc_k = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens)
        pos_k = torch.arange(int(cu_seqlens[-1]), device=dev) - cu_seqlens[:-1].long()[doc_k]
        if cp_size == 1:
            return doc_k, pos_k, doc_k, pos_k
        from mcore_align.ops.context_parallel import cp_local_token_index

        idx = cp_local_token_index(cu_seqlens, cp_rank, cp_size)
        return doc_k[idx], pos_k[idx], doc_k, pos_k

    @staticmethod
    def block_mask(cu_seqlens, cp_rank, cp_size, device, block_size: int = 128):
        """FlexAttention's document-causal ``BlockMask``, built at tile granularity.

        ``create_block_mask`` (uncompiled) evaluates the mask on every (query, key) pair: an
        element mask plus int64 gathers over ``[T/CP, T]``, many GiB at 32k tokens. Here
        each query's allowed keys form one contiguous range of the global key order,
        ``[start(doc), start(doc) + pos]``, so a ``block_size`` x ``block_size`` tile is
        *partial* when some query's range meets it and *full* when every query's range
        covers it (no padding): ``O(T/CP x T/block)`` work, chunked over query blocks.
        Example, CP=1, one document of 200 tokens, block 128 (tiles are (query block, key
        block)): (0, 0) partial (the causal diagonal); (0, 1) empty (every key comes after
        every query); (1, 0) every real query sees all 128 keys, but query block 1 holds 72
        real queries and 56 padding rows, so it is partial, not full; (1, 1) partial.
        With a second document of 300 tokens after it, (2, 0) is empty: those queries
        belong to document 2, whose keys start at 200.
        """
        from torch.nn.attention.flex_attention import BlockMask

        doc_q, pos_q, doc_k, pos_k = PackedAttentionKernels.document_ids_positions(cu_seqlens, cp_rank, cp_size)
        doc_q, pos_q, doc_k, pos_k = (t.to(device) for t in (doc_q, pos_q, doc_k, pos_k))

        def document_causal(b, h, qi, ki):
            return (doc_q[qi] == doc_k[ki]) & (pos_k[ki] <= pos_q[qi])

        B, nq, nk = block_size, doc_q.numel(), doc_k.numel()
        nqb, nkb = -(-nq // B), -(-nk // B)
        starts = cu_seqlens[:-1].long().to(device)
        lo = torch.full((nqb * B,), nk, dtype=torch.long, device=device)  # padding queries: empty range
        hi = torch.full((nqb * B,), -1, dtype=torch.long, device=device)
        lo[:nq] = starts[doc_q]  # first key of the query's document (global key order)
        hi[:nq] = starts[doc_q] + pos_q  # last key it may see (causal)
        lo, hi = lo.view(nqb, B), hi.view(nqb, B)
        k_first = torch.arange(nkb, device=device) * B  # [nkb]
        k_last = torch.clamp(k_first + B, max=nk) - 1
        partial = torch.empty(nqb, nkb, dtype=torch.bool, device=device)
        rows = max(1, (1 << 22) // (B * nkb))  # query blocks per chunk: ~4M pair tests at a time
        for a in range(0, nqb, rows):
            lo_c, hi_c = lo[a:a + rows, :, None], hi[a:a + rows, :, None]  # [r, B, 1]
            partial[a:a + rows] = ((lo_c <= k_last) & (hi_c >= k_first)).any(dim=1)
        real_q = torch.arange(nqb, device=device) * B + B <= nq  # query blocks without padding
        real_k = k_first + B <= nk
        full = (real_q[:, None] & real_k[None, :]
                & (lo.max(dim=1).values[:, None] <= k_first) & (hi.min(dim=1).values[:, None] >= k_last))
        partial &= ~full

        def as_indices(m):  # [nqb, nkb] bool -> ([1, 1, nqb] counts, [1, 1, nqb, nkb] indices, selected first)
            counts = m.sum(dim=1, dtype=torch.int32)
            order = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)
            return counts[None, None], order[None, None]

        (kv_num, kv_idx), (full_num, full_idx) = as_indices(partial), as_indices(full)
        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=B, mask_mod=document_causal,
                                        seq_lengths=(nq, nk))

    @staticmethod
    def flex(q_TND, k_SGD, v_SGD, block_mask, *, scale, compiled=True):
        from torch.nn.attention.flex_attention import flex_attention

        fn = _compiled_flex() if compiled else flex_attention
        o = fn(
            q_TND.transpose(0, 1).unsqueeze(0), k_SGD.transpose(0, 1).unsqueeze(0),
            v_SGD.transpose(0, 1).unsqueeze(0), block_mask=block_mask, scale=scale,
            enable_gqa=q_TND.shape[1] != k_SGD.shape[1],
        )
        return o[0].transpose(0, 1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex materialises the full score matrix; compiled it is a fused kernel.
    return torch.compile(flex_attention, dynamic=True)


class PackedCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron's local spec: THD packing + CP without TE.

    Same constructor as ``megatron.core.transformer.dot_product_attention.DotProductAttention``.
    ``cp_comm_type`` may be ``None`` or ``"all_gather"`` (the only scheme implemented here).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        if cp_comm_type not in (None, "all_gather"):
            raise ValueError(f"PackedCoreAttention implements cp_comm_type 'all_gather' only, got {cp_comm_type!r}")
        if config.softmax_type != "vanilla":
            raise ValueError(f"PackedCoreAttention supports softmax_type='vanilla' only, got {config.softmax_type!r}")
        if config.window_size is not None:
            raise ValueError("PackedCoreAttention does not implement sliding-window attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group, self.cp_group = pg_collection.tp, pg_collection.cp
        if group_size(self.cp_group) != config.context_parallel_size:
            raise ValueError(
                f"cp group has {group_size(self.cp_group)} ranks, config.context_parallel_size is "
                f"{config.context_parallel_size}"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        tp = group_size(self.tp_group)
        self.num_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_groups_per_partition = divide(config.num_query_groups, tp)
        # Query/key head size and value head size: equal for GQA (kv_channels); multi-head latent
        # attention passes k_channels = nope + rope dims and v_channels = v_head_dim.
        self.head_dim = k_channels or config.kv_channels
        self.v_head_dim = v_channels or config.kv_channels
        # megatron's apply_query_key_layer_scaling divides by layer_number and multiplies it
        # back inside the fp32 softmax: the net scale is unchanged, so it is not applied here.
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.backend = select_backend(_model_device_type())
        if self.backend == "flex" and self.dropout_p > 0:
            raise ValueError("the flex attention backend has no attention dropout; set attention_dropout=0")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """query/key ``[s, b, np|ng, hk]``, value ``[s, b, ng, hv]`` -> ``[s, b, np*hv]``
        (hk = hv except for multi-head latent attention).

        Packed (``packed_seq_params.qkv_format == "thd"``): ``[t, np, h]`` or ``[t, 1, np, h]``
        -> ``[t, np*hv]`` or ``[t, 1, np*hv]``; ``t`` is this CP rank's token count.
        """
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention does not support attention_bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        dropout_p = self.dropout_p if self.training else 0.0
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout_p > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            if packed_seq_params is not None:
                return self._forward_packed(query, key, value, attention_mask, mask_type, packed_seq_params, dropout_p)
            return self._forward_padded(query, key, value, attention_mask, mask_type, dropout_p)

    def _forward_padded(self, q_SBND, k_SBGD, v_SBGD, attention_mask, mask_type, dropout_p):
        if group_size(self.cp_group) > 1:
            raise NotImplementedError(
                "context parallelism in PackedCoreAttention needs packed THD input (packed_seq_params)"
            )
        s, b, n, d = q_SBND.shape
        allowed = None  # SDPA boolean mask: True = may attend
        if mask_type in _CAUSAL:
            allowed = torch.ones(s, k_SBGD.shape[0], dtype=torch.bool, device=q_SBND.device).tril()
        if attention_mask is not None:  # megatron convention: True = masked out, [b|1, 1|np, s, s]
            keep = ~attention_mask.to(torch.bool)
            allowed = keep if allowed is None else keep & allowed
        o_BNSD = F.scaled_dot_product_attention(
            q_SBND.permute(1, 2, 0, 3), k_SBGD.permute(1, 2, 0, 3), v_SBGD.permute(1, 2, 0, 3),
            attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale,
            enable_gqa=n != k_SBGD.shape[2],
        )
        # Query rows with nothing to attend to (fully padded) come out as 0.
        return o_BNSD.permute(2, 0, 1, 3).reshape(s, b, n * v_SBGD.shape[-1])

    def _forward_packed(self, q, k, v, attention_mask, mask_type, psp, dropout_p):
        if psp.qkv_format != "thd":
            raise ValueError(f"PackedCoreAttention supports qkv_format 'thd', got {psp.qkv_format!r}")
        if mask_type not in _CAUSAL:
            raise NotImplementedError(f"packed attention is document-causal; got attn_mask_type {mask_type}")
        if attention_mask is not None:
            raise ValueError("packed attention builds its mask from cu_seqlens; attention_mask must be None")
        with_batch_dim = q.dim() == 4
        if with_batch_dim:  # [t, 1, np, hn]
            if q.shape[1] != 1:
                raise ValueError(f"packed THD input must have batch size 1, got {tuple(q.shape)}")
            q, k, v = q.squeeze(1), k.squeeze(1), v.squeeze(1)
        # Layout boundaries: padded ones if given (megatron's RoPE uses the same).
        cu = psp.cu_seqlens_q_padded if psp.cu_seqlens_q_padded is not None else psp.cu_seqlens_q
        cu_kv = psp.cu_seqlens_kv_padded if psp.cu_seqlens_kv_padded is not None else psp.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu and not torch.equal(cu_kv, cu):
            raise ValueError("self-attention on packed sequences needs cu_seqlens_kv == cu_seqlens_q")
        cp_size = group_size(self.cp_group)
        cp_rank = 0 if cp_size == 1 else self.cp_group.rank()
        check_cp_divisible(cu, cp_size)
        if int(cu[-1]) != q.shape[0] * cp_size:
            raise ValueError(f"cu_seqlens end at {int(cu[-1])} but {cp_size} CP rank(s) x {q.shape[0]} tokens were given")
        # K/V of the whole packed batch in global order (CP: all-gather, backward reduce-scatter).
        if cp_size > 1:  # [t, g, hk] and [t, g, hv] as one [t, g*(hk+hv)] collective
            kshape, vshape = k.shape[1:], v.shape[1:]
            kv = all_gather_cp(torch.cat([k.flatten(1), v.flatten(1)], dim=1), cu, self.cp_group)
            k, v = kv[:, :k[0].numel()].unflatten(1, kshape), kv[:, k[0].numel():].unflatten(1, vshape)
        if self.backend == "flex":
            out = PackedAttentionKernels.flex(q, k, v, self._block_mask(psp, cu, cp_rank, cp_size, q.device),
                                              scale=self.softmax_scale)
        else:
            out = PackedAttentionKernels.sdpa(q, k, v, cu, scale=self.softmax_scale, dropout_p=dropout_p,
                                              cp_rank=cp_rank, cp_size=cp_size)
        out = out.reshape(out.shape[0], -1)  # [t, np*hn]
        return out.unsqueeze(1) if with_batch_dim else out

    @staticmethod
    def _block_mask(psp, cu, cp_rank, cp_size, device):
        # One BlockMask per micro-batch, shared by all layers: cached on the params object.
        key = (cp_rank, cp_size)
        cache = getattr(psp, "_mcore_align_block_mask", None)
        if cache is None or cache[0] != key:
            cache = (key, PackedAttentionKernels.block_mask(cu, cp_rank, cp_size, device))
            psp._mcore_align_block_mask = cache
        return cache[1]

