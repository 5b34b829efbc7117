"""`vaedist bench sweep`: four debug-sized trials through `vaedist sweep`, two at a time and one at a
time, against the same four runs of `vaedist train` one after another, all in the same run.

    vaedist bench sweep --config configs/debug.yaml --steps 20

What Tune adds per trial is (sweep one at a time - train one after another) / 4: both run the same
four trainings one by one on the same Ray, so the difference is Tune's driver, its trial actors and
the report path. Two at a time against one after another is what concurrency buys on this machine.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from typing import Callable

from vaedist.config import Config, config_from_dict
from vaedist.sweep import plan_sweep, with_cli

GRID = ["train.lr=2e-3,1e-3", "model.latent_dim=4,8"]


def bench_sweep(cfg: Config, steps: int, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Wall seconds of each side and their ratios; the runs go to a temporary storage path."""
    from vaedist.cluster import init_ray
    from vaedist.sweep.tune import run_sweep
    from vaedist.train import train

    init_ray(cfg.scaling.address)  # started once, before any clock: every side runs on the same Ray
    with tempfile.TemporaryDirectory(prefix="vaedist-bench-sweep-") as storage:
        base = config_from_dict(cfg.to_dict(), [f"output.storage_path={storage}", f"train.max_steps_per_epoch={steps}",
                                                "train.num_samples_iw_final=0", "tracking.enabled=false"])
        seconds: dict[str, float] = {}

        start = time.perf_counter()
        for trial in plan_sweep(with_cli(base, grid=GRID, name="sequential")).trials:
            train(trial.config, echo=lambda line: None)
        seconds["train, one after another"] = time.perf_counter() - start
        echo(f"4 x vaedist train, one after another: {seconds['train, one after another']:.1f} s")

        for concurrency in (1, 2):
            sweep_cfg = with_cli(base, grid=GRID, name=f"sweep-{concurrency}")
            sweep_cfg = replace(sweep_cfg, sweep=replace(sweep_cfg.sweep, max_concurrent_trials=concurrency))
            start = time.perf_counter()
            result = run_sweep(sweep_cfg, echo=lambda line: None)
            seconds[f"sweep, {concurrency} at a time"] = time.perf_counter() - start
            assert result.count("finished") == 4, result.table.to_pylist()
            echo(f"vaedist sweep, 4 trials {concurrency} at a time: {seconds[f'sweep, {concurrency} at a time']:.1f} s")

    sequential = seconds["train, one after another"]
    per_trial = (seconds["sweep, 1 at a time"] - sequential) / 4
    ratio = sequential / seconds["sweep, 2 at a time"]
    echo(f"what Tune adds per trial (sweep 1 at a time - train one after another) / 4: {per_trial:+.1f} s "
         f"({per_trial / (sequential / 4):+.0%} of a {sequential / 4:.1f} s run)")
    echo(f"speed-up of 2 trials at a time over train one after another: {ratio:.2f}x "
         f"(wall {seconds['sweep, 2 at a time']:.1f} s vs {sequential:.1f} s)")
    return {**seconds, "tune_s_per_trial": per_trial, "speedup_2_at_a_time": ratio}
