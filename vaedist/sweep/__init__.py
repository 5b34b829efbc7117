"""Sweeps: many training runs of one config, one per trial, through Ray Tune.

    vaedist sweep --config configs/debug.yaml --grid train.lr=1e-3,3e-4 --grid model.latent_dim=8,16
    vaedist sweep --config configs/sweep-mnist.yaml             # the grid in the config's sweep section
    vaedist query --sweep debug-sweep "SELECT name, test_loss FROM sweep ORDER BY test_loss"
    vaedist report --sweep debug-sweep --out outputs/report-sweep
    vaedist encode --sweep debug-sweep --best 2

The package: spec.py lists and checks the trials and guards the sweep directory (no Ray); tune.py
runs them through Ray Tune (the only Tune imports) and encodes the best; results.py reads the run
directories into sweep.parquet (no Ray). The report page is vaedist/report/sweep.py.

A sweep directory, <output.storage_path>/<sweep.name>:
    sweep.json          the sweep's identity: base config, swept keys, every trial's overrides
    sweep.parquet       a row per trial (results.collect)
    t000-lr=0.001-.../  an ordinary vaedist run directory per trial (+ trial.json, its record)
    _tune/attempt-N/    Ray Tune's experiment of each run of the sweep
    mlflow.json         the MLflow parent run (when tracking is on)
"""

from vaedist.sweep.results import best_trials, collect, query_sweep, read_table, resolve_sweep_dir, write_table
from vaedist.sweep.spec import SweepError, Sweep, Trial, check_identity, plan_sweep, with_cli

__all__ = ["Sweep", "SweepError", "Trial", "best_trials", "check_identity", "collect", "plan_sweep", "query_sweep",
           "read_table", "resolve_sweep_dir", "with_cli", "write_table"]
