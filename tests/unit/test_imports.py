"""Training, encoding and the benchmarks import neither DuckDB nor MLflow (a GPU machine without a package
index has neither: README, "Proving the GPU paths ..."), and a command that needs one where it is
missing says which package to install. Each check runs in a fresh interpreter, whose sys.modules is
the evidence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_train_encode_and_bench_import_neither_duckdb_nor_mlflow(tmp_path):
    code = f"""
import json, sys
from click.testing import CliRunner
from vaedist.cli import cli
# What `train`, `encode` and `bench gpu` import before any work (the drivers import Ray's inside).
import vaedist.train, vaedist.encode, vaedist.bench.gpu, vaedist.bench.train, vaedist.bench.encode
from ray.train.torch import TorchTrainer
import ray.data
# Each command's error path: its error handling once imported vaedist.analyses, hence DuckDB.
results = [CliRunner().invoke(cli, args) for args in (
    ["train", "--set", "data.shards_dir={tmp_path}/none"],
    ["encode", "--checkpoint", "{tmp_path}/none"],
    ["bench", "train", "--set", "data.shards_dir={tmp_path}/none"],
    ["bench", "gpu", "--out", "{tmp_path}/out", "--mnist-dir", "{tmp_path}/none"])]
print(json.dumps({{"exit_codes": [r.exit_code for r in results], "outputs": [r.output for r in results],
                  "loaded": sorted({{m.split(".")[0] for m in sys.modules}} & {{"duckdb", "mlflow"}})}}))
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["exit_codes"] == [1, 1, 1, 1], found["outputs"]
    assert "does not exist" in found["outputs"][0] and "MNIST's IDX files" in found["outputs"][3], found["outputs"]
    assert not any("Traceback" in out for out in found["outputs"])
    assert found["loaded"] == []


def test_a_query_without_duckdb_says_what_to_install(tmp_path):
    # None in sys.modules makes `import duckdb` fail as it does where DuckDB is not installed.
    code = f"""
import sys
sys.modules["duckdb"] = None
from click.testing import CliRunner
from vaedist.cli import cli
result = CliRunner().invoke(cli, ["query", "loss-by-digit", "--latents", "{tmp_path}"])
print(result.exit_code)
print(result.output)
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exit_code, output = proc.stdout.split("\n", 1)
    assert exit_code == "1" and "needs duckdb" in output and "pip install" in output, output
    assert "Traceback" not in output


def test_tracking_without_mlflow_says_what_to_install_before_training(tmp_path, small_shards):
    code = f"""
import sys
sys.modules["mlflow"] = None
from click.testing import CliRunner
from vaedist.cli import cli
result = CliRunner().invoke(cli, ["train", "--config", "configs/debug.yaml", "--set", "data.shards_dir={small_shards}",
                                  "--set", "output.storage_path={tmp_path}", "--set", "tracking.enabled=true"])
print(result.exit_code)
print(result.output)
print("ray started" if "ray" in sys.modules and sys.modules["ray"].is_initialized() else "no ray")
"""
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exit_code, output = proc.stdout.split("\n", 1)
    assert exit_code == "1" and "mlflow is not installed" in output and "pip install 'vaedist[mlflow]'" in output, output
    assert "Traceback" not in output and output.rstrip().endswith("no ray"), output
