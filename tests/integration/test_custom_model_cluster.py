"""model.kind=custom on a real local Ray: examples/custom_model trained on 2 workers through Ray Train
with its code only in the directory the job runs from (shipped to the workers by Ray's runtime
environment), then encoded by Ray Data's actors and reported; and a factory that imports here but not
on the workers is refused before training starts."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import REPO, debug_config
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


def test_custom_model_ships_to_two_workers_then_encodes_and_reports(ray_cluster, small_shards, tmp_path, monkeypatch,
                                                                    isolated_imports):
    from vaedist.encode import encode
    from vaedist.report import write_report
    from vaedist.train import train

    work = tmp_path / "work"
    shutil.copytree(REPO / "examples" / "custom_model", work, ignore=shutil.ignore_patterns("outputs", "__pycache__"))
    monkeypatch.chdir(work)
    assert importlib.util.find_spec("toyvae") is None  # nowhere on this process's path but the cwd
    # Ray's workers have the repository (the fixture's PYTHONPATH) and the cwd the cluster started in:
    # toyvae is in neither, so it reaches them only through the runtime environment.
    assert not (Path.cwd() / "toyvae").resolve().is_relative_to(REPO)
    cfg = debug_config(small_shards, tmp_path / "runs", "custom", "model.kind=custom",
                       "model.factory=toyvae.model:build", "model.kwargs.channels=4", "model.kwargs.hidden=16",
                       "model.latent_dim=4", "scaling.num_workers=2", "scaling.cpus_per_worker=1", "train.epochs=1",
                       "train.max_steps_per_epoch=4", "data.max_test_shards=2", "encode.splits=[test]",
                       "encode.num_samples_mc=1", "encode.num_samples_iw=0", "encode.concurrency=1",
                       f"output.latents_dir={tmp_path / 'latents'}")
    result = train(cfg)
    epoch, = result.epochs
    assert epoch["world_size"] == 2 and epoch["rank_sample_counts"] == [200, 200]
    assert len(set(epoch["rank_param_sums"])) == 1  # DDP kept the ranks' weights equal
    assert epoch["test_loss"] < 784 * 0.7  # better than an untrained decoder's ~ln 2 per pixel

    state = load_checkpoint(str(Path(result.best_checkpoint) / CHECKPOINT_FILE))
    assert state.config["model"]["factory"] == "toyvae.model:build"
    assert state.config["model"]["kwargs"] == {"channels": 4, "hidden": 16}
    assert all(k.startswith("net.") for k in state.model) and state.model["net.encoder.0.weight"].shape[0] == 4

    table = encode(cfg)  # Ray Data's encoder actors rebuild the model from the checkpoint's config
    assert table.rows == {"test": 4000}
    rows = pq.read_table(table.path, columns=["mu", "loss"])
    assert rows.num_rows == 4000 and len(rows["mu"][0]) == 4
    assert abs(float(torch.tensor(rows["loss"].to_pylist()).mean()) - epoch["test_loss"]) < 0.5 * epoch["test_loss"]

    index = write_report(table.path, str(tmp_path / "report"), num_examples=8)  # the driver imports toyvae from the cwd
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
