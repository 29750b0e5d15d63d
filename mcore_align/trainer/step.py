"""One optimizer step on megatron's pipeline schedules, and the loss function seam.

Flow of a step (``Stepper.train_step``):

1. Micro-batches of this DP rank go to the device (CP ranks keep their slice).
2. Forward-only passes (``forward_only=True`` of the same schedule, so pipeline
   parallelism is handled by megatron) give per-sequence log-prob sums of the
   frozen reference (objectives with ``needs_reference``) and, for KTO, of the
   policy on the mismatched KL sequences; they are attached to the micro-batches.
3. ``forward_backward_func`` runs the policy. The loss function turns the model's
   output (final hidden states with the fused head, the default; vocab-parallel logits
   otherwise) into per-sequence sums (``ops.logprobs`` + ``ops.segments``, all-reduced
   over CP) and calls the objective, which returns a contribution already
   normalised by *global* counts. The provider builds with
   ``calculate_per_token_loss=True`` and ``finalize_model_grads`` is called without
   a token count, so megatron neither divides by the micro-batch count nor averages
   over DP: gradients are exactly those of the global-batch loss, however the batch
   is split (micro-batches, DP, packing, CP).
4. NaN/inf in the loss or the gradients skips the update on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.distributed as dist

from mcore_align.algorithms import GlobalCounts, SequenceStats
from mcore_align.algorithms.kto import kl_partial_sums, kl_reference_point
from mcore_align.ops.context_parallel import packed_seq_params, split_packed_for_cp
from mcore_align.models.heads import emits_hidden_states, lm_logprobs
from mcore_align.ops.logprobs import vocab_parallel_logprobs
from mcore_align.ops.segments import allreduce_segment_sums, segment_sums

ROLE_CHOSEN, ROLE_REJECTED, ROLE_UNPAIRED, ROLE_KL = 0, 1, 2, 3


@dataclass
class StepResult:
    metrics: dict[str, float]
    skipped: bool = False
    grad_norm: float | None = None


@dataclass
class DeviceBatch:
    """A micro-batch on the device, plus what earlier passes attached to it."""

    mb: object  # data.batch.MicroBatch (on device; CP slice when CP > 1)
    psp: object = None  # PackedSeqParams for the model (global boundaries), None when padded
    seg_cu: torch.Tensor | None = None  # [N+1] boundaries of this rank's tokens, for segment sums
    ref_sums: torch.Tensor | None = None  # [N] reference log-prob sums, all sequences
    policy_sums_nograd: torch.Tensor | None = None  # [N] policy sums from a forward-only pass
    extras: dict = field(default_factory=dict)


class Stepper:
    def __init__(self, runtime, objective, policy, reference=None, *, reference_is_base: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.rt = runtime
        self.objective = objective
        self.policy = policy
        self.reference = reference
        # [LoRA] the reference is the policy with its adapters switched off.
        self.reference_is_base = reference_is_base
        assert not (reference_is_base and reference is not None)
        self.fb = get_forward_backward_func()
        self.tp_group = runtime.pgs.tp
        self.cp_group = runtime.pgs.cp
        self.cp_size = runtime.parallel.context_parallel_size
        # [RM] the model ends in a value head: its output is per-token values [B, S, 1].
        self.value_head = getattr(objective, "output_head", "lm") == "value"

    # -- data ---------------------------------------------------------------------
    def to_device(self, micro_batches) -> list[DeviceBatch]:
        dev = self.rt.device
        out = []
        for mb in micro_batches:
            moved = replace(mb, **{
                k: getattr(mb, k).to(dev, non_blocking=True)
                for k in ("tokens", "position_ids", "labels", "loss_mask", "cu_seqlens")
            })
            if self.cp_size == 1:
                out.append(DeviceBatch(moved, psp=moved.packed_seq_params(), seg_cu=moved.cu_seqlens))
                continue
            # Context parallelism: this rank keeps chunks r and 2*CP-1-r of every sequence;
            # attention and RoPE get the global boundaries, segment sums the local ones.
            tok, lab, mask, pos, cu_local = split_packed_for_cp(
                moved.tokens, moved.labels, moved.loss_mask, moved.position_ids,
                cu_seqlens=moved.cu_seqlens, cp_rank=self.cp_group.rank(), cp_size=self.cp_size,
            )
            psp = packed_seq_params(moved.cu_seqlens, cp_group=self.cp_group)
            moved = replace(moved, tokens=tok, labels=lab, loss_mask=mask, position_ids=pos)
            out.append(DeviceBatch(moved, psp=psp, seg_cu=cu_local))
        return out

    # -- forward pieces -------------------------------------------------------------
    @staticmethod
    def _model_forward(model, b: "DeviceBatch"):
        return model(
            input_ids=b.mb.tokens, position_ids=b.mb.position_ids, attention_mask=None,
            packed_seq_params=b.psp,
        )

    def sequence_sums(self, b: "DeviceBatch", output, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence sums of target log-probs over loss tokens: ([N], [N]), whole sequences.

        ``output`` is what ``model`` returned: vocab-parallel logits ``[B, S, V/TP]``, or (fused
        head, models/heads.py) final hidden states ``[B, S(/TP with SP), H]`` that go through
        the output-layer matmul chunk by chunk inside the log-prob kernel.
        """
        if emits_hidden_states(model):
            logp_BS = lm_logprobs(model, output, b.mb.labels)
        else:
            logits = output.float() if output.dtype == torch.float16 else output
            logp_BS = vocab_parallel_logprobs(logits, b.mb.labels, self.tp_group)
        sums_N, counts_N = segment_sums(logp_BS.reshape(-1), b.mb.loss_mask.reshape(-1), b.seg_cu)
        if self.cp_size > 1:
            sums_N, counts_N = allreduce_segment_sums(sums_N, counts_N, self.cp_group)
        return sums_N, counts_N

    def _run(self, chunks, batches: list[DeviceBatch], step_fn, forward_only: bool):
        seq_len = max(int(b.mb.tokens.shape[-1]) for b in batches)
        micro = int(batches[0].mb.tokens.shape[0])
        return self.fb(
            forward_step_func=step_fn,
            data_iterator=[iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches),
            seq_length=seq_len,
            micro_batch_size=micro,
            forward_only=forward_only,
        )

    def forward_only_sums(self, chunks, batches: list[DeviceBatch]) -> list[torch.Tensor] | None:
        """Per-sequence log-prob sums of ``chunks`` for every micro-batch (last PP stage; else None)."""

        def step(data_iterator, model):
            b = next(data_iterator)
            out = self._model_forward(model, b)

            def loss_fn(output):
                sums, _ = self.sequence_sums(b, output, model)
                zero = output.new_zeros(())
                return zero, torch.tensor(0, dtype=torch.int), {"sums": sums.detach()}

            return out, loss_fn

        with torch.no_grad():
            outs = self._run(chunks, batches, step, forward_only=True)
        if not outs:
            return None
        return [o["sums"] for o in outs]

    def reference_sums(self, batches: list[DeviceBatch]) -> list[torch.Tensor] | None:
        """Reference log-prob sums: the frozen reference, or (LoRA) the policy without adapters."""
        if self.reference_is_base:  # [LoRA]
            from mcore_align.models.lora import adapters_disabled

            with adapters_disabled(self.policy):
                return self.forward_only_sums(self.policy, batches)
        assert self.reference is not None, "objective needs a reference but none was built"
        return self.forward_only_sums(self.reference, batches)

    # -- statistics for the objective -----------------------------------------------
    def build_stats(self, b: DeviceBatch, sums_N, counts_N, kl_reference) -> SequenceStats:
        mb = b.mb
        role = mb.seq_role.to(sums_N.device)
        scored = role != ROLE_KL
        kl = role == ROLE_KL
        ref = b.ref_sums
        stats = SequenceStats(
            logps=sums_N[scored],
            num_tokens=counts_N[scored],
            ref_logps=ref[scored] if ref is not None else None,
            labels=mb.kto_label.to(sums_N.device)[scored] if kl.any() else None,
        )
        if kl.any():
            # KL sequences follow the pair_index order of their examples.
            order = torch.argsort(mb.pair_index.to(sums_N.device)[kl])
            stats.kl_logps = b.policy_sums_nograd[kl][order]
            stats.ref_kl_logps = ref[kl][order]
            stats.kl_reference = kl_reference
        return stats

    def _loss_fn(self, b: DeviceBatch, counts: GlobalCounts, kl_reference, model, output):
        if self.value_head:  # [RM] output = values [B, S, 1]: one reward per sequence (its last token)
            from mcore_align.models.heads import sequence_rewards

            mb = b.mb
            rewards = sequence_rewards(output, mb.position_ids, mb.seq_lengths, b.seg_cu,
                                       self.cp_group if self.cp_size > 1 else None)
            stats = SequenceStats(logps=rewards.detach(), num_tokens=mb.num_loss_tokens.to(rewards.device),
                                  rewards=rewards, margins=_pair_margins(mb, rewards.device))
        else:  # output = vocab-parallel logits [B, S, V/TP] or hidden states (fused head)
            sums, cnts = self.sequence_sums(b, output, model)
            stats = self.build_stats(b, sums, cnts, kl_reference)
        loss, metrics = self.objective(stats, counts)
        report = {"loss": loss.detach().reshape(()).float()}
        for name, (s, c) in metrics.items():
            report[name] = torch.stack([s.detach().float().reshape(()), c.detach().float().reshape(())])
        return loss, torch.tensor(1, dtype=torch.int), report

    # -- the step -------------------------------------------------------------------
    def prepare(self, global_batch, ref_cache=None) -> tuple[list[DeviceBatch], torch.Tensor | None]:
        """Device batches with reference / KL sums attached; returns (batches, z0 or None).

        ``ref_cache``: precomputed reference sums of these micro-batches (a list, empty on
        non-last pipeline stages), or None to run the reference now."""
        batches = self.to_device(global_batch.micro_batches)
        if self.objective.needs_reference:
            ref = ref_cache if ref_cache is not None else self.reference_sums(batches)
            for b, r in zip(batches, ref or []):
                b.ref_sums = r
        z0 = None
        if any(bool((b.mb.seq_role == ROLE_KL).any()) for b in batches):
            pol = self.forward_only_sums(self.policy, batches)
            z0 = self._kl_reference(batches, pol)
        return batches, z0

    def _kl_reference(self, batches, pol_sums):
        s = torch.zeros(2, dtype=torch.float64, device=self.rt.device)
        if pol_sums is not None:  # last PP stage
            for b, p in zip(batches, pol_sums):
                b.policy_sums_nograd = p
                kl = b.mb.seq_role.to(p.device) == ROLE_KL
                ks, kc = kl_partial_sums(SequenceStats(logps=p, num_tokens=p, kl_logps=p[kl], ref_kl_logps=b.ref_sums[kl]))
                s += torch.stack([ks, kc]).double()
        dist.all_reduce(s, group=self.rt.pgs.dp)  # every DP rank sees the global z0
        return kl_reference_point(s[0], s[1]).float()

    def train_step(self, global_batch, optimizer, scheduler, ref_cache=None) -> StepResult:
        batches, z0 = self.prepare(global_batch, ref_cache)
        counts = GlobalCounts(**global_batch.counts_dict())
        for m in self.policy:
            m.zero_grad_buffer()
        optimizer.zero_grad()

        def step(data_iterator, model):
            b = next(data_iterator)
            out = self._model_forward(model, b)
            return out, partial(self._loss_fn, b, counts, z0, model)

        outs = self._run(self.policy, batches, step, forward_only=False)
        metrics = self.reduce_metrics(outs)
        self._update_objective_state()
        bad = torch.tensor([0.0 if math.isfinite(metrics.get("loss", 0.0)) and self._grads_finite() else 1.0],
                           device=self.rt.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        # fp16: megatron's loss scaler must see the overflow to back off, so its optimizer
        # step (which finds the inf, lowers the scale and skips) runs instead of ours.
        if bad.item() > 0 and not _has_loss_scaler(optimizer):
            for m in self.policy:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            return StepResult(metrics, skipped=True)
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=1)
        return StepResult(metrics, skipped=not ok, grad_norm=float(grad_norm) if grad_norm is not None else None)

    def eval_step(self, global_batch, ref_cache=None) -> dict[str, float]:
        """Objective metrics of the policy on a batch, without gradients."""
        batches, z0 = self.prepare(global_batch, ref_cache)
        counts = GlobalCounts(**global_batch.counts_dict())

        def step(data_iterator, model):
            b = next(data_iterator)
            out = self._model_forward(model, b)
            return out, partial(self._loss_fn, b, counts, z0, model)

        with torch.no_grad():
            outs = self._run(self.policy, batches, step, forward_only=True)
        return self.reduce_metrics(outs)

    def _update_objective_state(self) -> None:
        """Stateful objectives (bco_pair's running reward mean) see global-batch sums once per step."""
        partial_sums = self.objective.state_partial_sums() if hasattr(self.objective, "state_partial_sums") else None
        if partial_sums is None:
            return
        partial_sums = partial_sums.to(self.rt.device, torch.float64)
        dist.all_reduce(partial_sums, group=self.rt.pgs.dp)
        self.objective.update_state(partial_sums)

    def _grads_finite(self) -> bool:
        for m in self.policy:
            for buf in getattr(m, "buffers", []):
                if not torch.isfinite(buf.grad_data).all():
                    return False
        return True

    def reduce_metrics(self, outs) -> dict[str, float]:
        """Sum (sum, count) metrics over micro-batches and DP; the same dict on every rank."""
        local: dict[str, torch.Tensor] = {}
        for o in outs or []:
            for k, v in o.items():
                local[k] = local.get(k, 0) + v.detach().double().cpu()
        gathered = [None] * self.rt.pgs.dp.size()
        dist.all_gather_object(gathered, local, group=self.rt.pgs.dp)
        total: dict[str, torch.Tensor] = {}
        for d in gathered:
            for k, v in d.items():
                total[k] = total.get(k, 0) + v
        result = {}
        for k, v in total.items():
            if v.dim() == 0:
                result[k] = float(v)
            else:
                result[k] = float(v[0] / v[1]) if v[1] > 0 else float("nan")
        # Only the last pipeline stage computed them: hand them to every stage.
        obj = [result]
        pp = self.rt.pgs.pp
        last = dist.get_global_rank(pp, pp.size() - 1)
        dist.broadcast_object_list(obj, src=last, group=pp)
        return obj[0]


def _has_loss_scaler(optimizer) -> bool:
    """True for fp16 (a dynamic loss scaler skips overflowing steps itself)."""
    return any(getattr(o, "grad_scaler", None) is not None
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _pair_margins(mb, device) -> torch.Tensor | None:
    """[RM] per-pair margins [P] in pair order (the chosen sequences), or None when the data
    has none; a pair without one (NaN) gets 0 (plain Bradley-Terry)."""
    m = mb.margin[mb.seq_role == ROLE_CHOSEN]
    if not torch.isfinite(m).any():
        return None
    return torch.nan_to_num(m, nan=0.0).to(device)
