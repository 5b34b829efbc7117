"""A run resumed from what storage holds (on two workers), tracked in MLflow; a file of its own
so that the test runner can run it beside test_train.py's other runs."""

from __future__ import annotations

import importlib.util

import pytest

from vaedist.checkpoint import CheckpointError, checkpoint_dirs, load_model, read_metrics
from vaedist.train import train

from conftest import debug_config

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 35  # about how long this file takes in `make test` (conftest: longest first)


def test_rerun_resumes_from_what_storage_holds_and_refuses_another_model_shape(ray_cluster, small_shards, tmp_path,
                                                                              monkeypatch):
    # One run, resumed on two workers (rank 0 chooses the checkpoint; both must load it), tracked in a
    # real SQLite MLflow store where the mlflow extra is installed. (A rerun that restores Ray's
    # checkpoint-manager snapshot with an unevaluated checkpoint in it: test_s3.py.)
    mlflow = importlib.util.find_spec("mlflow") is not None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    two = ("scaling.num_workers=2", "train.eval_every_epochs=3",
           *((f"tracking.mlflow_uri={uri}", "tracking.experiment=it") if mlflow else ()))
    first = train(debug_config(small_shards, tmp_path, "rerun", "train.epochs=2", *two))
    assert [(r["epoch"], r["test_loss"] is None) for r in first.epochs] == [(0, True), (1, False)]
    # 1. Ray Train records a checkpoint only when its controller next polls; a node lost in between
    # leaves the newest checkpoints in storage but not in Ray's records. Simulated whole: Ray's
    # records are removed, and the newest file is torn as by a failure during its upload.
    run_dir = tmp_path / "rerun"
    (run_dir / "checkpoint_manager_snapshot.json").unlink()
    torn = run_dir / "epoch-0001" / "checkpoint.pt"
    torn.write_bytes(torn.read_bytes()[:1000])
    cfg = debug_config(small_shards, tmp_path, "rerun", "train.epochs=4", "train.num_samples_iw_final=8", *two)
    resumed = train(cfg)
    # Resumed from epoch 0, the newest readable one: epoch 0 not retrained, 1 (torn) retrained.
    assert [(r["epoch"], r["restored_from_epoch"]) for r in resumed.epochs] == [(0, -1), (1, 0), (2, 0), (3, 0)]
    assert resumed.epochs[:1] == first.epochs[:1]
    assert all(len(set(r["rank_param_sums"])) == 1 for r in resumed.epochs[1:])
    # Every checkpoint left loads: epoch 0's (outside Ray's records, which were removed) and what Ray
    # kept of the resumed run (the best evaluated, epoch 2, and the latest). Epoch 1's rewritten
    # checkpoint, unevaluated and so ranked last, went to Ray's retention, the torn file with it.
    assert [(e, load_model(d)[2].epoch) for e, d in checkpoint_dirs(str(run_dir))] == [(0, 0), (2, 2), (3, 3)]
    # 2. Another model shape under the same run name is refused before training.
    with pytest.raises(CheckpointError, match=r"different model shape: model.latent_dim: checkpoint 8 vs config 5"):
        train(debug_config(small_shards, tmp_path, "rerun", "train.epochs=5", "model.latent_dim=5", *two))
    assert [r["epoch"] for r in read_metrics(resumed.run_dir) if r["kind"] == "epoch"] == [0, 1, 2, 3]
    # 3. The finished run once more: nothing to train, and no Ray Train run starts (one would rewrite
    # Ray's records, the metrics and the tracking run's files at least).
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    said = []
    same = train(cfg, echo=said.append)
    assert said == [f"run {run_dir} is finished (train.epochs = 4): nothing to train; more train.epochs resume "
                    "it, a new output.run_name starts another run"]
    assert same == resumed and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written
    if mlflow:
        check_one_mlflow_run_for_the_resumed_run(uri, small_shards, tmp_path, cfg, first, resumed, two)


def check_one_mlflow_run_for_the_resumed_run(uri, small_shards, tmp_path, cfg, first, resumed, two) -> None:
    """The resumed run is one MLflow run, with one point per epoch, and the encode job joins it."""
    from mlflow import MlflowClient

    from vaedist.config import config_from_dict
    from vaedist.encode import encode
    from vaedist.tracking import flatten_config, read_run_record

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("it")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert read_run_record(first.run_dir)[uri]["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.data.tags["vaedist.run_name"] == "rerun"
    # Params are the resolved config the run started with (MLflow params cannot change; the
    # resumed run's epoch count and final evaluation are the differences).
    expected = flatten_config(debug_config(small_shards, tmp_path, "rerun", "train.epochs=2", *two).to_dict())
    changed = ("train.epochs", "train.num_samples_iw_final")
    assert {k: v for k, v in run.data.params.items() if k not in changed} == \
        {k: v for k, v in expected.items() if k not in changed}
    for metric in ("train_loss", "samples_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == [0, 1, 2, 3], (metric, steps)  # one point per epoch, none twice
    # An epoch trained again (epoch 1, its checkpoint torn) keeps the point its first attempt logged:
    # MLflow's history cannot be rewritten, so a step already in the run is skipped.
    logged = {r["epoch"]: r for r in resumed.epochs} | {r["epoch"]: r for r in first.epochs}
    evaluated = sorted(e for e, r in logged.items() if r["test_loss"] is not None)
    assert evaluated == [1, 2, 3]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_loss")) == evaluated
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert losses == pytest.approx({e: r["train_loss"] for e, r in logged.items()})
    nll = client.get_metric_history(run.info.run_id, "test_nll_iw")
    assert len(nll) == 1 and nll[0].value == pytest.approx(resumed.final["test_nll_iw"])
    enc = encode(config_from_dict(cfg.to_dict(), ["encode.num_samples_iw=0", "encode.num_samples_mc=1",
                                                  "encode.splits=[test]", "encode.concurrency=1"]),
                 out=str(tmp_path / "latents"))
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "encode")]
    assert "encode/_lineage.json" in artifacts, artifacts
    assert len(client.search_runs([experiment.experiment_id])) == 1  # encode joined the training run
    assert enc.rows == {"test": 4000}
