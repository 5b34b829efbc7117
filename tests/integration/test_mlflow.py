"""MLflow tracking through real Ray Train and the real encode job, into a real SQLite MLflow store."""

from __future__ import annotations

import pytest

from vaedist.config import config_from_dict
from vaedist.tracking import flatten_config, read_run_record

from conftest import debug_config

pytestmark = pytest.mark.integration
mlflow = pytest.importorskip("mlflow")


def test_training_and_encode_record_one_mlflow_run_resumed_without_duplicates(ray_cluster, small_shards, tmp_path,
                                                                              monkeypatch):
    from mlflow import MlflowClient

    from vaedist.encode import encode
    from vaedist.train import train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    common = ("train.max_steps_per_epoch=10", f"tracking.mlflow_uri={uri}", "tracking.experiment=it")
    first = train(debug_config(small_shards, tmp_path, "tracked", "train.epochs=1", *common))
    # A rerun of the same run name resumes it, and must continue the same MLflow run.
    cfg = debug_config(small_shards, tmp_path, "tracked", "train.epochs=3", "train.num_samples_iw_final=8", *common)
    again = train(cfg)
    assert [r["restored_from_epoch"] for r in again.epochs] == [-1, 0, 0]

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("it")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert read_run_record(first.run_dir)[uri]["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED"
    # Params are the resolved config the run started with (MLflow params cannot change; the
    # resumed run's new epoch count is the one difference).
    expected = flatten_config(debug_config(small_shards, tmp_path, "tracked", "train.epochs=1", *common).to_dict())
    assert {k: v for k, v in run.data.params.items() if k != "train.epochs"} == \
        {k: v for k, v in expected.items() if k != "train.epochs"}
    for metric in ("train_loss", "test_loss", "samples_per_s"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert sorted(steps) == [0, 1, 2], (metric, steps)  # one point per epoch, none twice
    losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert losses == pytest.approx({r["epoch"]: r["train_loss"] for r in again.epochs})
    nll = client.get_metric_history(run.info.run_id, "test_nll_iw")
    assert len(nll) == 1 and nll[0].value == pytest.approx(again.final["test_nll_iw"])
    assert run.data.tags["vaedist.run_name"] == "tracked"

    enc = encode(config_from_dict(cfg.to_dict(), ["encode.num_samples_iw=0", "encode.num_samples_mc=1"]),
                 out=str(tmp_path / "latents"))
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "encode")]
    assert "encode/_lineage.json" in artifacts, artifacts
    assert len(client.search_runs([experiment.experiment_id])) == 1  # encode joined the training run
    assert enc.rows == {"train": 4000, "test": 4000}
