"""What a user sees: `vaedist run` in a subprocess, its output read line by line as it comes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration
VAEDIST = str(Path(sys.executable).with_name("vaedist"))
# Ray's C++ log lines look like "[2026-11-24 16:55:29,429 E 3773 3773] core_worker.cc:2465: ...".
CPP_ERROR = re.compile(r"^\[\S+ \S+ E \d+ \d+\]")


def test_run_shows_each_epoch_as_it_ends_and_no_ray_noise(small_shards, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VAEDIST_VERBOSE"))}
    command = [VAEDIST, "run", "--config", "configs/debug.yaml",
               "--set", f"data.shards_dir={small_shards}", "--set", "data.max_train_shards=0",
               "--set", "data.max_test_shards=0", "--set", "train.epochs=3",
               "--set", "train.batch_size_per_worker=50", "--set", f"output.storage_path={tmp_path}/runs",
               "--set", f"output.latents_dir={tmp_path}/latents", "--set", f"output.report_dir={tmp_path}/report"]
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
    assert proc.wait(timeout=600) == 0, "\n".join(text for _, text in lines)[-5000:]
    text = "\n".join(t for _, t in lines)
    epochs = {int(m[1]): at for at, t in lines if (m := re.search(r"epoch +(\d+) +train l_i", t))}
    assert sorted(epochs) == [0, 1, 2], text
    # Shown as each epoch ends, not all at the end: an epoch here takes seconds.
    assert epochs[2] - epochs[0] > 1.0, epochs
    assert "[5/5] report:" in text and "(10 rows)" in text
    for noise in ("TrainingReport(", "Traceback", "Reporting training result", "logging_progress",
                  "Running Dataset", "ERROR", "Token authentication is enabled"):
        assert noise not in text, f"{noise!r} in the output:\n{text[-5000:]}"
    assert not [t for _, t in lines if CPP_ERROR.match(t)], text[-5000:]
    # Non-interactive output stays line-oriented: no carriage-return progress bars.
    assert "\r" not in text
