"""The console a Megatron-LM user reads: one line per log interval, eval and checkpoint lines."""
from __future__ import annotations

import json

from mcore_align.trainer.reporting import Reporter, training_line, validation_line


ROW = {"loss": 0.6931, "rewards/accuracies": 0.5, "lr": 5e-7, "grad_norm": 1.25, "tokens_per_sec": 5130.2,
       "step_time": 0.8123, "skipped": False, "consumed_samples": 80, "global_batch_size": 8, "loss_scale": 1.0,
       "skipped_iters": 0, "mem_gib": 1.234}


def test_training_line_has_megatron_fields():
    line = training_line(10, 100, ROW)
    for part in ("iteration       10/     100", "consumed samples:           80",
                 "elapsed time per iteration (ms): 812.3", "tokens/s: 5130", "learning rate: 5.000000E-07",
                 "global batch size:     8", "loss: 6.931000E-01", "rewards/accuracies: 5.000000E-01",
                 "loss scale: 1.0", "grad norm: 1.250", "number of skipped iterations:   0", "mem (GiB): 1.23"):
        assert part in line, (part, line)
    assert "skipped:" not in line and "step_time" not in line  # loop keys are printed in words only once


def test_reporter_prints_lines_without_a_progress_bar(tmp_path, capsys):
    rep = Reporter(enabled=True, save=str(tmp_path), total_steps=2, start_step=0, progress_bar=False,
                   tensorboard=False, wandb_project=None, config={})
    rep.log(1, ROW)
    rep.log(1, {"loss": 0.5, "rewards/accuracies": 1.0}, prefix="eval/")
    rep.echo(" saved checkpoint at iteration 1 to /ckpt/iter_0000001")
    rep.close(plot=False)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[") and "iteration        1/       2" in out[0]
    assert out[1] == validation_line(1, {"loss": 0.5, "rewards/accuracies": 1.0})
    assert out[2].startswith(" saved checkpoint at iteration 1")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[1]["eval/loss"] == 0.5


def test_other_ranks_print_nothing(capsys):
    rep = Reporter(enabled=False, save=None, total_steps=2, start_step=0, progress_bar=False,
                   tensorboard=False, wandb_project=None, config={})
    rep.log(1, ROW)
    rep.echo("x")
    assert capsys.readouterr().out == ""


def test_missing_tensorboard_fails_on_every_rank(tmp_path, monkeypatch):
    """tensorboard=true without the package must fail on every rank at the same point, not only
    on rank 0 (the only rank that writes): a rank-0-only error left rank 1 in the next collective
    and the 2-rank launch desynchronised until a gloo timeout (seen on a venv without the
    `tensorboard` extra)."""
    import sys

    import pytest

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    for enabled in (True, False):
        with pytest.raises(ImportError, match="tensorboard=true.*pip install"):
            Reporter(enabled=enabled, save=str(tmp_path), total_steps=2, start_step=0, progress_bar=False,
                     tensorboard=True, wandb_project=None, config={})
