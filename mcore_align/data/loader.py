"""Sampler, global-batch loader and the `build_data` entry point."""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .batch import (ROLE_CHOSEN, ROLE_KL, ROLE_REJECTED, ROLE_UNPAIRED, GlobalBatch, SeqRef, collate,
                    plan_bins, round_up)
from .config import OBJECTIVE_KINDS, DataConfig
from .store import TokenizedStore, load_or_build_store
from .summary import format_summary
from .tokenization import padding_id

log = logging.getLogger(__name__)


class EpochSampler:
    """Seeded per-epoch shuffle over record ids, `batch_size` records at a time.

    Every DP rank runs the same sampler (the whole global batch is planned on every
    rank). An incomplete last batch of an epoch is dropped (the next epoch starts on a
    fresh permutation), so every step has exactly `batch_size` units.
    State: {"epoch", "position"} (records consumed in the epoch) plus checks.
    """

    def __init__(self, record_ids: np.ndarray, batch_size: int, seed: int):
        if len(record_ids) < batch_size:
            raise ValueError(f"global_batch_size={batch_size} exceeds the {len(record_ids)} training records")
        self.ids, self.batch_size, self.seed = record_ids, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm_epoch, self._perm = -1, None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.ids) // self.batch_size

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm, self._perm_epoch = self.ids[rng.permutation(len(self.ids))], self.epoch
        return self._perm

    def next_batch(self) -> np.ndarray:
        if self.position + self.batch_size > len(self.ids):
            self.epoch, self.position = self.epoch + 1, 0
        out = self._permutation()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_records": len(self.ids), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("seed", "num_records", "batch_size"):
            if state[k] != getattr(self, k if k != "num_records" else "_n"):
                raise ValueError(f"sampler state has {k}={state[k]} but this run has "
                                 f"{getattr(self, k if k != 'num_records' else '_n')}; cannot resume exactly")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @property
    def _n(self) -> int:
        return len(self.ids)


class BatchLoader:
    """Yields `GlobalBatch`es for one DP rank.

    Training loaders are infinite (epochs roll over); eval loaders run one pass in file
    order, keeping a smaller last batch when it still gives every rank a unit.
    """

    def __init__(self, store: TokenizedStore, record_ids: np.ndarray, *, kind: str, cfg: DataConfig,
                 dp_rank: int, dp_size: int, global_batch_size: int, pad_multiple: int, pad_id: int,
                 train: bool, microbatch_multiple: int = 1, image_encoder=None):
        self.store, self.kind, self.cfg = store, kind, cfg
        # Vision stores: micro-batches carry their images (decoded when collated).
        self.image_encoder = image_encoder if store.has_images else None
        self.dp_rank, self.dp_size, self.gbs = dp_rank, dp_size, global_batch_size
        self.pad_multiple, self.pad_id, self.train = pad_multiple, pad_id, train
        self.microbatch_multiple = microbatch_multiple  # PP with the interleaved schedule, else 1
        self.record_ids = record_ids
        self.sampler = EpochSampler(record_ids, global_batch_size, cfg.seed) if train else None

    # ---- state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        assert self.sampler is not None, "only the training loader has state"
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.sampler is not None, "only the training loader has state"
        self.sampler.load_state_dict(state)

    # ---- iteration ----------------------------------------------------------------
    def __iter__(self) -> Iterator[GlobalBatch]:
        if self.train:
            return self
        return self._eval_batches()

    def __next__(self) -> GlobalBatch:
        assert self.sampler is not None
        recs = self.sampler.next_batch()
        return self.make_global_batch(recs, self.sampler.epoch, self.sampler.position // self.gbs - 1)

    def _eval_batches(self) -> Iterator[GlobalBatch]:
        for step, start in enumerate(range(0, len(self.record_ids), self.gbs)):
            recs = self.record_ids[start:start + self.gbs]
            if len(recs) < self.dp_size:
                log.warning("eval: dropping the last %d records (fewer than %d DP ranks)", len(recs), self.dp_size)
                return
            if len(recs) < self.gbs and self.microbatch_multiple > 1:
                # The interleaved schedule needs a multiple of PP micro-batches per rank, which
                # a short last batch may not split into: keep whole global batches only.
                log.warning("eval: dropping the last %d records (interleaved pipeline: whole global batches only)",
                            len(recs))
                return
            yield self.make_global_batch(recs, 0, step)

    @property
    def batches_per_epoch(self) -> int:
        if self.sampler is not None:
            return self.sampler.batches_per_epoch
        need = self.gbs if self.microbatch_multiple > 1 else self.dp_size  # see _eval_batches
        return sum(1 for s in range(0, len(self.record_ids), self.gbs) if len(self.record_ids) - s >= need)

    # ---- global batch ---------------------------------------------------------------
    def units(self, recs: np.ndarray) -> list[list[SeqRef]]:
        """The sequences of each unit of the global batch (unit u has pair_index u)."""
        st = self.store
        seqs = st.rec_seq[recs]
        lens = st.seq_len(seqs.clip(min=0))
        labels = st.rec_label[recs]
        margins = st.rec_margin[recs]
        out = []
        for u in range(len(recs)):
            s0, s1 = int(seqs[u, 0]), int(seqs[u, 1])
            if self.kind == "paired":
                m = float(margins[u])
                out.append([SeqRef(s0, ROLE_CHOSEN, u, False, int(lens[u, 0]), margin=m),
                            SeqRef(s1, ROLE_REJECTED, u, False, int(lens[u, 1]), margin=m)])
            elif self.kind == "kto":
                # KL sequence: this prompt + the completion of the previous example of
                # the global batch (shift by one, as TRL does), placed right after it.
                j = int(seqs[(u - 1) % len(recs), 0])
                p, q = int(st.seq_plen[s0]), int(st.seq_plen[j])
                kl_len = min(p + int(st.seq_len(j)) - q, self.cfg.max_length)
                lab = bool(labels[u] == 1)
                out.append([SeqRef(s0, ROLE_UNPAIRED, u, lab, int(lens[u, 0])),
                            SeqRef(s0, ROLE_KL, u, lab, kl_len, completion_of=j)])
            else:
                out.append([SeqRef(s0, ROLE_UNPAIRED, u, False, int(lens[u, 0]))])
        return out

    def make_global_batch(self, recs: np.ndarray, epoch: int = 0, step: int = 0) -> GlobalBatch:
        units = self.units(recs)
        packed = self.cfg.packing
        if packed:
            sizes = np.array([sum(round_up(r.length, self.pad_multiple) for r in u) for u in units])
            plan = plan_bins(sizes, self.cfg.max_tokens_per_micro_batch, self.dp_size, self.microbatch_multiple)
            slot = sum(len(bins) for bins in plan) * self.cfg.max_tokens_per_micro_batch
        else:
            mbs = self.cfg.micro_batch_size
            n = len(units)
            if n % (mbs * self.dp_size) and self.train:
                raise ValueError(f"padded mode: global_batch_size={n} must be a multiple of "
                                 f"micro_batch_size * dp_size = {mbs * self.dp_size}")
            per_rank = -(-n // self.dp_size)  # eval's last batch may be ragged
            if -(-per_rank // mbs) % self.microbatch_multiple:
                raise ValueError(f"padded mode: {-(-per_rank // mbs)} micro-batches per rank is not a multiple of "
                                 f"{self.microbatch_multiple} (interleaved pipeline: PP)")
            plan = [[list(range(r * per_rank + i, min(r * per_rank + i + mbs, (r + 1) * per_rank, n)))
                     for i in range(0, per_rank, mbs)] for r in range(self.dp_size)]
            # Slots of a padded micro-batch: rows * S, with S its longest sequence rounded up.
            slot = 0
            for b in (b for bins in plan for b in bins if b):
                seqs = [s for u in b for s in units[u]]
                slot += len(seqs) * round_up(max(s.length for s in seqs), self.pad_multiple)
        mbs_out = [collate(self.store, [s for u in b for s in units[u]], packed, self.pad_multiple,
                           self.pad_id, self.cfg.max_length, self.image_encoder)
                   for b in plan[self.dp_rank] if b]
        return GlobalBatch(micro_batches=mbs_out, record_ids=[int(r) for r in recs], epoch=epoch, step_in_epoch=step, slot_tokens=int(slot),
                           real_tokens=int(sum(s.length for u in units for s in u)),
                           **self._counts(recs, units))

    def _counts(self, recs: np.ndarray, units: list[list[SeqRef]]) -> dict[str, int]:
        st = self.store
        seqs = st.rec_seq[recs]
        # Loss tokens of a stored sequence = targets after the first position (the
        # first token has no predictor), computed from the memory-mapped targets.
        def loss_tokens(s: int) -> int:
            a, b = st.seq_off[s], st.seq_off[s + 1]
            return int(np.asarray(st.targets[a + 1:b]).sum())
        chosen = sum(loss_tokens(int(s)) for s in seqs[:, 0])
        # Every token after the first is predicted: L - 1 per chosen sequence.
        chosen_seq = sum(int(st.seq_off[int(s) + 1] - st.seq_off[int(s)]) - 1 for s in seqs[:, 0])
        rejected = sum(loss_tokens(int(s)) for s in seqs[:, 1] if s >= 0) if self.kind == "paired" else 0
        n = len(recs)
        labels = st.rec_label[recs]
        return {
            "num_pairs": n,
            "num_sequences": 2 * n if self.kind == "paired" else n,
            "num_chosen_tokens": chosen if self.kind == "paired" else 0,
            "num_chosen_seq_tokens": chosen_seq if self.kind == "paired" else 0,
            "num_tokens": chosen + rejected,
            "num_desirable": int((labels == 1).sum()) if self.kind == "kto" else 0,
            "num_undesirable": int((labels == 0).sum()) if self.kind == "kto" else 0,
        }


@dataclass
class DataBundle:
    """What `build_data` returns."""

    train: BatchLoader
    eval: BatchLoader | None
    report: dict


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def build_data(cfg: DataConfig, tokenizer, objective_kind: str, *, dp_rank: int = 0, dp_size: int = 1,
               global_batch_size: int, pad_multiple: int = 1, report_path: str | Path | None = None,
               report_batches: int = 50, microbatch_multiple: int = 1, vision="auto") -> DataBundle:
    """Tokenize (cached), split, and return the training and eval loaders for one DP rank.

    objective_kind: "paired" (DPO, CPO, ORPO, SimPO, RM), "kto", "sft" or "prompt".
    global_batch_size counts units: pairs for "paired", examples otherwise.
    pad_multiple: see `required_pad_multiple(tp, cp, sequence_parallel)`.
    microbatch_multiple: each rank's micro-batch count is a multiple of it (PP when the
    interleaved pipeline schedule runs, which needs that).
    vision: "auto" reads the model from the tokenizer's checkpoint folder
    (``images.model_kind_of_tokenizer``): a vision checkpoint's processor expands image
    placeholders and micro-batches carry the images (``MicroBatch.images``); a text-only
    checkpoint makes image records bad records; a bare tokenizer counts them as
    ``images_ignored``. Or pass a ``images.VisionProcessor``, or None (bare-tokenizer rule).
    The data report (counts by reason, length statistics, packing efficiency estimated
    on the first `report_batches` global batches) is logged on rank 0 and written to
    `report_path` when given.
    """
    if objective_kind not in OBJECTIVE_KINDS:
        raise ValueError(f"objective_kind must be one of {OBJECTIVE_KINDS}, got {objective_kind!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if global_batch_size < dp_size:
        raise ValueError(f"global_batch_size={global_batch_size} must be >= dp_size={dp_size}")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    per_unit = 2 if objective_kind in ("paired", "kto") else 1
    need = per_unit * round_up(cfg.max_length, pad_multiple)
    if cfg.packing and cfg.max_tokens_per_micro_batch < need:
        raise ValueError(f"max_tokens_per_micro_batch={cfg.max_tokens_per_micro_batch} cannot hold one "
                         f"{objective_kind} unit of up to {need} tokens ({per_unit} x max_length rounded to "
                         f"pad_multiple={pad_multiple})")
    from .images import ImageEncoder, VisionProcessor, model_kind_of_tokenizer

    if isinstance(vision, VisionProcessor):
        model_kind, processor = "vision", vision
    elif vision == "auto":
        model_kind, processor = model_kind_of_tokenizer(tokenizer)
    elif vision is None:
        model_kind, processor = "unknown", None
    else:
        raise ValueError(f"vision must be 'auto', None or a VisionProcessor, got {vision!r}")
    store_kw = dict(vision=processor, model_kind=model_kind)
    store = load_or_build_store(cfg, tokenizer, objective_kind, **store_kw)
    n = store.num_records
    if n == 0:
        raise ValueError(f"no usable records in {cfg.dataset}:\n{format_summary(store.meta, 'train')}")
    # Held-out split: a seeded choice of records, independent of dp layout.
    perm = np.random.default_rng([cfg.seed, 7]).permutation(n)
    n_val = int(round(n * cfg.val_fraction))
    val_ids, train_ids = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    common = dict(kind=objective_kind, cfg=cfg, dp_rank=dp_rank, dp_size=dp_size,
                  global_batch_size=global_batch_size, pad_multiple=pad_multiple, pad_id=padding_id(tokenizer),
                  microbatch_multiple=microbatch_multiple,
                  image_encoder=ImageEncoder(processor) if processor is not None else None)
    train = BatchLoader(store, train_ids, train=True, **common)
    evl = BatchLoader(store, val_ids, train=False, **common) if n_val else None
    summary = [format_summary(store.meta, "train")]
    vstore = None
    if cfg.val_dataset:  # a separate eval dataset: its own (cached) store, every record
        vstore = load_or_build_store(dataclasses.replace(cfg, dataset=cfg.val_dataset, val_dataset=None),
                                     tokenizer, objective_kind, **store_kw)
        summary.append(format_summary(vstore.meta, "val_dataset"))
        if vstore.num_records == 0:
            raise ValueError(f"no usable records in val_dataset {cfg.val_dataset}:\n{summary[-1]}")
        evl = BatchLoader(vstore, np.arange(vstore.num_records), train=False, **common)
    report = make_report(store, train, evl, report_batches)
    if vstore is not None:
        report["val_dataset"] = {k: vstore.meta.get(k) for k in ("records_read_total", "records_kept", "dropped",
                                                             "dropped_total", "warnings", "first_dropped")}
    if _is_rank0():
        # One WARNING block (the default level) so drops and oddities are seen, not just filed.
        log.warning("%s%s", "\n".join(summary),
                    f"\n  details: {report_path}" if report_path is not None else "")
        log.info("data report:\n%s", json.dumps(report, indent=1))
        if report_path is not None:
            Path(report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(report_path).write_text(json.dumps(report, indent=1))
    return DataBundle(train=train, eval=evl, report=report)


def make_report(store: TokenizedStore, train: BatchLoader, evl: BatchLoader | None, num_batches: int) -> dict:
    """Cache meta plus split sizes and packing efficiency over the first training batches."""
    meta = {k: v for k, v in store.meta.items() if k != "array_sizes"}
    probe = BatchLoader(store, train.record_ids, kind=train.kind, cfg=train.cfg, dp_rank=0,
                        dp_size=train.dp_size, global_batch_size=train.gbs, pad_multiple=train.pad_multiple,
                        pad_id=train.pad_id, train=True, microbatch_multiple=train.microbatch_multiple)
    probe.image_encoder = None  # the report counts tokens; no need to decode images
    real = slot = mbs = 0
    steps = min(num_batches, probe.batches_per_epoch)
    for _ in range(steps):
        recs = probe.sampler.next_batch()
        gb = probe.make_global_batch(recs)
        real, slot, mbs = real + gb.real_tokens, slot + gb.slot_tokens, mbs + len(gb.micro_batches)
    meta.update({
        "cache_dir": str(store.path), "train_records": int(len(train.record_ids)),
        "eval_records": int(len(evl.record_ids)) if evl else 0,
        "train_batches_per_epoch": train.batches_per_epoch,
        "packing": {"mode": "packed" if train.cfg.packing else "padded", "batches_measured": steps,
                    "micro_batches_per_rank_per_step": round(mbs / max(steps, 1), 2),
                    "efficiency_real_over_slots": round(real / slot, 4) if slot else None},
    })
    return meta
