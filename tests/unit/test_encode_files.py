"""The encode job's plan of files (what makes a rerun find the files a killed run finished). No Ray;
its one-line account of an actor's error is tests/unit/test_errors.py's."""

from __future__ import annotations

import json

from vaedist.data import MNIST, Manifest
from vaedist.data.manifest import ShardEntry, SplitEntry
from vaedist.encode import MIN_FILES, file_plan


def manifest(shards_per_split: dict[str, list[int]]) -> Manifest:
    splits = {}
    for split, sizes in shards_per_split.items():
        firsts = [sum(sizes[:i]) for i in range(len(sizes))]
        splits[split] = SplitEntry(num_samples=sum(sizes), shards=tuple(
            ShardEntry(path=f"{split}/{split}-{i:06d}.tar", first_index=first, num_samples=n, bytes=n * 800,
                       sha256=f"{i:064x}") for i, (n, first) in enumerate(zip(sizes, firsts))))
    return Manifest(dataset=MNIST, splits=splits, samples_per_shard=max(max(s) for s in shards_per_split.values()))


def test_files_group_consecutive_shards_of_one_split_and_depend_on_the_manifest_only():
    m = manifest({"train": [2500] * 24, "test": [2500] * 4})
    plan = file_plan(m, ["train", "test"], rows_per_file=20_000)
    # 70,000 rows: files of at least 70,000 / MIN_FILES = 8,750 rows, so 4 shards each.
    assert MIN_FILES == 8
    assert [f["file"] for f in plan] == [f"train-{i:05d}.parquet" for i in range(6)] + ["test-00000.parquet"]
    assert [f["datapoints"] for f in plan] == [10_000] * 7
    shards = [s["path"] for f in plan for s in json.loads(f["entries"])]
    assert shards == [s.path for split in ("train", "test") for s in m.split(split).shards]
    assert file_plan(m, ["train", "test"], 20_000) == plan
    # Large tables: files of rows_per_file; a short last group keeps the split's remainder.
    big = file_plan(manifest({"train": [2500] * 1000 + [100]}), ["train"], rows_per_file=20_000)
    assert [f["datapoints"] for f in big] == [20_000] * 125 + [100]
    assert file_plan(m, ["test"], 2500) == [
        {"file": f"test-{i:05d}.parquet", "split": "test", "datapoints": 2500,
         "entries": json.dumps([m.split("test").shards[i].to_dict()], sort_keys=True)} for i in range(4)]

