"""Binarisation: MNIST grey levels p/255 read as Bernoulli probabilities (as in Kingma & Welling's
experiments); training draws fresh pixels each epoch, evaluation a fixed draw per datapoint."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from vaedist.data.common import _check_split

def dynamic_binarize(images_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 {0, 1} of the input's shape: a fresh Bernoulli(pixel / 255) draw from `generator`
    (on the images' device; the caller seeds it from (seed, epoch))."""
    if not isinstance(images_u8, torch.Tensor) or images_u8.dtype != torch.uint8:
        raise TypeError(f"dynamic_binarize takes a uint8 tensor of grey levels, got "
                        f"{getattr(images_u8, 'dtype', type(images_u8))}")
    return torch.bernoulli(images_u8.float().div_(255), generator=generator)


_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment (the golden ratio in 64 bits)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 output function (Steele, Lea & Flood 2014) on uint64 arrays: a bijection
    that turns consecutive counters into independent-looking 64-bit values."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def fixed_binarize(images_u8, indices, split: str, seed: int = 0) -> torch.Tensor:
    """float32 {0, 1} [B, P], the same for a datapoint whatever batch it is in.

    Pixel j of datapoint (split, index) is 1 iff u < pixel / 255, where u = r / 2**32 and r is
    the top 32 bits of splitmix64(row + (j + 1) * GAMMA), row = splitmix64(stream + (index + 1) *
    GAMMA), stream = splitmix64((seed mod 2**64) XOR the first 8 bytes (big-endian) of
    sha256(split)), and j runs over the image's P values in row-major (H, W, C) order. Compared in
    integers, so it is exact on every platform. Images uint8 [B, P] or [B, H, W(, C)] and indices
    [B], numpy or torch; the result is on the images' device.
    """
    _check_split(split)
    device = images_u8.device if isinstance(images_u8, torch.Tensor) else torch.device("cpu")
    pixels, index = _as_numpy(images_u8), _as_numpy(indices)
    if pixels.dtype != np.uint8 or pixels.ndim < 2:
        raise ValueError(f"images must be uint8 [B, P] or [B, H, W(, C)], got {pixels.dtype} {list(pixels.shape)}")
    num_pixels = int(np.prod(pixels.shape[1:]))
    if index.shape != (len(pixels),) or not np.issubdtype(index.dtype, np.integer) or (index < 0).any():
        raise ValueError(f"indices must be {len(pixels)} non-negative integers, got {index.dtype} {list(index.shape)}")
    split_tag = int.from_bytes(hashlib.sha256(split.encode()).digest()[:8], "big")
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64 by design
        stream = _splitmix64(np.array([(int(seed) % 2**64) ^ split_tag], np.uint64))
        rows = _splitmix64(stream + (index.astype(np.uint64) + np.uint64(1)) * _GAMMA)
        cols = np.arange(1, num_pixels + 1, dtype=np.uint64) * _GAMMA
        r = _splitmix64(rows[:, None] + cols[None, :]) >> np.uint64(32)
    on = r * np.uint64(255) < pixels.reshape(len(pixels), num_pixels).astype(np.uint64) << np.uint64(32)
    return torch.from_numpy(on.astype(np.float32)).to(device)
