"""MNIST for vaedist. numpy, torch and tarfile; no Ray.

    manifest = prepare_shards("outputs/shards", mnist_dir="/data/mnist")
    verify_shards("outputs/shards")
    indices, images, labels = load_split_arrays(shard_paths("outputs/shards", "train"))

common.py    splits, sizes, the datapoint key, DataError
mnist.py     the source files: local IDX (gzip or raw) checked by md5, or torchvision's download
shards.py    the WebDataset shards: reproducible writing, manifest, verification, the fast reader
binarize.py  dynamic (training) and fixed per-datapoint (evaluation) Bernoulli binarisation
"""

from vaedist.data.binarize import dynamic_binarize, fixed_binarize
from vaedist.data.common import (FORMAT_VERSION, IMAGE_SHAPE, MNIST_NUM_SAMPLES, NUM_PIXELS, SPLITS, DataError,
                                 key_for, parse_key)
from vaedist.data.mnist import MNIST_FILES, MNIST_MD5, load_mnist
from vaedist.data.shards import (IMAGE_EXT, LABEL_EXT, MANIFEST_NAME, iter_shard, load_split_arrays, manifest_hash,
                                 prepare_shards, read_checked_shard, read_manifest, shard_paths,
                                 verify_shards)

__all__ = [
    "FORMAT_VERSION", "IMAGE_EXT", "IMAGE_SHAPE", "LABEL_EXT", "MANIFEST_NAME", "MNIST_FILES", "MNIST_MD5",
    "MNIST_NUM_SAMPLES", "NUM_PIXELS", "SPLITS", "DataError", "dynamic_binarize", "fixed_binarize", "iter_shard",
    "key_for", "load_mnist", "load_split_arrays", "manifest_hash", "parse_key", "prepare_shards",
    "read_checked_shard", "read_manifest", "shard_paths", "verify_shards",
]
