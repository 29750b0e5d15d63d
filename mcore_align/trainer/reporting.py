"""What the user sees: rank-0 progress bar, Megatron-LM-style console lines, metrics.jsonl,
TensorBoard/wandb, a PNG plot.

Console (rank 0, stdout, whatever the log level), as Megatron-LM's ``training_log`` prints:

    [2026-12-01 15:00:00] iteration       10/     100 | consumed samples:           80 | elapsed time per
    iteration (ms): 812.3 | tokens/s: 5130 | learning rate: 5.000000E-07 | global batch size:     8 |
    loss: 6.931472E-01 | rewards/accuracies: 5.000000E-01 | ... | loss scale: 1.0 | grad norm: 1.234 |
    number of skipped iterations:   0 | mem (GiB): 1.23 |

one every ``train.log_interval`` steps (and for every skipped step), plus a line per evaluation
(``validation at iteration N | ...``) and per checkpoint (``saved checkpoint at iteration N to
...``). With the progress bar on, the lines are written above the bar.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

BAR_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "objective/scores")
# Loop bookkeeping that the console line prints in its own words (not as objective metrics).
_LOOP_KEYS = ("lr", "grad_norm", "tokens_per_sec", "step_time", "skipped", "consumed_samples", "loss_scale",
              "skipped_iters", "mem_gib", "global_batch_size", "tflops_per_gpu", "mfu", "hfu")


class Reporter:
    """Only rank 0 writes; every other rank holds a no-op reporter."""

    def __init__(self, *, enabled: bool, save: str | None, total_steps: int, start_step: int,
                 progress_bar: bool, tensorboard: bool, wandb_project: str | None, config: dict):
        self.enabled = enabled
        self.save = Path(save) if save else None
        self.total = total_steps
        self.start_step = start_step
        self.bar = None
        self.tb = None
        self.wandb = None
        self.t0 = time.time()
        if tensorboard and self.save:
            # Checked on EVERY rank, before the rank-0-only writer below: an import error on rank 0
            # alone left the other ranks in the next collective, desynchronised until a gloo timeout.
            try:
                import tensorboard as _tb  # noqa: F401
            except ImportError as e:
                raise ImportError("train.tensorboard=true needs the tensorboard package "
                                  "(pip install 'mcore_align[tensorboard]'), or set tensorboard=false") from e
        if not enabled:
            return
        if self.save:
            self.save.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(self.save / "metrics.jsonl", "a")
        else:
            self.metrics_file = None
        if progress_bar and sys.stderr.isatty():  # logs (Slurm, CI, files) get the lines only
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        if tensorboard and self.save:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.save / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("wandb_project=%s but wandb is not installed; not logging to wandb", wandb_project)
            else:
                self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, step: int, metrics: dict, prefix: str = "", console: bool = True) -> None:
        """Record ``metrics`` of ``step`` everywhere; ``console``: also print the line."""
        if not self.enabled:
            return
        row = {"step": step, **{prefix + k: v for k, v in metrics.items()}}
        if console:
            self.echo(training_line(step, self.total, metrics) if not prefix else
                      validation_line(step, metrics))
        if self.metrics_file:
            self.metrics_file.write(json.dumps(row) + "\n")
            self.metrics_file.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(row, step=step)
        if self.bar is not None and not prefix:
            self.bar.update(step - self.bar.n)
            shown = {k.split("/")[-1][:6]: f"{metrics[k]:.4g}" for k in BAR_KEYS if k in metrics}
            if "tokens_per_sec" in metrics:
                shown["tok/s"] = f"{metrics['tokens_per_sec']:.0f}"
            self.bar.set_postfix(shown)

    def echo(self, line: str) -> None:
        """One console line on rank 0 (above the progress bar when there is one)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self, plot: bool) -> Path | None:
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file:
            self.metrics_file.close()
        if self.tb:
            self.tb.close()
        if plot and self.save:
            return plot_curves(self.save / "metrics.jsonl", self.save / "training_curves.png")
        return None


def _num(v) -> str:
    return f"{v:.6E}" if isinstance(v, float) else str(v)


def training_line(step: int, total: int, m: dict) -> str:
    """Megatron-LM's per-interval line from one training row (see the module docstring)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    parts = [f"[{stamp}] iteration {step:8d}/{total:8d}"]
    if "consumed_samples" in m:
        parts.append(f"consumed samples: {m['consumed_samples']:12d}")
    if "step_time" in m:
        parts.append(f"elapsed time per iteration (ms): {1000 * m['step_time']:.1f}")
    if "tflops_per_gpu" in m:  # mcore_align/flops.py step_metrics
        parts.append(f"throughput per GPU (TFLOP/s/GPU): {m['tflops_per_gpu']:.1f}")
    if m.get("mfu") is not None:
        parts.append(f"MFU: {100 * m['mfu']:.1f}%")
    if "tokens_per_sec" in m:
        parts.append(f"tokens/s: {m['tokens_per_sec']:.0f}")
    if "lr" in m:
        parts.append(f"learning rate: {m['lr']:.6E}")
    if "global_batch_size" in m:
        parts.append(f"global batch size: {m['global_batch_size']:5d}")
    parts += [f"{k}: {_num(v)}" for k, v in m.items() if k not in _LOOP_KEYS]
    if m.get("loss_scale") is not None:
        parts.append(f"loss scale: {m['loss_scale']:.1f}")
    if m.get("grad_norm") is not None:
        parts.append(f"grad norm: {m['grad_norm']:.3f}")
    if "skipped_iters" in m:
        parts.append(f"number of skipped iterations: {m['skipped_iters']:3d}")
    if m.get("mem_gib") is not None:
        parts.append(f"mem (GiB): {m['mem_gib']:.2f}")
    return " | ".join(parts) + " |"


def validation_line(step: int, m: dict) -> str:
    """Megatron-LM's evaluation line."""
    return f" validation at iteration {step} | " + " | ".join(f"{k}: {_num(v)}" for k, v in m.items()) + " |"


def plot_curves(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Loss, reward accuracy/margin, and their eval/ counterparts against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "nll_loss", "kl", "objective/scores",
                        "objective/kl", "loss/value_avg", "lr") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for prefix, style in (("", "-"), ("eval/", "o--")):
            pts = [(r["step"], r[prefix + k]) for r in rows if prefix + k in r]
            if pts:
                ax.plot(*zip(*pts), style, label=(prefix or "train/") + k)
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
