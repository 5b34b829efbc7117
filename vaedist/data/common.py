"""What every part of the data layer shares: splits, the datapoint key, what a dataset is, the error type."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

SPLITS = ("train", "test")
MNIST_NUM_SAMPLES = {"train": 60000, "test": 10000}
MNIST_SHAPE = (28, 28, 1)
FORMAT_VERSION = 2  # 2: the manifest names the dataset, its image shape and class names
UNLABELLED = -1  # the label of every datapoint of an unlabelled dataset (whose num_classes is 0)


class DataError(ValueError):
    """Bad input data; the message names the file, shard and/or key."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know of a dataset: its name, the shape of one image (height, width,
    channels; uint8 grey or colour levels, channels last) and its class names (None where the
    labels speak for themselves, as MNIST's digits do). Recorded in the shards' manifest. An
    unlabelled dataset has num_classes 0 and every label is UNLABELLED (-1)."""
    name: str
    image_shape: tuple[int, int, int]
    class_names: tuple[str, ...] | None = None
    num_classes: int = 10

    def __post_init__(self) -> None:
        if len(self.image_shape) != 3 or min(self.image_shape) <= 0:
            raise ValueError(f"image_shape must be (height, width, channels) > 0, got {self.image_shape}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0: unlabelled), got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def num_pixels(self) -> int:
        h, w, c = self.image_shape
        return h * w * c

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The array shape of one image in a shard: (H, W) for one channel, as MNIST has always been
        stored, else (H, W, C)."""
        h, w, c = self.image_shape
        return (h, w) if c == 1 else (h, w, c)

    def class_name(self, label: int) -> str:
        return self.class_names[label] if self.class_names else str(label)

    def to_manifest(self) -> dict:
        return {"name": self.name, "image_shape": list(self.image_shape), "dtype": "uint8",
                "num_classes": self.num_classes,
                "class_names": list(self.class_names) if self.class_names else None}

    @classmethod
    def from_manifest(cls, entry: dict) -> "DatasetInfo":
        names = entry.get("class_names")
        return cls(name=str(entry["name"]), image_shape=tuple(int(d) for d in entry["image_shape"]),
                   class_names=tuple(names) if names else None, num_classes=int(entry["num_classes"]))


MNIST = DatasetInfo("mnist", MNIST_SHAPE)


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
