"""Where each datapoint came from: one string per (split, index), so a user can open the image behind
an outlier.

    sources = read_sources("outputs/shards", read_manifest("outputs/shards"), "test")  # object array
    sources[42]            # 'cats/train/tabby/0042.png', 's3://b/shards-000001.tar#000123', ...

What the strings are, per source kind (the manifest's `source.kind`):
- images:      the file's path relative to the source folder, '/'-separated (`train/cat/001.png`)
- webdataset:  the shard's URL (absolute local path or s3://...) + '#' + the sample's __key__
- arrays:      the array file's absolute path + '#' + row (`.npy`), or + '#' + key + '[' + row + ']'
               (`.npz`, whose member key says which array)
- built-ins (idx, torchvision): synthesised, `<dataset>/<IDX image file>#<row>`, e.g.
               `mnist/t10k-images-idx3-ubyte#42`; mnist8m's training index i is variant v = i // 60000
               of MNIST row r = i % 60000: `mnist/train-images-idx3-ubyte#r` for v = 0 (the
               original), `mnist/train-images-idx3-ubyte#r:vV` for the deformations.

Storage: the external sources' prepare writes <shards_dir>/<split>/sources.parquet (columns `index`
int64 = 0..n-1 in order and `source` string) and records its path, size and sha256 in the manifest's
split entry (`"sources": {"path", "bytes", "sha256"}`); the built-ins need no file.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np

from vaedist import storage
from vaedist.data.common import DataError, _check_split
from vaedist.data.manifest import Manifest, SplitEntry

SOURCES_NAME = "sources.parquet"
BUILTIN_KINDS = ("idx", "torchvision")
_MNIST_TRAIN_ROWS = 60000
_IDX_IMAGE_FILE = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def _builtin_sources(manifest: Manifest, split: str, indices: np.ndarray) -> np.ndarray:
    dataset = manifest.dataset.name
    base = "mnist" if dataset == "mnist8m" else dataset
    prefix = f"{base}/{_IDX_IMAGE_FILE[split]}#"
    out = np.empty(len(indices), dtype=object)
    if dataset == "mnist8m" and split == "train":
        out[:] = [f"{prefix}{i % _MNIST_TRAIN_ROWS}:v{i // _MNIST_TRAIN_ROWS}" if i >= _MNIST_TRAIN_ROWS
                  else f"{prefix}{i}" for i in indices.tolist()]
    else:
        out[:] = [f"{prefix}{i}" for i in indices.tolist()]
    return out


def _read_sources_file(shards_dir: str, entry: SplitEntry, split: str) -> np.ndarray:
    import pyarrow.parquet as pq

    meta = entry.sources
    if meta is None:
        raise DataError(f"{shards_dir}: the manifest's {split} split records no sources file (prepared by an "
                        "older vaedist?); prepare the shards again")
    path = storage.join(shards_dir, *meta.path.split("/"))
    if not storage.exists(path):
        raise DataError(f"sources file {path} is missing")
    data = storage.read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != meta.bytes or digest != meta.sha256:
        raise DataError(f"sources file {path}: {len(data)} bytes, sha256 {digest}, but the manifest says "
                        f"{meta.bytes} bytes, {meta.sha256} (corrupt or overwritten)")
    table = pq.read_table(io.BytesIO(data))
    index = table.column("index").to_numpy()
    if len(index) != entry.num_samples or not np.array_equal(index, np.arange(len(index))):
        raise DataError(f"sources file {path}: rows are not indices 0..{entry.num_samples - 1} in order")
    return np.asarray(table.column("source").to_pylist(), dtype=object)


def read_sources(shards_dir: str, manifest: Manifest, split: str, indices: np.ndarray | None = None) -> np.ndarray:
    """A numpy object array of str: element j is the source of datapoint `indices[j]` of `split`
    (indices None: of every datapoint, element i for index i). manifest: read_manifest(shards_dir).

    External sources (images, webdataset, arrays) read <split>/sources.parquet, checked against the
    manifest's size and sha256; built-in datasets synthesise the strings (see the module docstring).
    DataError names the file on a missing, corrupt or short sources file and on an index out of range.
    """
    _check_split(split)
    entry = manifest.split(split)
    n = entry.num_samples
    idx = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise DataError(f"{shards_dir}: {split} index {bad} is outside 0..{n - 1}")
    kind = manifest.source_kind
    if kind is None or kind in BUILTIN_KINDS:  # format 1 manifests (MNIST) have no source kind
        return _builtin_sources(manifest, split, idx)
    every = _read_sources_file(shards_dir, entry, split)
    return every if indices is None else every[idx]
