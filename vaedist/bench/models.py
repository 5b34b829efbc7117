"""`vaedist bench models`: training samples/s of the conv family on 28x28x1 and 32x32x3 images, through
Ray Train (one worker, shards) and through the plain loop (in-memory tensors, no Ray), in one run,
with `vaedist bench train`'s ratio method for each image shape.

    vaedist bench models --epochs 3 --steps 30

28x28x1: the MNIST shards of data.shards_dir. 32x32x3: a colour shard set made once from them by
the project's own arrays source (vaedist/prepare.py): each digit padded to 32x32 and drawn in a
colour per class on a background per datapoint, written to an .npz and prepared into shards (cached
beside the MNIST shards as <shards_dir>-colour32). Only the speed is measured, so the pixels need
to be neither natural nor learnable; they are deterministic.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

import numpy as np

from vaedist import storage
from vaedist.config import Config, config_from_dict
from vaedist.data import load_split_arrays, read_manifest

COLOUR_SUFFIX = "-colour32"


def colour_images(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """[N, 28, 28] grey digits -> [N, 32, 32, 3]: padded by 2, the stroke in a colour per class
    blended over a background colour per datapoint (a hash of its index)."""
    grey = np.pad(images.reshape(-1, 28, 28), ((0, 0), (2, 2), (2, 2))).astype(np.float32)[..., None] / 255
    hues = np.array([[230, 60, 60], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.float32)
    stroke = hues[labels % 10][:, None, None, :]
    background = ((indices.astype(np.uint64)[:, None] * np.array([2654435761, 40503, 2246822519], np.uint64))
                  % 97).astype(np.float32)[:, None, None, :]
    return np.clip(grey * stroke + (1 - grey) * background, 0, 255).round().astype(np.uint8)


def colour_shards(mnist_shards: str, echo: Callable[[str], None] = print) -> str:
    """The 32x32x3 shard set made from the MNIST shards (once; reused while its manifest exists)."""
    from vaedist.prepare import prepare_external

    out = mnist_shards.rstrip("/") + COLOUR_SUFFIX
    if storage.exists(storage.join(out, "manifest.json")):
        return out
    manifest = read_manifest(mnist_shards)
    info = manifest.dataset
    arrays = {}
    for split, key in (("train", "train"), ("test", "test")):
        shards = manifest.split(split).shards
        indices, images, labels = load_split_arrays([storage.join(mnist_shards, s.path) for s in shards],
                                                    [s.num_samples for s in shards], info)
        arrays[f"x_{key}"], arrays[f"y_{key}"] = colour_images(images, labels, indices), labels
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "colour32.npz")
        np.savez(path, **arrays)
        cfg = config_from_dict({}, ["data.source=arrays", f"data.source_path={path}", "data.samples_per_shard=2500"])
        prepare_external(cfg, out, progress=False, use_ray=False)
    echo(f"wrote {out}: {len(arrays['y_train']):,} + {len(arrays['y_test']):,} 32x32x3 images")
    return out


SHAPES = ("28x28x1", "32x32x3")


def bench_models(cfg: Config, epochs: int, steps: int, shapes: tuple[str, ...] = SHAPES,
                 echo: Callable[[str], None] = print) -> dict[str, dict]:
    """For each image shape, bench.train's (b), (a), (b) with the model of cfg.model (the conv
    family in configs/conv.yaml), max `steps` optimiser steps per epoch; returns each shape's
    samples/s and ratio."""
    from vaedist.bench.train import bench_train

    mnist = storage.absolute(cfg.data.shards_dir)
    common = [f"train.max_steps_per_epoch={steps}", "data.max_test_shards=1", "train.num_samples_iw_final=0"]
    cases = {"28x28x1": lambda: [f"data.shards_dir={mnist}"],
             "32x32x3": lambda: [f"data.shards_dir={colour_shards(mnist, echo)}", "data.source=arrays",
                                 f"data.source_path={colour_shards(mnist, echo)}"]}
    results = {}
    for name in shapes:
        overrides = cases[name]()
        echo(f"--- {name}")
        case = config_from_dict(cfg.to_dict(), common + overrides)
        results[name] = bench_train(case, epochs, repeats=1, echo=echo)
    echo("image shape | Ray Train samples/s | plain loop samples/s | ratio")
    for name, r in results.items():
        echo(f"{name} | {r['ray_samples_per_s']:,.0f} | {r['plain_samples_per_s']:,.0f} | {r['ratio']:.3f}")
    return results
