"""The rollout phase of online objectives (``data_kind="prompt"``: GRPO, RLOO).

Before the optimizer step, a global batch of prompts becomes a global batch of scored
experience, which the ordinary step (trainer/step.py) then trains on:

1. **Generate** ``num_generations`` responses per prompt with the rollout engine
   (``mcore_align.rollout``; the "megatron" backend samples on the policy's own TP/PP chunks).
   Every rank of a pipeline gets the same tokens; DP ranks sample their own prompts.
2. **Pack** prompt + response sequences into micro-batches (the response tokens are the loss
   tokens) and run the forward-only passes the objective needs, with megatron's schedules:
   the policy's own log-probs at the sampling temperature (``token_old_logps``, recomputed
   by the training forward, not taken from the generator), the reference's (KL), the
   critic's values, the reward model's score (its value at each response's last token).
   The last pipeline stage computes them and broadcasts them to the other stages.
3. **Score**: reward model plus the user's reward functions on the decoded texts (and the
   records' other dataset columns)
   (``algorithms/ppo/reward_funcs.py``), minus ``missing_eos_penalty`` for responses that
   hit ``response_length`` without a stop token.
4. **Advantages** from the registered estimator (``algorithms/ppo/advantages``): "gae"
   (PPO; per-token rewards ``-kl_coef * KL`` plus the score after the last token, then GAE
   with the critic's values; TRL's PPOTrainer), "grpo" / "rloo" (one score per response,
   compared within the prompt's group, which is on the same rank).
5. **Updates**: the per-token tensors ride with the micro-batches (``MicroBatch.extras``),
   split into ``num_mini_batches`` mini-batches (shuffled with a seeded generator, as TRL
   permutes) for each of ``num_ppo_epochs`` epochs; one optimizer step each.

Reward functions run on every rank (each computes the same scores from the same texts), so
they must be deterministic. The generation seed is ``(train.seed, step)``: a resumed run
samples the same tokens as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import time

import numpy as np
import torch
import torch.distributed as dist

from mcore_align.data.batch import ROLE_UNPAIRED, GlobalBatch, MicroBatch, SeqRef, collate_arrays

log = logging.getLogger(__name__)


def check_online_support(cfg, objective) -> None:
    """What the rollout phase does not do yet, refused before anything is built."""
    par, t = cfg.parallel, cfg.train
    if par.virtual_pipeline_model_parallel_size:
        raise ValueError(f"rlhf_type={objective.name}: the rollout engine needs one model chunk per rank; "
                         "unset virtual_pipeline_model_parallel_size")
    if par.context_parallel_size > 1 or par.sequence_parallel:
        raise ValueError(f"rlhf_type={objective.name}: generation does not support context or sequence "
                         "parallelism yet; set context_parallel_size=1 and sequence_parallel=false")
    if t.ref_model == "precompute":
        raise ValueError(f"rlhf_type={objective.name}: the reference scores the policy's fresh samples every "
                         "step; ref_model=precompute cannot be used (use co_resident)")
    if t.eval_interval or cfg.data.val_dataset or cfg.data.val_fraction:
        raise ValueError(f"rlhf_type={objective.name}: held-out evaluation of online objectives is not "
                         "implemented; unset train.eval_interval, data.val_dataset and data.val_fraction")
    if cfg.data.max_length <= objective.cfg.response_length:
        raise ValueError(f"data.max_length={cfg.data.max_length} leaves no room for a prompt before "
                         f"response_length={objective.cfg.response_length}")


def prompt_data_config(data_cfg, objective):
    """Prompts get ``max_length - response_length`` tokens; longer ones are dropped and counted
    (``too_long`` in the data report), never cut inside the chat template."""
    import dataclasses

    return dataclasses.replace(data_cfg, max_length=data_cfg.max_length - objective.cfg.response_length,
                               truncation_strategy="delete")


def prompt_token_ids(mb: MicroBatch) -> list[list[int]]:
    """The sequences of a micro-batch as token lists (packed ``[1, T]`` or padded ``[B, S]``)."""
    out = []
    lens = mb.seq_lengths.tolist()
    if mb.packed:
        flat = mb.tokens.reshape(-1)
        for i, n in enumerate(lens):
            a = int(mb.cu_seqlens[i])
            out.append(flat[a:a + n].tolist())
    else:
        out = [mb.tokens[i, :n].tolist() for i, n in enumerate(lens)]
    return out


def _sequence(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, targets) of prompt + response; the response tokens are the ones to score."""
    return (np.array(prompt + response, dtype=np.int64),
            np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(response), np.uint8)]))


class RolloutPhase:
    """Prompts -> scored experience for the objective's step(s); see the module docstring."""

    def __init__(self, runtime, objective, stepper, tokenizer, *, vocab_size: int, pad_id: int,
                 pad_multiple: int, max_tokens_per_micro_batch: int, packed: bool, seed: int,
                 critic_stepper=None, reward_model=None, save: str | None = None, total_steps: int = 1,
                 store=None):
        from mcore_align.algorithms.ppo.advantages import ADVANTAGE_ESTIMATORS
        from mcore_align.algorithms.ppo.reward_funcs import load_reward_funcs
        from mcore_align.rollout import build_rollout_engine

        cfg = objective.cfg
        self.rt, self.objective, self.stepper, self.tok, self.cfg = runtime, objective, stepper, tokenizer, cfg
        self.critic_stepper, self.reward_model = critic_stepper, reward_model
        self.pad_id, self.pad_multiple, self.packed, self.seed = pad_id, pad_multiple, packed, seed
        self.capacity = max_tokens_per_micro_batch
        self.estimator = ADVANTAGE_ESTIMATORS[getattr(cfg, "advantage_estimator", "gae")]
        if self.estimator.needs_values and critic_stepper is None:
            raise ValueError(f"advantage estimator {self.estimator.name!r} needs a critic")
        self.engine = build_rollout_engine(cfg.rollout_backend, chunks=stepper.policy, runtime=runtime,
                                           vocab_size=vocab_size, pad_token_id=pad_id,
                                           local_rollout_forward_batch_size=cfg.local_rollout_forward_batch_size)
        self.reward_funcs = load_reward_funcs(cfg.reward_funcs, cfg.reward_weights) if cfg.reward_funcs else []
        if tokenizer.eos_token_id is None:
            raise ValueError("online objectives need the tokenizer's eos token to stop generation")
        self.stop_ids = (int(tokenizer.eos_token_id),)
        self.last_batch = None  # the latest RolloutBatch
        self.save, self.total_steps = save, total_steps
        self.store = store  # the tokenized dataset: the records' other columns

    # -- the phase ---------------------------------------------------------------------
    def make_experience(self, gb: GlobalBatch, step: int) -> tuple[list[GlobalBatch], dict]:
        from mcore_align.algorithms.ppo.reward_funcs import compute_rewards
        from mcore_align.rollout import SamplingParams

        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        prompts = [p for mb in gb.micro_batches for p in prompt_token_ids(mb)]
        repeated = [p for p in prompts for _ in range(G)]  # a prompt's G responses are consecutive
        # The records' other dataset columns (reward functions get them, one value per response).
        rids = [gb.record_ids[int(u)] for mb in gb.micro_batches for u in mb.pair_index.tolist()]
        cols = [self.store.record_columns(r) if self.store is not None else {} for r in rids]
        columns = {k: [c.get(k) for c in cols for _ in range(G)] for k in sorted(set().union(*cols))}
        params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                response_length=cfg.response_length, stop_token_ids=self.stop_ids,
                                seed=self.seed * 1_000_003 + step)
        batch = self.engine.generate(repeated, params)
        self.last_batch = batch
        t_gen = time.perf_counter()

        lengths, T = batch.response_lengths_B, batch.response_ids_BT.shape[1]
        responses = [batch.response_ids_BT[i, :int(n)].tolist() for i, n in enumerate(lengths)]
        mbs, where = self._pack(repeated, responses)
        passes = self._forward_passes(mbs, where, T)  # [B, T] / [B] tensors, same on every stage
        completions = self.tok.batch_decode(responses, skip_special_tokens=True)
        self.last_texts = (self.tok.batch_decode(repeated, skip_special_tokens=True), completions)
        scores = torch.zeros(len(responses), dtype=torch.float64)
        per_fn = {}
        if self.reward_funcs:
            fn_scores, per_fn = compute_rewards(self.reward_funcs, self.last_texts[0], completions,
                                                {**columns, "completion_ids": responses})
            scores += fn_scores.to(torch.float64)
        if "rm_scores" in passes:
            per_fn["reward_model"] = passes["rm_scores"]
            scores += passes["rm_scores"].to(torch.float64)
        scores = scores.to(torch.float32)
        no_eos = ~batch.eos_B
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * no_eos.to(scores.dtype)
        self._write_samples(step, scores)
        extras, kl_BT, nsr_BT = self._advantages(scores, lengths, T, passes)
        t_score = time.perf_counter()
        updates = self._updates(repeated, responses, extras, step)

        # Global counts are set per update; metrics are summed over DP here.
        valid = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
        local = [len(responses), float(scores.sum()), float((scores.double() ** 2).sum()), float(lengths.sum()),
                 float(batch.eos_B.sum()), float(no_eos.sum()), float(batch.stats.get("tokens", 0)),
                 float((kl_BT.double() * valid).sum()) if kl_BT is not None else 0.0,
                 float((nsr_BT.double() * valid).sum()) if nsr_BT is not None else 0.0,
                 # TRL's objective/entropy: -sum of the sampled tokens' log-probs per response.
                 float((-batch.logprobs_BT.double() * valid).sum())]
        local += [float(torch.as_tensor(v, dtype=torch.float64).sum()) for v in per_fn.values()]
        g = torch.tensor(local, dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(g, group=self.rt.pgs.dp)
        g = g.cpu().tolist()
        n_resp = g[0]
        mean = g[1] / n_resp
        gen_s = t_gen - t0
        metrics = {
            "objective/scores": mean,
            "objective/scores_std": max(g[2] / n_resp - mean ** 2, 0.0) ** 0.5,
            "response_length": g[3] / n_resp,
            "val/num_eos_tokens": g[4],
            "rollout/no_eos_fraction": g[5] / n_resp,
            "time/generation": gen_s,
            "time/scoring": t_score - t_gen,
            "rollout/gen_tokens_per_sec": g[6] / max(gen_s, 1e-9),  # every pipeline's samples, once
        }
        if kl_BT is not None:  # TRL: per-response sums, averaged over responses
            metrics["objective/kl"] = g[7] / n_resp
            metrics["objective/non_score_reward"] = g[8] / n_resp
            metrics["objective/rlhf_reward"] = mean + g[8] / n_resp
        metrics["objective/entropy"] = g[9] / n_resp
        for i, name in enumerate(per_fn):
            metrics[f"rewards/{name}"] = g[10 + i] / n_resp
        meta = dict(epoch=gb.epoch, step_in_epoch=gb.step_in_epoch, record_ids=gb.record_ids)
        return [self._global_batch(u, meta) for u in updates], metrics

    # -- pieces ------------------------------------------------------------------------
    def _write_samples(self, step: int, scores, k: int = 4) -> None:
        """``num_sample_generations`` times over the run (TRL's spacing: every
        ``total_steps // num_sample_generations`` steps), the first ``k`` samples of this
        iteration go to ``save/samples.jsonl`` (prompt, completion, score, step) and the log."""
        n = getattr(self.cfg, "num_sample_generations", 0)
        if not n or self.rt.rank != 0 or (step + 1) % max(1, self.total_steps // n):
            return
        prompts, completions = self.last_texts
        rows = [{"step": step + 1, "prompt": p, "completion": c, "score": float(s)}
                for p, c, s in list(zip(prompts, completions, scores.tolist()))[:k]]
        log.warning("sample at step %d: %r -> %r (score %.4g)", step + 1, rows[0]["prompt"][-80:],
                    rows[0]["completion"][:120], rows[0]["score"])
        if self.save:
            from pathlib import Path

            Path(self.save).mkdir(parents=True, exist_ok=True)
            with open(Path(self.save) / "samples.jsonl", "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))

    def _pack(self, prompts, responses) -> tuple[list[MicroBatch], list[tuple[int, int, int]]]:
        """Prompt + response sequences, in order, into micro-batches of at most ``capacity``
        padded token slots; targets on the response tokens. ``where[b]`` = (micro-batch, flat
        index of the sequence's first token, prompt length, sequence length)."""
        seqs = [_sequence(p, r) for p, r in zip(prompts, responses)]
        mbs, where = [], []
        for grp in self._group(seqs):
            mb = self._collate(seqs, grp, {})
            row = mb.tokens.shape[-1]
            for j, i in enumerate(grp):
                start = int(mb.cu_seqlens[j]) if self.packed else j * row
                where.append((len(mbs), start, len(prompts[i]), len(seqs[i][0])))
            mbs.append(mb)
        return mbs, where

    def _collate(self, seqs, grp: list[int], ext: dict) -> MicroBatch:
        """Sequences ``grp`` of ``seqs`` (and their per-token ``ext`` arrays) as one micro-batch."""
        refs = [SeqRef(0, ROLE_UNPAIRED, j, False, len(seqs[i][0])) for j, i in enumerate(grp)]
        return collate_arrays([seqs[i] for i in grp], refs, self.packed, self.pad_multiple, self.pad_id,
                              extras={k: [v[i] for i in grp] for k, v in ext.items()})

    def _group(self, seqs) -> list[list[int]]:
        """Consecutive sequences per micro-batch under the token-slot capacity."""
        from mcore_align.data.batch import round_up

        groups, cur, widths = [], [], []
        for i, (t, _) in enumerate(seqs):
            w = int(round_up(len(t), self.pad_multiple))
            if w > self.capacity:
                raise ValueError(f"a prompt + response of {len(t)} tokens exceeds max_tokens_per_micro_batch="
                                 f"{self.capacity}; raise it to at least max_length")
            # Slots with this sequence: packed, the sum of padded lengths; padded, B times the longest.
            slots = sum(widths) + w if self.packed else (len(widths) + 1) * max(widths + [w])
            if cur and slots > self.capacity:
                groups.append(cur)
                cur, widths = [], []
            cur.append(i)
            widths.append(w)
        if cur:
            groups.append(cur)
        return groups

    def _forward_passes(self, mbs, where, T) -> dict[str, torch.Tensor]:
        """The no-grad passes over the packed experience, as per-response tensors: ``old_logps``,
        ``ref_logps``, ``values`` ``[B, T]`` (response index i: the position that predicts
        response token i; values also at i = length, the last token's position) and
        ``rm_scores`` ``[B]``. Computed on the last pipeline stage, broadcast to the others."""
        st, obj = self.stepper, self.objective
        dev_batches = st.to_device(mbs)
        B = len(where)
        want = []
        if "token_old_logps" in obj.inputs:
            want.append(("old_logps", lambda: st.forward_only_token_logprobs(st.policy, dev_batches,
                                                                             obj.logprob_temperature)))
        if obj.needs_reference:
            def ref():
                with st.reference.models() as chunks:
                    return st.forward_only_token_logprobs(chunks, dev_batches, obj.logprob_temperature)
            want.append(("ref_logps", ref))
        if self.critic_stepper is not None:
            cs = self.critic_stepper
            want.append(("values", lambda: cs.forward_only_values(cs.policy, dev_batches, last_token=False)))
        out: dict[str, torch.Tensor] = {}
        for name, run in want:
            per_mb = run()
            t = torch.zeros(B, T, dtype=torch.float32)
            if per_mb is not None:
                for b, (k, start, plen, n) in enumerate(where):
                    flat = per_mb[k].cpu()
                    first = start + plen - 1  # the position that predicts response token 0
                    m = min(T, n - plen + (1 if name == "values" else 0))
                    t[b, :m] = flat[first:first + m]
            out[name] = t
        if self.reward_model is not None:
            with self.reward_model.models() as chunks:
                per_mb = st.forward_only_values(chunks, dev_batches, last_token=True)
            s = torch.zeros(B, dtype=torch.float32)
            if per_mb is not None:
                s = torch.cat([v.cpu().float() for v in per_mb])
            out["rm_scores"] = s
        # The last pipeline stage holds the results: every stage needs them (advantages, metrics).
        pp = self.rt.pgs.pp
        if pp.size() > 1 and out:
            names = sorted(out)
            flat = torch.cat([out[n].reshape(-1) for n in names]).to(self.rt.device)
            dist.broadcast(flat, src=dist.get_global_rank(pp, pp.size() - 1), group=pp)
            flat, i = flat.cpu(), 0
            for n in names:
                k = out[n].numel()
                out[n] = flat[i:i + k].reshape(out[n].shape)
                i += k
        return out

    def _advantages(self, scores, lengths, T, passes):
        """Per-token advantages (and PPO's returns) as ``[B, T]`` tensors; returns (extras of
        each response as [B, T] tensors, per-token KL or None, non-score reward or None)."""
        from mcore_align.algorithms.ppo.advantages import compute_advantages
        from mcore_align.algorithms.ppo.config import PPOConfig as MathConfig
        from mcore_align.algorithms.ppo.rewards import per_token_rewards

        cfg, est = self.cfg, self.estimator
        extras, kl_BT, nsr_BT = {}, None, None
        if est.needs_values:  # GAE: KL in the reward (TRL's PPOTrainer)
            ref = passes.get("ref_logps", passes["old_logps"])  # kl_coef 0: no reference, KL 0
            rewards_BT, nsr_BT, kl_BT = per_token_rewards(scores, passes["old_logps"], ref, lengths,
                                                          kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator,
                                                          whiten_rewards=cfg.whiten_rewards)
            math_cfg = MathConfig(advantage_estimator="gae", gamma=cfg.gamma, lam=cfg.lam, kl_coef=cfg.kl_coef)
            adv_BT, ret_BT = compute_advantages("gae", rewards_BT, lengths, values_BT=passes["values"], cfg=math_cfg)
            extras.update(token_returns=ret_BT, token_old_values=passes["values"])
        else:  # group estimators: one score per response (on its last token), KL in the loss
            rewards_BT = torch.zeros(len(scores), T, dtype=torch.float32)
            rewards_BT[torch.arange(len(scores)), (lengths - 1).clamp(min=0)] = scores
            math_cfg = MathConfig(advantage_estimator=est.name, num_generations=cfg.num_generations,
                                  grpo_scale_by_std=getattr(cfg, "scale_rewards", True))
            adv_BT, _ = compute_advantages(est.name, rewards_BT, lengths, num_generations=cfg.num_generations,
                                           cfg=math_cfg)
        extras["token_advantages"] = adv_BT
        for name in ("old_logps", "ref_logps"):
            if f"token_{name}" in self.objective.inputs:
                extras[f"token_{name}"] = passes[name]
        return extras, kl_BT, nsr_BT

    def _updates(self, prompts, responses, extras, step) -> list[list[int]]:
        """Mini-batches of response indices for every optimizer step of this iteration, with
        the per-response extras kept for `_global_batch`."""
        n_epochs = getattr(self.cfg, "num_ppo_epochs", 1)
        n_mini = getattr(self.cfg, "num_mini_batches", 1)
        B = len(responses)
        if B < n_mini:
            raise ValueError(f"num_mini_batches={n_mini} exceeds the {B} responses of a DP rank's rollout batch")
        self._exp = (prompts, responses, extras)
        g = torch.Generator().manual_seed(self.seed * 7919 + step)
        out = []
        for epoch in range(n_epochs):
            order = torch.randperm(B, generator=g).tolist() if n_mini > 1 else list(range(B))
            for k in range(n_mini):
                out.append(sorted(order[k::n_mini]))
        return out

    def _global_batch(self, idx: list[int], meta: dict) -> GlobalBatch:
        """The experience of responses ``idx`` as micro-batches with their per-token extras,
        and the global counts of the mini-batch (summed over DP)."""
        prompts, responses, extras = self._exp
        seqs, ext = [], {k: [] for k in extras}
        value_positions = 0
        for i in idx:
            p, r = prompts[i], responses[i]
            n = len(p) + len(r)
            seqs.append(_sequence(p, r))
            for k, v_BT in extras.items():
                # Token-aligned: response token i is token len(p) + i; values one further.
                extra = len(r) < v_BT.shape[1] and k in ("token_returns", "token_old_values")
                arr = np.zeros(n + (1 if extra else 0), np.float32)
                arr[len(p):len(p) + len(r) + int(extra)] = v_BT[i, :len(r) + int(extra)].numpy()
                ext[k].append(arr)
            if "token_returns" in extras:
                m = len(r) + int(len(r) < extras["token_returns"].shape[1])
                mask = np.zeros(n + 1, np.float32)
                mask[len(p):len(p) + m] = 1.0
                ext.setdefault("token_value_mask", []).append(mask)
                value_positions += m
        mbs = [self._collate(seqs, grp, ext) for grp in self._group(seqs)]
        n_tok = sum(len(responses[i]) for i in idx)
        c = torch.tensor([len(idx), n_tok, value_positions, sum(len(s[0]) for s in seqs)], dtype=torch.float64,
                         device=self.rt.device)
        dist.all_reduce(c, group=self.rt.pgs.dp)
        n_seq, n_tok, n_val, real = (int(x) for x in c.cpu().tolist())
        return GlobalBatch(micro_batches=mbs, num_pairs=n_seq, num_sequences=n_seq, num_chosen_tokens=0,
                           num_tokens=n_tok, num_desirable=0, num_undesirable=0, num_value_tokens=n_val,
                           real_tokens=real, **meta)
