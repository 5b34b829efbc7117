"""The commands of the README and the docs, run as written where they are cheap.

Which blocks run: every ```bash block of README.md and docs/**/*.md, except the README's head-node
block (tests/integration/test_cluster_readme.py runs that one on free ports). A block that cannot run here
(a cluster, object storage, other data, hours of training) is fenced ```bash {.no-run}, which the
docs render as any bash block. In the blocks that run, `vaedist train` and `vaedist encode` lines are
what the rest of the suite runs; here their output is stood in for by a real table. A command that
appears in several blocks runs once."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, command_blocks, repo_copy

pytestmark = pytest.mark.integration
EXPENSIVE = ("vaedist train", "vaedist encode")
RUN_ELSEWHERE = "ray start --head"  # test_cluster_readme.py's block


def documented_commands() -> dict[str, list[str]]:
    """Each file's commands to run, in order: the README's first, then the docs' pages."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    found = {}
    for page in pages:
        commands = [c for block in command_blocks(page.read_text())
                    if not any(RUN_ELSEWHERE in c for c in block) for c in block]
        if commands:
            found[str(page.relative_to(REPO))] = commands
    return found


def test_documented_commands_work_as_written(tmp_path, mnist_dir, latent_tables):
    by_page = documented_commands()
    assert "README.md" in by_page and "docs/guides/queries.md" in by_page, sorted(by_page)
    commands = list(dict.fromkeys(c for page in by_page.values() for c in page))
    cheap = [c for c in commands if not c.startswith(EXPENSIVE)]
    assert all(c.startswith("vaedist ") for c in commands), commands
    assert len(cheap) >= 7 and any(c.startswith("vaedist data prepare") for c in cheap), cheap
    repo = repo_copy(tmp_path / "repo")
    # What `vaedist encode --config configs/debug.yaml` would have published there.
    shutil.copytree(latent_tables["latents"], repo / "outputs" / "latents-debug")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VAEDIST_"))}
    env["VAEDIST_MNIST_DIR"] = str(mnist_dir)  # the README's "MNIST comes from VAEDIST_MNIST_DIR"
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # this interpreter's `vaedist`
    for command in cheap:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        if command.endswith("loss-by-digit"):
            assert "(10 rows)" in done.stdout
        if command.startswith("vaedist data verify"):
            assert "train: 24 shards, 60000 datapoints OK" in done.stdout
        if command.startswith("vaedist report"):
            assert (repo / "outputs" / "report-debug" / "index.html").is_file()
