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


@pytest.fixture(scope="session")
def ray_cluster():
    """One 2-CPU local Ray for the whole session (started lazily, shut down at the end)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, dashboard_host="127.0.0.1", include_dashboard=True, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()
