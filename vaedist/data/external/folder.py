"""The `images` source: a directory tree of image files.

    data.source: images
    data.source_path: /data/cats          # cats/tabby/001.png, cats/siamese/002.jpg, ...

Which files: every file whose extension (any case) is one of transform.IMAGE_EXTENSIONS, at any
depth; hidden files and folders (a leading '.') are passed over, and so are other files (counted in
the manifest). Order: relative paths ('/'-separated) sorted by their UTF-8 bytes.
Split: when the top level holds both train/ and test/, those are the splits (and no image may sit
outside them); otherwise the hash split of transform.is_test on the relative path.
Labels (torchvision's ImageFolder convention): the first-level subfolder under the split's root
(the folder itself, or its train/ and test/), classes numbered in sorted order of their names over
both splits; images directly in the root make the dataset unlabelled (label -1), which every image
must then be.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from vaedist.data.common import DataError
from vaedist.data.external import (SPLIT_CODES, SourcePlan, batch_from_rows, dataset_name, decode_or_mark)
from vaedist.data.external.transform import IMAGE_EXTENSIONS, BadImage, ImageTransform, decode_image, is_test

FILES_PER_TASK = 512


def _walk(root: str) -> tuple[list[str], list[str]]:
    """(image files, other files) under root, relative, sorted; hidden entries passed over."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                continue
            rel = name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/")
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(rel)
    # Code-point order is UTF-8 byte order, without a bytes copy of every name (the driver's memory
    # is the listing's; docs: performance).
    images.sort()
    others.sort()
    return images, others


class ImageFolderSource:
    kind = "images"

    @classmethod
    def from_config(cls, data_cfg) -> "ImageFolderSource":
        return cls(os.path.abspath(data_cfg.source_path), data_cfg.test_fraction)

    def __init__(self, root: str, test_fraction: float = 0.1, files_per_task: int = FILES_PER_TASK):
        self.root, self.test_fraction, self.files_per_task = root, test_fraction, files_per_task

    def plan(self) -> SourcePlan:
        root = self.root
        if not os.path.isdir(root):
            raise DataError(f"image folder {root} does not exist or is not a directory (data.source_path)")
        files, others = _walk(root)
        if not files:
            if not others:
                raise DataError(f"image folder {root} is empty: no files in it or below it")
            raise DataError(f"image folder {root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) among its "
                            f"{len(others)} files, e.g. {', '.join(others[:3])}")
        top = {f.split("/", 1)[0] for f in files if "/" in f}
        split_layout = {"train", "test"} <= top
        if split_layout:
            outside = [f for f in files if f.split("/", 1)[0] not in ("train", "test")]
            if outside:
                raise DataError(f"image folder {root} has train/ and test/ folders, so every image must be in one "
                                f"of them, but {outside[0]} is not ({len(outside)} such files)")
            split = np.array([SPLIT_CODES[f.split("/", 1)[0]] for f in files], np.int8)
            for code, name in ((0, "train"), (1, "test")):
                if not (split == code).any():  # train/ and test/ hold only other folders' files? impossible
                    raise DataError(f"image folder {root}: {name}/ holds no images")
        else:
            split = is_test(files, self.test_fraction).astype(np.int8)
            for code, name in ((0, "train"), (1, "test")):
                if not (split == code).any():
                    raise DataError(f"image folder {root}: the hash split (data.test_fraction = {self.test_fraction}) "
                                    f"puts none of its {len(files)} images in the {name} split; add images, change "
                                    "data.test_fraction, or make train/ and test/ folders")
        skip = 1 if split_layout else 0  # path components before the class folder: train/ or test/
        in_class = np.fromiter((f.count("/") > skip for f in files), bool, len(files))
        if in_class.any() and not in_class.all():
            loose, foldered = files[int(np.argmin(in_class))], files[int(np.argmax(in_class))]
            raise DataError(f"image folder {root}: {loose} is not in a class subfolder but {foldered} is; put every "
                            "image in a class folder (labels from folder names) or none (unlabelled)")
        if in_class.all():
            # Two passes over the names, so no list of 200k class-name strings is ever held.
            class_of = lambda f: f.split("/", skip + 1)[skip]  # noqa: E731
            class_names = tuple(sorted({class_of(f) for f in files}))
            number = {c: i for i, c in enumerate(class_names)}
            labels = np.fromiter((number[class_of(f)] for f in files), np.int64, len(files))
        else:
            class_names, labels = None, np.full(len(files), -1, np.int64)
        # A task's files as one string (NUL never appears in a path): the driver holds the plan for
        # the whole job, and one string per 512 names is a third of the memory of 512 strings.
        n = self.files_per_task
        tasks = [{"root": root, "files": "\0".join(files[i:i + n]),
                  "split": split[i:i + n].tolist(), "label": labels[i:i + n].tolist()}
                 for i in range(0, len(files), n)]
        sha = hashlib.sha256()
        for i, f in enumerate(files):
            sha.update(b"\n" + f.encode() if i else f.encode())
        digest = sha.hexdigest()
        record = {"kind": self.kind, "location": root, "num_files": len(files), "files_sha256": digest,
                  "files_sha256_of": "the sorted relative paths joined by newlines",
                  "other_files_ignored": len(others),
                  "split": {"rule": "folders train/ and test/"} if split_layout else
                  {"rule": "hash", "test_fraction": self.test_fraction,
                   "hash": "sha256 of the relative path, first 8 bytes big-endian < test_fraction * 2**64"},
                  "labels": "first-level subfolders, sorted" if class_names else "none (label -1)"}
        return SourcePlan(self.kind, dataset_name(self.kind, root), root, tasks, len(files), "image",
                          class_names, record)

    @staticmethod
    def run_task(task: dict, tf: ImageTransform, skip_bad: bool = False) -> dict[str, np.ndarray]:
        rows = []
        for rel, split, label in zip(task["files"].split("\0"), task["split"], task["label"]):
            path = os.path.join(task["root"], *rel.split("/"))

            def decode(path=path, rel=rel):
                try:
                    with open(path, "rb") as f:
                        data = f.read()
                except OSError as e:
                    raise BadImage(f"{path}: cannot read it ({e})") from None
                return decode_image(data, path, tf)

            image, error = decode_or_mark(decode, path, skip_bad)
            rows.append((split, image, label, rel, error))
        return batch_from_rows(rows)

