"""A run resumed from what storage holds (twice, on two workers), tracked in MLflow; a file of its own
so that the test runner can run it beside test_train.py's other runs."""

from __future__ import annotations

import importlib.util

import pytest

from vaedist.checkpoint import CheckpointError, load_model, read_metrics
from vaedist.train import train

from conftest import debug_config

pytestmark = pytest.mark.integration


def test_rerun_resumes_from_what_storage_holds_and_refuses_another_model_shape(ray_cluster, small_shards, tmp_path,
                                                                              monkeypatch):
    # One run, resumed twice, on two workers (rank 0 chooses the checkpoint; both must load it),
    # tracked in a real SQLite MLflow store where the mlflow extra is installed.
    # 1. Epoch 0 is checkpointed without a test evaluation (eval_every_epochs=3), so the rerun restores
    # Ray's checkpoint-manager snapshot with an unevaluated checkpoint in it: it used to hold a null
    # score there, and the rerun failed in Ray's checkpoint manager.
    mlflow = importlib.util.find_spec("mlflow") is not None
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    two = ("scaling.num_workers=2", "train.eval_every_epochs=3",
           *((f"tracking.mlflow_uri={uri}", "tracking.experiment=it") if mlflow else ()))
    first = train(debug_config(small_shards, tmp_path, "rerun", "train.epochs=2", *two))
    assert [(r["epoch"], r["test_loss"] is None) for r in first.epochs] == [(0, True), (1, False)]
    again = train(debug_config(small_shards, tmp_path, "rerun", "train.epochs=3", *two))
    assert [(r["epoch"], r["restored_from_epoch"]) for r in again.epochs] == [(0, -1), (1, -1), (2, 1)]
    assert again.epochs[:2] == first.epochs  # epochs 0 and 1 not retrained
    # 2. Ray Train records a checkpoint only when its controller next polls; a node lost in between
    # leaves the newest checkpoints in storage but not in Ray's records. Simulated whole: Ray's
    # records are removed, and the newest file is torn as by a failure during its upload.
    run_dir = tmp_path / "rerun"
    (run_dir / "checkpoint_manager_snapshot.json").unlink()
    torn = run_dir / "epoch-0002" / "checkpoint.pt"
    torn.write_bytes(torn.read_bytes()[:1000])
    cfg = debug_config(small_shards, tmp_path, "rerun", "train.epochs=4", "train.num_samples_iw_final=8", *two)
    third = train(cfg)
    # Resumed from epoch 1, the newest readable one: epochs 0-1 not retrained, 2 (torn) retrained.
    assert [(r["epoch"], r["restored_from_epoch"]) for r in third.epochs] == [(0, -1), (1, -1), (2, 1), (3, 1)]
    assert third.epochs[:2] == first.epochs
    assert all(len(set(r["rank_param_sums"])) == 1 for r in third.epochs[2:])
    assert load_model(str(run_dir / "epoch-0002"))[2].epoch == 2  # rewritten whole
    # 3. Another model shape under the same run name is refused before training.
    with pytest.raises(CheckpointError, match=r"different model shape: model.latent_dim: checkpoint 8 vs config 5"):
        train(debug_config(small_shards, tmp_path, "rerun", "train.epochs=5", "model.latent_dim=5", *two))
    assert [r["epoch"] for r in read_metrics(third.run_dir) if r["kind"] == "epoch"] == [0, 1, 2, 3]
    # 4. The finished run once more: nothing to train, and no Ray Train run starts (one would rewrite
    # Ray's records, the metrics and the tracking run's files at least).
    written = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    said = []
    same = train(cfg, echo=said.append)
    assert said == [f"run {run_dir} is finished (train.epochs = 4): nothing to train; more train.epochs resume "
                    "it, a new output.run_name starts another run"]
    assert same == third and {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == written
    if mlflow:
        check_one_mlflow_run_for_the_resumed_run(uri, small_shards, tmp_path, cfg, first, third, two)


def check_one_mlflow_run_for_the_resumed_run(uri, small_shards, tmp_path, cfg, first, third, two) -> None:
    """The run resumed twice is one MLflow run, with one point per epoch, and the encode job joins it."""
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
    # resumed runs' epoch count and final evaluation are the differences).
    expected = flatten_config(debug_config(small_shards, tmp_path, "rerun", "train.epochs=2", *two).to_dict())
    changed = ("train.epochs", "train.num_samples_iw_final")
    assert {k: v for k, v in run.data.params.items() if k not in changed} == \
        {k: v for k, v in expected.items() if k not in changed}
    for metric in ("train_loss", "samples_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == [0, 1, 2, 3], (metric, steps)  # one point per epoch, none twice
    evaluated = [r["epoch"] for r in third.epochs if r["test_loss"] is not None]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test_loss")) == evaluated
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert losses == pytest.approx({r["epoch"]: r["train_loss"] for r in third.epochs})
    nll = client.get_metric_history(run.info.run_id, "test_nll_iw")
    assert len(nll) == 1 and nll[0].value == pytest.approx(third.final["test_nll_iw"])
    enc = encode(config_from_dict(cfg.to_dict(), ["encode.num_samples_iw=0", "encode.num_samples_mc=1",
                                                  "encode.splits=[test]", "encode.concurrency=1"]),
                 out=str(tmp_path / "latents"))
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "encode")]
    assert "encode/_lineage.json" in artifacts, artifacts
    assert len(client.search_runs([experiment.experiment_id])) == 1  # encode joined the training run
    assert enc.rows == {"test": 4000}
