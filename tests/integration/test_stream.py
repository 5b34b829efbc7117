"""`stream` ingest: the shards through Ray Data to Ray Train's workers, on a real 2-CPU local Ray. Two
workers training in step from the stream, through a crash and its resume: test_train.py's crash test."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from vaedist.data import DataError, read_manifest

from conftest import debug_config

pytestmark = pytest.mark.integration


def test_every_datapoint_once_per_epoch_in_equal_shares(ray_cluster, small_shards):
    """The dataset training builds, split as Ray Train splits it (equal=True), iterated as each worker
    iterates it: each rank sees its share once per epoch, the shares are disjoint, equal, and
    together all of the training split; the order changes between epochs."""
    from vaedist.ingest import stream_dataset, stream_epoch

    manifest = read_manifest(small_shards)
    shards = manifest.split("train").shards  # 4 x 1,000
    ds = stream_dataset(small_shards, shards, manifest.dataset, seed=0)
    splits = ds.streaming_split(2, equal=True)
    orders = []
    for epoch in range(2):
        # The splits of one execution must be consumed together, as the workers do.
        with ThreadPoolExecutor(2) as pool:
            seen = list(pool.map(lambda rank: [int(i) for b in stream_epoch(splits[rank], 50, 300, 0, epoch, rank)
                                               for i in b["index"]], range(2)))
        assert [len(s) for s in seen] == [2000, 2000]  # 40 full batches each
        assert len(set(seen[0]) | set(seen[1])) == 4000 and not set(seen[0]) & set(seen[1])
        assert all(len(set(s)) == len(s) for s in seen)  # no datapoint twice within a share
        orders.append(seen[0] + seen[1])
    assert orders[0] != orders[1]


def test_a_corrupt_shard_met_mid_epoch_names_the_shard(ray_cluster, small_shards, tmp_path):
    from vaedist.train import train

    broken = tmp_path / "shards"
    shutil.copytree(small_shards, broken)
    shard = broken / "train" / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[7000] ^= 0xFF  # same size: the stream preflight checks sizes, the decode tasks the sha256
    shard.write_bytes(bytes(data))
    cfg = debug_config(str(broken), tmp_path, "corrupt", "data.ingest=stream", "output.max_failures=0")
    with pytest.raises(DataError, match=r"train-000002\.tar: sha256 mismatch"):
        train(cfg)


def test_auto_chooses_by_the_memory_budget(small_shards):
    from vaedist.ingest import choose_ingest
    from vaedist.train import preflight

    base = ("data.ingest=auto",)
    plan = preflight(debug_config(small_shards, "/tmp/unused", "x", *base))
    assert plan.ingest == "memory" and "fits data.memory_budget_mb" in plan.ingest_reason
    info = read_manifest(small_shards).dataset
    mode, why = choose_ingest(debug_config(small_shards, "/tmp/unused", "x", "data.memory_budget_mb=1").data,
                              info, 1_200_000, 1)
    assert mode == "stream" and "897 MB, exceeds data.memory_budget_mb = 1" in why  # 1.2M x 784 bytes
