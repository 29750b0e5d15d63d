"""What the user sees: rank-0 progress bar, metrics.jsonl, TensorBoard/wandb, a PNG plot."""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger(__name__)

BAR_KEYS = ("loss", "rewards/accuracies", "rewards/margins")


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
        if not enabled:
            return
        if self.save:
            self.save.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(self.save / "metrics.jsonl", "a")
        else:
            self.metrics_file = None
        if progress_bar:
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

    def log(self, step: int, metrics: dict, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{prefix + k: v for k, v in metrics.items()}}
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
        elif prefix:
            log.info("step %d %s", step, {k: round(v, 4) for k, v in row.items() if k != "step"})

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


def plot_curves(metrics_jsonl: Path, out_png: Path) -> Path | None:
    """Loss, reward accuracy/margin, and their eval/ counterparts against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins", "nll_loss", "kl", "lr") if any(k in r for r in rows)]
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
