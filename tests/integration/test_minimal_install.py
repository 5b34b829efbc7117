"""The main commands in an environment with vaedist's required dependencies only (`pip install vaedist`,
no `[mlflow]`, no `[test]`): what a user who skips the extras gets. `make test` installs every extra, so
without this tier a command that imports an optional package where it need not would pass here and
fail there. tests/offline_env.py builds the environment: a venv of links to this interpreter's
required packages and pytest, vaedist from PYTHONPATH.

One pipeline, its commands chained in subprocesses as a user types them (each with its embedded Ray):
data prepare -> train -> encode -> query -> report -> sweep (twice: as is, and rerun with tracking off)
-> run; and tracking asked for without mlflow, refused before any work."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

import offline_env  # tests/, on sys.path beside conftest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "debug.yaml")
# Import names of what only the extras install (their distributions are checked against pyproject below).
EXTRAS_MODULES = {"mlflow": "mlflow", "boto3": "boto3", "moto": "moto", "playwright": "playwright",
                  "webdataset": "webdataset"}
# Ray's C++ log lines look like "[2026-11-24 16:55:29,429 E 3773 3773] core_worker.cc:2465: ...".
CPP_ERROR = re.compile(r"^\[\S+ \S+ E \d+ \d+\]", re.M)
NO_MLFLOW = "mlflow is not installed: pip install 'vaedist[mlflow]', or set tracking.enabled=false"


@pytest.fixture(scope="module")
def minimal(tmp_path_factory) -> dict:
    """The environment's python and the variables every command runs with."""
    python = offline_env.build_minimal(tmp_path_factory.mktemp("minimal"))
    # Ours and pytest's own variables out; the session mark and Ray Train's short poll interval stay.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "RAY_ADDRESS", "MLFLOW_TRACKING_URI")
           and not (k.startswith("VAEDIST_") and k != "VAEDIST_TEST_SESSION")}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return {"python": str(python), "env": env}


def vaedist(minimal, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`vaedist ARGS` with the environment's interpreter, stdout and stderr together."""
    return subprocess.run([minimal["python"], "-m", "vaedist.cli", *args], cwd=cwd, env=minimal["env"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


@pytest.fixture(scope="module")
def pipeline(minimal, mnist_dir, tmp_path_factory) -> dict:
    """{step: CompletedProcess} of the chained commands, and the paths they wrote; each step's
    seconds in "seconds". A step runs only when the one before it succeeded (the test of that
    step says why the chain stopped)."""
    out = tmp_path_factory.mktemp("pipeline")
    paths = {"shards": out / "shards", "runs": out / "runs", "latents": out / "latents", "report": out / "report",
             "run_latents": out / "run-latents", "run_report": out / "run-report"}
    common = ["--config", CONFIG, "--mnist-dir", mnist_dir,
              *[f"--set={o}" for o in (
                  f"data.shards_dir={paths['shards']}", "data.max_train_shards=1", "data.max_test_shards=1",
                  f"output.storage_path={paths['runs']}", "output.run_name=minimal", "train.epochs=1",
                  "train.num_samples_iw_final=0", "encode.splits=[test]", "encode.num_samples_mc=1",
                  "encode.num_samples_iw=0")]]
    sweep = ["sweep", *common, "--grid", "model.latent_dim=4,8", "--name", "grid", "--max-concurrent", "2"]
    steps = {
        "prepare": ["data", "prepare", *common],
        "train": ["train", *common],
        "encode": ["encode", *common, "--out", str(paths["latents"])],
        "query": ["query", *common, "loss-by-digit", "--split", "test", "--latents", str(paths["latents"])],
        "report": ["report", *common, "--latents", str(paths["latents"]), "--out", str(paths["report"])],
        # The sweep as the README shows it (tracking left to its default: on only where a store is named).
        "sweep": sweep,
        # Its rerun, with the advice the missing-mlflow error gives: nothing left to run, the summary only.
        "sweep_tracking_off": [*sweep, "--set", "tracking.enabled=false"],
        "sweep_query": ["query", *common, "--sweep", "grid", "SELECT name, status FROM sweep ORDER BY name"],
        "run": ["run", *common, "--set", "output.run_name=minimal-run",
                "--set", f"output.latents_dir={paths['run_latents']}",
                "--set", f"output.report_dir={paths['run_report']}"],
    }
    done: dict = {"paths": paths, "seconds": {}}
    for step, args in steps.items():
        start = time.monotonic()
        done[step] = vaedist(minimal, out, *args)
        done["seconds"][step] = round(time.monotonic() - start, 1)
        if done[step].returncode != 0:
            break
    # Tracking asked for where mlflow is missing: the clear error, before any training.
    for command in ("train", "sweep", "run"):
        args = steps[command] + ["--set", "tracking.enabled=true", "--set", "output.run_name=tracked"]
        if command == "sweep":
            args += ["--name", "tracked"]
        start = time.monotonic()
        done[f"{command}_tracked"] = vaedist(minimal, out, *args)
        done["seconds"][f"{command}_tracked"] = round(time.monotonic() - start, 1)
    print("seconds per step:", done["seconds"])
    return done


def succeeded(pipeline, step: str) -> str:
    """The step's output, after asserting it ran, exited 0 and printed no traceback or error line."""
    ran = [s for s in pipeline if isinstance(pipeline[s], subprocess.CompletedProcess)]
    assert step in pipeline, f"the chain stopped before {step}: {ran[-1]} failed:\n{pipeline[ran[-1]].stdout[-4000:]}"
    proc = pipeline[step]
    assert proc.returncode == 0, f"vaedist {' '.join(proc.args[3:])}\n{proc.stdout[-4000:]}"
    for noise in ("Traceback", "ERROR"):
        assert noise not in proc.stdout, f"{noise!r} in the output of {step}:\n{proc.stdout[-4000:]}"
    assert not CPP_ERROR.search(proc.stdout), proc.stdout[-4000:]
    return proc.stdout


def test_the_environment_has_the_required_packages_and_none_that_only_extras_bring(minimal):
    only_extras = set(offline_env.extras_only())
    assert {"mlflow", "boto3", "moto", "playwright", "webdataset"} <= only_extras, only_extras
    code = ("import importlib.util as u, json, sys, vaedist; print(json.dumps({'vaedist': vaedist.__file__, "
            f"'found': [m for m in {sorted(EXTRAS_MODULES.values())!r} if u.find_spec(m)], "
            "'required': [m for m in ('torch', 'torchvision', 'ray', 'pyarrow', 'duckdb', 'yaml', 'pytest') "
            "if u.find_spec(m)]}))")
    proc = subprocess.run([minimal["python"], "-c", code], env=minimal["env"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["found"] == [] and len(found["required"]) == 7, found
    assert found["vaedist"] == str(REPO / "vaedist" / "__init__.py")  # this checkout, not an installed copy
    proc = subprocess.run([minimal["python"], "-c", "import mlflow"], env=minimal["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "No module named 'mlflow'" in proc.stderr, proc.stderr[-3000:]


def test_prepare_train_encode_query_report(pipeline):
    assert "test: 10000 datapoints in 4 shards" in succeeded(pipeline, "prepare")
    assert "epoch   0" in succeeded(pipeline, "train")
    succeeded(pipeline, "encode")
    assert (pipeline["paths"]["latents"] / "_lineage.json").is_file()
    assert "(10 rows)" in succeeded(pipeline, "query")
    succeeded(pipeline, "report")
    assert (pipeline["paths"]["report"] / "index.html").is_file()


def test_a_sweep_with_tracking_by_default_or_off_needs_no_mlflow(pipeline):
    first = succeeded(pipeline, "sweep")
    assert "2 finished" in first, first[-3000:]
    rerun = succeeded(pipeline, "sweep_tracking_off")
    assert "2 done already, 0 to run" in rerun, rerun[-3000:]
    rows = succeeded(pipeline, "sweep_query")
    assert rows.count("finished") == 2, rows


def test_run_end_to_end(pipeline):
    output = succeeded(pipeline, "run")
    assert "[5/5] report:" in output and "(10 rows)" in output
    assert (pipeline["paths"]["run_report"] / "index.html").is_file()


@pytest.mark.parametrize("command", ["train", "sweep", "run"])
def test_tracking_asked_for_without_mlflow_is_refused_before_any_work(pipeline, command):
    proc = pipeline[f"{command}_tracked"]
    assert proc.returncode == 1 and NO_MLFLOW in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and "epoch" not in proc.stdout and "[1/5]" not in proc.stdout, proc.stdout
    runs = pipeline["paths"]["runs"]
    assert not (runs / "tracked").exists(), sorted(p.name for p in runs.iterdir())
