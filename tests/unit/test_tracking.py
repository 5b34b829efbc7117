"""MLflow tracking against a real MLflow store (SQLite in tmp_path), read back with MlflowClient. No Ray:
the training sequence is driven the way rank 0 drives it (checkpoint, metrics.jsonl, then the tracker).
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from vaedist.checkpoint import checkpoint_dir_name, run_dir_of_checkpoint, save_checkpoint, write_metrics
from vaedist.config import Config, ConfigError, ModelConfig, load_config
from vaedist.model import VAE
from vaedist.tracking import (EPOCH_METRICS, RUN_RECORD_FILE, TrackingError, TrainTracker, check_uri,
                              flatten_config, log_encode, read_run_record, redact, resolve_uri)

from conftest import free_ports, moto_s3

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient

EXPERIMENT = "vaedist-test"


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes ~2 s); tests use their own run dirs."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")


@pytest.fixture(autouse=True)
def _one_attempt(monkeypatch):
    """No HTTP retries, so the unreachable-server tests take milliseconds (a user's setting wins over
    vaedist's bounded default, which is what this relies on)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tiny_config() -> Config:
    return Config(model=ModelConfig(latent_dim=2, hidden_dims=[8]))


def epoch_row(epoch: int, loss: float, evaluated: bool = True) -> dict:
    return {"kind": "epoch", "epoch": epoch, "step": 10 * (epoch + 1), "train_loss": loss + 1.0,
            "train_recon_nll": loss - 4.0, "train_kl": 5.0, "train_objective": loss + 1.0,
            "test_loss": loss if evaluated else None,
            "test_recon_nll": loss - 4.5 if evaluated else None, "test_kl": 4.5 if evaluated else None,
            "test_bpd": loss / 543.4 if evaluated else None,
            "test_count": 100 if evaluated else 0, "samples_per_s": 1000.0 + epoch, "epoch_seconds": 2.0,
            "world_size": 1, "restored_from_epoch": -1}


def train_epochs(tracker: TrainTracker, run_dir: Path, cfg: Config, history: list[dict], rows: list[dict]) -> None:
    """What rank 0 does each epoch: save the checkpoint, rewrite metrics.jsonl, then log the epoch."""
    model = VAE(cfg.model)
    for row in rows:
        save_checkpoint(str(run_dir / checkpoint_dir_name(row["epoch"])), model_state=model.state_dict(),
                        optimizer_state=None, epoch=row["epoch"], global_step=row["step"], config=cfg,
                        manifest_hash="f" * 64, history=history + [row])
        history.append(row)
        write_metrics(str(run_dir), history)
        tracker.log_epoch(row)


def the_run(uri: str, experiment: str = EXPERIMENT):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def points(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_a_crashed_and_resumed_run_is_one_mlflow_run_with_one_point_per_epoch(uri, tmp_path):
    cfg, run_dir = tiny_config(), tmp_path / "runs" / "resumed"
    first = TrainTracker(uri, EXPERIMENT, str(run_dir), "resumed", cfg.to_dict(), manifest_hash="f" * 64)
    assert first.active
    history: list[dict] = []
    train_epochs(first, run_dir, cfg, history, [epoch_row(0, 120.0), epoch_row(1, 110.0, evaluated=False),
                                                epoch_row(2, 100.0)])
    # The worker dies after epoch 2 was logged; Ray restores epoch 1's checkpoint, so epoch 2 runs again.
    history = history[:2]
    second = TrainTracker(uri, EXPERIMENT, str(run_dir), "resumed", cfg.to_dict(), manifest_hash="f" * 64,
                          history=history)
    assert second.run_id == first.run_id
    train_epochs(second, run_dir, cfg, history, [epoch_row(2, 101.0), epoch_row(3, 95.0), epoch_row(4, 97.0)])
    second.log_final({"kind": "final", "epoch": 4, "num_samples_iw": 100, "test_nll_iw": 92.5, "test_loss": 97.0})
    second.finish()

    client, run = the_run(uri)
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert run.info.run_name == "resumed"
    for key in ("train_loss", "train_recon_nll", "train_kl", "samples_per_s", "epoch_seconds"):
        assert [s for s, _ in points(client, run.info.run_id, key)] == [0, 1, 2, 3, 4], key
    # No test evaluation in epoch 1; epoch 2 keeps the value logged first.
    assert points(client, run.info.run_id, "test_loss") == [(0, 120.0), (2, 100.0), (3, 95.0), (4, 97.0)]
    assert points(client, run.info.run_id, "test_nll_iw") == [(4, 92.5)]

    params = run.data.params
    assert params == flatten_config(cfg.to_dict())
    assert params["train.lr"] == "0.001" and params["model.hidden_dims"] == "[8]"
    assert params["tracking.enabled"] == "None" and params["output.run_name"] == "vae-mnist"

    tags = run.data.tags
    assert tags["vaedist.run_name"] == "resumed" and tags["vaedist.manifest_hash"] == "f" * 64
    assert tags["vaedist.run_dir"] == str(run_dir)
    assert tags["vaedist.checkpoint.latest"] == str(run_dir / "epoch-0004")
    assert tags["vaedist.checkpoint.best"] == str(run_dir / "epoch-0003")  # lowest test loss, 95.0
    record = json.loads((run_dir / RUN_RECORD_FILE).read_text())
    assert record == {uri: {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                            "experiment": EXPERIMENT}}

    # A rerun of the finished run (e.g. with more epochs) reopens it, and finishes it again.
    third = TrainTracker(uri, EXPERIMENT, str(run_dir), "resumed", cfg.to_dict(), history=history)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    third.finish()
    client, run = the_run(uri)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 5


def test_a_rerun_with_changed_overrides_keeps_the_first_params_and_says_so(uri, tmp_path, caplog):
    experiment = "vaedist-params"
    run_dir = tmp_path / "run"
    before = load_config(None, ["train.epochs=3"]).to_dict()
    TrainTracker(uri, experiment, str(run_dir), "run", before).finish()
    after = load_config(None, ["train.epochs=6"]).to_dict()
    after["train"]["a_new_field"] = 7  # a newer vaedist's config: new keys are logged
    with caplog.at_level(logging.WARNING, logger="vaedist.tracking"):
        tracker = TrainTracker(uri, experiment, str(run_dir), "run", after)
    assert tracker.active, caplog.text
    assert "train.epochs 3 -> 6" in caplog.text
    _, run = the_run(uri, experiment)
    assert run.data.params["train.epochs"] == "3" and run.data.params["train.a_new_field"] == "7"
    assert json.loads(run.data.tags["vaedist.params_changed_on_resume"]) == {
        "train.epochs": {"logged": "3", "now": "6"}}


def test_a_run_tracked_late_backfills_its_history(uri, tmp_path):
    experiment, cfg, run_dir = "vaedist-backfill", tiny_config(), tmp_path / "late"
    history = [epoch_row(e, 100.0 - e) for e in range(4)]
    tracker = TrainTracker(uri, experiment, str(run_dir), "late", cfg.to_dict(), history=history)
    tracker.log_epoch(history[-1])  # already backfilled: no second point
    client, run = the_run(uri, experiment)
    for key in EPOCH_METRICS:
        assert [s for s, _ in points(client, run.info.run_id, key)] == [0, 1, 2, 3], key
    assert points(client, run.info.run_id, "test_loss") == [(e, 100.0 - e) for e in range(4)]


def test_a_store_that_fails_mid_run_warns_once_and_training_goes_on(tmp_path, caplog):
    uri = "sqlite:///" + str(tmp_path / "failing" / "mlflow.db")
    cfg, run_dir, history = tiny_config(), tmp_path / "run", []
    tracker = TrainTracker(uri, "vaedist", str(run_dir), "run", cfg.to_dict())
    train_epochs(tracker, run_dir, cfg, history, [epoch_row(0, 100.0)])
    (tmp_path / "failing" / "mlflow.db").write_bytes(b"not a database" * 1000)  # the store breaks
    with caplog.at_level(logging.WARNING, logger="vaedist.tracking"):
        train_epochs(tracker, run_dir, cfg, history, [epoch_row(1, 99.0), epoch_row(2, 98.0)])
        tracker.log_final({"kind": "final", "epoch": 2, "test_nll_iw": 90.0})
        tracker.finish()
    warnings = [r for r in caplog.records if r.name == "vaedist.tracking"]
    assert len(warnings) == 1 and "logging epoch 1" in warnings[0].getMessage()
    assert "training goes on without tracking" in warnings[0].getMessage()
    assert not tracker.active


def test_an_unreachable_server_does_not_stop_training(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vaedist.tracking"):
        tracker = TrainTracker(f"http://user:secret@127.0.0.1:{free_ports(1)[0]}", "vaedist", str(tmp_path), "run",
                               tiny_config().to_dict())
        tracker.log_epoch(epoch_row(0, 100.0))
        tracker.finish()
    assert not tracker.active
    assert len([r for r in caplog.records if r.name == "vaedist.tracking"]) == 1
    assert "secret" not in caplog.text  # MLflow's own message quotes the URL; the credentials are cut
    assert not (tmp_path / RUN_RECORD_FILE).exists()


def test_no_uri_means_no_tracking(tmp_path):
    tracker = TrainTracker(None, "vaedist", str(tmp_path), "run", tiny_config().to_dict())
    tracker.log_epoch(epoch_row(0, 1.0))
    tracker.finish()
    assert not tracker.active and list(tmp_path.iterdir()) == []
    assert log_encode(None, str(tmp_path)) is None


# ---------------------------------------------------------------------------------------------
# The encode job's table, into the training run's MLflow run.

def test_log_encode_adds_lineage_summary_and_report_to_the_training_run(uri, tmp_path, latent_tables):
    experiment, cfg, run_dir = "vaedist-encode", tiny_config(), tmp_path / "trained"
    tracker = TrainTracker(uri, experiment, str(run_dir), "trained", cfg.to_dict())
    train_epochs(tracker, run_dir, cfg, [], [epoch_row(0, 100.0)])
    tracker.finish()
    report = tmp_path / "report"
    report.mkdir()
    (report / "index.html").write_text("<html><img src='loss_by_digit.png'></html>")
    (report / "loss_by_digit.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))

    latents = latent_tables["latents"]
    run_id = log_encode(uri, latents, experiment=experiment, run_dir=str(run_dir), report_dir=str(report))
    assert run_id == tracker.run_id
    assert log_encode(uri, latents, experiment=experiment, run_dir=str(run_dir), report_dir=str(report)) == run_id

    client, run = the_run(uri, experiment)
    names = {a.path for a in client.list_artifacts(run_id, "encode")}
    assert {"encode/_lineage.json", "encode/loss_by_split.csv", "encode/loss_by_split.jsonl",
            "encode/loss_by_digit_test.csv", "encode/loss_by_digit_train.jsonl", "encode/report"} <= names
    assert {a.path for a in client.list_artifacts(run_id, "encode/report")} == {
        "encode/report/index.html", "encode/report/loss_by_digit.png"}
    local = Path(client.download_artifacts(run_id, "encode", str(tmp_path / "download")))
    assert json.loads((local / "_lineage.json").read_text()) == json.loads(Path(latents, "_lineage.json").read_text())
    assert (local / "report" / "loss_by_digit.png").read_bytes() == (report / "loss_by_digit.png").read_bytes()

    # The summary against the table read by pyarrow alone; logged twice, one point each.
    table = pq.ParquetDataset([str(p) for p in Path(latents).glob("[!_.]*.parquet")]).read().to_pandas()
    for split in ("train", "test"):
        rows = table[table["split"] == split]
        (step, loss), = points(client, run_id, f"encode_{split}_loss_mean")
        assert step == 0 and loss == pytest.approx(rows["loss"].mean(), rel=1e-9)
        (_, nll), = points(client, run_id, f"encode_{split}_nll_iw")
        assert nll == pytest.approx(-rows["log_px"].mean(), rel=1e-9)
    by_digit = [json.loads(line) for line in (local / "loss_by_digit_test.jsonl").read_text().splitlines()]
    test_rows = table[table["split"] == "test"]
    assert [r["label"] for r in by_digit] == sorted(test_rows["label"].unique().tolist())
    assert by_digit[3]["loss_mean"] == pytest.approx(test_rows[test_rows["label"] == 3]["loss"].mean(), rel=1e-6)
    assert run.data.tags["vaedist.encode.latents_dir"] == latents
    assert run.info.status == "FINISHED"  # the training run's status is left as it was


def test_log_encode_finds_the_run_from_the_tables_checkpoint(uri, tmp_path, latent_tables):
    """No run_dir given: the run directory of the checkpoint in _lineage.json (…/run/epoch-NNNN)."""
    experiment, cfg, run_dir = "vaedist-encode-lineage", tiny_config(), tmp_path / "runs" / "r"
    tracker = TrainTracker(uri, experiment, str(run_dir), "r", cfg.to_dict())
    tracker.finish()
    latents = tmp_path / "latents"
    latents.mkdir()
    source = Path(latent_tables["latents_k0"])
    for f in source.glob("[!_.]*.parquet"):
        (latents / f.name).write_bytes(f.read_bytes())
    lineage = json.loads((source / "_lineage.json").read_text())
    lineage.update(checkpoint=str(run_dir / "epoch-0003" / "checkpoint.pt"), checkpoint_epoch=3)
    (latents / "_lineage.json").write_text(json.dumps(lineage))
    (latents / "_SUCCESS").write_text("")

    assert log_encode(uri, str(latents), experiment=experiment) == tracker.run_id
    client, run = the_run(uri, experiment)
    assert [s for s, _ in points(client, run.info.run_id, "encode_test_loss_mean")] == [3]
    assert "encode_test_nll_iw" not in run.data.metrics  # K = 0: no log_px
    assert run.data.tags["vaedist.encode.checkpoint"] == lineage["checkpoint"]


def test_log_encode_of_a_checkpoint_outside_any_run_gets_a_finished_run_of_its_own(uri, latent_tables):
    experiment, latents = "vaedist-encode-standalone", latent_tables["latents"]  # checkpoint: <root>/checkpoint
    run_id = log_encode(uri, latents, experiment=experiment)
    _, run = the_run(uri, experiment)
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.info.run_name == "latents"
    assert "encode_test_loss_mean" in run.data.metrics
    assert not Path(latents, RUN_RECORD_FILE).exists()


def test_run_dir_of_checkpoint():
    assert run_dir_of_checkpoint("/a/runs/r/epoch-0003/checkpoint.pt") == "/a/runs/r"
    assert run_dir_of_checkpoint("s3://b/runs/r/epoch-0012") == "s3://b/runs/r"
    assert run_dir_of_checkpoint("/a/runs/r/kept/epoch-0002/checkpoint.pt") == "/a/runs/r"
    assert run_dir_of_checkpoint("/a/copied-checkpoint/checkpoint.pt") is None


def test_the_run_record_lives_in_an_s3_run_directory(uri, s3_run_dir):
    experiment, cfg = "vaedist-s3", tiny_config()
    first = TrainTracker(uri, experiment, s3_run_dir, "on-s3", cfg.to_dict())
    first.log_epoch(epoch_row(0, 100.0))
    second = TrainTracker(uri, experiment, s3_run_dir, "on-s3", cfg.to_dict(), history=[epoch_row(0, 100.0)])
    assert first.active and second.run_id == first.run_id
    assert read_run_record(s3_run_dir)[uri]["run_id"] == first.run_id
    the_run(uri, experiment)


# ---------------------------------------------------------------------------------------------
# Which store, and the driver's preflight.

def test_resolve_uri_precedence(tmp_path, monkeypatch):
    runs = str(tmp_path / "runs")
    assert resolve_uri(load_config(None, [f"output.storage_path={runs}"])) is None
    assert resolve_uri(load_config(None, [f"output.storage_path={runs}", "tracking.enabled=true"])) == \
        f"sqlite:///{runs}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert resolve_uri(load_config(None)) == "http://tracking:5000"
    assert resolve_uri(load_config(None, ["tracking.enabled=true"])) == "http://tracking:5000"
    assert resolve_uri(load_config(None, ["tracking.enabled=false"])) is None
    assert resolve_uri(load_config(None, ["tracking.mlflow_uri=http://other:5000"])) == "http://other:5000"
    monkeypatch.chdir(tmp_path)
    assert resolve_uri(load_config(None, ["tracking.mlflow_uri=sqlite:///out/m.db"])) == \
        f"sqlite:///{tmp_path}/out/m.db"  # relative to the driver's directory, made absolute


def test_the_default_store_needs_a_local_storage_path():
    with pytest.raises(ConfigError, match="tracking.enabled: .*local output.storage_path, got 's3://b/runs'"):
        resolve_uri(load_config(None, ["tracking.enabled=true", "output.storage_path=s3://b/runs"]))


@pytest.mark.parametrize("override, problem", [
    ("tracking.mlflow_uri=./mlruns", "tracking.mlflow_uri: must be a tracking URI such as"),
    ("tracking.enabled=sometimes", "tracking.enabled: must be bool or null, got 'sometimes'"),
    ("tracking.experiment=''", "tracking.experiment: must not be empty"),
])
def test_bad_tracking_config_names_the_key(override, problem):
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(")):
        load_config(None, [override])


@pytest.fixture
def not_mlflow():
    """An HTTP server that answers every request with 404, as a wrong host or path would."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/no-mlflow-here"
    server.shutdown()
    server.server_close()


def test_check_uri_refuses_bad_stores_naming_them(tmp_path, not_mlflow):
    port = free_ports(1)[0]
    with pytest.raises(TrackingError, match=rf"store http://127.0.0.1:{port} cannot be used: .*Connection refused"):
        check_uri(f"http://me:pw@127.0.0.1:{port}")
    with pytest.raises(TrackingError, match=f"store {not_mlflow} cannot be used"):
        check_uri(not_mlflow)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(TrackingError, match="cannot be used"):
        check_uri(f"sqlite:///{blocker}/mlflow.db")  # its directory cannot be created


def test_check_uri_accepts_a_good_store_and_refuses_a_deleted_experiment(uri):
    check_uri(uri, "vaedist-preflight")
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("vaedist-deleted"))
    with pytest.raises(TrackingError, match="experiment 'vaedist-deleted' .* is deleted; restore it"):
        check_uri(uri, "vaedist-deleted")


def test_redact_drops_credentials():
    assert redact("https://alice:s3cret@mlflow.example.com:8443/prefix?token=x") == \
        "https://mlflow.example.com:8443/prefix"
    assert redact("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"
    assert redact("databricks") == "databricks"


# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_run_dir():
    """A run directory on moto's S3 server (127.0.0.1), the AWS variables pointing at it meanwhile."""
    with moto_s3("vaedist-tracking"):
        yield "s3://vaedist-tracking/runs/on-s3"


def test_a_tracker_without_a_uri_does_nothing_and_says_nothing(tmp_path, caplog):
    tracker = TrainTracker(None, EXPERIMENT, str(tmp_path), "off", tiny_config().to_dict())
    with caplog.at_level(logging.DEBUG, logger="vaedist.tracking"):
        tracker.log_epoch(epoch_row(0, 100.0))
        tracker.log_final({"kind": "final", "epoch": 0, "test_nll_iw": 90.0, "num_samples_iw": 8})
        tracker.finish()
    assert not tracker.active and caplog.records == []
    assert not (tmp_path / RUN_RECORD_FILE).exists()
