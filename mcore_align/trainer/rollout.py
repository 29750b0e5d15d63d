"""The rollout phase of online objectives (``data_kind="prompt"``: GRPO, RLOO).

Before the optimizer step, a global batch of prompts becomes a global batch of scored
experience, which the ordinary step (trainer/step.py) then trains on:

1. **Generate** ``num_generations`` responses per prompt with the rollout engine
   (``mcore_align.rollout``; the "megatron" backend samples on the policy's own TP/PP chunks).
   Every rank of a pipeline gets the same tokens; DP ranks sample their own prompts.
2. **Score** them with the user's reward functions on the decoded texts
   (``algorithms/ppo/reward_funcs.py``), minus ``missing_eos_penalty`` for responses that
   hit ``response_length`` without a stop token.
3. **Advantages** from the registered estimator (``algorithms/ppo/advantages``: "grpo",
   "rloo"); the G responses of a prompt are consecutive and on the same rank, so no
   collective is needed.
4. **Pack** prompt + response sequences into micro-batches (the response tokens are the
   loss tokens) with the per-token advantage attached (``MicroBatch.extras``), and, when the
   objective reads ``token_ref_logps``, run the reference forward-only over them.

Reward functions run on every rank (each computes the same scores from the same texts), so
they must be deterministic. The generation seed is ``(train.seed, step)``: a resumed run
samples the same tokens as an uninterrupted one.
"""
from __future__ import annotations

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


class RolloutPhase:
    """Prompts -> scored experience for the objective's step; see the module docstring."""

    def __init__(self, runtime, objective, stepper, tokenizer, *, vocab_size: int, pad_id: int,
                 pad_multiple: int, max_tokens_per_micro_batch: int, packed: bool, seed: int):
        from mcore_align.algorithms.ppo.reward_funcs import load_reward_funcs
        from mcore_align.rollout import build_rollout_engine

        cfg = objective.cfg
        self.rt, self.objective, self.stepper, self.tok, self.cfg = runtime, objective, stepper, tokenizer, cfg
        self.pad_id, self.pad_multiple, self.packed, self.seed = pad_id, pad_multiple, packed, seed
        self.capacity = max_tokens_per_micro_batch
        self.engine = build_rollout_engine(cfg.rollout_backend, chunks=stepper.policy, runtime=runtime,
                                           vocab_size=vocab_size, pad_token_id=pad_id,
                                           local_rollout_forward_batch_size=cfg.local_rollout_forward_batch_size)
        self.reward_funcs = load_reward_funcs(cfg.reward_funcs, cfg.reward_weights)
        if tokenizer.eos_token_id is None:
            raise ValueError("online objectives need the tokenizer's eos token to stop generation")
        self.stop_ids = (int(tokenizer.eos_token_id),)

    def make_experience(self, gb: GlobalBatch, step: int) -> tuple[GlobalBatch, dict]:
        from mcore_align.algorithms.ppo.advantages import compute_advantages
        from mcore_align.algorithms.ppo.config import PPOConfig
        from mcore_align.algorithms.ppo.reward_funcs import compute_rewards
        from mcore_align.rollout import SamplingParams

        cfg, G = self.cfg, self.cfg.num_generations
        t0 = time.perf_counter()
        prompts = [p for mb in gb.micro_batches for p in prompt_token_ids(mb)]
        repeated = [p for p in prompts for _ in range(G)]  # a prompt's G responses are consecutive
        params = SamplingParams(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                response_length=cfg.response_length, stop_token_ids=self.stop_ids,
                                seed=self.seed * 1_000_003 + step)
        batch = self.engine.generate(repeated, params)
        t_gen = time.perf_counter()

        lengths = batch.response_lengths_B
        responses = [batch.response_ids_BT[i, :int(n)].tolist() for i, n in enumerate(lengths)]
        completions = self.tok.batch_decode(responses, skip_special_tokens=True)
        prompt_texts = self.tok.batch_decode(repeated, skip_special_tokens=True)
        scores, per_fn = compute_rewards(self.reward_funcs, prompt_texts, completions,
                                         {"completion_ids": responses})
        scores = scores.to(torch.float32)
        no_eos = ~batch.eos_B
        if cfg.missing_eos_penalty is not None:
            scores = scores - cfg.missing_eos_penalty * no_eos.to(scores.dtype)
        # The score on the last response token: the token rewards sum to it (group estimators).
        T = batch.response_ids_BT.shape[1]
        rewards_BT = torch.zeros(len(responses), T, dtype=torch.float32)
        last = (lengths - 1).clamp(min=0)
        rewards_BT[torch.arange(len(responses)), last] = scores * (lengths > 0).to(scores.dtype)
        adv_BT, _ = compute_advantages(cfg.advantage_estimator, rewards_BT, lengths, num_generations=G,
                                       cfg=PPOConfig(advantage_estimator=cfg.advantage_estimator, num_generations=G,
                                                     grpo_scale_by_std=cfg.scale_rewards))
        micro_batches, n_tokens = self._pack(repeated, responses, adv_BT)
        t_score = time.perf_counter()
        if "token_ref_logps" in self.objective.inputs:
            self._attach_reference(micro_batches)
        t_ref = time.perf_counter()

        # Global counts (the loss is normalised by them) and metrics, summed over DP.
        local = torch.tensor([len(responses), n_tokens, float(scores.sum()), float((scores ** 2).sum()),
                              float(lengths.sum()), float(batch.eos_B.sum()), float(no_eos.sum()),
                              float(batch.stats.get("tokens", 0))], dtype=torch.float64)
        for vals in per_fn.values():
            local = torch.cat([local, torch.tensor([float(torch.as_tensor(vals, dtype=torch.float64).sum())])])
        local = local.to(self.rt.device)
        dist.all_reduce(local, group=self.rt.pgs.dp)
        g = local.cpu().tolist()
        n_resp, n_tok = int(g[0]), int(g[1])
        mean = g[2] / n_resp
        gen_s = t_gen - t0
        metrics = {
            "objective/scores": mean,
            "objective/scores_std": max(g[3] / n_resp - mean ** 2, 0.0) ** 0.5,
            "response_length": g[4] / n_resp,
            "val/num_eos_tokens": g[5],
            "rollout/no_eos_fraction": g[6] / n_resp,
            "time/generation": gen_s,
            "time/scoring": (t_score - t_gen) + (t_ref - t_score),
            "rollout/gen_tokens_per_sec": g[7] / max(gen_s, 1e-9),  # every pipeline's samples, once
        }
        for i, f in enumerate(self.reward_funcs):
            metrics[f"rewards/{f.name}"] = g[8 + i] / n_resp
        exp = GlobalBatch(micro_batches=micro_batches, num_pairs=n_resp, num_sequences=n_resp,
                          num_chosen_tokens=0, num_tokens=n_tok, num_desirable=0, num_undesirable=0,
                          real_tokens=int(sum(len(p) for p in repeated) + int(lengths.sum())),
                          epoch=gb.epoch, step_in_epoch=gb.step_in_epoch, record_ids=gb.record_ids)
        return exp, metrics

    def _pack(self, prompts, responses, adv_BT) -> tuple[list[MicroBatch], int]:
        """Prompt + response sequences, in order, into micro-batches of at most ``capacity``
        padded tokens; targets and advantages on the response tokens."""
        from mcore_align.data.batch import round_up

        items = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            tok = np.array(p + r, dtype=np.int64)
            tgt = np.concatenate([np.zeros(len(p), np.uint8), np.ones(len(r), np.uint8)])
            adv = np.concatenate([np.zeros(len(p), np.float32), adv_BT[i, :len(r)].numpy().astype(np.float32)])
            items.append((tok, tgt, adv))
        groups, cur, widths = [], [], []
        for it in items:
            w = int(round_up(len(it[0]), self.pad_multiple))
            if w > self.capacity:
                raise ValueError(f"a prompt + response of {len(it[0])} tokens exceeds max_tokens_per_micro_batch="
                                 f"{self.capacity}; raise it to at least max_length")
            # Slots the micro-batch would take with this sequence: packed, the sum of padded
            # lengths; padded [B, S], B times the longest.
            slots = sum(widths) + w if self.packed else (len(widths) + 1) * max(widths + [w])
            if cur and slots > self.capacity:
                groups.append(cur)
                cur, widths = [], []
            cur.append(it)
            widths.append(w)
        if cur:
            groups.append(cur)
        mbs = []
        for k, grp in enumerate(groups):
            refs = [SeqRef(0, ROLE_UNPAIRED, j, False, len(t)) for j, (t, _, _) in enumerate(grp)]
            mbs.append(collate_arrays([(t, g) for t, g, _ in grp], refs, self.packed, self.pad_multiple, self.pad_id,
                                      extras={"token_advantages": [a for _, _, a in grp]}))
        return mbs, int(sum(len(r) for r in responses))

    def _attach_reference(self, micro_batches: list[MicroBatch]) -> None:
        """Reference log-probs of every position's label at the sampling temperature, laid out
        like the labels (computed on the last pipeline stage, zeros elsewhere)."""
        st = self.stepper
        with st.reference.models() as chunks:
            ref = st.forward_only_token_logprobs(chunks, st.to_device(micro_batches), self.objective.logprob_temperature)
        for mb, r in zip(micro_batches, ref or [None] * len(micro_batches)):
            mb.extras["token_ref_logps"] = (r.detach().cpu().reshape(mb.labels.shape).float() if r is not None
                                            else torch.zeros(mb.labels.shape))
