"""The datasets for vaedist: sources, WebDataset shards, binarisation. numpy, torch and tarfile; no Ray.

    manifest = prepare_shards("outputs/shards", "fashion-mnist", source_dir="/data/fashion-mnist")
    verify_shards("outputs/shards")
    info = read_manifest("outputs/shards").dataset                # name, image shape, class names
    indices, images, labels = load_split_arrays(shard_paths("outputs/shards", "train"), info=info)

common.py    splits, the datapoint key, DatasetInfo, DataError
sources.py   the built-in datasets: MNIST and Fashion-MNIST (local IDX files checked by md5, or
             torchvision's download) and mnist8m (deformed MNIST, deform.py)
manifest.py  the shard manifest as a typed record (Manifest): its one reader and writer
shards.py    the WebDataset shards: reproducible writing, verification, the fast reader
provenance.py  where each datapoint came from: read_sources(shards_dir, manifest, split)
binarize.py  dynamic (training) and fixed per-datapoint (evaluation) Bernoulli binarisation

binarize (torch) is imported on first use, so that the shard reader, which Ray Data's decode tasks
run, starts without importing torch.
"""

from vaedist.data.common import (FORMAT_VERSION, MNIST, MNIST_NUM_SAMPLES, MNIST_SHAPE, SPLITS, DataError,
                                 DatasetInfo, key_for, parse_key)
from vaedist.data.manifest import (MANIFEST_NAME, FileEntry, Manifest, ShardEntry, SplitEntry, manifest_hash,
                                   read_manifest)
from vaedist.data.shards import (IMAGE_EXT, LABEL_EXT, iter_shard, load_split_arrays, prepare_shards,
                                 read_checked_shard, shard_paths, verify_shards)
from vaedist.data.provenance import SOURCES_NAME, read_sources
from vaedist.data.sources import (DATASETS, FASHION_MNIST, MNIST_FILES, MNIST_MD5, dataset_info, load_idx, load_mnist,
                                  open_split)

_LAZY = {"dynamic_binarize", "fixed_binarize"}


def __getattr__(name: str):
    if name in _LAZY:
        from vaedist.data import binarize

        return getattr(binarize, name)
    raise AttributeError(f"module 'vaedist.data' has no attribute {name!r}")


__all__ = [
    "DATASETS", "FASHION_MNIST", "FORMAT_VERSION", "IMAGE_EXT", "LABEL_EXT", "MANIFEST_NAME", "MNIST", "MNIST_FILES",
    "MNIST_MD5", "MNIST_NUM_SAMPLES", "MNIST_SHAPE", "SPLITS", "DataError", "DatasetInfo", "FileEntry", "Manifest",
    "ShardEntry", "SplitEntry", "dataset_info", "dynamic_binarize", "fixed_binarize", "iter_shard", "key_for",
    "load_idx", "load_mnist", "load_split_arrays", "manifest_hash", "open_split", "parse_key", "prepare_shards", "read_checked_shard",
    "read_manifest", "read_sources", "SOURCES_NAME", "shard_paths", "verify_shards",
]
