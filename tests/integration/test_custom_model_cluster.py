"""model.kind=custom on a real local Ray: examples/custom_model trained on 2 workers through Ray Train
on a folder of colour images prepared into shards, with its code only in the directory the job runs
from (shipped to the workers by Ray's runtime environment), then encoded by Ray Data's actors, queried
and reported; a factory that imports here but not on the workers is refused before training; and a
model that raises in training ends the run in one line that names it."""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import REPO, debug_config
from vaedist.config import load_config
from vaedist.checkpoint import CHECKPOINT_FILE, load_checkpoint
from vaedist.custom_model import FactoryError

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 60  # about how long this file takes in `make test` (conftest: longest first)


@pytest.fixture
def isolated_imports(monkeypatch):
    """sys.path and the user's modules as they were, afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("toyvae", "needs_helper", "helper_only_here", "failvae"):
            del sys.modules[name]


def test_a_colour_folder_trains_a_custom_model_on_two_workers_then_encodes_queries_and_reports(
        ray_cluster, tmp_path, monkeypatch, isolated_imports, capfd):
    """An unlabelled folder of colour PNGs prepared into shards; examples/custom_model trained on them
    by two workers, with its code only in the directory the job runs from (shipped by Ray's runtime
    environment); Ray Data's actors encode it; queries and the report read the table."""
    from vaedist.data import read_sources
    from vaedist.encode import encode
    from vaedist.prepare import prepare_external
    from vaedist.analyses import loss_by_digit, run_sql
    from vaedist.report import write_report
    from vaedist.train import train

    root = tmp_path / "colour"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(240):
        image = np.zeros((10, 10, 3), np.uint8)
        image[..., i % 3] = rng.integers(100, 256, (10, 10))  # a red, green or blue tint
        Image.fromarray(image).save(root / f"{i:03d}.png")
    shards = str(tmp_path / "shards")
    overrides = ["data.source=images", f"data.source_path={root}", "data.image_size=[8,8]", "data.samples_per_shard=60"]
    manifest = prepare_external(load_config(None, overrides), shards, progress=False)
    assert manifest.dataset.num_classes == 0 and manifest.dataset.image_shape == (8, 8, 3)

    work = tmp_path / "work"
    shutil.copytree(REPO / "examples" / "custom_model", work, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    monkeypatch.chdir(work)
    assert importlib.util.find_spec("toyvae") is None  # nowhere on this process's path but the cwd
    # Ray's workers have the repository (the fixture's PYTHONPATH) and the cwd the cluster started in:
    # toyvae is in neither, so it reaches them only through the runtime environment.
    assert not (Path.cwd() / "toyvae").resolve().is_relative_to(REPO)
    cfg = debug_config(shards, tmp_path / "runs", "custom", *overrides, "model.kind=custom",
                       "model.factory=toyvae.model:build", "model.kwargs.channels=4", "model.kwargs.hidden=16",
                       "model.latent_dim=4", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
                       "train.batch_size_per_worker=20", "encode.num_samples_mc=1", "encode.num_samples_iw=4",
                       "encode.concurrency=1", f"output.latents_dir={tmp_path / 'latents'}")
    result = train(cfg)
    # Shards go round-robin to the ranks; each takes the smaller share's full batches (DDP in step).
    shares = [sum(s.num_samples for s in manifest.split("train").shards[r::2]) for r in range(2)]
    assert [e["world_size"] for e in result.epochs] == [2, 2]
    assert all(e["rank_sample_counts"] == [min(shares) // 20 * 20] * 2 for e in result.epochs), result.epochs
    assert all(len(set(e["rank_param_sums"])) == 1 for e in result.epochs)  # DDP kept the ranks' weights equal
    losses = [e["train_loss"] for e in result.epochs]
    assert all(np.isfinite(losses)) and losses[1] < losses[0]

    state = load_checkpoint(str(Path(result.best_checkpoint) / CHECKPOINT_FILE))
    assert state.config["model"]["factory"] == "toyvae.model:build"
    assert state.config["model"]["kwargs"] == {"channels": 4, "hidden": 16}
    assert all(k.startswith("net.") for k in state.model) and state.model["net.encoder.0.weight"].shape[0] == 4

    from vaedist.encode import ISSUE_DETECTION_LOGGER, ray_data_log, ray_data_reports_to_its_log_only

    capfd.readouterr()
    log_before = Path(ray_data_log()).stat().st_size if Path(ray_data_log()).is_file() else 0
    encoded = encode(cfg, checkpoint=result.best_checkpoint)  # the actors rebuild the model from its config
    # A quiet console: no advice from Ray Data's issue detectors; and the actors asked Ray for the
    # memory they used, with its headroom, or its memory detector would say so in its log at the end.
    console = "".join(capfd.readouterr())
    assert "memory per worker" not in console and "memory=" not in console, console
    with open(ray_data_log()) as f:
        f.seek(log_before)
        assert "of memory per worker" not in f.read()
    # Its advice, when it has some, goes to its log only.
    with ray_data_reports_to_its_log_only():
        logging.getLogger(ISSUE_DETECTION_LOGGER + ".issue_detector_manager").warning("uses 4.2GiB of memory per worker")
    assert "4.2GiB" not in "".join(capfd.readouterr())
    assert encoded.rows == {s: e.num_samples for s, e in manifest.splits.items()}
    rows = pq.read_table(encoded.path, columns=["mu", "loss"])
    assert len(rows["mu"][0]) == 4 and np.all(np.isfinite(rows["loss"].to_numpy()))
    by_label = loss_by_digit(encoded.path, split="test").to_pylist()
    assert [row["label"] for row in by_label] == [-1]
    rows = run_sql(encoded.path, "SELECT index, label, source FROM latents WHERE split = 'test' ORDER BY index").to_pylist()
    assert all(row["label"] == -1 for row in rows) and len(rows) == manifest.split("test").num_samples
    assert [r["source"] for r in rows] == list(read_sources(shards, manifest, "test"))  # each row's own file
    assert all((root / r["source"]).is_file() for r in rows)

    index = write_report(encoded.path, str(tmp_path / "report"), num_examples=8)  # the driver imports toyvae
    assert Path(index).is_file() and (tmp_path / "report" / "samples.png").stat().st_size > 0


def test_a_factory_that_does_not_import_on_the_workers_is_refused_before_training(
        ray_cluster, small_shards, tmp_path, monkeypatch, isolated_imports):
    """needs_helper is shipped, but it imports helper_only_here, which only this process can find
    (on its sys.path, not in the factory's package): the workers cannot import the factory."""
    from vaedist.train import train

    (tmp_path / "work" / "needs_helper").mkdir(parents=True)
    (tmp_path / "work" / "needs_helper" / "__init__.py").write_text("")
    shutil.copy(REPO / "examples" / "custom_model" / "toyvae" / "model.py", tmp_path / "work" / "needs_helper" / "nets.py")
    with open(tmp_path / "work" / "needs_helper" / "nets.py", "a") as f:
        f.write("\nimport helper_only_here  # noqa: E402\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "helper_only_here.py").write_text("")
    sys.path.append(str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path / "work")
    cfg = debug_config(small_shards, tmp_path / "runs", "unshippable", "model.kind=custom",
                       "model.factory=needs_helper.nets:build", "model.kwargs.channels=4", "train.epochs=1")
    with pytest.raises(FactoryError, match=r"model.factory 'needs_helper.nets:build' does not import on the Ray "
                                           r"workers of 1 of 1 node\(s\) .*vaedist shipped .*needs_helper \(py_modules\)"
                                           r".*No module named 'helper_only_here'"):
        train(cfg)
    assert not (tmp_path / "runs" / "unshippable").exists()  # refused before Ray Train started


FAILING_MODEL = """
from torch import nn


class FailVAE(nn.Module):
    def __init__(self, image_shape, latent_dim, params_per_pixel):
        super().__init__()
        pixels = image_shape[0] * image_shape[1] * image_shape[2]
        self.encoder, self.decoder = nn.Linear(pixels, 2 * latent_dim), nn.Linear(latent_dim, pixels * params_per_pixel)

    def encode(self, x):
        if x.shape[0] > 4:  # passes vaedist's check of the protocol (4 images), fails in training
            raise ValueError(f"a batch of {x.shape[0]} is more than this model takes")
        return self.encoder(x).chunk(2, dim=-1)

    def decode(self, z):
        return self.decoder(z)


def build(image_shape, latent_dim, params_per_pixel):
    return FailVAE(image_shape, latent_dim, params_per_pixel)
"""


def test_a_model_that_raises_in_training_ends_the_run_in_one_line_naming_it(
        ray_cluster, small_shards, tmp_path, monkeypatch, isolated_imports, capfd):
    """`vaedist train` of a custom model that raises on its first training batch, on 2 workers: the
    output ends with one line naming the exception, the user's file and line, and the log file that
    holds Ray's traceback; no traceback on the console; exit code 1."""
    from vaedist.cli import main

    package = tmp_path / "work" / "failvae"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text(FAILING_MODEL)
    line = next(i for i, text in enumerate(FAILING_MODEL.splitlines(), 1) if "raise ValueError" in text)
    monkeypatch.chdir(tmp_path / "work")
    overrides = [f"data.shards_dir={small_shards}", "data.max_train_shards=0", "data.max_test_shards=0",
                 f"output.storage_path={tmp_path / 'runs'}", "output.run_name=fails", "output.max_failures=0",
                 "train.batch_size_per_worker=50", "model.kind=custom", "model.factory=failvae.model:build",
                 "scaling.num_workers=2", "tracking.enabled=false"]
    capfd.readouterr()
    with pytest.raises(SystemExit) as ended:
        main(["train", "--config", str(REPO / "configs" / "debug.yaml"), *[a for o in overrides for a in ("--set", o)]])
    console = "".join(capfd.readouterr())
    assert ended.value.code == 1
    assert "Traceback" not in console and "File \"" not in console, console
    last = console.strip().splitlines()[-1]
    told = re.fullmatch(rf"Error: training failed: ValueError: a batch of 50 is more than this model takes "
                        rf"\(in encode, {re.escape(str(package / 'model.py'))}:{line}\) \(Ray's traceback: (\S+)\)", last)
    assert told, console
    with open(told.group(1)) as f:
        assert "a batch of 50 is more than this model takes" in f.read()
