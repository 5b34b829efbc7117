"""Shared fixtures: the real MNIST files, small real shards, and one small local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_mnist_dir() -> str | None:
    """$VAEDIST_MNIST_DIR, else ../shared/data/mnist beside the checkout."""
    candidates = [os.environ.get("VAEDIST_MNIST_DIR"), str(REPO.parent / "shared" / "data" / "mnist")]
    for c in filter(None, candidates):
        if any(Path(c, "train-images-idx3-ubyte" + ext).exists() for ext in (".gz", "")):
            return c
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    found = find_mnist_dir()
    if found is None:
        pytest.skip("MNIST IDX files not found: set VAEDIST_MNIST_DIR or place them in ../shared/data/mnist "
                    "(tests never download)")
    return found


@pytest.fixture(scope="session")
def small_shards(mnist_dir, tmp_path_factory) -> str:
    """The first 4,000 datapoints of each split in 1,000-datapoint shards: 4 train and 4 test shards."""
    from vaedist.data import prepare_shards

    out = str(tmp_path_factory.mktemp("shards") / "shards")
    prepare_shards(out, mnist_dir=mnist_dir, samples_per_shard=1000, limit_per_split=4000, progress=False)
    return out


def start_local_ray():
    """A fresh 2-CPU local Ray in this process; any earlier connection is shut down first.
    address="local": never join a cluster that `ray start` left in /tmp/ray/ray_current_cluster."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=True,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    return ray


@pytest.fixture(scope="session")
def ray_cluster():
    """One 2-CPU local Ray for the whole session (started lazily, shut down at the end)."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _ray_cluster_alive(request):
    """Modules with a cluster of their own (test_cluster, test_s3) shut the shared Ray down: a later
    test that uses it gets it started again."""
    if "ray_cluster" in request.fixturenames:
        ray = request.getfixturevalue("ray_cluster")
        if not ray.is_initialized():
            start_local_ray()


def debug_config(shards: str, storage_path, run_name: str, *extra: str):
    """configs/debug.yaml pointed at test shards and a test storage path."""
    from vaedist.config import load_config

    return load_config(REPO / "configs" / "debug.yaml", [
        f"data.shards_dir={shards}", "data.max_train_shards=0", "data.max_test_shards=0",
        f"output.storage_path={storage_path}", f"output.run_name={run_name}",
        "train.batch_size_per_worker=50", "output.checkpoints_to_keep=2", *extra])


@pytest.fixture(scope="session")
def trained_run(ray_cluster, small_shards, tmp_path_factory):
    """One debug training run (2 epochs, 1 worker) over small_shards: (config, TrainResult)."""
    from vaedist.train import train

    cfg = debug_config(small_shards, tmp_path_factory.mktemp("runs"), "trained")
    return cfg, train(cfg)
