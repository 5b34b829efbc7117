"""The main commands in an environment with vaedist's required dependencies only (`pip install vaedist`,
no `[mlflow]`, no `[test]`): what a user who skips the extras gets. `make test` installs every extra, so
without this tier a command that imports an optional package where it need not would pass here and
fail there. tests/offline_env.py builds the environment: a venv of links to this interpreter's
required packages and pytest, vaedist from PYTHONPATH.

One pipeline, its commands chained as a user types them: data prepare; train, sweep and run asking for
tracking, each refused before any work; train -> encode -> query -> report -> sweep (twice: as is, and
rerun with tracking off) -> query of the sweep -> run. The sweep has one trial (what is checked here is
that no command needs an extra; test_sweep_cluster.py runs several trials), and `run` reruns the train
step's run, as after a failed later step: its shards verify, its training is found finished, and it
encodes, queries and reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

import offline_env  # tests/, on sys.path beside conftest

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 50  # about how long this file takes in `make test` (conftest: longest first)

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "debug.yaml")
# What only the extras install (distribution and import names alike; checked against pyproject below).
EXTRAS_ONLY = ("mlflow", "boto3", "moto", "playwright", "webdataset")
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


# The commands run one after another in one process, as `vaedist.cli.main(args)`: the same code as
# typing them, and one Python, torch and embedded Ray start instead of one per command (which on
# 2 CPUs would cost minutes). Each step's output is framed by marker lines.
DRIVER = """
import json, sys, time
from vaedist.cli import main

for step, args, expect in json.loads(sys.argv[1]):
    print(f"=== {step} start", flush=True)
    start, code = time.monotonic(), 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    print(f"=== {step} exit {code} {time.monotonic() - start:.1f} s", flush=True)
    if code != expect:
        break
"""
STEP = re.compile(r"^=== (\S+) start\n(.*?)^=== \1 exit (\d+) ([\d.]+) s$", re.M | re.S)


@pytest.fixture(scope="module")
def pipeline(minimal, mnist_dir, tmp_path_factory) -> dict:
    """{step: (exit code, output)} of the chained commands, "seconds" per step, and the paths they
    wrote. The chain stops at the first step whose exit code is not the expected one."""
    out = tmp_path_factory.mktemp("pipeline")
    paths = {"shards": out / "shards", "runs": out / "runs", "latents": out / "latents", "report": out / "report",
             "run_latents": out / "run-latents", "run_report": out / "run-report"}
    common = ["--config", CONFIG, "--mnist-dir", mnist_dir,
              *[f"--set={o}" for o in (
                  f"data.shards_dir={paths['shards']}", "data.max_train_shards=1", "data.max_test_shards=1",
                  f"output.storage_path={paths['runs']}", "output.run_name=minimal", "train.epochs=1",
                  "train.num_samples_iw_final=0", "encode.splits=[test]", "encode.num_samples_mc=1",
                  "encode.num_samples_iw=0")]]
    sweep = ["sweep", *common, "--grid", "model.latent_dim=4", "--name", "grid"]
    run = ["run", *common, "--set", f"output.latents_dir={paths['run_latents']}",
           "--set", f"output.report_dir={paths['run_report']}"]
    tracked = ["--set", "tracking.enabled=true", "--set", "output.run_name=tracked"]
    steps = [
        ("prepare", ["data", "prepare", *common], 0),
        # Tracking asked for where mlflow is missing: the clear error, before any work (and before
        # this process has started Ray).
        ("train_tracked", ["train", *common, *tracked], 1),
        ("sweep_tracked", [*sweep, *tracked, "--name", "tracked"], 1),
        ("run_tracked", [*run, *tracked], 1),
        ("train", ["train", *common], 0),
        ("encode", ["encode", *common, "--out", str(paths["latents"])], 0),
        ("query", ["query", *common, "loss-by-digit", "--split", "test", "--latents", str(paths["latents"])], 0),
        ("report", ["report", *common, "--latents", str(paths["latents"]), "--out", str(paths["report"])], 0),
        # The sweep as the README shows it (tracking left to its default: on only where a store is named).
        ("sweep", sweep, 0),
        # Its rerun with the advice the missing-mlflow error gives: nothing left to run, the summary only.
        ("sweep_tracking_off", [*sweep, "--set", "tracking.enabled=false"], 0),
        ("sweep_query", ["query", *common, "--sweep", "grid", "SELECT name, status FROM sweep ORDER BY name"], 0),
        ("run", run, 0),
    ]
    proc = subprocess.run([minimal["python"], "-c", DRIVER, json.dumps(steps)], cwd=out, env=minimal["env"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1200)
    done: dict = {"paths": paths, "seconds": {}, "process": proc}
    for m in STEP.finditer(proc.stdout):
        done[m[1]] = (int(m[3]), m[2])
        done["seconds"][m[1]] = float(m[4])
    print("seconds per step:", done["seconds"])
    return done


def step(pipeline, name: str) -> tuple[int, str]:
    """(exit code, output) of a step; fails naming where the chain stopped when it did not run."""
    if name not in pipeline:
        ran = [s for s in pipeline["seconds"]]
        raise AssertionError(f"{name} did not run; the steps that did: {ran}. The process (exit "
                             f"{pipeline['process'].returncode}) ended with:\n{pipeline['process'].stdout[-5000:]}")
    return pipeline[name]


def succeeded(pipeline, name: str) -> str:
    """The step's output, after asserting it exited 0 and printed no traceback or error line."""
    code, output = step(pipeline, name)
    assert code == 0, f"{name} exited {code}:\n{output[-4000:]}"
    for noise in ("Traceback", "ERROR"):
        assert noise not in output, f"{noise!r} in the output of {name}:\n{output[-4000:]}"
    assert not CPP_ERROR.search(output), output[-4000:]
    return output


def test_the_environment_has_the_required_packages_and_none_that_only_extras_bring(minimal):
    only_extras = set(offline_env.extras_only())
    assert set(EXTRAS_ONLY) <= only_extras, only_extras
    code = ("import importlib.util as u, json, sys, vaedist; print(json.dumps({'vaedist': vaedist.__file__, "
            f"'found': [m for m in {EXTRAS_ONLY!r} if u.find_spec(m)], "
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
    assert "1 finished" in first, first[-3000:]
    rerun = succeeded(pipeline, "sweep_tracking_off")
    assert "1 done already, 0 to run" in rerun, rerun[-3000:]
    rows = succeeded(pipeline, "sweep_query")
    assert rows.count("finished") == 1, rows


def test_run_end_to_end(pipeline):
    output = succeeded(pipeline, "run")
    assert "is finished (train.epochs = 1): nothing to train" in output, output[-3000:]
    assert "[5/5] report:" in output and "(10 rows)" in output
    assert (pipeline["paths"]["run_report"] / "index.html").is_file()


@pytest.mark.parametrize("command", ["train", "sweep", "run"])
def test_tracking_asked_for_without_mlflow_is_refused_before_any_work(pipeline, command):
    code, output = step(pipeline, f"{command}_tracked")
    assert code == 1 and NO_MLFLOW in output, output[-3000:]
    assert "Traceback" not in output and "epoch" not in output and "[1/5]" not in output, output
    runs = pipeline["paths"]["runs"]
    assert not (runs / "tracked").exists(), sorted(p.name for p in runs.iterdir())


def test_the_chain_ran_to_its_end_and_its_process_exits_quietly(pipeline):
    output = pipeline["process"].stdout
    assert pipeline["process"].returncode == 0 and "run" in pipeline, output[-5000:]
    after = output.rpartition("=== run exit")[2].partition("\n")[2]  # Ray's shutdown, atexit handlers
    assert "Traceback" not in after and "ERROR" not in after and not CPP_ERROR.search(after), after[-5000:]
