"""One optimizer step on megatron's pipeline schedules, and the loss function seam.

Flow of a step (``Stepper.train_step``):

1. Micro-batches of this DP rank go to the device (CP ranks keep their slice).
2. Forward-only passes (``forward_only=True`` of the same schedule, so pipeline
   parallelism is handled by megatron) compute what the objective declares in
   ``Objective.inputs`` (algorithms/base.py) beyond the policy's own forward: reference
   log-prob sums (``ref_logps``, ``ref_kl_logps``; the reference is whatever
   ``trainer/reference.py`` provides), a no-grad policy pass over the auxiliary sequences
   (``kl_logps``), and a global statistic summed over the step (``kl_reference``). They
   are attached to the micro-batches. The step never names an objective.
3. ``forward_backward_func`` runs the policy. The loss function turns the model's
   output (final hidden states with the fused head, the default; vocab-parallel logits
   otherwise) into per-sequence sums (``ops.logprobs`` + ``ops.segments``, all-reduced
   over CP) and calls the objective, which returns a contribution already
   normalised by *global* counts. The provider builds with
   ``calculate_per_token_loss=True`` and ``finalize_model_grads`` is called without
   a token count, so megatron neither divides by the micro-batch count nor averages
   over DP: gradients are exactly those of the global-batch loss, however the batch
   is split (micro-batches, DP, packing, CP).
   MoE with ``model.moe_aux_loss_coeff`` > 0: a forward-only counting pass over the step's
   micro-batches first finds the global batch's expert loads, so the load-balancing loss
   is that of the global batch too (models/moe_aux.py).
4. NaN/inf in the loss or the gradients skips the update on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.distributed as dist

from mcore_align.algorithms import GlobalCounts, SequenceStats
from mcore_align.algorithms.base import TOKEN_EXTRAS
from mcore_align.data.batch import ROLE_CHOSEN, ROLE_KL
from mcore_align.models.vision import is_multimodal, multimodal_forward, unwrap
from mcore_align.ops.context_parallel import cp_local_token_index, packed_seq_params, split_packed_for_cp
from mcore_align.models.heads import emits_hidden_states, lm_logprobs
from mcore_align.ops.logprobs import vocab_parallel_logprobs
from mcore_align.ops.segments import allreduce_segment_sums, segment_of_token, segment_sums


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
    images: dict | None = None  # vision: the micro-batch's image tensors on the device (MicroBatch.images)
    full_tokens: torch.Tensor | None = None  # vision + CP: the uncut [1, T] row (the merge needs it whole)
    cp_index: torch.Tensor | None = None  # vision + CP: this rank's token positions in that row
    padding_mask: torch.Tensor | None = None  # MoE aux loss: [B, S] bool, True where not a real token


class Stepper:
    def __init__(self, runtime, objective, policy, reference=None):  # noqa: D107
        """``reference``: a trainer/reference.py provider (``.models()``), or None when the
        objective reads no reference sums (or they are precomputed)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        self.rt = runtime
        self.objective = objective
        self.inputs = objective.inputs
        self.policy = policy
        self.reference = reference
        self.fb = get_forward_backward_func()
        self.tp_group = runtime.pgs.tp
        self.cp_group = runtime.pgs.cp
        self.cp_size = runtime.parallel.context_parallel_size
        from mcore_align.models.moe_aux import GlobalBatchAuxLoss

        # The MoE load-balancing loss over the global batch (models/moe_aux.py), or None.
        self.aux = GlobalBatchAuxLoss.of(policy) if policy else None

    # -- data ---------------------------------------------------------------------
    def to_device(self, micro_batches) -> list[DeviceBatch]:
        dev = self.rt.device
        out = []
        for mb in micro_batches:
            moved = replace(mb, **{
                k: getattr(mb, k).to(dev, non_blocking=True)
                for k in ("tokens", "position_ids", "labels", "loss_mask", "cu_seqlens")
            }, extras={k: v.to(dev, non_blocking=True) for k, v in mb.extras.items()},
               images={k: v.to(dev, non_blocking=True) for k, v in mb.images.items()})
            # Per-token extras (online objectives) are not split for context parallelism.
            assert not (mb.extras and self.cp_size > 1), "per-token batch extras with context parallelism"
            images = moved.images or None
            if self.cp_size == 1:
                out.append(DeviceBatch(moved, psp=moved.packed_seq_params(), seg_cu=moved.cu_seqlens, images=images,
                                       padding_mask=self._padding_mask(moved, moved.cu_seqlens)))
                continue
            # Context parallelism: this rank keeps chunks r and 2*CP-1-r of every sequence;
            # attention and RoPE get the global boundaries, segment sums the local ones.
            tok, lab, mask, pos, cu_local = split_packed_for_cp(
                moved.tokens, moved.labels, moved.loss_mask, moved.position_ids,
                cu_seqlens=moved.cu_seqlens, cp_rank=self.cp_group.rank(), cp_size=self.cp_size,
            )
            psp = packed_seq_params(moved.cu_seqlens, cp_group=self.cp_group)
            # The whole row goes along (M-RoPE positions are computed on it, per sequence).
            vision = dict(full_tokens=moved.tokens)
            if images:  # image features are merged on the whole row, then this rank's tokens picked
                vision.update(images=images, cp_index=cp_local_token_index(
                    moved.cu_seqlens, self.cp_group.rank(), self.cp_size).to(dev))
            moved = replace(moved, tokens=tok, labels=lab, loss_mask=mask, position_ids=pos)
            out.append(DeviceBatch(moved, psp=psp, seg_cu=cu_local, padding_mask=self._padding_mask(moved, cu_local),
                                   **vision))
        return out

    def _padding_mask(self, mb, seg_cu) -> torch.Tensor | None:
        """``[B, S]`` bool, True at positions that are not real tokens (padding to a multiple of
        TP x CP, padded rows), for the MoE aux loss (megatron's ``padding_mask``); None when it
        is off. Positions count on past a sequence's end, so padding is ``position >= length``
        (also on a CP slice: position ids are positions in the sequence).
        Example: lengths [5, 3] padded to 8 and 4: positions [0..7 | 0..3] -> mask
        [F F F F F T T T | F F F T]."""
        if self.aux is None:
            return None
        pos_T = mb.position_ids.reshape(-1)
        seg_T = segment_of_token(seg_cu, pos_T.shape[0])
        return (pos_T >= mb.seq_lengths.to(pos_T.device)[seg_T]).reshape(mb.tokens.shape)

    # -- forward pieces -------------------------------------------------------------
    def _model_forward(self, model, b: "DeviceBatch"):
        if b.images or is_multimodal(unwrap(model)):
            if b.padding_mask is not None:
                raise ValueError("model.moe_aux_loss_coeff > 0 is not supported for vision-language models")
            # Vision-language model: image features merged into the embeddings on the first
            # stage (models/vision.py), M-RoPE positions on every stage; text-only
            # micro-batches run the text forward there.
            return multimodal_forward(model, b.mb.tokens, b.mb.position_ids, None, image_inputs=b.images,
                                      full_input_ids_BS=b.full_tokens, cp_index_S=b.cp_index,
                                      packed_seq_params=b.psp)
        extra = {}
        if b.padding_mask is not None:  # MoE aux loss: padding is not routed for it
            pad_BS = b.padding_mask
            if self.rt.parallel.sequence_parallel and not unwrap(model).pre_process:
                # GPTModel scatters the mask over SP on the first stage only; later stages get
                # this TP rank's slice of positions here (as the hidden states they receive).
                tp, r = self.tp_group.size(), self.tp_group.rank()
                s = pad_BS.shape[1] // tp
                pad_BS = pad_BS[:, r * s:(r + 1) * s]
            extra["padding_mask"] = pad_BS
        return model(
            input_ids=b.mb.tokens, position_ids=b.mb.position_ids, attention_mask=None,
            packed_seq_params=b.psp, **extra,
        )

    def token_logprobs(self, b: "DeviceBatch", output, model, temperature: float = 1.0, entropy: bool = False):
        """``[T]`` log-prob of every position's label (this rank's tokens, flattened); with
        ``entropy`` also ``[T]`` the (detached) entropy of each position's distribution.

        ``temperature``: log-probs of ``softmax(logits / temperature)`` (online objectives score
        their samples at the sampling temperature). With the fused head the hidden states are
        divided instead: ``(h / t) W^T = (h W^T) / t``, so the logits still never exist whole."""
        if emits_hidden_states(model):
            hidden = output / temperature if temperature != 1.0 else output
            out = lm_logprobs(model, hidden, b.mb.labels, return_entropy=entropy)
        else:
            logits = output.float() if output.dtype == torch.float16 else output
            logits = logits / temperature if temperature != 1.0 else logits
            out = vocab_parallel_logprobs(logits, b.mb.labels, self.tp_group, return_entropy=entropy)
        if entropy:
            return out[0].reshape(-1), out[1].detach().reshape(-1)
        return out.reshape(-1)

    def sequence_sums(self, b: "DeviceBatch", output, model, whole_sequence: bool = False):
        """Per-sequence sums of target log-probs over loss tokens: ([N], [N]), whole sequences.

        ``output`` is what ``model`` returned: vocab-parallel logits ``[B, S, V/TP]``, or (fused
        head, models/heads.py) final hidden states ``[B, S(/TP with SP), H]`` that go through
        the output-layer matmul chunk by chunk inside the log-prob kernel.
        ``whole_sequence``: also return the sums and counts over every predicted token of each
        sequence, prompt included (positions 0..L-2, whose labels are tokens 1..L-1), from the
        same log-probs: ``(sums, counts, seq_sums, seq_counts)``.
        """
        logp_T = self.token_logprobs(b, output, model)
        cp = self.cp_group if self.cp_size > 1 else None
        sums_N, counts_N = allreduce_segment_sums(*segment_sums(logp_T, b.mb.loss_mask.reshape(-1), b.seg_cu), cp)
        if not whole_sequence:
            return sums_N, counts_N
        # Position p of a sequence of length L predicts token p + 1: positions 0..L-2 (this
        # works on a CP slice too: position ids are the tokens' positions in their sequence).
        pos_T = b.mb.position_ids.reshape(-1)
        seg_T = segment_of_token(b.seg_cu, logp_T.shape[0])
        predicted_T = pos_T < (b.mb.seq_lengths.to(pos_T.device)[seg_T] - 1)
        seq_sums_N, seq_counts_N = allreduce_segment_sums(*segment_sums(logp_T, predicted_T, b.seg_cu), cp)
        return sums_N, counts_N, seq_sums_N, seq_counts_N

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

    def forward_only_token_logprobs(self, chunks, batches: list[DeviceBatch], temperature: float = 1.0
                                    ) -> list[torch.Tensor] | None:
        """Per-token label log-probs ``[T]`` of ``chunks`` for every micro-batch (last PP stage;
        else None), at ``temperature``."""

        def step(data_iterator, model):
            b = next(data_iterator)
            out = self._model_forward(model, b)

            def loss_fn(output):
                logp_T = self.token_logprobs(b, output, model, temperature)
                return output.new_zeros(()), torch.tensor(0, dtype=torch.int), {"logp": logp_T.detach()}

            return out, loss_fn

        with torch.no_grad():
            outs = self._run(chunks, batches, step, forward_only=True)
        return [o["logp"] for o in outs] if outs else None

    def forward_only_values(self, chunks, batches: list[DeviceBatch], last_token: bool
                            ) -> list[torch.Tensor] | None:
        """A value-head model's output for every micro-batch (last PP stage; else None): the
        value at every position ``[T]``, or (``last_token``) at each sequence's last token
        ``[N]`` (a reward model's score, as the RM objective reads it)."""
        from mcore_align.models.heads import sequence_rewards

        def step(data_iterator, model):
            b = next(data_iterator)
            out = self._model_forward(model, b)

            def loss_fn(output):
                if last_token:
                    v = sequence_rewards(output, b.mb.position_ids, b.mb.seq_lengths, b.seg_cu,
                                         self.cp_group if self.cp_size > 1 else None)
                else:
                    v = output.reshape(-1).float()
                return output.new_zeros(()), torch.tensor(0, dtype=torch.int), {"v": v.detach()}

            return out, loss_fn

        with torch.no_grad():
            outs = self._run(chunks, batches, step, forward_only=True)
        return [o["v"] for o in outs] if outs else None

    def reference_sums(self, batches: list[DeviceBatch]) -> list[torch.Tensor] | None:
        """Reference log-prob sums of every sequence (last PP stage; else None)."""
        assert self.reference is not None, "objective needs a reference but none was built"
        with self.reference.models() as chunks:
            return self.forward_only_sums(chunks, batches)

    # -- statistics for the objective -----------------------------------------------
    def build_stats(self, b: DeviceBatch, output, model, global_stat=None) -> SequenceStats:
        """The `SequenceStats` fields the objective declares, for this micro-batch.

        ``output`` is the model's output (values ``[B, S, 1]`` for a value head; logits or
        hidden states for the LM head), or None for the no-grad pre-pass, which reads the
        sums attached by `prepare`. Auxiliary sequences (role KL) are not scored: they only
        feed ``kl_logps`` / ``ref_kl_logps``, in the pair order of their examples."""
        mb, want = b.mb, self.inputs
        role = mb.seq_role
        scored = role != ROLE_KL
        stats = SequenceStats()
        if "rewards" in want:  # value head: one reward per sequence, at its last token
            from mcore_align.models.heads import sequence_rewards

            rewards = sequence_rewards(output, mb.position_ids, mb.seq_lengths, b.seg_cu,
                                       self.cp_group if self.cp_size > 1 else None)
            stats.rewards = rewards[scored.to(rewards.device)]
        if "token_logps" in want or "token_values" in want:  # per-token: this rank's flat positions
            if "token_logps" in want:  # at the objective's temperature
                out = self.token_logprobs(b, output, model, self.objective.logprob_temperature,
                                          entropy="token_entropy" in want)
                stats.token_logps, stats.token_entropy = out if "token_entropy" in want else (out, None)
                stats.token_mask = mb.loss_mask.reshape(-1).to(stats.token_logps.dtype)
            if "token_values" in want:  # value head: values [B, S, 1] at every position
                stats.token_values = output.reshape(-1).float()
            for name in want & TOKEN_EXTRAS:
                setattr(stats, name, mb.extras[name].reshape(-1))
            return stats
        if "logps" in want or "num_tokens" in want:
            if output is None:
                sums, cnts = b.policy_sums_nograd, mb.num_loss_tokens.to(b.policy_sums_nograd.device)
            else:
                whole = "seq_logps" in want
                sums, cnts, *seq = self.sequence_sums(b, output, model, whole_sequence=whole)
            scored_d = scored.to(sums.device)
            stats.logps, stats.num_tokens = sums[scored_d], cnts[scored_d]
            if output is not None and whole:
                stats.seq_logps, stats.seq_num_tokens = seq[0][scored_d], seq[1][scored_d]
        dev = stats.logps.device if stats.logps is not None else stats.rewards.device
        if "ref_logps" in want:
            stats.ref_logps = b.ref_sums[scored.to(dev)]
        if "labels" in want:
            stats.labels = mb.kto_label.to(dev)[scored.to(dev)]
        if "margins" in want:
            stats.margins = _pair_margins(mb, dev)
        aux = (role == ROLE_KL).to(dev)
        order = torch.argsort(mb.pair_index.to(dev)[aux])
        if "kl_logps" in want:
            stats.kl_logps = b.policy_sums_nograd[aux][order]
        if "ref_kl_logps" in want:
            stats.ref_kl_logps = b.ref_sums[aux][order]
        if "kl_reference" in want:
            stats.kl_reference = global_stat
        return stats

    def _loss_fn(self, b: DeviceBatch, counts: GlobalCounts, global_stat, model, output):
        stats = self.build_stats(b, output, model, global_stat)
        loss, metrics = self.objective(stats, counts)
        report = {"loss": loss.detach().reshape(()).float()}
        for name, (s, c) in metrics.items():
            report[name] = torch.stack([s.detach().float().reshape(()), c.detach().float().reshape(())])
        return loss, torch.tensor(1, dtype=torch.int), report

    # -- the step -------------------------------------------------------------------
    def prepare(self, global_batch, ref_cache=None) -> tuple[list[DeviceBatch], torch.Tensor | None]:
        """Device batches with what the objective declares attached; returns (batches, the
        global statistic or None).

        ``ref_cache``: precomputed reference sums of these micro-batches (a list, empty on
        non-last pipeline stages), or None to run the reference now."""
        batches = self.to_device(global_batch.micro_batches)
        if self.inputs & {"ref_logps", "ref_kl_logps"}:  # per-token reference inputs ride with the batch
            ref = ref_cache if ref_cache is not None else self.reference_sums(batches)
            for b, r in zip(batches, ref or []):
                b.ref_sums = r
        if "kl_logps" in self.inputs:  # no-grad policy sums (of the auxiliary sequences)
            for b, p in zip(batches, self.forward_only_sums(self.policy, batches) or []):
                b.policy_sums_nograd = p
        global_stat = self._global_statistic(batches) if "kl_reference" in self.inputs else None
        return batches, global_stat

    def _global_statistic(self, batches) -> torch.Tensor | None:
        """The objective's pre-pass statistic over the whole step: the partial sums of every
        micro-batch summed over DP (the same value on every DP rank). Only the last pipeline
        stage holds sums and computes the loss; other stages get None."""
        pp = self.rt.pgs.pp
        if pp.rank() != pp.size() - 1:
            return None
        total = sum(self.objective.global_partial_sums(self.build_stats(b, None, None)).double() for b in batches)
        total = total.to(self.rt.device)
        dist.all_reduce(total, group=self.rt.pgs.dp)  # a DP group lies within one PP stage
        return self.objective.global_statistic(total).float()

    def train_step(self, global_batch, optimizer, scheduler, ref_cache=None) -> StepResult:
        batches, global_stat = self.prepare(global_batch, ref_cache)
        counts = GlobalCounts(**global_batch.counts_dict())
        for m in self.policy:
            m.zero_grad_buffer()
        optimizer.zero_grad()

        def step(data_iterator, model):
            b = next(data_iterator)
            out = self._model_forward(model, b)
            return out, partial(self._loss_fn, b, counts, global_stat, model)

        if self.aux is not None:
            self._count_expert_loads(batches)
        outs = self._run(self.policy, batches, step, forward_only=False)
        metrics = self.reduce_metrics(outs)
        if self.aux is not None:
            metrics.update(self.aux.metrics(self.rt.device))
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

    def eval_sums(self, global_batch, ref_cache=None, counts: GlobalCounts | None = None
                  ) -> dict[str, tuple[float, float]]:
        """(sum, count) of every objective metric of the policy on one batch, without
        gradients, reduced over micro-batches and DP (the same on every rank).

        ``counts``: the global counts the loss is normalised by; default the batch's own.
        Evaluation over several batches passes the counts of ALL of them (`pooled_counts`),
        so the batches' loss contributions add up to the loss of the whole held-out set, as
        the micro-batches of one training step add up to its loss. The loss comes back as
        (contribution, this batch's share of the counts' units), so shares add up to 1 and
        `finalize_metrics` returns the pooled loss; metrics add their sums and counts."""
        batches, global_stat = self.prepare(global_batch, ref_cache)
        own = GlobalCounts(**global_batch.counts_dict())
        counts = counts or own

        def step(data_iterator, model):
            b = next(data_iterator)
            out = self._model_forward(model, b)
            return out, partial(self._loss_fn, b, counts, global_stat, model)

        with torch.no_grad():
            outs = self._run(self.policy, batches, step, forward_only=True)
        sums = self.reduce_metric_sums(outs)
        sums["loss"] = (sums["loss"][0], self._units(own) / self._units(counts))
        return sums

    def _units(self, counts: GlobalCounts) -> float:
        """What a loss averages over: pairs (paired data) or sequences."""
        return float(counts.num_pairs if self.objective.paired else counts.num_sequences)

    def eval_step(self, global_batch, ref_cache=None) -> dict[str, float]:
        """Objective metrics of the policy on one batch, without gradients."""
        return finalize_metrics(self.eval_sums(global_batch, ref_cache))

    def _count_expert_loads(self, batches: list[DeviceBatch]) -> None:
        """The MoE aux loss's counting pass: a forward-only pass of the policy over this step's
        micro-batches (the same schedule, so PP works), in which the routers count the global
        batch's expert loads (models/moe_aux.py); the sums over all ranks follow."""

        def step(data_iterator, model):
            b = next(data_iterator)
            out = self._model_forward(model, b)
            return out, lambda output: (output.new_zeros(()), torch.tensor(0, dtype=torch.int), {})

        with torch.no_grad(), self.aux.counting():
            self._run(self.policy, batches, step, forward_only=True)
        self.aux.reduce_counts(self.rt.device)

    def _update_objective_state(self) -> None:
        """Stateful objectives (bco_pair's running reward mean) see global-batch sums once per step."""
        partial_sums = self.objective.state_partial_sums()
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

    def reduce_metric_sums(self, outs) -> dict[str, tuple[float, float]]:
        """Sum the loss contributions and the (sum, count) metrics of every micro-batch over
        micro-batches and DP; the same dict on every rank. The loss is (batch loss, 1)."""
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
        result = {k: (float(v), 1.0) if v.dim() == 0 else (float(v[0]), float(v[1])) for k, v in total.items()}
        # Only the last pipeline stage computed them: hand them to every stage.
        obj = [result]
        pp = self.rt.pgs.pp
        last = dist.get_global_rank(pp, pp.size() - 1)
        dist.broadcast_object_list(obj, src=last, group=pp)
        return obj[0]

    def reduce_metrics(self, outs) -> dict[str, float]:
        """`reduce_metric_sums`, divided: the step's metrics."""
        return finalize_metrics(self.reduce_metric_sums(outs))


def add_metric_sums(total: dict[str, tuple[float, float]], more: dict[str, tuple[float, float]]) -> None:
    """total += more, (sum, count) per key, in place."""
    for k, (s, c) in more.items():
        s0, c0 = total.get(k, (0.0, 0.0))
        total[k] = (s0 + s, c0 + c)


def pooled_counts(global_batches) -> GlobalCounts:
    """The global counts of several batches taken as one (evaluation over a held-out set)."""
    total: dict[str, int] = {}
    for gb in global_batches:
        for k, v in gb.counts_dict().items():
            total[k] = total.get(k, 0) + v
    return GlobalCounts(**total)


def finalize_metrics(sums: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{name: sum / count}; NaN for a metric that had nothing to average (count 0)."""
    return {k: s / c if c > 0 else float("nan") for k, (s, c) in sums.items()}


def _has_loss_scaler(optimizer) -> bool:
    """True for fp16 (a dynamic loss scaler skips overflowing steps itself)."""
    return any(getattr(o, "grad_scaler", None) is not None
               for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _pair_margins(mb, device) -> torch.Tensor | None:
    """Per-pair margins [P] in pair order (the chosen sequences), or None when the data has
    none; a pair without one (NaN) gets 0 (plain Bradley-Terry)."""
    m = mb.margin[mb.seq_role == ROLE_CHOSEN]
    if not torch.isfinite(m).any():
        return None
    return torch.nan_to_num(m, nan=0.0).to(device)
