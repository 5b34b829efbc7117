"""`vaedist sweep` through real Ray Tune and Ray Train on the session's 2-CPU local Ray: a grid sweep
whose driver is killed mid-sweep and rerun until all its trials finish (sweep.parquet against the run
directories, MLflow's parent and children, the query, report and encode of a sweep), and ASHA stopping
the trials that are clearly worse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from vaedist.checkpoint import read_metrics
from vaedist.sweep import query_sweep, with_cli
from vaedist.sweep.results import read_record
from vaedist.sweep.tune import encode_best, run_sweep

from conftest import REPO, debug_config

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 55  # about how long this file takes in `make test` (conftest: longest first)
TINY = ("train.max_steps_per_epoch=3", "scaling.cpus_per_worker=1", "encode.num_samples_mc=1",
        "encode.num_samples_iw=0", "encode.concurrency=1")
# A hierarchical model whose grid splits 8 latent dimensions between two groups in three ways (the
# base config is checked as it is, so it names a split of its own).
HIERARCHICAL = ("model.kind=hierarchical", "model.latent_dim=8", "model.latent_groups=[4,4]")


def sweep_config(shards, storage, name, grid, *extra):
    return with_cli(debug_config(shards, storage, "sweep", *TINY, *extra), grid=grid, name=name)


def test_a_grid_sweep_killed_mid_way_resumes_two_at_a_time_into_run_dirs_the_table_and_mlflow(
        ray_cluster, small_shards, tmp_path, monkeypatch):
    """One sweep serves both stories (a Tune run costs ~20 s a trial here): its first driver, a real
    `vaedist sweep` process with its own embedded Ray, is killed once its first trial is done; the rerun
    finishes the rest two at a time without rerunning that trial, and the finished sweep is checked
    whole: sweep.parquet against the run directories (with each trial's KL per latent group: the model
    is hierarchical, the grid its group sizes), one MLflow parent with a child per trial, the query,
    report and encode of the sweep, and a third run that runs nothing."""
    MlflowClient = pytest.importorskip("mlflow", reason="the sweep's MLflow runs need vaedist[mlflow]").MlflowClient
    from vaedist.report.sweep import write_sweep_report

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    tracking = (f"tracking.mlflow_uri={uri}", "tracking.experiment=sweeps")
    storage = tmp_path / "runs"
    # Three trials (the product of both keys' values): one for the killed driver, two for the rerun
    # to run at once; a fourth would only add another round of ~20 s.
    grid = ["train.lr=2e-3", "model.latent_groups=[2,6],[4,4],[6,2]"]
    names = ["t000-lr=0.002-latent_groups=_2_6_", "t001-lr=0.002-latent_groups=_4_4_",
             "t002-lr=0.002-latent_groups=_6_2_"]
    args = [sys.executable, "-m", "vaedist.cli", "sweep", "--config", str(REPO / "configs" / "debug.yaml"),
            *[f"--set={o}" for o in (f"data.shards_dir={small_shards}", "data.max_train_shards=0",
                                     "data.max_test_shards=0", f"output.storage_path={storage}",
                                     "output.run_name=sweep", "train.batch_size_per_worker=50",
                                     "output.checkpoints_to_keep=2", *TINY, *HIERARCHICAL, *tracking)],
            *[f"--grid={g}" for g in grid], "--name", "grid", "--max-concurrent", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    driver = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    first = storage / "grid" / names[0]
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            if (first / "trial.json").exists() and read_record(str(first)).get("status") == "finished":
                break
            time.sleep(0.5)
        assert driver.poll() is None, driver.stdout.read()[-3000:]
        assert read_record(str(first)).get("status") == "finished"
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        try:  # its embedded Ray goes with it (fate sharing); make sure of it
            time.sleep(2)
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finished_metrics = (first / "metrics.jsonl").read_bytes()
    unfinished = [n for n in names[1:] if read_record(str(storage / "grid" / n)).get("status") != "finished"]
    assert unfinished

    cfg = sweep_config(small_shards, storage, "grid", grid, "sweep.max_concurrent_trials=2", *HIERARCHICAL,
                       *tracking)
    result = run_sweep(cfg)
    assert names[0] in result.skipped and sorted(result.ran) == unfinished
    assert (first / "metrics.jsonl").read_bytes() == finished_metrics  # not trained again
    assert read_record(str(first))["attempts"] == 1
    table = pq.read_table(Path(result.dir) / "sweep.parquet")
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["finished"] * 3, rows
    assert [r["name"] for r in rows] == names
    assert [(r["train.lr"], r["model.latent_groups"]) for r in rows] == [(2e-3, "[2, 6]"), (2e-3, "[4, 4]"),
                                                                         (2e-3, "[6, 2]")]
    assert table.schema.field("model.latent_groups").type == "string"  # lists as JSON
    for row in rows:  # each row says what its run directory says
        metrics = read_metrics(row["run_dir"])
        epochs = [m for m in metrics if m["kind"] == "epoch"]
        assert [m["epoch"] for m in epochs] == [0, 1], (row["name"], epochs)  # no epoch trained twice
        assert row["epochs_run"] == len(epochs) == row["epochs"] == 2
        assert row["train_loss"] == pytest.approx(epochs[-1]["train_loss"])
        assert row["test_loss"] == pytest.approx(epochs[-1]["test_loss"])
        # Each group's test KL, z_1 first: two terms that sum to test_kl, as the run's last epoch has them.
        assert len(row["test_kl_groups"]) == 2 and all(kl >= 0 for kl in row["test_kl_groups"]), row
        assert row["test_kl_groups"] == pytest.approx(epochs[-1]["test_kl_groups"])
        assert sum(row["test_kl_groups"]) == pytest.approx(row["test_kl"], rel=1e-9)
        assert Path(row["best_checkpoint"], "checkpoint.pt").is_file()
        assert Path(row["run_dir"]).parent == Path(result.dir) and row["run_dir"].endswith(row["name"])
        assert row["wall_s"] > 0 and row["attempts"] >= 1
        # The trial's run is an ordinary run of its own config: its overrides in its checkpoint's config.
        saved = yaml.safe_load(Path(row["best_checkpoint"], "config.yaml").read_text())
        assert saved["train"]["lr"] == row["train.lr"]
        assert json.dumps(saved["model"]["latent_groups"]) == row["model.latent_groups"]
    # The rerun ran two at a time: some pair of its trials overlapped in time.
    spans = [(e["started"], e["started"] + e["wall_s"]) for e in (read_record(r["run_dir"]) for r in rows[1:])]
    overlaps = [sum(a[0] < b[1] and b[0] < a[1] for b in spans) - 1 for a in spans]
    assert max(overlaps) >= 1, spans

    # MLflow: the killed driver's parent run resumed, not doubled; a child per trial, none left running.
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sweeps")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("vaedist.sweep") == "grid"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["vaedist.run_name"] for r in children) == names
    assert all(r.info.status == "FINISHED" for r in children)
    assert parents[0].data.metrics["best_test_loss"] == pytest.approx(min(r["test_loss"] for r in rows))

    best = query_sweep(result.dir, "SELECT name FROM sweep WHERE status = 'finished' ORDER BY test_loss LIMIT 1")
    assert best.column("name").to_pylist() == [min(rows, key=lambda r: r["test_loss"])["name"]]
    page = Path(write_sweep_report(result.dir, str(tmp_path / "report")))
    assert "Best trials" in page.read_text() and (page.parent / "sweep-train_lr.png").stat().st_size > 0
    assert "test KL by group" in page.read_text()
    (row, encoded), = encode_best(cfg, result.dir, 1, out=str(tmp_path / "latents"))
    assert row["name"] == best.column("name")[0].as_py() and encoded.rows == {"test": 4000}
    latents = pq.read_table(encoded.path, columns=["kl", "kl_groups", "mu"]).to_pydict()  # the best trial's groups
    assert {len(g) for g in latents["kl_groups"]} == {2} and {len(m) for m in latents["mu"]} == {8}
    assert [sum(g) for g in latents["kl_groups"][:5]] == pytest.approx(latents["kl"][:5], rel=1e-12)

    # A rerun of a finished sweep runs nothing.
    again = run_sweep(cfg)
    assert again.ran == [] and sorted(again.skipped) == names
