"""The README's "A head node on this machine" block, typed as written, against a head started with
`ray start` on its own ports and temp dir (tests/integration/clusters.py has the helpers); a file of
its own so that the test runner can run it beside the other cluster tests. The same head then serves
a client that joins it without the token, and is stopped alone."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from vaedist import schema

from conftest import readme_commands, repo_copy
from clusters import HEAD_MARKER_ENV, MAX_PACKAGE_BYTES, head_flags, kill_tree, own_processes, process_table, tree_bytes

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 95  # about how long this file takes in `make test` (conftest: longest first)


def test_readme_head_node_commands_work_as_written(tmp_path, mnist_dir):
    """The README's "A head node on this machine" block, typed as written into a shell, in a copy of
    the repository and a home directory of its own. The home holds ~/.ray/auth_token, as after
    `make run` (any ray.init() writes it): with it there, `ray start` turns token auth on, which is
    what broke the README's commands before they exported RAY_AUTH_MODE=token. Only what must
    differ on a shared test machine is changed: the head's ports and temp dir (`ray start` gets flags
    appended, the job address follows the dashboard port), and the final `ray stop`, which would
    stop every Ray on the machine, becomes killing this head's processes.

    Then, on the same head: a client that joins it without RAY_AUTH_MODE=token gets the fix, not
    Ray's traceback; and stopping it ends its own processes (GCS, raylet, dashboard, workers) and
    nothing else: a bystander whose command line looks like Ray's survives."""
    from vaedist.checkpoint import checkpoint_dirs, read_metrics

    commands = readme_commands("ray start --head")
    assert commands[-1] == "ray stop", commands
    assert any(c.startswith("export RAY_AUTH_MODE=token") for c in commands), commands
    temp_dir = tempfile.mkdtemp(prefix="vdr-", dir="/tmp")
    flags, gcs_port, dashboard_port = head_flags(temp_dir)
    script = []
    for command in commands[:-1]:
        if command.startswith("ray start --head"):
            command = " ".join([command, *flags])
        script.append(command.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard_port}"))
    repo = repo_copy(tmp_path / "repo")
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text(secrets.token_hex(32))  # as ray.init() writes it
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "VIRTUAL_ENV")) and k not in ("PYTHONPATH", "VAEDIST_CONFIG", "VAEDIST_SET")}
    env.update(HOME=str(tmp_path / "home"), VAEDIST_MNIST_DIR=mnist_dir, **{HEAD_MARKER_ENV: temp_dir})
    gcs = f"127.0.0.1:{gcs_port}"
    bystander = None
    try:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(script)], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=1200)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        package_dirs = [p for p in Path(temp_dir).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                        if p.is_dir()]
        package_sizes = [tree_bytes(p) for p in package_dirs]
        uploaded = {p.name: sorted(c.name for c in p.iterdir()) for p in package_dirs}
        no_token = subprocess.run(
            [str(Path(sys.executable).with_name("vaedist")), "train", "--config", "configs/debug.yaml",
             "--address", gcs, "--set", f"data.shards_dir={repo}/outputs/shards",
             "--set", f"output.storage_path={tmp_path}/no-token-runs"],
            cwd=repo, env={**{k: v for k, v in env.items() if k != "VAEDIST_VERBOSE"}, "HOME": str(tmp_path)},
            capture_output=True, text=True, timeout=300)  # this HOME holds no ~/.ray/auth_token
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "raylet", "gcs_server"])
        head = own_processes(set(), temp_dir)
        commands = [cmd for pid, (_, cmd) in process_table().items() if pid in head]
    finally:
        left = kill_tree(set(), temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        bystander_lived = bystander is not None and bystander.poll() is None
        if bystander is not None:
            bystander.kill()
            bystander.wait()
    assert not left, f"processes of the README's head survived: {sorted(left)}"
    for part in ("gcs_server", "raylet", "dashboard.py"):
        assert any(part in c for c in commands), f"no {part} among the head's processes"
    assert bystander.pid not in head and bystander_lived, "the bystander was killed"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", gcs_port)) != 0, "GCS still listening"
    assert no_token.returncode == 1, no_token.stdout + no_token.stderr
    assert f"cannot join the Ray cluster at {gcs}" in no_token.stderr, no_token.stderr[-3000:]
    assert "export RAY_AUTH_MODE=token" in no_token.stderr and "ray get-auth-token" in no_token.stderr
    assert "Traceback" not in no_token.stderr
    assert "Job 'raysubmit_" in output and output.count("succeeded") >= 2, output[-6000:]

    # The CLI packed and uploaded the repo; Ray left out its default excludes (.git, .venv,
    # __pycache__) and everything .gitignore names (outputs/ with its shards and runs, caches).
    assert package_dirs and all(size < MAX_PACKAGE_BYTES for size in package_sizes), package_sizes
    for names in uploaded.values():
        assert "vaedist" in names and "jobs" in names
        assert not {".venv", "outputs", ".git"} & set(names), names

    run_dir = str(repo / "outputs" / "runs" / "debug")
    rows = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert [e for e, _ in checkpoint_dirs(run_dir)] == [1]  # debug config keeps 1 (+ the latest)
    out = repo / "outputs" / "latents-debug"
    lineage = json.loads((out / schema.LINEAGE_FILE).read_text())
    assert lineage["rows"] == {"test": 10000}
    assert lineage["checkpoint"] == f"{run_dir}/epoch-0001/checkpoint.pt"
    # The last command printed the loss-by-digit table of the published table: ten digits.
    assert "loss_mean" in output and "(10 rows)" in output, output[-3000:]
