"""model.kind=custom on a real local Ray: examples/custom_model trained on 2 workers through Ray Train
on a folder of colour images prepared into shards, with its code only in the directory the job runs
from (shipped to the workers by Ray's runtime environment), then encoded by Ray Data's actors, queried
and reported; and a factory that imports here but not on the workers is refused before training."""

from __future__ import annotations

import importlib.util
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


@pytest.fixture
def isolated_imports(monkeypatch):
    """sys.path and the user's modules as they were, afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("toyvae", "needs_helper", "helper_only_here"):
            del sys.modules[name]


def test_a_colour_folder_trains_a_custom_model_on_two_workers_then_encodes_queries_and_reports(
        ray_cluster, tmp_path, monkeypatch, isolated_imports):
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

    encoded = encode(cfg, checkpoint=result.best_checkpoint)  # the actors rebuild the model from its config
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
