"""Tracking where mlflow is not installed (`pip install vaedist` without `[mlflow]`): off or left to its
default, nothing imports it; asked for, the driver's preflight says how to install it or turn it off.
mlflow is hidden from this process's imports here; tests/integration/test_minimal_install.py runs
the commands where it is really absent."""

from __future__ import annotations

import sys

import pytest

from vaedist.config import load_config
from vaedist.tracking import SweepTracker, TrackingError, TrainTracker, check_uri, log_encode, resolve_uri


@pytest.fixture
def no_mlflow(monkeypatch):
    """`import mlflow` (and of any submodule) raises ModuleNotFoundError, as where it is not installed."""
    for name in [n for n in sys.modules if n == "mlflow" or n.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ModuleNotFoundError):
        import mlflow.entities  # noqa: F401


@pytest.mark.parametrize("overrides", [[], ["tracking.enabled=false"]], ids=["default", "off"])
def test_a_sweep_and_its_trials_without_a_store_never_import_mlflow(no_mlflow, overrides, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, [f"output.storage_path={tmp_path}", *overrides])
    uri = resolve_uri(cfg)
    assert uri is None
    sweep = SweepTracker(uri, "vaedist", str(tmp_path / "sweep"), "sweep", {"grid": {"model.latent_dim": [4, 8]}})
    assert sweep.child_tags is None
    sweep.end_child(str(tmp_path / "sweep" / "t000"), "KILLED")
    sweep.finish({"best_test_loss": 97.1, "trials_finished": 2.0}, status="FINISHED")
    trial = TrainTracker(uri, "vaedist", str(tmp_path / "run"), "run", cfg.to_dict(), tags=sweep.child_tags)
    trial.log_epoch({"kind": "epoch", "epoch": 0, "train_loss": 1.0})
    trial.log_final({"kind": "final", "epoch": 0, "test_nll_iw": 90.0})
    trial.finish()
    assert log_encode(uri, str(tmp_path / "latents")) is None
    assert "mlflow" not in [n.partition(".")[0] for n, m in sys.modules.items() if m is not None]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, env", [
    (["tracking.enabled=true"], None),
    (["tracking.mlflow_uri=http://tracking:5000"], None),
    ([], "http://tracking:5000"),
], ids=["enabled", "uri", "env"])
def test_tracking_asked_for_without_mlflow_is_a_preflight_error_that_says_what_to_do(no_mlflow, overrides, env,
                                                                                   tmp_path, monkeypatch):
    if env:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    else:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_uri(load_config(None, [f"output.storage_path={tmp_path}", *overrides]))
    with pytest.raises(TrackingError, match=r"mlflow is not installed: pip install 'vaedist\[mlflow\]', or set "
                                            r"tracking.enabled=false"):
        check_uri(uri)
