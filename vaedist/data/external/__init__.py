"""Your own images as vaedist shards: a folder of image files, existing WebDataset shards, or NumPy
arrays. No Ray here: the prepare job (vaedist/prepare.py) runs these sources' tasks in parallel, and
the same tasks run in a plain loop (vaedist bench prepare's baseline, the tests).

    source = open_source(cfg.data)          # ImageFolderSource, WebDatasetSource or ArraySource
    plan = source.plan()                    # on the driver: list, split, label; errors before work
    batch = source.run_task(plan.tasks[0], ImageTransform.from_config(cfg.data), skip_bad=False)
    writer = ShardAssembler(out_dir, 2500); writer.add(batch); ...; manifest = writer.finish(plan, tf)

A source lists its items on the driver in one fixed order (sorted paths, shard URLs, array rows)
and cuts them into tasks (small JSON-able dicts). A task decodes its items into one batch: columns
split (int8, 0 train / 1 test), image (uint8 [n, H, W, C]), label (int64, -1 unlabelled), source (the
provenance string, see data.provenance) and error ('' where decoded, else why not: only with
skip_bad). The shard writer takes the batches in task order and numbers each split's datapoints as
they come, so the shards depend on the items alone, not on how many workers decoded them.

folder.py     images: a directory tree of PNG, JPEG, BMP, GIF, WebP, TIFF files
webdataset.py webdataset: tar shards (local, s3://, brace patterns)
arrays.py     arrays: .npy / .npz files of uint8 images
transform.py  the one image transform (decode, composite, channels, cover-resize, centre crop) and
              the hash split
writer.py     ShardAssembler: batches in order -> shards, sources.parquet files, manifest
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vaedist.data.common import DataError
from vaedist.data.external.transform import BadImage, ImageTransform
from vaedist.registry import source_class

SPLIT_CODES = {"train": 0, "test": 1}


@dataclass
class SourcePlan:
    """What the driver knows before decoding: the tasks in order and what the manifest records."""
    kind: str
    name: str                      # the dataset's name in the manifest, e.g. "images:cats"
    location: str
    tasks: list[dict]
    num_items: int | None          # images or array rows to decode; None where unknown (webdataset)
    progress_unit: str             # what a task's progress counts: "image" or "shard"
    class_names: tuple[str, ...] | None = None
    record: dict = field(default_factory=dict)  # the manifest's source entry: files, split rule, labels


def dataset_name(kind: str, location: str) -> str:
    """E.g. images:cats for the folder /data/cats; the last path component without extension."""
    base = location.rstrip("/").split("/")[-1] or location
    return f"{kind}:{base.split('.')[0] if kind != 'images' else base}"


def batch_from_rows(rows: list[tuple[int, np.ndarray | None, int, str, str]]) -> dict[str, np.ndarray]:
    """One batch from (split code, image [H, W, C] or None, label, source, error) in order. Every
    decoded image of a batch must have the same shape (an unset data.image_size / data.channels takes
    the images' own, which must then agree): else DataError naming two of them."""
    good = [r for r in rows if r[1] is not None]
    shape = good[0][1].shape if good else (1, 1, 1)
    for r in good:
        if r[1].shape != shape:
            raise DataError(images_differ(good[0][3], shape, r[3], r[1].shape))
    images = np.zeros((len(rows), *shape), np.uint8)
    for i, r in enumerate(rows):
        if r[1] is not None:
            images[i] = r[1]
    return {"split": np.array([r[0] for r in rows], np.int8), "image": images,
            "label": np.array([r[2] for r in rows], np.int64),
            "source": np.array([r[3] for r in rows], dtype=object),
            "error": np.array([r[4] for r in rows], dtype=object)}


def concat_batches(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One batch of the rows of several, in order; their decoded images must have one shape (else
    DataError naming two). A batch of only undecodable rows takes the others' shape."""
    if len(batches) == 1:
        return batches[0]
    decoded = [(b, int(np.argmax(b["error"] == ""))) for b in batches if (b["error"] == "").any()]
    shape = decoded[0][0]["image"].shape[1:] if decoded else batches[0]["image"].shape[1:]
    for b, i in decoded:
        if b["image"].shape[1:] != shape:
            first, at = decoded[0]
            raise DataError(images_differ(first["source"][at], shape, b["source"][i], b["image"].shape[1:]))
    images = [b["image"] if b["image"].shape[1:] == shape else np.zeros((len(b["image"]), *shape), np.uint8)
              for b in batches]
    return {"image": np.concatenate(images),
            **{k: np.concatenate([b[k] for b in batches]) for k in ("split", "label", "source", "error")}}


def images_differ(a: str, shape_a: tuple, b: str, shape_b: tuple) -> str:
    fmt = lambda s: "x".join(map(str, s))  # noqa: E731
    return (f"images differ in size or channels: {a} is {fmt(shape_a)} (H x W x C) but {b} is {fmt(shape_b)}; "
            "set data.image_size [H, W] and data.channels (1 or 3) to bring every image to one shape")


def decode_or_mark(decode, name: str, skip_bad: bool):
    """(image, '') or, for a BadImage with skip_bad, (None, its message); without skip_bad it raises."""
    try:
        return decode(), ""
    except BadImage as e:
        if not skip_bad:
            raise
        return None, str(e)


def open_source(data_cfg):
    """The source data.source names (vaedist.registry.EXTERNAL_SOURCES), with its options
    (data.source_path, ...)."""
    try:
        cls = source_class(data_cfg.source)
    except ValueError as e:
        raise DataError(str(e)) from None
    return cls.from_config(data_cfg)


__all__ = ["SPLIT_CODES", "BadImage", "ImageTransform", "SourcePlan", "batch_from_rows", "concat_batches",
           "dataset_name", "decode_or_mark", "images_differ", "open_source"]
