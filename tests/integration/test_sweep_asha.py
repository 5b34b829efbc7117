"""ASHA (sweep.scheduler) stopping the trials that are clearly worse, through real Ray Tune on the
session's 2-CPU local Ray; a file of its own so that the test runner can run it beside the grid sweep."""

from __future__ import annotations

import pytest

from vaedist.sweep.tune import run_sweep

from test_sweep_cluster import sweep_config

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 26  # about how long this file takes in `make test` (conftest: longest first)


def test_asha_stops_trials_that_are_clearly_worse_early(ray_cluster, small_shards, tmp_path):
    # lr 1e-30 cannot learn: at the first rung it is behind the trial that can. One at a time, so
    # the good trial (first in the grid) sets the rung before the bad one reaches it.
    cfg = sweep_config(small_shards, tmp_path / "runs", "asha", ["train.lr=2e-3,1e-30"],
                       "sweep.max_concurrent_trials=1", "sweep.scheduler=asha", "sweep.asha_grace_epochs=1",
                       "sweep.asha_reduction_factor=2")
    rows = run_sweep(cfg).table.to_pylist()
    good, bad = rows
    assert (good["train.lr"], good["status"], good["epochs_run"]) == (2e-3, "finished", 2), rows
    # Stopped at the first rung: Tune had seen 1 of 2 epochs (the workers may finish a few more steps
    # in the seconds before the trial's actor is killed).
    assert (bad["train.lr"], bad["status"]) == (1e-30, "stopped"), rows
    assert bad["stopped_after_epochs"] == 1 < bad["epochs"], rows
    assert good["test_loss"] < bad["test_loss"], rows
