"""`vaedist bench gpu` run as the borrowed GPU machine runs it (issue 19; README, "Proving the GPU paths on a
machine without a package index"): an interpreter with only that machine's packages (no DuckDB, no MLflow,
no Ray dashboard extras), Ray from ../shared/offline-wheels/build.sh's wheelhouse installed with
`pip install --no-index --no-deps --target`, vaedist on PYTHONPATH, not installed. Without CUDA here the
command runs its CPU mode, at tiny sizes, to the end. tests/offline_env.py builds the environment and
says why it links the test interpreter's packages rather than installing torch afresh.

The wheelhouse (49 MB from PyPI) is kept in outputs/offline-wheels-py3.X, ignored by git and outside
`.whl/`, which holds the GPU machine's own Python 3.12 wheelhouse and travels with the code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import offline_env  # tests/, on sys.path beside conftest

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 75  # about how long this file takes in `make test` (conftest: longest first)

REPO = Path(__file__).resolve().parents[2]
WHEELHOUSE = REPO / "outputs" / f"offline-wheels-py{sys.version_info.major}.{sys.version_info.minor}"
PARTS = {"shards", "facts", "gpu_tests", "train", "batch_sweep", "quality", "encode", "cpu_scaling"}


@pytest.fixture(scope="module")
def gpu_like(tmp_path_factory) -> dict:
    """The interpreter and the environment variables of the GPU machine's one command."""
    if not offline_env.WHEELHOUSE_SCRIPT.exists():
        pytest.skip(f"{offline_env.WHEELHOUSE_SCRIPT} is not beside the checkout")
    paths = offline_env.build(tmp_path_factory.mktemp("gpu-like"), offline_env.build_wheelhouse(WHEELHOUSE))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "RAY_ADDRESS")
           and not k.startswith("VAEDIST_")}
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{paths['site']}", PYTHONUNBUFFERED="1")
    return {"python": str(paths["python"]), "site": str(paths["site"]), "env": env}


def test_the_environment_lacks_what_the_gpu_machine_lacks(gpu_like):
    code = ("import importlib.util as u, json, ray; print(json.dumps({'ray': ray.__file__, 'found': [m for m in "
            "('duckdb', 'mlflow', 'aiohttp', 'aiohttp_cors', 'opencensus') if u.find_spec(m)]}))")
    proc = subprocess.run([gpu_like["python"], "-c", code], env=gpu_like["env"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["found"] == [] and found["ray"].startswith(gpu_like["site"]), found


def test_bench_gpu_runs_to_the_end_there(gpu_like, mnist_dir, tmp_path):
    out = tmp_path / "gpu"
    # The command of the README's section, from outside the checkout (nothing may depend on the cwd).
    proc = subprocess.run([gpu_like["python"], "-m", "vaedist.cli", "bench", "gpu", "--out", str(out),
                           "--budget-s", "900"], cwd=tmp_path, env={**gpu_like["env"], "VAEDIST_MNIST_DIR": mnist_dir},
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["mode"] == "cpu" and set(doc["parts"]) == PARTS
    for name, part in doc["parts"].items():
        assert part["status"] in ("ok", "partial"), (name, part)
    assert doc["optional_modules_imported"] == []
    assert doc["facts"]["ray"] and doc["facts"]["cpu_count"] >= 1
    tests = doc["parts"]["gpu_tests"]
    assert tests["exit_code"] == 0 and tests["skipped"] > 0 and tests["failed"] == tests["errors"] == 0, tests
    assert doc["parts"]["train"]["fp32"]["ratio"] > 0 and "bf16" not in doc["parts"]["train"]
    sweep = doc["parts"]["batch_sweep"]
    assert sweep["modes"] == ["eager"] and all(b["eager"]["test_loss"] > 0 for b in sweep["batches"].values())
    assert doc["parts"]["quality"]["epochs_run"] >= 1 and doc["parts"]["quality"]["test_neg_elbo"] > 0
    assert doc["parts"]["encode"]["S=1 K=100"]["rows"] > 0
    assert doc["parts"]["cpu_scaling"]["train"]["1"]["speedup"] == 1.0
    assert doc["parts"]["cpu_scaling"]["encode"]["1"]["rows"] > 0
    table = (out / "results.md").read_text()
    assert "| train | fp32: Ray Train 1 CPU worker / plain loop" in table
    assert proc.stdout.rstrip().endswith(table.rstrip())  # the table prints last
    assert (out / "gpu-tests.log").exists()
