"""Fashion-MNIST through the whole pipeline (`vaedist run --config configs/fashion-mnist.yaml`, made
small with overrides, in a subprocess as a user runs it), with its class names in the query and the
report and a console free of Ray's noise; and the refusals of data that does not fit: shards of
another dataset than the config names, a checkpoint trained on images of another shape.

The refusals need no Ray (they come before any cluster work), so they are not marked integration
and run in the unit tier (`pytest -m "not integration"`). Fashion-MNIST comes from
$VAEDIST_FASHION_MNIST_DIR, else ../shared/data/fashion-mnist beside the checkout; without it the
tests skip (they never download).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from vaedist.checkpoint import CheckpointError, checkpoint_dir_name, load_checkpoint, save_checkpoint
from vaedist.cli import cli
from vaedist.data import DataError, manifest_hash, prepare_shards
from vaedist.data.sources import FASHION_MNIST
from vaedist.model import VAE

from conftest import REPO, debug_config, find_mnist_dir

SCHEDULE_SECONDS = 45  # about how long this file takes in `make test` (conftest: longest first)

CLASS_NAMES = list(FASHION_MNIST.class_names)  # label 9 is "Ankle boot"


@pytest.fixture(scope="module")
def tiny_fashion_shards(fashion_dir, tmp_path_factory) -> str:
    """The first 200 datapoints of each split in 100-datapoint shards."""
    out = str(tmp_path_factory.mktemp("fashion") / "shards")
    prepare_shards(out, "fashion-mnist", source_dir=fashion_dir, samples_per_shard=100, limit_per_split=200,
                   progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# Data that does not fit is refused before any cluster work (no Ray).

def test_shards_of_another_dataset_than_the_config_names_are_refused(tiny_fashion_shards, tmp_path):
    from vaedist.train import preflight

    with pytest.raises(DataError, match=rf"{tiny_fashion_shards} holds fashion-mnist \(its manifest.json says so\), "
                                        r"but data.dataset is 'mnist'; point data.shards_dir at mnist shards or set "
                                        r"data.dataset=fashion-mnist"):
        preflight(debug_config(tiny_fashion_shards, tmp_path, "mismatch"))
    mnist_dir = find_mnist_dir()
    if mnist_dir is None:
        pytest.skip("MNIST IDX files not found for the other direction (set VAEDIST_MNIST_DIR)")
    mnist_shards = str(tmp_path / "mnist-shards")
    prepare_shards(mnist_shards, source_dir=mnist_dir, samples_per_shard=100, limit_per_split=200, progress=False)
    with pytest.raises(DataError, match=r"holds mnist \(its manifest.json says so\), but data.dataset is "
                                        r"'fashion-mnist'"):
        preflight(debug_config(mnist_shards, tmp_path, "mismatch", "data.dataset=fashion-mnist"))


def test_a_checkpoint_of_another_image_shape_is_refused_by_train_and_encode(tiny_fashion_shards, tmp_path):
    from vaedist.encode import encode
    from vaedist.train import train

    # What a run on 32x32 colour images (say SVHN) would have saved, with the same model config and
    # over the same shards' manifest, so that only the image shape is wrong.
    cfg = debug_config(tiny_fashion_shards, tmp_path, "other-shape", "data.dataset=fashion-mnist")
    run_dir = tmp_path / "other-shape" / checkpoint_dir_name(0)
    save_checkpoint(str(run_dir), model_state=VAE(cfg.model, (32, 32, 3)).state_dict(), optimizer_state=None,
                    epoch=0, global_step=0, config=cfg, manifest_hash=manifest_hash(tiny_fashion_shards), history=[],
                    dataset="svhn", image_shape=(32, 32, 3))
    state = load_checkpoint(str(run_dir))
    assert (state.dataset, state.image_shape) == ("svhn", (32, 32, 3))
    message = (rf"checkpoint {run_dir}/checkpoint.pt was trained on svhn images of shape \[32, 32, 3\], but the "
               rf"shards in {tiny_fashion_shards} hold fashion-mnist images of shape \[28, 28, 1\]")
    with pytest.raises(CheckpointError, match=message):
        train(cfg)  # a rerun of the run would resume from it
    with pytest.raises(CheckpointError, match=message):
        encode(cfg, checkpoint=str(run_dir), out=str(tmp_path / "latents"))
    assert not (tmp_path / "latents").exists()


# ---------------------------------------------------------------------------------------------
# The whole pipeline.

VAEDIST = str(Path(sys.executable).with_name("vaedist"))
# Ray's C++ log lines look like "[2026-11-24 16:55:29,429 E 3773 3773] core_worker.cc:2465: ...".
CPP_ERROR = re.compile(r"^\[\S+ \S+ E \d+ \d+\]")


@pytest.mark.integration
def test_fashion_mnist_end_to_end_as_a_user_sees_it(fashion_dir, tmp_path):
    """`vaedist run` in a subprocess, its output read line by line as it comes: the class names in
    the outputs, each epoch shown as it ends, and none of Ray's noise."""
    out = tmp_path
    overrides = [
        f"data.fashion_mnist_dir={fashion_dir}", f"data.shards_dir={out}/shards", "data.samples_per_shard=2500",
        "data.max_train_shards=4", "data.max_test_shards=1",  # train on 10,000, evaluate on 2,500
        "model.latent_dim=8", "model.hidden_dims=[128]", "train.epochs=3", "train.batch_size_per_worker=50",
        "train.kl_warmup_epochs=0", "train.num_samples_iw_final=0", "scaling.cpus_per_worker=1",
        "encode.splits=[test]", "encode.num_samples_mc=1", "encode.concurrency=1",
        f"output.storage_path={out}/runs", "output.run_name=fashion", f"output.latents_dir={out}/latents",
        f"output.report_dir={out}/report", "tracking.enabled=false",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VAEDIST_VERBOSE"))}
    command = [VAEDIST, "run", "--config", "configs/fashion-mnist.yaml", *[f"--set={o}" for o in overrides]]
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    for line in proc.stdout:
        lines.append((time.monotonic() - start, line.rstrip("\n")))
    assert proc.wait(timeout=600) == 0, "\n".join(text for _, text in lines)[-5000:]
    text = "\n".join(t for _, t in lines)
    assert f"[1/5] shards: writing fashion-mnist to {out}/shards" in text
    assert "Ankle boot" in text  # the printed loss-by-class summary

    # The console: a line per epoch as it ends, not all at the end (an epoch here takes a second).
    epochs = {int(m[1]): at for at, t in lines if (m := re.search(r"epoch +(\d+) +train l_i", t))}
    assert sorted(epochs) == [0, 1, 2], text
    assert epochs[2] - epochs[0] > 1.0, epochs
    assert "[5/5] report:" in text and "(10 rows)" in text
    for noise in ("TrainingReport(", "Traceback", "Reporting training result", "logging_progress",
                  "Running Dataset", "ERROR", "WARNING", "Token authentication is enabled"):
        assert noise not in text, f"{noise!r} in the output:\n{text[-5000:]}"
    assert not [t for _, t in lines if CPP_ERROR.match(t)], text[-5000:]
    assert "\r" not in text  # non-interactive output stays line-oriented: no carriage-return bars

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == "fashion-mnist" and manifest["dataset"]["class_names"] == CLASS_NAMES
    assert manifest["splits"]["test"]["num_samples"] == 10000
    lineage = json.loads((out / "latents" / "_lineage.json").read_text())
    assert lineage["dataset"] == "fashion-mnist" and lineage["class_names"] == CLASS_NAMES
    assert lineage["rows"] == {"test": 10000}
    state = load_checkpoint(lineage["checkpoint"])
    assert (state.dataset, state.image_shape) == ("fashion-mnist", (28, 28, 1))

    query = CliRunner().invoke(cli, ["query", "loss-by-digit", "--latents", str(out / "latents"), "--format", "json"])
    assert query.exit_code == 0, query.output
    rows = [json.loads(line) for line in query.output.splitlines()]
    assert list(rows[0])[:3] == ["label", "class", "count"]
    assert [(r["label"], r["class"]) for r in rows] == list(enumerate(CLASS_NAMES))
    assert sum(r["count"] for r in rows) == 10000 and all(r["loss_mean"] > 0 for r in rows)
    worst = CliRunner().invoke(cli, ["query", "worst", "--k", "3", "--latents", str(out / "latents"),
                                     "--format", "json"])
    assert all(json.loads(line)["class"] in CLASS_NAMES for line in worst.output.splitlines()), worst.output

    index = (out / "report" / "index.html").read_text()
    missing = [name for name in CLASS_NAMES if name not in index]
    assert not missing, f"the report's index.html does not name the classes {missing}"
