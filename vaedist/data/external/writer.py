"""The external sources' shard writer: decoded batches, taken in task order, become each split's
shards (data.shards.write_shard: the same layout and bytes as the built-ins'), its sources.parquet
and the manifest. It holds at most a shard's worth of rows per split, so memory does not grow with
the data.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from vaedist import storage
from vaedist.data.common import SPLITS, UNLABELLED, DataError, DatasetInfo
from vaedist.data.external import SourcePlan, images_differ
from vaedist.data.external.transform import ImageTransform
from vaedist.data.provenance import SOURCES_NAME
from vaedist.data.manifest import Manifest, SplitEntry
from vaedist.data.shards import (IMAGE_EXT, LABEL_EXT, commit_prepare, discard_partials, write_shard,
                                 write_split_file)

SKIPPED_LISTED = 1000  # the manifest lists this many skipped files by name (and counts them all)


class _SourcesFile:
    """A split's sources.parquet, written a row group per shard (so its bytes depend on the rows
    alone) into a local temporary file, uploaded when finished."""

    def __init__(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        fd, self.path = tempfile.mkstemp(prefix="vaedist-sources-", suffix=".parquet")
        os.close(fd)
        schema = pa.schema([("index", pa.int64()), ("source", pa.string())])
        self.writer = pq.ParquetWriter(self.path, schema, compression="zstd", write_statistics=False,
                                       store_schema=False)

    def write(self, first_index: int, sources: np.ndarray) -> None:
        pa = self._pa
        self.writer.write_table(pa.table({
            "index": pa.array(np.arange(first_index, first_index + len(sources), dtype=np.int64)),
            "source": pa.array(sources.tolist(), pa.string())}))

    def finish(self) -> bytes:
        self.writer.close()
        with open(self.path, "rb") as f:
            data = f.read()
        os.unlink(self.path)
        return data

    def abandon(self) -> None:
        self.writer.close()
        if os.path.exists(self.path):
            os.unlink(self.path)


class ShardAssembler:
    """add(batch) for each task's batch in order; finish(plan, transform) -> the manifest."""

    def __init__(self, out_dir: str, samples_per_shard: int):
        self.out_dir, self.samples_per_shard = out_dir, samples_per_shard
        self.pending = {s: [] for s in SPLITS}       # [(images, labels, sources)] not yet in a shard
        self.pending_rows = dict.fromkeys(SPLITS, 0)
        self.written = dict.fromkeys(SPLITS, 0)      # datapoints in shards so far = the next index
        self.shards = {s: [] for s in SPLITS}
        self.sources = {s: _SourcesFile() for s in SPLITS}
        self.shape, self.first_source = None, None   # the first decoded image's [H, W, C] and source
        self.labelled, self.max_label = None, -1
        self.skipped, self.num_skipped = [], 0
        for split in SPLITS:
            storage.makedirs(storage.join(out_dir, split))

    def add(self, batch: dict[str, np.ndarray]) -> int:
        """Take one batch (in task order); returns its number of rows (decoded or skipped)."""
        errors = batch["error"]
        bad = np.fromiter((bool(e) for e in errors), bool, len(errors))
        if bad.any():
            for source, error in zip(batch["source"][bad], errors[bad]):
                if len(self.skipped) < SKIPPED_LISTED:
                    self.skipped.append({"source": str(source), "error": str(error)})
            self.num_skipped += int(bad.sum())
        good = ~bad
        images, labels, sources, split = (batch["image"][good], batch["label"][good], batch["source"][good],
                                          batch["split"][good])
        if len(images):
            self._check(images, labels, sources)
        for code, name in enumerate(SPLITS):
            mine = split == code
            if mine.any():
                self.pending[name].append((images[mine], labels[mine], sources[mine]))
                self.pending_rows[name] += int(mine.sum())
                while self.pending_rows[name] >= self.samples_per_shard:
                    self._flush(name, self.samples_per_shard)
        return len(errors)

    def _check(self, images: np.ndarray, labels: np.ndarray, sources: np.ndarray) -> None:
        if self.shape is None:
            self.shape, self.first_source = tuple(images.shape[1:]), str(sources[0])
        elif tuple(images.shape[1:]) != self.shape:
            raise DataError(images_differ(self.first_source, self.shape, str(sources[0]), tuple(images.shape[1:])))
        unlabelled = labels == UNLABELLED
        if self.labelled is None:
            self.labelled = not bool(unlabelled[0])
        mismatch = unlabelled if self.labelled else ~unlabelled
        if mismatch.any():
            which = sources[int(np.argmax(mismatch))]
            raise DataError(f"{which} has {'no ' if self.labelled else 'a '}label but {self.first_source} "
                            f"{'has one' if self.labelled else 'has none'}: label every datapoint or none")
        self.max_label = max(self.max_label, int(labels.max()))

    def _flush(self, split: str, n: int) -> None:
        """Write the next shard of `split` from its first n pending rows."""
        parts = self.pending[split]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        sources = np.concatenate([p[2] for p in parts])
        first = self.written[split]
        stored = images[:n, ..., 0] if images.shape[-1] == 1 else images[:n]  # the stored shape: (H, W) for grey
        self.shards[split].append(write_shard(self.out_dir, split, first // self.samples_per_shard, first,
                                              stored, labels[:n]))
        self.sources[split].write(first, sources[:n])
        self.written[split] += n
        rest = len(labels) - n
        self.pending[split] = [(images[n:], labels[n:], sources[n:])] if rest else []
        self.pending_rows[split] = rest

    def finish(self, plan: SourcePlan, transform: ImageTransform) -> Manifest:
        """Write the last shards, the sources files and the manifest; returns the manifest."""
        for split in SPLITS:
            if self.pending_rows[split]:
                self._flush(split, self.pending_rows[split])
        if self.shape is None:
            raise DataError(f"{plan.location}: no image could be decoded ({self.num_skipped} skipped, e.g. "
                            f"{self.skipped[0]['source'] if self.skipped else 'none'})")
        for split in SPLITS:
            if not self.written[split]:
                self.abandon()
                rule = plan.record.get("split", {})
                raise DataError(f"{plan.location}: the {split} split is empty (split rule: {rule}); "
                                "add data, change data.test_fraction, or give the splits")
        splits = {}
        for split in SPLITS:
            sources = write_split_file(self.out_dir, split, SOURCES_NAME, self.sources[split].finish())
            splits[split] = SplitEntry(num_samples=self.written[split], shards=tuple(self.shards[split]),
                                       sources=sources)
        if plan.class_names is not None:
            num_classes, class_names = len(plan.class_names), plan.class_names
        else:
            num_classes, class_names = (self.max_label + 1 if self.labelled else 0), None
        info = DatasetInfo(plan.name, self.shape, class_names, num_classes)
        manifest = Manifest(dataset=info, splits=splits, samples_per_shard=self.samples_per_shard,
                            source={**plan.record, "transform": transform.describe(self.shape),
                                    "skipped": self.skipped, "num_skipped": self.num_skipped},
                            members={"image": IMAGE_EXT, "label": LABEL_EXT})
        commit_prepare(self.out_dir, manifest)
        return manifest

    def abandon(self) -> None:
        for f in self.sources.values():
            f.abandon()
        discard_partials(self.out_dir)
