"""Ray Tune: a sweep's trials, each a Tune function trainable that builds and fits the trial's
TorchTrainer (Ray Train V2 inside Tune, as Ray 2.60's train_tune_interop documents). The only Tune
imports in vaedist.

    vaedist sweep --config configs/debug.yaml --grid train.lr=1e-3,3e-4 --grid model.latent_dim=8,16

The three Tune touchpoints, labelled TUNE (1)-(3): the trial function (one per trial, ~0 CPU: the
training workers take the trial's `scaling`), the report callback that passes each evaluated epoch
from Ray Train to Tune (ray.tune.integration.ray_train.TuneReportCallback), and the Tuner with its
concurrency limit and optional ASHA scheduler.

Resuming: a trial's run name is fixed by the sweep (spec.trial_name), so a trial that starts again
finds its run directory and resumes from its latest checkpoint, as `vaedist train` does. Which trials
are done is read from their run directories (trial.json, metrics.jsonl), not from Tune's experiment
state: Tune snapshots that state every few seconds, so a driver killed right after a trial ended
may have recorded it as still running, and Tuner.restore would run it again; Tuner.restore also
needs the same Tune version and trainable, while the run directories are what every other vaedist
command reads anyway. A rerun of the sweep therefore starts a new Tune experiment (`_tune/attempt-N`)
over the trials that are not finished or stopped; ASHA then decides with the rungs of this attempt's
trials only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
from ray.tune import Callback

from vaedist import storage
from vaedist.cluster import check_resources, init_ray
from vaedist.config import Config, config_from_dict
from vaedist.console import loss_from_ray_score
from vaedist.errors import original, root_cause
from vaedist.sweep import results
from vaedist.sweep.spec import TUNE_DIR, Sweep, SweepError, check_identity, plan_sweep, write_identity
from vaedist.tracking import SweepTracker, check_uri, resolve_uri

log = logging.getLogger("vaedist.sweep")
TIME_ATTR = "epochs_done"  # ASHA's clock: epochs, not Tune's iterations (a resumed trial counts from 1 again)
METRIC = "test_loss"
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}
STOPPED_TRIAL_CLEANUP_S = 5
ORPHAN_SWEEP_S = 60  # how long after a trial ends its placement group is looked for
TUNE_KEYS = ("epoch", "train_loss", "train_recon_nll", "train_kl", "test_loss", "test_recon_nll", "test_kl",
             "samples_per_s", "epoch_seconds")


@dataclass
class SweepResult:
    dir: str
    table: pa.Table
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return self.table.column("status").to_pylist().count(status)


# ---------------------------------------------------------------------------------------------
# Inside a trial.

def _report_callback():
    """TUNE (2): Ray Train's reports -> Tune, for evaluated epochs only (ASHA compares test losses;
    an epoch without one, or the final IW row, would be a result without the metric)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochsToTune(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = metrics[0]
            loss = loss_from_ray_score(row.get(METRIC))
            if row.get("kind") != "epoch" or not isinstance(loss, float) or not math.isfinite(loss):
                return
            clean = {k: row[k] for k in TUNE_KEYS if k in row}
            super().after_report(run_context, [{**clean, TIME_ATTR: row["epoch"] + 1}], checkpoint)

    return EpochsToTune()


def run_trial(config: dict[str, Any], payloads: dict[str, dict[str, Any]]) -> None:
    """TUNE (1): one trial: its TorchTrainer built and fitted (resumed, when its run directory has
    checkpoints) by vaedist.train's driver, and its record kept in the run directory."""
    from vaedist.train import fit, make_trainer, preflight

    payload = payloads[config["trial"]]
    cfg = config_from_dict(payload["config"])
    run_dir = storage.join(cfg.output.storage_path, cfg.output.run_name)
    results.start_attempt(run_dir, payload["name"], payload["overrides"])
    if not results.run_complete(cfg, run_dir):  # else it finished before the driver learnt of it
        trainer = make_trainer(cfg, preflight(cfg), payload["tracking_uri"], callbacks=[_report_callback()],
                               tracking_tags=payload["tracking_tags"])
        fit(trainer)
    results.end_attempt(run_dir, "finished")


# ---------------------------------------------------------------------------------------------
# On the driver.

class Recorder(Callback):
    """Tune's view of each trial, recorded where vaedist keeps it: a trial the scheduler stopped or
    that failed is marked in its trial.json (it cannot say so itself), and sweep.parquet is rebuilt."""

    def __init__(self, sweep: Sweep, tracker: SweepTracker, echo: Callable[[str], None]):
        self.by_name = {t.name: t for t in sweep.trials}
        self.sweep_dir, self.tracker, self.echo = sweep.dir, tracker, echo
        self.stdout = sys.stdout  # _quiet_tune swallows Tune's own prints, not these

    def __getstate__(self):  # Tune pickles its callbacks with the experiment; all this stays here
        return {}

    def say(self, line: str) -> None:
        with contextlib.redirect_stdout(self.stdout):
            self.echo(line)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.say(f"{trial.config['trial']}: started")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.say(f"{trial.config['trial']}: epoch {result.get('epoch')} train l_i {result.get('train_loss', 0):.3f} "
                 f"test l_i {result.get(METRIC, math.nan):.3f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "stopped", None)
        self.sweep_until = time.monotonic() + ORPHAN_SWEEP_S

    def on_step_end(self, iteration, trials, **info):
        # For a while after a trial ends, about once a second: its killed Train controller's workers'
        # placement group, which Ray Train's own cleaner may fail to remove (below).
        if time.monotonic() < getattr(self, "sweep_until", 0) and time.monotonic() > getattr(self, "swept_at", 0) + 1:
            self.swept_at = time.monotonic()
            _remove_orphaned_placement_groups()

    def on_trial_error(self, iteration, trials, trial, **info):
        error = trial.get_error() if hasattr(trial, "get_error") else None
        # The trial's TrainingError says it in one line; an error Tune holds only as text, its last line.
        told = root_cause(error) if error is not None and original(error) is not error else \
            (str(error or "").strip().splitlines() or ["the trial failed"])[-1]
        self._ended(trial, "error", told[:2000])

    def _ended(self, trial, status: str, error: str | None) -> None:
        t = self.by_name[trial.config["trial"]]
        record = results.end_attempt(t.run_dir, status, error)
        if record.get("status") == "stopped" and "stopped_after_epochs" not in record:
            # The epochs Tune had seen when it stopped the trial: its workers may finish a few more
            # steps (even its epoch) before the actor is killed.
            seen = (trial.last_result or {}).get(TIME_ATTR)
            record = results.write_record(t.run_dir, stopped_after_epochs=seen)
        if record.get("status") != "finished":
            self.tracker.end_child(t.run_dir, "KILLED" if status == "stopped" else "FAILED")
        row = results.trial_row(t.run_dir, t.config.train.epochs)
        test = f", test l_i {row['test_loss']:.3f}" if row["test_loss"] is not None else ""
        self.say(f"{t.name}: {record.get('status')} after {row['epochs_run']} of {row['epochs']} epochs{test}"
                 + (f" ({error})" if record.get("status") == "error" and error else ""))
        results.write_table(self.sweep_dir)


def _remove_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead: a stopped trial's Train controller,
    killed with the trial's actor, leaves its workers' placement group (and their CPUs) behind for as
    long as the job lives. Ray Train's PlacementGroupCleaner should remove it, but finds the cluster
    through the State API, which fails where several local Ray instances run (this machine: its
    monitor thread dies with "Found multiple active Ray instances"). Groups created by a driver (Tune's
    trials') have no creating actor and are left alone."""
    import ray
    from ray._private.state import state
    from ray._raylet import PlacementGroupID
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        info = gcs_pb2.PlacementGroupTableData.FromString(raw)
        creator = info.creator_actor_id
        if (info.state == gcs_pb2.PlacementGroupTableData.CREATED and info.creator_actor_dead
                and not info.is_detached and creator and creator != b"\xff" * len(creator)):
            ray.util.remove_placement_group(PlacementGroup(PlacementGroupID(info.placement_group_id)))
            removed += 1
    if removed:
        log.info("removed %d placement group(s) of stopped trials", removed)
    return removed


@contextlib.contextmanager
def _quiet_tune():
    """Tune prints its experiment's table and path to stdout and logs slow-callback warnings, whatever
    its verbose setting says; the sweep's own lines (and --verbose) say what matters."""
    from vaedist.console import is_verbose

    if is_verbose():
        yield
        return
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        tune_log.setLevel(level)


def _concurrency(sweep: Sweep, address: str | None) -> int:
    """sweep.max_concurrent_trials, else as many trials as the cluster's CPUs (GPUs) hold at the
    largest trial's demand; the embedded Ray refuses a trial larger than itself."""
    import ray

    cpus = max(t.config.scaling.num_workers * t.config.scaling.cpus_per_worker for t in sweep.trials)
    gpus = max(t.config.scaling.num_workers if t.config.scaling.use_gpu else 0 for t in sweep.trials)
    check_resources("a trial of the sweep", [
        ("CPU", cpus, f"scaling.num_workers x scaling.cpus_per_worker of the largest trial = {cpus:g} CPUs",
         "use fewer workers or CPUs per worker"),
        ("GPU", gpus, f"scaling.use_gpu with scaling.num_workers = {gpus}", "set scaling.use_gpu=false"),
    ], address)
    if sweep.base.sweep.max_concurrent_trials:
        return sweep.base.sweep.max_concurrent_trials
    have = ray.cluster_resources()
    fits = [have.get("CPU", 0) // cpus] + ([have.get("GPU", 0) // gpus] if gpus else [])
    return max(1, int(min(fits)))


def _attempt_name(sweep: Sweep) -> str:
    tune_dir = storage.join(sweep.dir, TUNE_DIR)
    done = [n for n in storage.listdir(tune_dir) if n.startswith("attempt-")] if storage.exists(tune_dir) else []
    return f"attempt-{len(done) + 1:03d}"


def _summary(table: pa.Table) -> dict[str, float]:
    rows = table.to_pylist()
    finished = [r for r in rows if r["status"] == "finished" and r["test_loss"] is not None]
    summary = {f"trials_{s}": float(sum(r["status"] == s for r in rows))
               for s in ("finished", "stopped", "error", "running", "pending")}
    if finished:
        summary["best_test_loss"] = min(r["test_loss"] for r in finished)
        nll = [r["test_nll_iw"] for r in finished if r["test_nll_iw"] is not None]
        if nll:
            summary["best_test_nll_iw"] = min(nll)
    return summary


def run_sweep(cfg: Config, echo: Callable[[str], None] | None = None) -> SweepResult:
    """Run (or resume) the sweep cfg.sweep describes over cfg: every trial's config and data are
    checked first, then the trials that are not finished or stopped run through Ray Tune, at most
    sweep.max_concurrent_trials at once; returns sweep.parquet's table."""
    import ray.tune as tune

    echo = echo or log.info
    start = time.perf_counter()
    sweep = plan_sweep(cfg)
    resumed = check_identity(sweep)

    # Which trials are left, and their data and checkpoints checked, before anything starts.
    from vaedist.train import preflight

    todo, skipped = [], []
    for trial in sweep.trials:
        status = results.read_record(trial.run_dir).get("status")
        if status not in results.DONE and results.run_complete(trial.config, trial.run_dir):
            results.end_attempt(trial.run_dir, "finished")  # it finished; the driver died before it could say so
            status = results.read_record(trial.run_dir).get("status") or "finished"
        if status in results.DONE:
            skipped.append(trial.name)
            continue
        try:
            preflight(trial.config)
        except Exception as e:
            raise type(e)(f"trial {trial.name}: {e}") from None
        todo.append(trial)
    tracking_uri = resolve_uri(cfg)
    if tracking_uri:
        check_uri(tracking_uri, cfg.tracking.experiment)
    write_identity(sweep)
    echo(f"sweep {sweep.name}: {len(sweep.trials)} trials in {sweep.dir}"
         + (f"; {len(skipped)} done already, {len(todo)} to run" if resumed else ""))

    tracker = SweepTracker(tracking_uri, cfg.tracking.experiment, sweep.dir, sweep.name,
                           {"sweep": {"keys": sweep.keys, "grid": cfg.sweep.grid, "sample": cfg.sweep.sample,
                                      "num_samples": cfg.sweep.num_samples, "seed": cfg.sweep.seed,
                                      "scheduler": cfg.sweep.scheduler, "trials": len(sweep.trials)},
                            **{k: v for k, v in sweep.base.to_dict().items() if k != "sweep"}})
    if todo:
        init_ray(cfg.scaling.address)
        concurrency = _concurrency(sweep, cfg.scaling.address)
        payloads = {t.name: {"name": t.name, "overrides": t.overrides, "config": t.config.to_dict(),
                             "tracking_uri": tracking_uri, "tracking_tags": tracker.child_tags} for t in todo}
        scheduler = None
        if cfg.sweep.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # Rungs only before the last epoch (max_t half an epoch short of it), and no stop at
            # max_t: a stop there could only cut a trial's last checkpoint and final estimate.
            scheduler = ASHAScheduler(time_attr=TIME_ATTR, metric=METRIC, mode="min",
                                      max_t=max(t.config.train.epochs for t in sweep.trials) - 0.5,
                                      grace_period=cfg.sweep.asha_grace_epochs,
                                      reduction_factor=cfg.sweep.asha_reduction_factor, stop_last_trials=False)
        echo(f"running {len(todo)} trial(s), {concurrency} at a time"
             + (f", ASHA on {METRIC}" if scheduler else ""))
        # TUNE (3): one Tune trial per vaedist trial. The trial function needs no CPU of its own (its
        # workers take the trial's scaling); Tune wants some resource, so it asks for 1 MiB of memory.
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(run_trial, payloads=payloads), TRIAL_DRIVER_RESOURCES),
            param_space={"trial": tune.grid_search([t.name for t in todo])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, scheduler=scheduler,
                                        trial_name_creator=lambda t: t.config["trial"],
                                        trial_dirname_creator=lambda t: t.config["trial"]),
            run_config=tune.RunConfig(name=_attempt_name(sweep), **storage.ray_storage(storage.join(sweep.dir, TUNE_DIR)),
                                      failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_trial_failures),
                                      callbacks=[Recorder(sweep, tracker, echo)], verbose=0),
        )
        # A trial the scheduler stops is blocked inside trainer.fit(), which no stop request reaches;
        # Tune kills its actor (and so its Train controller and workers, and their CPUs) only after
        # this many seconds, 600 by default: the next trials would wait that long for the CPUs.
        os.environ.setdefault("TUNE_FORCE_TRIAL_CLEANUP_S", str(STOPPED_TRIAL_CLEANUP_S))
        with _quiet_tune():
            tuner.fit()
    table = results.write_table(sweep.dir)
    summary = _summary(table)
    unfinished = summary["trials_error"] + summary["trials_running"] + summary["trials_pending"]
    tracker.finish(summary, status="FAILED" if unfinished else "FINISHED")
    return SweepResult(sweep.dir, table, ran=[t.name for t in todo], skipped=skipped,
                       seconds=time.perf_counter() - start)


def encode_best(cfg: Config, sweep_dir: str, k: int, out: str | None = None,
                echo: Callable[[str], None] | None = None) -> list[tuple[dict[str, Any], Any]]:
    """Encode the test split of the k best finished trials, each with its best checkpoint, into a
    latent table per trial: <out>/<trial name> (out: output.latents_dir + '-' + the sweep's name).
    Each trial's own data config; cfg's encode, scaling.address and tracking settings."""
    from vaedist.checkpoint import config_of, load_checkpoint
    from vaedist.encode import encode

    if k < 1:
        raise SweepError(f"--best: must be >= 1, got {k}")
    table = results.read_table(sweep_dir)
    name = sweep_dir.rstrip("/").rpartition("/")[2]
    out = storage.absolute(out or f"{cfg.output.latents_dir}-{name}")
    uri = resolve_uri(cfg)
    done = []
    for row in results.best_trials(table, k):
        trial_cfg = config_of(load_checkpoint(row["best_checkpoint"]))
        tree = trial_cfg.to_dict()
        tree.update(encode={**cfg.to_dict()["encode"], "splits": ["test"]}, tracking=cfg.to_dict()["tracking"])
        tree["scaling"]["address"] = cfg.scaling.address
        if uri:
            tree["tracking"]["mlflow_uri"] = uri  # the sweep's store, not one beside the trial's runs
        result = encode(config_from_dict(tree), checkpoint=row["best_checkpoint"],
                        out=storage.join(out, row["name"]), echo=echo)
        done.append((row, result))
    return done
