"""The README's "Using it" commands, run as written where they are cheap (the training and encoding
lines are what the rest of the suite runs; here their output is stood in for by a real table)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import readme_commands, repo_copy

pytestmark = pytest.mark.integration
EXPENSIVE = ("vaedist train", "vaedist encode")


def test_readme_using_it_commands_work_as_written(tmp_path, mnist_dir, latent_tables):
    commands = readme_commands("vaedist data prepare --mnist-dir ../shared/data/mnist")
    cheap = [c for c in commands if not c.startswith(EXPENSIVE)]
    assert len(cheap) >= 7 and all(c.startswith("vaedist ") for c in commands), commands
    repo = repo_copy(tmp_path / "repo")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "mnist").symlink_to(mnist_dir)  # the README's ../shared/data/mnist
    # What `vaedist encode --config configs/debug.yaml` would have published there.
    shutil.copytree(latent_tables["latents"], repo / "outputs" / "latents-debug")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VAEDIST_"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # this interpreter's `vaedist`
    for command in cheap:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        if "loss-by-digit" in command:
            assert "(10 rows)" in done.stdout
        if command.startswith("vaedist data verify"):
            assert "train: 24 shards, 60000 datapoints OK" in done.stdout
        if command.startswith("vaedist report"):
            assert (repo / "outputs" / "report-debug" / "index.html").is_file()
