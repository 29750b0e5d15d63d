"""Micro-batch contract, packing plan and collation.

A *unit* is what must stay together in one micro-batch: a pair (chosen, rejected), a
KTO example plus its mismatched KL sequence, or a single SFT/prompt sequence. Every
rank plans the packing of the WHOLE global batch from sequence lengths alone (cheap,
deterministic), so all DP ranks agree on the number of micro-batches without talking.

Packed layout (one row, b = 1), pad_multiple = 4, a pair with lengths 5 and 3:

    tokens      [c c c c c p p p | r r r p]       T = 12
    position    [0 1 2 3 4 5 6 7 | 0 1 2 3]       restarts per sequence
    cu_seqlens  [0, 8, 12]                        padded boundaries, int32
    labels[t]   = tokens[t + 1] inside a sequence's real tokens, else 0
    loss_mask[t]= 1 where labels[t] is a response token
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import torch

ROLE_CHOSEN, ROLE_REJECTED, ROLE_UNPAIRED, ROLE_KL = 0, 1, 2, 3


def required_pad_multiple(tp: int, cp: int, sequence_parallel: bool) -> int:
    """Multiple each packed sequence is padded to.

    Context parallelism splits every sequence into 2 * CP load-balanced chunks, so a rank
    keeps L / CP tokens of it; sequence parallelism then splits this rank's tokens over
    the TP ranks, so L / CP must also be a multiple of TP:
    lcm(tp * cp if sp else 1, 2 * cp if cp > 1 else 1).
    Example: tp=4, cp=2, sp: lcm(8, 4) = 8 (with 4, a 4-token sequence would leave 2
    tokens per CP rank, which 4 TP ranks cannot split)."""
    if tp < 1 or cp < 1:
        raise ValueError(f"tp and cp must be >= 1, got tp={tp} cp={cp}")
    return math.lcm(tp * cp if sequence_parallel else 1, 2 * cp if cp > 1 else 1)


def layout_multiples(parallel) -> dict[str, int]:
    """What a megatron layout (``ParallelConfig``) asks of the micro-batches, as ``build_data``
    keywords: the per-sequence pad multiple, and the per-rank micro-batch count multiple
    (megatron's interleaved 1F1B runs a multiple of PP micro-batches)."""
    vpp = parallel.virtual_pipeline_model_parallel_size
    return {"pad_multiple": required_pad_multiple(parallel.tensor_model_parallel_size,
                                                  parallel.context_parallel_size, parallel.sequence_parallel),
            "microbatch_multiple": parallel.pipeline_model_parallel_size if vpp else 1}


def round_up(x: int | np.ndarray, m: int):
    return (x + m - 1) // m * m


@dataclass
class SeqRef:
    """One sequence of a unit: tokens of store sequence `seq`; a KL sequence takes the
    prompt of `seq` and the completion of store sequence `completion_of`."""

    seq: int
    role: int
    pair_index: int
    kto_label: bool
    length: int
    completion_of: int = -1
    margin: float = math.nan
    """Paired data: the pair's reward-model margin (NaN: none)."""


@dataclass
class MicroBatch:
    """One micro-batch (CPU tensors; the trainer moves them to the device).

    Packed mode: shapes [1, T]; padded mode: [B, S] (one sequence per row).
    Sequence i occupies flat positions cu_seqlens[i]:cu_seqlens[i+1] of the flattened
    tokens (in padded mode cu_seqlens = [0, S, 2S, ...]).
    """

    tokens: torch.Tensor
    """int64 token ids (pad id in padding)."""
    position_ids: torch.Tensor
    """int64 positions, restarting at 0 for each sequence."""
    labels: torch.Tensor
    """int64 next token: labels[t] = tokens[t + 1] within the same sequence, 0 where undefined."""
    loss_mask: torch.Tensor
    """float32: 1 where labels[t] is a response token to score."""
    cu_seqlens: torch.Tensor
    """int32 [N + 1] padded sequence boundaries in the flattened batch."""
    max_seqlen: int
    """Longest padded sequence."""
    seq_role: torch.Tensor
    """int64 [N]: 0 chosen, 1 rejected, 2 unpaired, 3 KTO mismatched (KL) sequence."""
    pair_index: torch.Tensor
    """int64 [N]: index of the unit within the global batch (a pair's two sequences and a
    KTO example's KL sequence share it)."""
    kto_label: torch.Tensor
    """bool [N]: KTO desirability (False when not KTO)."""
    num_loss_tokens: torch.Tensor
    """int64 [N]: loss_mask sum per sequence."""
    seq_lengths: torch.Tensor
    """int64 [N]: real (unpadded) length of each sequence."""
    margin: torch.Tensor
    """float32 [N]: the pair's reward-model margin on its sequences (NaN: none)."""
    packed: bool
    """True for the [1, T] THD layout."""
    extras: dict = field(default_factory=dict)
    """Per-token float tensors laid out like ``labels`` (online objectives: the advantage,
    old and reference log-prob of the token each position predicts; 0 elsewhere)."""
    images: dict = field(default_factory=dict)
    """Vision models: the processor's image tensors of this micro-batch (``pixel_values``
    ``[N_unique, 3, H, W]``) plus ``image_index`` (int64 ``[N_runs]``): the image of each
    image-token run of the flattened tokens, in order. A pair's chosen and rejected share
    their prompt's images, so each image is stored (and run through the vision tower) once
    and ``image_index`` repeats it. ``{}``: no image in the micro-batch."""

    def packed_seq_params(self):
        """`PackedSeqParams` (THD) for megatron's attention; None in padded mode."""
        if not self.packed:
            return None
        from megatron.core.packed_seq_params import PackedSeqParams

        return PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=self.cu_seqlens, cu_seqlens_kv=self.cu_seqlens,
            cu_seqlens_q_padded=self.cu_seqlens, cu_seqlens_kv_padded=self.cu_seqlens,
            max_seqlen_q=self.max_seqlen, max_seqlen_kv=self.max_seqlen,
        )

    @property
    def num_sequences(self) -> int:
        return len(self.seq_role)


@dataclass
class GlobalBatch:
    """One optimizer step: this DP rank's micro-batches plus counts over the whole global batch.

    num_pairs: pairs for paired objectives, examples (sequences) otherwise.
    num_sequences: scored sequences (2 * num_pairs when paired; KL sequences excluded).
    num_chosen_tokens: loss tokens of chosen sequences (role 0 only).
    num_chosen_seq_tokens: predicted tokens (prompt and response, L - 1) of chosen sequences.
    num_tokens: loss tokens of all scored sequences (KL sequences excluded).
    num_desirable / num_undesirable: KTO label counts.
    """

    micro_batches: list[MicroBatch]
    num_pairs: int
    num_sequences: int
    num_chosen_tokens: int
    num_tokens: int
    num_desirable: int
    num_undesirable: int
    num_chosen_seq_tokens: int = 0
    num_value_tokens: int = 0
    real_tokens: int = 0
    """Real (unpadded) tokens over the global batch, all ranks."""
    slot_tokens: int = 0
    """Token slots over the global batch: micro-batches * max_tokens (packed) or B * S (padded)."""
    epoch: int = 0
    step_in_epoch: int = 0
    record_ids: list[int] = field(default_factory=list)
    """Cached-record index of each unit (position = pair_index), for debugging and tests."""

    @classmethod
    def of(cls, batches: list["GlobalBatch"]) -> "GlobalBatch":
        """One batch holding the micro-batches of several (their counts summed), e.g. the
        updates of an online iteration, for accounting such as FLOPs; returned as is for one."""
        if len(batches) == 1:
            return batches[0]
        total = {k: sum(getattr(b, k) for b in batches) for k in batches[0].counts_dict()}
        return cls(micro_batches=[mb for b in batches for mb in b.micro_batches],
                   real_tokens=sum(b.real_tokens for b in batches), **total)

    def counts_dict(self) -> dict[str, int]:
        """Keyword arguments of `mcore_align.algorithms.base.GlobalCounts`."""
        return {k: getattr(self, k) for k in ("num_pairs", "num_sequences", "num_chosen_tokens",
                                               "num_tokens", "num_desirable", "num_undesirable",
                                               "num_chosen_seq_tokens", "num_value_tokens")}


# ---- planning -----------------------------------------------------------------------
def plan_bins(sizes: np.ndarray, capacity: int, dp_size: int, multiple_of: int = 1) -> list[list[list[int]]]:
    """Pack units of `sizes` (padded tokens) into bins of `capacity`, then give every DP
    rank the same number of bins (or one fewer, see below), balanced by tokens. Returns per rank a list of bins,
    each a list of unit indices. Deterministic for the same inputs.

    multiple_of: every rank's bin count must be a multiple of it (megatron's interleaved
    1F1B schedule runs a multiple of PP micro-batches); ranks then get equal counts.
    """
    n = len(sizes)
    if n < dp_size:
        raise ValueError(f"a global batch of {n} units cannot give each of {dp_size} DP ranks a micro-batch")
    if n and sizes.max() > capacity:
        raise ValueError(f"a unit of {int(sizes.max())} tokens exceeds max_tokens_per_micro_batch={capacity}")
    # First-fit decreasing (stable order for ties keeps it deterministic).
    order = np.argsort(-sizes, kind="stable")
    bins: list[list[int]] = []
    free: list[int] = []
    for u in order:
        s = int(sizes[u])
        for b, f in enumerate(free):
            if f >= s:
                bins[b].append(int(u))
                free[b] -= s
                break
        else:
            bins.append([int(u)])
            free.append(capacity - s)
    # Balance the micro-batch count over ranks: split the fullest multi-unit bins until
    # the bin count is a multiple of dp_size. When every bin already holds a single unit
    # (units close to the capacity) nothing can be split: ranks then differ by at most one
    # micro-batch, which megatron handles (the DP gradient reduction happens once, after
    # the last micro-batch, and losses are normalised by global counts).
    target = dp_size * multiple_of
    while len(bins) % target:
        cand = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not cand and multiple_of == 1:
            break
        if not cand:
            raise ValueError(
                f"cannot make {len(bins)} micro-batches of one unit each a multiple of dp_size * "
                f"{multiple_of} (interleaved pipeline: a multiple of PP per rank): raise global_batch_size "
                "or lower max_tokens_per_micro_batch")
        b = max(cand, key=lambda i: (len(bins[i]), capacity - free[i], -i))
        units = sorted(bins[b], key=lambda u: -sizes[u])
        halves: list[list[int]] = [[], []]
        loads = [0, 0]
        for u in units:  # greedy two-way balance
            k = 0 if loads[0] <= loads[1] else 1
            halves[k].append(u)
            loads[k] += int(sizes[u])
        bins[b], free[b] = halves[0], capacity - loads[0]
        bins.append(halves[1])
        free.append(capacity - loads[1])
    # Longest-processing-time assignment with at most ceil(bins / dp) bins per rank.
    per_rank = -(-len(bins) // dp_size)
    loads_b = [capacity - f for f in free]
    heap = [(0, r) for r in range(dp_size)]
    out: list[list[list[int]]] = [[] for _ in range(dp_size)]
    for b in sorted(range(len(bins)), key=lambda i: (-loads_b[i], i)):
        popped = []
        while True:
            load, r = heapq.heappop(heap)
            if len(out[r]) < per_rank:
                break
            popped.append((load, r))
        out[r].append(sorted(bins[b]))
        heapq.heappush(heap, (load + loads_b[b], r))
        for p in popped:
            heapq.heappush(heap, p)
    return out


# ---- collation ----------------------------------------------------------------------
def _materialize(store, ref: SeqRef, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    tok, tgt = store.seq(ref.seq)
    if ref.completion_of < 0:
        return tok, tgt
    # KL sequence: prompt of this example + completion of another one (TRL's KTO KL term).
    p = int(store.seq_plen[ref.seq])
    ctok, ctgt = store.seq(ref.completion_of)
    q = int(store.seq_plen[ref.completion_of])
    tok = np.concatenate([tok[:p], ctok[q:]])[:max_length]
    tgt = np.concatenate([np.zeros(p, np.uint8), ctgt[q:]])[:max_length]
    return tok, tgt


def _shift(tok: np.ndarray, tgt: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
    """Row of `width` slots for one sequence: tokens, labels (next token), loss mask."""
    n = len(tok)
    t = np.zeros(width, np.int64)
    lab = np.zeros(width, np.int64)
    mask = np.zeros(width, np.float32)
    t[:n] = tok
    lab[: n - 1] = tok[1:]
    mask[: n - 1] = tgt[1:]
    return t, lab, mask


def collate(store, refs: list[SeqRef], packed: bool, pad_multiple: int, pad_id: int,
            max_length: int, image_encoder=None) -> MicroBatch:
    """``image_encoder`` (``images.ImageEncoder``): attach the sequences' images (vision stores)."""
    mb = collate_arrays([_materialize(store, r, max_length) for r in refs], refs, packed, pad_multiple, pad_id)
    if image_encoder is not None:
        mb.images = micro_batch_images([store.seq_images(r.seq) for r in refs], image_encoder)
    return mb


def micro_batch_images(paths_per_seq: list[list[str]], image_encoder) -> dict:
    """``MicroBatch.images`` for sequences with these image paths (in row order, which is
    placeholder-run order: packed rows are concatenated, padded rows are read row-major).

    Example: a pair sharing image a, then a pair with images b, c:
    paths [[a], [a], [b, c], [b, c]] -> pixel_values of [a, b, c], image_index [0, 0, 1, 2, 1, 2].
    """
    unique: dict[str, int] = {}
    index = [unique.setdefault(p, len(unique)) for paths in paths_per_seq for p in paths]
    if not index:
        return {}
    from .images import micro_batch_image_inputs

    out = micro_batch_image_inputs([image_encoder.encode(p) for p in unique])
    out["image_index"] = torch.tensor(index, dtype=torch.int64)
    return out


def collate_arrays(seqs: list[tuple[np.ndarray, np.ndarray]], refs: list[SeqRef], packed: bool,
                   pad_multiple: int, pad_id: int, extras: dict[str, list[np.ndarray]] | None = None) -> MicroBatch:
    """A micro-batch from (tokens, targets) arrays, one per sequence (targets: 1 on tokens to
    score). ``extras``: per-token float arrays, one per sequence and aligned with its TOKENS
    (value i belongs to token i); they are shifted like the targets, so in the batch they sit
    at the position that predicts the token, the position of its label and loss-mask entry.
    An extras array may hold one value more than the sequence has tokens: index n (a token
    past the end) lands on the last position (PPO's critic is trained one position further)."""
    lens = np.array([len(t) for t, _ in seqs], dtype=np.int64)
    if packed:
        widths = round_up(lens, pad_multiple)
    else:
        widths = np.full(len(lens), round_up(int(lens.max()), pad_multiple), dtype=np.int64)
    rows = [_shift(t, g, int(w)) for (t, g), w in zip(seqs, widths)]
    toks = [r[0] for r in rows]
    for (t, _), row, n in zip(seqs, toks, lens):
        row[n:] = pad_id
    pos = [np.arange(w, dtype=np.int64) for w in widths]
    cat = (np.concatenate if packed else np.stack)
    shape_fix = (lambda a: a[None]) if packed else (lambda a: a)
    cu = np.concatenate([[0], np.cumsum(widths)]).astype(np.int32)
    mask = cat([r[2] for r in rows])
    nlt = np.array([r[2].sum() for r in rows], dtype=np.int64)
    shifted = {}
    for name, per_seq in (extras or {}).items():
        vals = []
        for v, w, n in zip(per_seq, widths, lens):
            assert len(v) in (n, n + 1), (name, len(v), n)
            row = np.zeros(int(w), np.float32)
            row[: len(v) - 1] = v[1:]  # value of token t+1 at position t, like the labels
            vals.append(row)
        shifted[name] = torch.from_numpy(shape_fix(cat(vals)))
    return MicroBatch(
        tokens=torch.from_numpy(shape_fix(cat(toks))),
        position_ids=torch.from_numpy(shape_fix(cat(pos))),
        labels=torch.from_numpy(shape_fix(cat([r[1] for r in rows]))),
        loss_mask=torch.from_numpy(shape_fix(mask)),
        cu_seqlens=torch.from_numpy(cu),
        max_seqlen=int(widths.max()),
        seq_role=torch.tensor([r.role for r in refs], dtype=torch.int64),
        pair_index=torch.tensor([r.pair_index for r in refs], dtype=torch.int64),
        kto_label=torch.tensor([r.kto_label for r in refs], dtype=torch.bool),
        num_loss_tokens=torch.from_numpy(nlt),
        seq_lengths=torch.from_numpy(lens),
        margin=torch.tensor([r.margin for r in refs], dtype=torch.float32),
        packed=packed,
        extras=shifted,
    )
