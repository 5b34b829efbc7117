"""Experiment tracking in MLflow: one MLflow run per vaedist run, holding the training run's config,
per-epoch metrics, final NLL and checkpoint paths, and the encode job's lineage, summaries and report.
No Ray; mlflow is an optional extra (`pip install 'vaedist[mlflow]'`), imported only when tracking is on.

    vaedist train --config configs/debug.yaml --set tracking.enabled=true
    mlflow ui --backend-store-uri sqlite:///$PWD/outputs/runs/mlflow.db

Which store: resolve_uri(cfg) on the driver (tracking.mlflow_uri, else $MLFLOW_TRACKING_URI, else the
SQLite file storage_path/mlflow.db when tracking.enabled is true); the driver checks it with check_uri()
before any cluster work and hands the URI to the workers explicitly.

Which run: the MLflow run id lives in the run directory (`<run_dir>/mlflow.json`, one entry per
tracking store), so a resumed Ray run, after a worker failure or a rerun of the same run name, logs into
the same MLflow run, and the encode job finds the run of the checkpoint it encoded. Metric steps are
epochs; a step already in the run is never logged twice.

A store that fails after the preflight never stops a job: the first failure is logged as a warning and
tracking stops for that process; a resumed run backfills the epochs it missed from its history.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vaedist import __version__, storage
from vaedist.config import Config, ConfigError

log = logging.getLogger("vaedist.tracking")

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
RUN_RECORD_FILE = "mlflow.json"
DEFAULT_STORE_FILE = "mlflow.db"  # beside the run directories, under output.storage_path
DEFAULT_ARTIFACTS_DIR = "mlartifacts"  # beside a SQLite store (MLflow's own default is ./mlruns in the cwd)
EPOCH_METRICS = ("train_loss", "train_recon_nll", "train_kl", "train_objective", "test_loss", "test_recon_nll",
                 "test_kl", "test_bpd", "samples_per_s", "epoch_seconds")
FINAL_METRICS = ("test_nll_iw", "test_bpd_iw")  # bpd: bits per dimension, loss / (H * W * C * ln 2)
TAG = "vaedist."  # prefix of vaedist's own run tags
# Per request, while vaedist talks to the store; MLflow's defaults (7 retries with exponential
# backoff, 120 s timeout) would stall a training epoch for minutes when the server is down.
# Variables the user sets win.
REQUEST_RETRIES, REQUEST_TIMEOUT_S = 2, 30

LOSS_BY_SPLIT_SQL = """\
SELECT split,
       count(*)       AS count,
       avg(loss)      AS loss_mean,
       avg(recon_nll) AS recon_nll_mean,
       avg(kl)        AS kl_mean,
       -avg(log_px)   AS nll_iw
FROM latents
GROUP BY split
ORDER BY split"""


class TrackingError(ValueError):
    """The tracking store cannot be used; the message names the URI (without credentials)."""


# ---------------------------------------------------------------------------------------------
# Which store: resolved and checked on the driver.

def resolve_uri(cfg: Config) -> str | None:
    """The tracking URI in force for cfg, or None when tracking is off. Call it on the driver: the
    environment it reads ($MLFLOW_TRACKING_URI, the working directory) is the driver's."""
    tc = cfg.tracking
    if tc.enabled is False:
        return None
    uri = tc.mlflow_uri or os.environ.get(TRACKING_URI_ENV) or None
    if uri is None:
        if not tc.enabled:
            return None
        if storage.is_uri(cfg.output.storage_path):
            raise ConfigError(f"tracking.enabled: the default MLflow store is a SQLite file beside the runs, which "
                              f"needs a local output.storage_path, got {cfg.output.storage_path!r}; set "
                              "tracking.mlflow_uri (or $MLFLOW_TRACKING_URI) to a tracking server")
        return "sqlite:///" + os.path.join(storage.absolute(cfg.output.storage_path), DEFAULT_STORE_FILE)
    return _absolute_sqlite(uri)


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///relative.db made absolute: workers and Ray jobs run in other working directories."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/") and uri[len(prefix):] != ":memory:":
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def _sqlite_path(uri: str) -> str | None:
    """The database file of a sqlite:////abs/path URI, else None."""
    if uri.startswith("sqlite:////"):
        return uri[len("sqlite:///"):].split("?", 1)[0]
    return None


def redact(uri: str) -> str:
    """The URI without user:password@ or a query string (for messages, params and mlflow.json)."""
    parts = urlsplit(uri)
    if parts.scheme in ("", "sqlite") or "@" not in parts.netloc:
        return uri.split("?", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _import_mlflow():
    try:
        import mlflow
    except ImportError:
        raise TrackingError("MLflow tracking is on (tracking.enabled / tracking.mlflow_uri / $MLFLOW_TRACKING_URI) "
                            "but mlflow is not installed: pip install 'vaedist[mlflow]', or set "
                            "tracking.enabled=false") from None
    return mlflow


@contextlib.contextmanager
def _bounded_requests() -> Iterator[None]:
    """Fewer retries and a shorter timeout for MLflow's HTTP requests inside the block, unless the
    user set MLflow's own variables."""
    ours = [name for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
            if name not in os.environ]
    for name in ours:
        os.environ[name] = str(REQUEST_RETRIES if name.endswith("RETRIES") else REQUEST_TIMEOUT_S)
    try:
        yield
    finally:
        for name in ours:
            os.environ.pop(name, None)


def _client(uri: str):
    """An MlflowClient for uri; a SQLite store's directory is created first (SQLite will not)."""
    mlflow = _import_mlflow()
    db = _sqlite_path(uri)
    if db:
        os.makedirs(os.path.dirname(db), exist_ok=True)
    return mlflow.MlflowClient(tracking_uri=uri)


def check_uri(uri: str, experiment: str = "vaedist") -> None:
    """The driver's preflight: the store answers, and the experiment is usable. Raises TrackingError."""
    _import_mlflow()
    with _bounded_requests():
        try:
            found = _client(uri).get_experiment_by_name(experiment)
        except Exception as e:  # MlflowException, SQLAlchemy's and requests' errors alike
            raise TrackingError(f"MLflow tracking store {redact(uri)} cannot be used: {_first_line(e, uri)}; check "
                                "tracking.mlflow_uri / $MLFLOW_TRACKING_URI, or set tracking.enabled=false") from None
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {experiment!r} in {redact(uri)} is deleted; restore it "
                            f"(mlflow experiments restore --experiment-id {found.experiment_id}) or set "
                            "tracking.experiment to another name")


def _first_line(error: Exception, uri: str | None = None) -> str:
    """The error's first line, without the credentials of uri (MLflow's messages quote the URL)."""
    text = str(error).strip().splitlines()
    line = text[0][:400] if text else type(error).__name__
    userinfo = urlsplit(uri).netloc.rpartition("@")[0] if uri and "://" in uri else ""
    return line.replace(userinfo + "@", "") if userinfo else line


# ---------------------------------------------------------------------------------------------
# Which run: the record in the run directory.

def read_run_record(run_dir: str) -> dict[str, dict]:
    """<run_dir>/mlflow.json: {store URI (redacted): {"run_id", "experiment_id", "experiment"}}."""
    path = storage.join(run_dir, RUN_RECORD_FILE)
    if not storage.exists(path):
        return {}
    return storage.read_json_object(path, TrackingError, "; remove it to start a new MLflow run")


def _write_run_record(run_dir: str, uri: str, run_id: str, experiment_id: str, experiment: str) -> None:
    record = read_run_record(run_dir)
    record[redact(uri)] = {"run_id": run_id, "experiment_id": experiment_id, "experiment": experiment}
    storage.write_bytes(storage.join(run_dir, RUN_RECORD_FILE),
                        (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def _experiment_id(client, uri: str, name: str) -> str:
    """The experiment's id, created when missing (a SQLite store's artifacts go beside its file)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        db = _sqlite_path(uri)
        location = os.path.join(os.path.dirname(db), DEFAULT_ARTIFACTS_DIR) if db else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:  # created meanwhile by another process
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {name!r} in {redact(uri)} is deleted; restore it or set "
                            "tracking.experiment to another name")
    return found.experiment_id


def _open_run(client, uri: str, experiment: str, run_dir: str | None, run_name: str,
              tags: Mapping[str, str]) -> tuple[Any, bool]:
    """(the MLflow run recorded for run_dir in this store, False), else (a new run, now recorded, True)."""
    from mlflow.exceptions import MlflowException

    entry = read_run_record(run_dir).get(redact(uri)) if run_dir else None
    if entry:
        try:
            run = client.get_run(entry["run_id"])
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # a store that fails must not fork the run
                raise
            log.warning("MLflow run %s recorded in %s is not in %s (%s); starting a new one", entry["run_id"],
                        storage.join(run_dir, RUN_RECORD_FILE), redact(uri), _first_line(e, uri))
        else:
            if run.info.lifecycle_stage != "deleted":
                return run, False
            log.warning("MLflow run %s recorded in %s was deleted; starting a new one", entry["run_id"],
                        storage.join(run_dir, RUN_RECORD_FILE))
    experiment_id = _experiment_id(client, uri, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    if run_dir:
        _write_run_record(run_dir, uri, run.info.run_id, experiment_id, experiment)
    return run, True


def _logged_steps(client, run, keys: Iterable[str]) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} already in the run (one history query per metric the run has)."""
    present = set(run.data.metrics)
    return {k: ({m.step: m.value for m in client.get_metric_history(run.info.run_id, k)} if k in present else {})
            for k in keys}


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train.lr": "0.001", "model.hidden_dims": "[512, 256]", ...}: MLflow params are strings."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, name + "."))
        elif name == "tracking.mlflow_uri" and value:
            flat[name] = redact(str(value))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---------------------------------------------------------------------------------------------
# Training: rank 0's tracker.

class TrainTracker:
    """The training run's MLflow run, opened (or resumed) on construction. Rank 0 only.

        tracker = TrainTracker(uri, cfg.tracking.experiment, run_dir, cfg.output.run_name, cfg.to_dict(),
                               manifest_hash=digest, history=history)
        tracker.log_epoch(row)        # each epoch, after metrics.jsonl is written
        tracker.log_final(row)        # the importance-weighted NLL row
        tracker.finish()              # status FINISHED; a rerun of the run name reopens it

    uri None makes every method a no-op. Methods never raise: the first failure of the store is
    logged as a warning and the tracker stops (history backfills the missed epochs on resume).
    """

    def __init__(self, uri: str | None, experiment: str, run_dir: str, run_name: str, config: Mapping[str, Any], *,
                 manifest_hash: str | None = None, tags: Mapping[str, str] | None = None,
                 history: Iterable[Mapping[str, Any]] = ()):
        self.uri, self.run_dir, self.run_id = uri, run_dir, None
        self._client = None
        self._steps: dict[str, dict[int, float]] = {}
        self._tags: dict[str, str] = {}
        self._failed = False
        if uri is not None:
            self._guard("opening the run", self._open, experiment, run_name, config, manifest_hash, tags or {},
                        list(history))

    @property
    def active(self) -> bool:
        return self._client is not None and self.run_id is not None and not self._failed

    def _guard(self, what: str, fn, *args) -> None:
        if self._failed or self.uri is None:
            return
        try:
            with _bounded_requests():
                fn(*args)
        except Exception as e:  # any failure of the store: training goes on regardless
            self._failed = True
            log.warning("MLflow tracking to %s failed while %s (%s: %s); training goes on without tracking, "
                        "and a rerun of this run name resumes the MLflow run and backfills what was missed",
                        redact(self.uri or ""), what, type(e).__name__, _first_line(e, self.uri))

    def _open(self, experiment: str, run_name: str, config: Mapping[str, Any], manifest_hash: str | None,
              tags: Mapping[str, str], history: list[Mapping[str, Any]]) -> None:
        from mlflow.entities import Param

        self._client = client = _client(self.uri)
        initial = {f"{TAG}run_name": run_name, f"{TAG}run_dir": self.run_dir, f"{TAG}version": __version__,
                   "mlflow.source.name": "vaedist train", "mlflow.source.type": "JOB", **tags}
        if manifest_hash:
            initial[f"{TAG}manifest_hash"] = manifest_hash
        run, _ = _open_run(client, self.uri, experiment, self.run_dir, run_name, initial)
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":  # a rerun of a finished (or failed) run
            client.update_run(self.run_id, status="RUNNING")
        self._tags = dict(run.data.tags)
        self._set_tags(initial)

        # Params are immutable: log the new keys; a changed value (a rerun with other overrides) is
        # kept as the first one, and the new value recorded in a tag.
        flat, old = flatten_config(config), run.data.params
        new = [Param(k, v) for k, v in flat.items() if k not in old]
        for chunk in _chunks(new, 100):  # MLflow's limit per batch
            client.log_batch(self.run_id, params=chunk)
        changed = {k: {"logged": old[k], "now": v} for k, v in flat.items() if k in old and old[k] != v}
        if changed:
            log.warning("MLflow run %s keeps its first params; changed on resume: %s", self.run_id,
                        ", ".join(f"{k} {c['logged']} -> {c['now']}" for k, c in changed.items()))
            self._set_tags({f"{TAG}params_changed_on_resume": json.dumps(changed, sort_keys=True)[:5000]})

        self._steps = _logged_steps(client, run, EPOCH_METRICS + FINAL_METRICS)
        # Epochs a failed store or a crash kept out of the run.
        self._log_metrics([(k, row.get(k), int(row["epoch"])) for row in history if row.get("kind") == "epoch"
                           for k in EPOCH_METRICS])
        self._set_checkpoint_tags()

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        changed = [RunTag(k, str(v)) for k, v in tags.items() if self._tags.get(k) != str(v)]
        if changed:
            self._client.log_batch(self.run_id, tags=changed)
            self._tags.update({t.key: t.value for t in changed})

    def _log_metrics(self, points: Iterable[tuple[str, Any, int]]) -> None:
        """(key, value, step) points, except None values and steps the run already has."""
        from mlflow.entities import Metric

        now, fresh = _now_ms(), {}
        for key, value, step in points:
            if value is not None and step not in self._steps.setdefault(key, {}):
                fresh[key, step] = Metric(key, float(value), now, step)
        for chunk in _chunks(list(fresh.values()), 1000):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, metrics=chunk)
            for m in chunk:
                self._steps[m.key][m.step] = m.value

    def _set_checkpoint_tags(self) -> None:
        from vaedist.checkpoint import best_checkpoint_dir, latest_checkpoint_dir

        # The run directory's own answer: best is the checkpoint encode would pick (by metrics.jsonl).
        tags = {f"{TAG}checkpoint.latest": latest_checkpoint_dir(self.run_dir),
                f"{TAG}checkpoint.best": best_checkpoint_dir(self.run_dir)}
        self._set_tags({k: v for k, v in tags.items() if v is not None})

    def _log_epoch(self, row: Mapping[str, Any]) -> None:
        self._log_metrics([(k, row.get(k), int(row["epoch"])) for k in EPOCH_METRICS])
        self._set_checkpoint_tags()

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """One epoch's metrics.jsonl row, at step = epoch (skipped if that step is in the run), and the
        run directory's latest and best checkpoints as tags. Call it after metrics.jsonl is written."""
        self._guard(f"logging epoch {row.get('epoch')}", self._log_epoch, row)

    def log_final(self, row: Mapping[str, Any]) -> None:
        """The final row: test_nll_iw (importance-weighted test NLL, nats) at step = the last epoch."""
        self._guard("logging the final NLL", self._log_metrics,
                    [(k, row.get(k), int(row["epoch"])) for k in FINAL_METRICS])

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED, FAILED or KILLED); a later TrainTracker on the run directory reopens it."""
        if self.active:
            self._guard("ending the run", self._client.set_terminated, self.run_id, status)


# ---------------------------------------------------------------------------------------------
# Encoding: the driver logs the published table into the training run.

def summarize_latents(latents_dir: str) -> tuple[dict[str, Any], dict[str, float]]:
    """A published latent table's summary: ({name: Arrow table}, {metric: value}).

    Tables: loss_by_split (count and mean l_i, recon_nll, kl, and the IW NLL when the table has
    log_px) and loss_by_digit_<split> (analyses.loss_by_digit). Metrics: encode_<split>_loss_mean,
    _recon_nll_mean, _kl_mean, _nll_iw (nats)."""
    from vaedist import analyses

    con = analyses.connect(latents_dir)
    try:
        by_split = analyses.run_sql(latents_dir, LOSS_BY_SPLIT_SQL, con=con)
        tables: dict[str, Any] = {"loss_by_split": by_split}
        metrics: dict[str, float] = {}
        for row in by_split.to_pylist():
            split = row["split"]
            tables[f"loss_by_digit_{split}"] = analyses.loss_by_digit(latents_dir, split, con=con)
            for name in ("loss_mean", "recon_nll_mean", "kl_mean", "nll_iw"):
                if row[name] is not None and math.isfinite(row[name]):
                    metrics[f"encode_{split}_{name}"] = float(row[name])
    finally:
        con.close()
    if by_split.column("nll_iw").null_count == by_split.num_rows:
        tables["loss_by_split"] = by_split.drop_columns(["nll_iw"])
    return tables, metrics


def _copy_tree(src: str, dst: str) -> None:
    """A local or URI directory copied into a local one (MLflow logs artifacts from local files)."""
    os.makedirs(dst, exist_ok=True)
    for name in storage.listdir(src):
        path = storage.join(src, name)
        if storage.is_dir(path):
            _copy_tree(path, os.path.join(dst, name))
        else:
            with open(os.path.join(dst, name), "wb") as f:
                f.write(storage.read_bytes(path))


def log_encode(uri: str | None, latents_dir: str, *, experiment: str = "vaedist", run_dir: str | None = None,
               run_id: str | None = None, report_dir: str | None = None, artifact_path: str = "encode") -> str | None:
    """Log a published latent table into the MLflow run of the training run it came from; returns the
    run id (None when uri is None or the store failed: a warning, never an error).

    The run: run_id if given, else the one recorded in run_dir's mlflow.json (run_dir defaults to
    the run directory of the table's checkpoint), else a new run, recorded in run_dir. Logged under
    `artifact_path`: `_lineage.json`, each summary table as .csv and .jsonl, and report_dir (index.html
    and its PNGs) under `report/`; the summary metrics at step = the checkpoint's epoch; tags
    vaedist.encode.latents_dir and vaedist.encode.checkpoint.
    """
    if uri is None:
        return None
    try:
        with _bounded_requests():
            return _log_encode(uri, storage.absolute(latents_dir), experiment, run_dir, run_id, report_dir,
                               artifact_path)
    except Exception as e:  # the table is published already; tracking must not undo that
        log.warning("MLflow tracking to %s failed while logging the latent table %s (%s: %s); the table is "
                    "published regardless", redact(uri), latents_dir, type(e).__name__, _first_line(e, uri))
        return None


def _log_encode(uri: str, latents_dir: str, experiment: str, run_dir: str | None, run_id: str | None,
                report_dir: str | None, artifact_path: str) -> str:
    from mlflow.entities import Metric, RunTag

    from vaedist import analyses, schema
    from vaedist.checkpoint import run_dir_of_checkpoint  # torch: imported only when encode logs

    lineage = analyses.read_lineage(latents_dir)
    checkpoint = str(lineage.checkpoint or "")
    client = _client(uri)
    if run_id is None:
        run_dir = run_dir or run_dir_of_checkpoint(checkpoint)
        name = (run_dir or latents_dir).rstrip("/").rpartition("/")[2]
        run, created = _open_run(client, uri, experiment, run_dir, name,
                                 {f"{TAG}run_dir": run_dir or "", "mlflow.source.name": "vaedist encode",
                                  "mlflow.source.type": "JOB"})
        run_id = run.info.run_id
    else:
        run, created = client.get_run(run_id), False

    tables, metrics = summarize_latents(latents_dir)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, schema.LINEAGE_FILE), "wb") as f:  # the file as the table has it
            f.write(storage.read_bytes(storage.join(latents_dir, schema.LINEAGE_FILE)))
        for name, table in tables.items():
            for fmt, ext in (("csv", "csv"), ("json", "jsonl")):
                with open(os.path.join(tmp, f"{name}.{ext}"), "w") as f:
                    f.write(analyses.format_table(table, fmt))
        client.log_artifacts(run_id, tmp, artifact_path)
    if report_dir:
        with tempfile.TemporaryDirectory() as tmp:
            _copy_tree(str(report_dir), tmp)
            client.log_artifacts(run_id, tmp, f"{artifact_path}/report")

    step = int(lineage.checkpoint_epoch or 0)
    logged = _logged_steps(client, run, metrics)
    now = _now_ms()
    fresh = [Metric(k, v, now, step) for k, v in metrics.items() if step not in logged[k]]
    tags = [RunTag(f"{TAG}encode.latents_dir", latents_dir), RunTag(f"{TAG}encode.checkpoint", checkpoint)]
    client.log_batch(run_id, metrics=fresh, tags=tags)
    if created:  # a run of its own (the training run was not tracked in this store): nothing else ends it
        client.set_terminated(run_id, "FINISHED")
    return run_id


# ---------------------------------------------------------------------------------------------
# Sweeps: a parent run, each trial's training run its child.

class SweepTracker:
    """A sweep's MLflow parent run, opened (or resumed, from <sweep_dir>/mlflow.json) on construction.
    Each trial's TrainTracker gets `child_tags` (mlflow.parentRunId), which makes its run a child.

        tracker = SweepTracker(uri, experiment, sweep_dir, name, params={"grid": ..., "trials": 4})
        tags = tracker.child_tags                 # into each trial's TrainTracker
        tracker.end_child(run_dir, "KILLED")      # a trial the scheduler stopped
        tracker.finish({"best_test_loss": 97.1}, status="FINISHED")

    uri None makes every method a no-op; like TrainTracker, a failing store costs a warning, never the sweep.
    """

    def __init__(self, uri: str | None, experiment: str, sweep_dir: str, name: str, params: Mapping[str, Any]):
        self.uri, self.sweep_dir, self.run_id = uri, sweep_dir, None
        self._client = None
        if uri is not None:
            self._guard("opening the sweep's run", self._open, experiment, name, params)

    def _guard(self, what: str, fn, *args) -> None:
        if self.uri is None or (self._client is None and self.run_id is not None):
            return
        try:
            with _bounded_requests():
                fn(*args)
        except Exception as e:  # any failure of the store: the sweep goes on regardless
            self._client, self.run_id = None, "failed"
            log.warning("MLflow tracking to %s failed while %s (%s: %s); the sweep goes on without its parent run",
                        redact(self.uri or ""), what, type(e).__name__, _first_line(e, self.uri))

    def _open(self, experiment: str, name: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self._client = client = _client(self.uri)
        tags = {f"{TAG}sweep": name, f"{TAG}sweep_dir": self.sweep_dir, f"{TAG}version": __version__,
                "mlflow.source.name": "vaedist sweep", "mlflow.source.type": "JOB"}
        run, _ = _open_run(client, self.uri, experiment, self.sweep_dir, name, tags)
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        flat = {k: v[:6000] for k, v in flatten_config(params).items() if k not in run.data.params}
        for chunk in _chunks([Param(k, v) for k, v in flat.items()], 100):
            client.log_batch(self.run_id, params=chunk)

    @property
    def child_tags(self) -> dict[str, str] | None:
        """Tags that make a run this run's child (None without a parent run)."""
        if self._client is None:
            return None
        return {"mlflow.parentRunId": self.run_id, f"{TAG}sweep_run_id": self.run_id}

    def end_child(self, run_dir: str, status: str) -> None:
        """End the MLflow run recorded in run_dir (a trial stopped early never ends its own)."""
        entry = read_run_record(run_dir).get(redact(self.uri)) if self._client is not None else None
        if entry:
            self._guard(f"ending the run of {run_dir}", self._client.set_terminated, entry["run_id"], status)

    def finish(self, metrics: Mapping[str, float], status: str = "FINISHED") -> None:
        """The sweep's summary metrics (step 0) and its end."""
        if self._client is None:  # before any mlflow import: without a store, mlflow may be absent
            return
        from mlflow.entities import Metric

        now = _now_ms()
        points = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        self._guard("logging the sweep's summary", self._client.log_batch, self.run_id, points)
        if self._client is not None:
            self._guard("ending the sweep's run", self._client.set_terminated, self.run_id, status)
