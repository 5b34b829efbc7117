"""Ray Data's own WebDataset reader against vaedist's fast reader, on real shards."""

from __future__ import annotations

import numpy as np
import pytest

from vaedist.data import key_for, load_split_arrays, shard_paths

pytestmark = pytest.mark.integration


def test_ray_read_webdataset_gives_exactly_the_fast_readers_images_and_labels(ray_cluster, small_shards):
    import ray

    paths = shard_paths(small_shards, "test")
    indices, images, labels = load_split_arrays(paths)
    rows = ray.data.read_webdataset(paths).take_all()  # default decoders: .npy -> array, .cls -> int
    rows.sort(key=lambda r: r["__key__"])
    assert [r["__key__"] for r in rows] == [key_for("test", int(i)) for i in indices]
    assert np.array_equal(np.stack([np.asarray(r["npy"]) for r in rows]).reshape(len(rows), -1), images)
    assert [int(r["cls"]) for r in rows] == labels.tolist()
