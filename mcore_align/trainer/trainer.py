"""The training loop: one class, read top to bottom."""
from __future__ import annotations

import gc
import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mcore_align.algorithms import build_objective
from mcore_align.config import RunConfig, check_layout
from mcore_align.data.batch import GlobalBatch, layout_multiples
from mcore_align.flops import step_metrics
from mcore_align.data.loader import build_data
from mcore_align.parallel.runtime import initialize
from mcore_align.models.moe import RouterLoad
from mcore_align.trainer.checkpointing import (Sidecar, last_stage_state, latest_checkpoint, load_checkpoint,
                                               save_checkpoint)
from mcore_align.trainer.reporting import Reporter
from mcore_align.trainer.setup import (build_optimizer, build_policy, build_reference, build_reward_model,
                                       check_device_support, wire_model_config)
from mcore_align.trainer.rollout import RolloutPhase, check_online_support, prompt_data_config
from mcore_align.trainer.step import Stepper

log = logging.getLogger(__name__)


class TooManyNonFinite(RuntimeError):
    pass


def _memory_gib(runtime) -> float:
    """Peak device memory (CUDA) or this process's resident memory (CPU mode), GiB."""
    if not runtime.is_cpu:
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class Trainer:
    def __init__(self, cfg: RunConfig):
        from transformers import AutoTokenizer

        from mcore_align.checkpoint import read_model_spec, resolve_checkpoint_dir

        self.cfg = cfg
        t = cfg.train
        self.rt = initialize(cfg.parallel, device=t.device, seed=t.seed)
        check_device_support(cfg, self.rt)
        par = cfg.parallel
        self.resume_from = latest_checkpoint(t.save)
        # model.load may be a converted checkpoint or another run's save dir (its latest iter_*).
        source = Path(self.resume_from or resolve_checkpoint_dir(cfg.model.load))  # model_spec.json + tokenizer/
        self.spec = read_model_spec(source)
        check_layout(cfg, self.spec, rank=self.rt.rank)  # PP vs layers, TP vs heads, max_length
        # Written into every checkpoint: held in memory, as pruning may delete `source`.
        self.sidecar = Sidecar.read(source, keep=self.rt.rank == 0)
        self.tokenizer = AutoTokenizer.from_pretrained(str(source / "tokenizer"))
        self.objective = build_objective(cfg.algo.rlhf_type, **cfg.algo.params)
        online = self.objective.data_kind == "prompt"  # prompts in, responses sampled by the policy
        if online:
            check_online_support(cfg, self.objective)
        self.data = build_data(
            prompt_data_config(cfg.data, self.objective) if online else cfg.data,
            self.tokenizer, self.objective.data_kind,
            dp_rank=self.rt.dp_rank, dp_size=self.rt.dp_size, global_batch_size=t.global_batch_size,
            report_path=Path(t.save) / "data_report.json" if t.save else None, **layout_multiples(par),
        )
        if self.rt.rank == 0:  # the objective's own data checks (e.g. KTO's weight balance)
            labels = (self.data.train.store.rec_label[self.data.train.record_ids]
                      if "labels" in self.objective.inputs else None)
            self.objective.check_data(labels)
        self.train_iters = t.train_iters or max(1, math.ceil(t.num_train_epochs * self.data.train.batches_per_epoch))
        # Adapter checkpoints (train_type=lora) hold only the adapters: the base always comes
        # from model.load. Full checkpoints hold everything: a resume loads nothing here.
        base_from_load = cfg.model.train_type == "lora" or not self.resume_from
        self.policy = build_policy(self.spec, self.rt, cfg, load_dir=cfg.model.load if base_from_load else None,
                                   head=self.objective.head)
        self.reference = build_reference(self.spec, self.rt, cfg, self.policy, self.objective)
        self.optimizer, self.scheduler = build_optimizer(self.policy, self.rt, cfg,
                                                         self.train_iters * self.objective.updates_per_step)
        wire_model_config(self.policy, self.optimizer, self.rt)
        self.router_load = RouterLoad(self.policy)  # MoE: per-layer expert loads -> metrics row
        self.critic = self.critic_stepper = self.reward_model = None
        if online and getattr(self.objective.cfg, "reward_model", None):  # checked before anything uses it
            self.reward_model = build_reward_model(self.spec, self.rt, cfg, self.objective.cfg.reward_model,
                                                   self.tokenizer, source / "tokenizer", self.objective.cfg)
        critic_objective = self.objective.critic_objective()
        if critic_objective is not None:  # a value model trained beside the policy (PPO)
            self._build_critic(critic_objective)
        self.step = 0
        if self.resume_from:
            extra = load_checkpoint(self.resume_from, self.policy, self.optimizer, self.scheduler, self.rt,
                                    companions=self._companions())
            self.step = extra["step"]
            self.data.train.load_state_dict(extra["data"])
            self.objective.load_state_dict(extra.get("objective", {}))
            log.warning("resumed from %s at step %d", self.resume_from, self.step)
        self.stepper = Stepper(self.rt, self.objective, self.policy, self.reference)
        self.rollout = RolloutPhase(
            self.rt, self.objective, self.stepper, self.tokenizer, vocab_size=self.spec.vocab_size,
            pad_id=self.data.train.pad_id, pad_multiple=layout_multiples(par)["pad_multiple"],
            max_tokens_per_micro_batch=cfg.data.max_tokens_per_micro_batch, packed=cfg.data.packing, seed=t.seed,
            critic_stepper=self.critic_stepper, reward_model=self.reward_model, save=t.save,
            total_steps=self.train_iters, store=self.data.train.store,
        ) if online else None
        self._eval_ref_cache: list | None = None  # reference sums of eval batches (precompute)
        self._stop_signal = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    # -- the loop -------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        if self.step >= self.train_iters:  # a finished run relaunched: leave its checkpoint and logs alone
            log.warning("the run in %s already reached step %d of train_iters=%d: nothing to train "
                        "(raise train_iters to continue it)", t.save, self.step, self.train_iters)
            return {"step": self.step, "history": [], "stopped": False, "eval": {}, "plot": None}
        ref_cache = (self._precompute_reference()
                     if self.objective.needs_reference and t.ref_model == "precompute" else None)
        reporter = Reporter(
            enabled=self.rt.rank == 0, save=t.save, total_steps=self.train_iters, start_step=self.step,
            progress_bar=t.progress_bar, tensorboard=t.tensorboard, wandb_project=t.wandb_project,
            config=self.cfg.to_dict(),
        )
        bad_in_row, steps_this_launch, history = 0, 0, []
        skipped_iters = 0  # this launch
        last_eval: tuple[int, dict] | None = None  # (step, metrics) of the latest evaluation
        if t.eval_interval and self.data.eval is not None and self.step == 0:
            last_eval = (0, self.evaluate())
            reporter.log(0, last_eval[1], prefix="eval/")  # the starting point of the curve
        while self.step < self.train_iters:
            gb = next(self.data.train)
            t0 = time.time()
            rollout_metrics, updates = {}, [gb]
            if self.rollout is not None:  # online: sample and score, then the same optimizer step(s)
                updates, rollout_metrics = self.rollout.make_experience(gb, self.step)
            t_train = time.time()
            res = self._optimizer_steps(updates, ref_cache.pop(self.step) if ref_cache is not None else None)
            dt = time.time() - t0
            self.step += 1
            steps_this_launch += 1
            bad_in_row = bad_in_row + 1 if res.skipped else 0
            skipped_iters += int(res.skipped)
            if rollout_metrics:
                rollout_metrics["time/training"] = dt - (t_train - t0)
            row = {**rollout_metrics, **res.metrics, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": res.grad_norm,
                   "tokens_per_sec": sum(u.real_tokens for u in updates) / dt, "step_time": dt, "skipped": res.skipped,
                   "consumed_samples": self.step * t.global_batch_size, "global_batch_size": t.global_batch_size,
                   "loss_scale": float(self.optimizer.get_loss_scale()), "skipped_iters": skipped_iters,
                   "mem_gib": _memory_gib(self.rt), **self.router_load.metrics(self.rt.device),
                   # Model FLOPs of the training passes (online objectives: over the whole
                   # iteration's time, rollouts included, so MFU there is a lower bound).
                   **step_metrics(self, GlobalBatch.of(updates), dt)}
            history.append(row)
            if self.step % t.log_interval == 0 or res.skipped:
                reporter.log(self.step, row)
            if bad_in_row >= t.max_consecutive_nan:
                raise TooManyNonFinite(
                    f"{bad_in_row} consecutive steps with non-finite loss or gradients (last at step {self.step}); "
                    "lower the learning rate, check the data, or raise train.max_consecutive_nan"
                )
            if t.eval_interval and self.data.eval is not None and self.step % t.eval_interval == 0:
                last_eval = (self.step, self.evaluate())
                reporter.log(self.step, last_eval[1], prefix="eval/")
            stop = self._agreed_stop() or (t.exit_after_steps is not None and steps_this_launch >= t.exit_after_steps)
            if t.save and (stop or (t.save_interval and self.step % t.save_interval == 0)):
                reporter.echo(f" saved checkpoint at iteration {self.step} to {self.save()}")
            if stop:
                log.warning("stopping at step %d (signal or exit_after_steps); relaunch to resume", self.step)
                reporter.close(plot=False)
                return {"step": self.step, "history": history, "stopped": True}
        if last_eval is not None and last_eval[0] == self.step:  # the interval already evaluated here
            final_eval = last_eval[1]
        else:
            final_eval = self.evaluate() if self.data.eval is not None else {}
            if final_eval:
                reporter.log(self.step, final_eval, prefix="eval/")
        if t.save and not (t.save_interval and self.step % t.save_interval == 0):
            reporter.echo(f" saved checkpoint at iteration {self.step} to {self.save()}")
        plot = reporter.close(plot=t.plot)
        return {"step": self.step, "history": history, "stopped": False, "eval": final_eval,
                "plot": str(plot) if plot else None}

    # -- pieces ---------------------------------------------------------------------
    def _build_critic(self, critic_objective) -> None:
        """The critic: a value-head model of the policy's architecture and layout, its own DDP,
        optimizer and scheduler, and a step that runs its objective."""
        import dataclasses

        cfg = self.cfg
        ocfg = self.objective.cfg
        init = ocfg.value_model or ocfg.reward_model or cfg.model.load
        from mcore_align.checkpoint import read_model_spec

        init_spec = read_model_spec(init)
        if dataclasses.replace(init_spec, init_std=self.spec.init_std) != self.spec:
            raise ValueError(f"the critic starts from {init}, whose architecture differs from the policy's; "
                             "set value_model to a (reward-model) checkpoint of the policy's architecture")
        full = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, train_type="full"))
        self.critic = build_policy(self.spec, self.rt, full, load_dir=None if self.resume_from else init,
                                   head=critic_objective.head, require_head=bool(ocfg.value_model))
        steps = self.train_iters * self.objective.updates_per_step
        self.critic_optimizer, self.critic_scheduler = build_optimizer(self.critic, self.rt, full, steps)
        wire_model_config(self.critic, self.critic_optimizer, self.rt)
        self.critic_stepper = Stepper(self.rt, critic_objective, self.critic, None)

    def _companions(self) -> dict:
        """Models trained beside the policy, checkpointed with it: name -> (chunks, optimizer, scheduler)."""
        return {"critic": (self.critic, self.critic_optimizer, self.critic_scheduler)} if self.critic else {}

    def _optimizer_steps(self, updates, ref_cache):
        """One optimizer step of the policy (and of the critic, when the objective declares one)
        per batch of ``updates`` (one, except for PPO's epochs x mini-batches); metrics are the
        mean over the updates, the step is skipped if any update was."""
        from mcore_align.trainer.step import StepResult

        results = []
        for u in updates:
            r = self.stepper.train_step(u, self.optimizer, self.scheduler, ref_cache=ref_cache)
            if self.critic is not None:
                c = self.critic_stepper.train_step(u, self.critic_optimizer, self.critic_scheduler)
                r.metrics.update({("critic/loss" if k == "loss" else k): v for k, v in c.metrics.items()})
                r.metrics["critic/grad_norm"] = c.grad_norm if c.grad_norm is not None else float("nan")
                r.skipped = r.skipped or c.skipped
            results.append(r)
        if len(results) == 1:
            return results[0]
        keys = results[0].metrics.keys()
        metrics = {k: sum(r.metrics[k] for r in results) / len(results) for k in keys}
        norms = [r.grad_norm for r in results if r.grad_norm is not None]
        return StepResult(metrics, skipped=any(r.skipped for r in results),
                          grad_norm=sum(norms) / len(norms) if norms else None)

    def evaluate(self) -> dict:
        """Metrics over ``eval_iters`` held-out batches taken as ONE global batch: the loss is
        normalised by the counts of all of them and metrics pool their sums and counts, so
        nothing depends on how the held-out set splits into batches."""
        from mcore_align.trainer.step import add_metric_sums, finalize_metrics, pooled_counts

        batches = [gb for _, gb in zip(range(self.cfg.train.eval_iters), self.data.eval)]
        counts = pooled_counts(batches)
        sums: dict[str, tuple[float, float]] = {}
        for i, gb in enumerate(batches):
            ref = self._eval_ref_cache[i] if self._eval_ref_cache is not None else None
            add_metric_sums(sums, self.stepper.eval_sums(gb, ref_cache=ref, counts=counts))
        return finalize_metrics(sums)

    def save(self) -> Path:
        t = self.cfg.train
        return save_checkpoint(
            t.save, self.step, self.policy, self.optimizer, self.scheduler, self.rt,
            extra={"step": self.step, "data": self.data.train.state_dict(), "config": self.cfg.to_dict(),
                   "objective": last_stage_state(self.objective.state_dict(), self.rt)},
            sidecar=self.sidecar, save_total_limit=t.save_total_limit, companions=self._companions(),
        )

    def _precompute_reference(self) -> dict[int, list]:
        """One forward-only pass of the reference over the batches of the remaining steps
        (and over the eval batches), then the reference weights are freed. Keyed by step
        (the loaders are deterministic). Non-last pipeline stages compute no sums: their
        entries are empty lists."""
        def sums(gb) -> list:
            return self.stepper.reference_sums(self.stepper.to_device(gb.micro_batches)) or []

        state = self.data.train.state_dict()
        cache = {}
        for step in range(self.step, self.train_iters):
            cache[step] = sums(next(self.data.train))
        self.data.train.load_state_dict(state)
        if self.data.eval is not None:
            self._eval_ref_cache = [sums(gb) for _, gb in zip(range(self.cfg.train.eval_iters), self.data.eval)]
        self.reference = self.stepper.reference = None
        gc.collect()
        log.warning("precomputed reference log-probs for %d steps; reference model freed", len(cache))
        return cache

    def _on_signal(self, signum, frame) -> None:
        log.warning("received signal %d: will checkpoint after this step and exit", signum)
        self._stop_signal = True

    def _agreed_stop(self) -> bool:
        """All ranks stop together if any rank got SIGTERM/SIGUSR1."""
        flag = torch.tensor([1.0 if self._stop_signal else 0.0], device=self.rt.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
