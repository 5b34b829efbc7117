"""The `arrays` source: NumPy files of uint8 images [N, H, W] or [N, H, W, C] (C 1, 3 or 4).

    data.source: arrays
    data.source_path: /data/digits.npz        # a .npy or .npz file, a folder of them, or a brace pattern

Files are taken in sorted order (a folder: its .npy and .npz files). In an .npz, the images are the
member data.image_key, else `images`, else `x`, else its only member; the labels data.label_key,
else `labels`, else `y`, else none (label -1). An .npz with x_train and x_test (Keras's layout, e.g.
mnist.npz) gives the split itself: x_train/y_train and x_test/y_test. Otherwise the split is
data.train_pattern / data.test_pattern, or the hash rule on file name + '#' + row (.npy) or file
name + '#' + key + '[' + row + ']' (.npz). A .npy holds images only (unlabelled). Local files only.
Provenance: the file's absolute path + '#' + row, or + '#' + key + '[' + row + ']'.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import numpy as np

from vaedist.data.common import DataError
from vaedist.data.external import SPLIT_CODES, SourcePlan, batch_from_rows, dataset_name, decode_or_mark
from vaedist.data.external.transform import ImageTransform, convert_array, is_test
from vaedist.data.external.webdataset import expand_braces

ROWS_PER_TASK = 4096
ARRAY_EXTENSIONS = (".npy", ".npz")


def _files(pattern: str) -> list[str]:
    out = []
    for path in expand_braces(pattern):
        path = os.path.abspath(path)
        if os.path.isdir(path):
            out += [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(ARRAY_EXTENSIONS)]
        elif os.path.isfile(path):
            if not path.endswith(ARRAY_EXTENSIONS):
                raise DataError(f"array file {path} is neither .npy nor .npz")
            out.append(path)
        else:
            raise DataError(f"array file or folder {path} does not exist (from {pattern})")
    if not out:
        raise DataError(f"{pattern} holds no .npy or .npz files")
    return out


def _npz_header(path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an .npz member, from its header alone (nothing decompressed beyond it)."""
    with zipfile.ZipFile(path) as zf, zf.open(key + ".npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return tuple(shape), dtype


def _load(path: str, key: str | None, mmap: bool = True) -> np.ndarray:
    if key is None:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    with np.load(path, allow_pickle=False) as z:
        return z[key]


class ArraySource:
    kind = "arrays"

    @classmethod
    def from_config(cls, data_cfg) -> "ArraySource":
        return cls(data_cfg.source_path, data_cfg.train_pattern, data_cfg.test_pattern, data_cfg.image_key,
                   data_cfg.label_key, data_cfg.test_fraction)

    def __init__(self, path: str | None, train_pattern: str | None = None, test_pattern: str | None = None,
                 image_key: str | None = None, label_key: str | None = None, test_fraction: float = 0.1,
                 rows_per_task: int = ROWS_PER_TASK):
        self.path, self.train_pattern, self.test_pattern = path, train_pattern, test_pattern
        self.image_key, self.label_key, self.test_fraction = image_key, label_key, test_fraction
        self.rows_per_task = rows_per_task

    def _members(self, path: str, split: int | None) -> list[tuple[str | None, str | None, int | None]]:
        """(image member, label member, split) of one file; None members for .npy."""
        if path.endswith(".npy"):
            return [(None, None, split)]
        try:
            with zipfile.ZipFile(path) as zf:
                keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"array file {path}: not a readable .npz ({e})") from None
        def need(key):
            if key not in keys:
                raise DataError(f"array file {path} has no member {key!r}; its members: {', '.join(keys)}")
            return key
        label = need(self.label_key) if self.label_key else None
        if self.image_key:
            return [(need(self.image_key), label, split)]
        if split is None and {"x_train", "x_test"} <= set(keys):
            return [(f"x_{s}", label or (f"y_{s}" if f"y_{s}" in keys else None), SPLIT_CODES[s])
                    for s in ("train", "test")]
        image = next((k for k in ("images", "x") if k in keys), keys[0] if len(keys) == 1 else None)
        if image is None:
            raise DataError(f"array file {path}: which member holds the images? Its members: {', '.join(keys)}; "
                            "set data.image_key")
        return [(image, label or next((k for k in ("labels", "y") if k in keys), None), split)]

    def plan(self) -> SourcePlan:
        if self.path is not None:
            files, location = [(f, None) for f in _files(self.path)], self.path
        else:
            files = [(f, SPLIT_CODES[s]) for s, p in (("train", self.train_pattern), ("test", self.test_pattern))
                     for f in _files(p)]
            location = f"train {self.train_pattern}, test {self.test_pattern}"
        tasks, total, labelled, members_seen = [], 0, set(), []
        for path, split in files:
            for image_key, label_key, member_split in self._members(path, split):
                where = path if image_key is None else f"{path}, member {image_key!r}"
                try:
                    shape, dtype = (_npz_header(path, image_key) if image_key else
                                    (_load(path, None).shape, _load(path, None).dtype))
                except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                    raise DataError(f"array file {where}: cannot read it ({e})") from None
                if dtype != np.uint8 or len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] not in (1, 3, 4)):
                    raise DataError(f"array file {where}: {dtype} {list(shape)}, expected uint8 images [N, H, W] or "
                                    "[N, H, W, C] with C 1, 3 or 4")
                if label_key is not None:
                    labels = _load(path, label_key)
                    if labels.shape != (shape[0],) or labels.dtype.kind not in "iu" or (len(labels) and labels.min() < 0):
                        raise DataError(f"array file {path}, labels {label_key!r}: {labels.dtype} {list(labels.shape)}, "
                                        f"expected {shape[0]} integer class numbers >= 0 (one per image)")
                labelled.add(label_key is not None)
                members_seen.append({"file": path, "images": image_key, "labels": label_key, "rows": shape[0]})
                for start in range(0, shape[0], self.rows_per_task):
                    tasks.append({"file": path, "key": image_key, "label_key": label_key, "split": member_split,
                                  "start": start, "stop": min(start + self.rows_per_task, shape[0]),
                                  "test_fraction": self.test_fraction})
                total += shape[0]
        if len(labelled) > 1:
            raise DataError(f"{location}: some arrays have labels and some not; give every file labels or none")
        if total == 0:
            raise DataError(f"{location}: the arrays hold no images")
        listing = "\n".join(f"{m['file']}#{m['images'] or ''}" for m in members_seen)
        record = {"kind": self.kind, "location": location, "num_files": len(files), "arrays": members_seen,
                  "files_sha256": hashlib.sha256(listing.encode()).hexdigest(),
                  "files_sha256_of": "'<file>#<member>' of each array in order, joined by newlines",
                  "split": {"rule": "hash", "test_fraction": self.test_fraction,
                            "hash": "sha256 of file name + '#' + row (npz: + '#' + key + '[' + row + ']'), "
                                    "first 8 bytes big-endian < test_fraction * 2**64"}
                  if any(t["split"] is None for t in tasks) else {"rule": "patterns or x_train/x_test members"},
                  "labels": "arrays" if labelled == {True} else "none (label -1)"}
        return SourcePlan(self.kind, dataset_name(self.kind, files[0][0]), location, tasks, total, "image", None, record)

    @staticmethod
    def run_task(task: dict, tf: ImageTransform, skip_bad: bool = False) -> dict[str, np.ndarray]:
        path, key, start, stop = task["file"], task["key"], task["start"], task["stop"]
        images = np.asarray(_load(path, key)[start:stop])
        labels = (np.asarray(_load(path, task["label_key"])[start:stop], np.int64) if task["label_key"]
                  else np.full(stop - start, -1, np.int64))
        name = os.path.basename(path)
        sources = [f"{path}#{row}" if key is None else f"{path}#{key}[{row}]" for row in range(start, stop)]
        if task["split"] is not None:
            split = [task["split"]] * len(sources)
        else:
            hashed = [f"{name}#{row}" if key is None else f"{name}#{key}[{row}]" for row in range(start, stop)]
            split = is_test(hashed, task["test_fraction"]).astype(int).tolist()
        rows = []
        for image, label, source, s in zip(images, labels, sources, split):
            converted, error = decode_or_mark(lambda: convert_array(image, source, tf), source, skip_bad)
            rows.append((s, converted, int(label), source, error))
        return batch_from_rows(rows)
