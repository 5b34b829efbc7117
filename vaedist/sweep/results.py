"""A sweep's results, from its trials' run directories: each trial's record (trial.json), the table
sweep.parquet (a row per trial), SQL over it, and the best trials. No Ray.

    vaedist query --sweep debug-sweep "SELECT name, \"train.lr\", test_loss FROM sweep ORDER BY test_loss"
    duckdb -c "SELECT * FROM 'outputs/runs/debug-sweep/sweep.parquet'"

The run directories are the truth: sweep.parquet is rebuilt from them (metrics.jsonl, the
checkpoints, trial.json) whenever a trial ends and when the sweep does, so the table and the
directories cannot disagree for long, and a sweep killed at any point rebuilds it on its rerun.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vaedist import storage
from vaedist.checkpoint import best_checkpoint_dir, read_metrics
from vaedist.config import Config
from vaedist.sweep.spec import SWEEP_FILE, TABLE_FILE, TRIAL_FILE, SweepError, read_identity

VIEW_NAME = "sweep"
# Trial states: running (or killed while running), finished (all its epochs), stopped (by the
# scheduler, early), error (failed more than sweep.max_trial_failures allows), pending (never started).
DONE = ("finished", "stopped")

# sweep.parquet's columns, in order: name -> (Arrow type, meaning). SWEPT_KEYS stands for the swept keys'
# columns, one per key, named by it, typed by its values (numbers, booleans, strings, else JSON text).
SWEPT_KEYS = "<swept key>"
COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "index": (pa.int64(), "the trial's position in the sweep's list of trials"),
    "name": (pa.string(), "the trial's run directory name, its index and values (t003-lr=0.0003-latent_dim=16)"),
    SWEPT_KEYS: (pa.null(), "one column per swept key, named by the key (quote it in SQL: \"train.lr\")"),
    "status": (pa.string(), "finished, stopped (by the scheduler), error, running (or killed while running), pending"),
    "epochs_run": (pa.int64(), "epochs in the trial's metrics.jsonl"),
    "epochs": (pa.int64(), "epochs planned (train.epochs)"),
    "train_loss": (pa.float64(), "the last epoch's mean training l_i, nats"),
    "train_recon_nll": (pa.float64(), "its reconstruction term"),
    "train_kl": (pa.float64(), "its KL term"),
    "test_loss": (pa.float64(), "the last evaluated epoch's mean test l_i, nats"),
    "test_recon_nll": (pa.float64(), "its reconstruction term"),
    "test_kl": (pa.float64(), "its KL term"),
    "test_kl_groups": (pa.list_(pa.float64()), "models of several latent groups: each group's term of test_kl, "
                                               "z_1 first (null for one group)"),
    "test_nll_iw": (pa.float64(), "the final importance-weighted test NLL (with train.num_samples_iw_final > 0)"),
    "stopped_after_epochs": (pa.int64(), "stopped trials: the epochs the scheduler had seen when it stopped it"),
    "best_checkpoint": (pa.string(), "the checkpoint of lowest test loss"),
    "wall_s": (pa.float64(), "seconds of every attempt so far"),
    "attempts": (pa.int64(), "times the trial started"),
    "error": (pa.string(), "the error of a failed trial"),
    "overrides": (pa.string(), "the trial's config overrides, JSON"),
    "run_dir": (pa.string(), "the trial's run directory"),
}


# ---------------------------------------------------------------------------------------------
# trial.json: written by the trial itself (running, finished) and by the sweep driver (stopped, error).

def read_record(run_dir: str) -> dict[str, Any]:
    path = storage.join(run_dir, TRIAL_FILE)
    if not storage.exists(path):
        return {}
    return storage.read_json_object(path, SweepError, "; remove it and rerun the sweep to run that trial again")


def write_record(run_dir: str, **fields: Any) -> dict[str, Any]:
    """Update the trial's record with `fields`; returns it."""
    record = {**read_record(run_dir), **fields}
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    storage.write_bytes(storage.join(run_dir, TRIAL_FILE), text.encode())
    return record


def start_attempt(run_dir: str, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """A trial starts (again): status running, one attempt more, the start time."""
    record = read_record(run_dir)
    wall = float(record.get("wall_s") or 0.0)
    return write_record(run_dir, name=name, overrides=overrides, status="running", error=None,
                        attempts=int(record.get("attempts", 0)) + 1, started=time.time(), wall_before_s=wall,
                        wall_s=wall)


def end_attempt(run_dir: str, status: str, error: str | None = None) -> dict[str, Any]:
    """The running attempt ends with `status`; wall_s becomes the seconds of every attempt so far.
    A record that is not running (finished, already stopped) stays as it is."""
    record = read_record(run_dir)
    if record.get("status") != "running" or "started" not in record:
        return record
    elapsed = time.time() - float(record["started"])
    return write_record(run_dir, status=status, error=error,
                        wall_s=float(record.get("wall_before_s") or 0.0) + elapsed)


def run_complete(cfg: Config, run_dir: str) -> bool:
    """Every epoch of the run is in its metrics.jsonl (and the final IW estimate, when configured)."""
    rows = read_metrics(run_dir) if storage.exists(run_dir) else []
    last = cfg.train.epochs - 1
    epochs = any(r.get("kind") == "epoch" and r.get("epoch") == last for r in rows)
    final = cfg.train.num_samples_iw_final == 0 or any(r.get("kind") == "final" and r.get("epoch") == last
                                                       for r in rows)
    return epochs and final


# ---------------------------------------------------------------------------------------------
# sweep.parquet.

def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _column(key: str, values: list[Any]) -> pa.Array:
    """A swept key's column: numbers as numbers, anything else (lists, strings) as JSON text."""
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.array(values, pa.bool_())
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.array(values, pa.int64())
    if present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present):
        return pa.array([None if v is None else float(v) for v in values], pa.float64())
    if present and all(isinstance(v, str) for v in present):
        return pa.array(values, pa.string())
    return pa.array([None if v is None else json.dumps(v) for v in values], pa.string())


def trial_row(run_dir: str, epochs_planned: int) -> dict[str, Any]:
    """A trial's numbers, from its run directory."""
    record = read_record(run_dir)
    rows = read_metrics(run_dir) if storage.exists(run_dir) else []
    epochs = {r["epoch"]: r for r in rows if r.get("kind") == "epoch"}  # a resumed run may repeat none, but be sure
    last = epochs[max(epochs)] if epochs else {}
    tested = [epochs[e] for e in sorted(epochs) if _number(epochs[e].get("test_loss")) is not None]
    finals = [r for r in rows if r.get("kind") == "final"]
    best = best_checkpoint_dir(run_dir) if storage.exists(run_dir) else None
    return {
        "status": record.get("status", "pending"), "epochs_run": len(epochs), "epochs": epochs_planned,
        "train_loss": _number(last.get("train_loss")), "train_recon_nll": _number(last.get("train_recon_nll")),
        "train_kl": _number(last.get("train_kl")),
        "test_loss": _number(tested[-1]["test_loss"]) if tested else None,
        "test_recon_nll": _number(tested[-1].get("test_recon_nll")) if tested else None,
        "test_kl": _number(tested[-1].get("test_kl")) if tested else None,
        "test_kl_groups": [_number(v) for v in tested[-1]["test_kl_groups"]]
        if tested and tested[-1].get("test_kl_groups") else None,
        "test_nll_iw": _number(finals[-1].get("test_nll_iw")) if finals else None,
        "stopped_after_epochs": record.get("stopped_after_epochs") if record.get("status") == "stopped" else None,
        "best_checkpoint": best, "wall_s": _number(record.get("wall_s")),
        "attempts": int(record.get("attempts", 0)), "error": record.get("error"),
    }


def collect(sweep_dir: str) -> pa.Table:
    """sweep.parquet's rows, built from the run directories of the sweep recorded in sweep_dir."""
    identity = read_identity(sweep_dir)
    if identity is None:
        raise SweepError(f"{sweep_dir} is not a vaedist sweep directory (no {SWEEP_FILE})")
    keys, trials = identity["keys"], identity["trials"]
    epochs = identity["config"].get("train.epochs")
    rows = []
    for index, trial in enumerate(trials):
        overrides = trial["overrides"]
        planned = overrides.get("train.epochs", epochs)
        rows.append({"index": index, "name": trial["name"], **{k: overrides.get(k) for k in keys},
                     "overrides": json.dumps(overrides, sort_keys=True),
                     **trial_row(storage.join(sweep_dir, trial["name"]), planned),
                     "run_dir": storage.join(sweep_dir, trial["name"])})
    columns: dict[str, pa.Array] = {"index": pa.array([r["index"] for r in rows], pa.int64()),
                                    "name": pa.array([r["name"] for r in rows], pa.string())}
    for key in keys:
        columns[key] = _column(key, [r[key] for r in rows])
    for name, (tp, _) in COLUMNS.items():
        if name not in columns and name != SWEPT_KEYS:
            columns[name] = pa.array([r[name] for r in rows], tp)
    return pa.table(columns).replace_schema_metadata({"vaedist.sweep": json.dumps(
        {"name": identity["name"], "keys": keys, "sampled": identity.get("sampled", {})})})


def write_table(sweep_dir: str) -> pa.Table:
    """Rebuild sweep.parquet from the run directories (one write: a reader sees the old or the new)."""
    table = collect(sweep_dir)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(sweep_dir, TABLE_FILE), buf.getvalue())
    return table


def read_table(sweep_dir: str) -> pa.Table:
    path = storage.join(sweep_dir, TABLE_FILE)
    if not storage.exists(path):
        raise SweepError(f"{path} not found: run `vaedist sweep` for that sweep first")
    return pq.read_table(io.BytesIO(storage.read_bytes(path)))


def swept_keys(table: pa.Table) -> list[str]:
    return json.loads((table.schema.metadata or {}).get(b"vaedist.sweep", b"{}")).get("keys", [])


def resolve_sweep_dir(cfg: Config, sweep: str) -> str:
    """--sweep S: a sweep directory, else the sweep named S under output.storage_path."""
    if storage.exists(storage.join(sweep, SWEEP_FILE)):
        return storage.absolute(sweep)
    named = storage.join(storage.absolute(cfg.output.storage_path), sweep)
    if storage.exists(storage.join(named, SWEEP_FILE)):
        return named
    raise SweepError(f"no sweep {sweep!r}: neither {sweep} nor {named} holds a {SWEEP_FILE} (run `vaedist sweep` "
                     "first; --sweep takes a sweep directory or a sweep name under output.storage_path)")


def query_sweep(sweep_dir: str, sql: str) -> pa.Table:
    """The result of `sql` over the view `sweep` (sweep.parquet) as an Arrow table."""
    from vaedist import analyses

    if not sql or not sql.strip():
        raise analyses.QueryError("empty SQL: give a query over the view 'sweep', e.g. "
                                  "SELECT name, test_loss FROM sweep ORDER BY test_loss")
    table = read_table(sweep_dir)
    con = analyses.core.cursor()
    try:
        con.register(VIEW_NAME, table)
        return analyses.core.execute(con, sweep_dir, sql)
    finally:
        con.close()


def best_trials(table: pa.Table, k: int) -> list[dict[str, Any]]:
    """The k finished trials of lowest final test loss (ties by name): ASHA-stopped and unfinished
    trials are not candidates."""
    rows = [r for r in table.to_pylist() if r["status"] == "finished" and r["test_loss"] is not None
            and r["best_checkpoint"]]
    if not rows:
        raise SweepError("the sweep has no finished trial with a test loss yet")
    return sorted(rows, key=lambda r: (r["test_loss"], r["name"]))[:k]
