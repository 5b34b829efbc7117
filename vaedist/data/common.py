"""What every part of the data layer shares: splits, sizes, the datapoint key, the error type."""

from __future__ import annotations

import operator
import re

SPLITS = ("train", "test")
MNIST_NUM_SAMPLES = {"train": 60000, "test": 10000}
IMAGE_SHAPE = (28, 28)
NUM_PIXELS = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
FORMAT_VERSION = 1


class DataError(ValueError):
    """Bad input data; the message names the file, shard and/or key."""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


_KEY_RE = re.compile(rf"({'|'.join(SPLITS)})-(\d{{5,}})")


def key_for(split: str, index: int) -> str:
    """The stable WebDataset __key__ of a datapoint, e.g. "train-00042" (no dots: tar names split there)."""
    _check_split(split)
    index = operator.index(index)
    if index < 0:
        raise ValueError(f"datapoint index must be >= 0, got {index}")
    return f"{split}-{index:05d}"


def parse_key(key: str) -> tuple[str, int]:
    """(split, index) from a key made by key_for; DataError on anything else."""
    match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if match is None or key_for(match[1], int(match[2])) != key:
        raise DataError(f"malformed key {key!r}: expected <split>-<index>, e.g. {key_for('train', 42)!r}")
    return match[1], int(match[2])
