"""mnist8m-style deformations of MNIST digits, deterministic per datapoint key. numpy and torch; no Ray.

    out = deform(images_u8, indices, seed=0)     # uint8 [B, 28, 28] -> uint8 [B, 28, 28]

As in the "infinite MNIST" of Loosli, Canu & Bottou (2007), each training image is the seed of many:
mnist8m's index i is a deformation of MNIST training image i % 60000 (data.sources.open_split).
Image b's deformation is drawn from the counter-based per-key generator vaedist.rng.keyed_normal,
so it depends only on (seed, indices[b]): not on the batch, its order or its size.

Scheme DEFORM_SCHEME = "elastic-a30-s6-affine-v1+" + vaedist.rng.NOISE_SCHEME, for 28 x 28 images.
Coordinates are in pixels, x the column (to the right), y the row (downwards), pixel centres at
0 .. 27, c = (13.5, 13.5).

1. Normals: eps = keyed_normal(indices, seed=seed, split="train", stream=STREAM_DEFORM = 3,
   num_samples=1, dim=1574)[:, 0] in float32 (NOISE_SCHEME of vaedist.rng), then float64; eps[d] drives
       d = 0           r  = 0.0437 * clip(eps, -2, 2)     rotation by theta = 2 atan(r), |theta| <= 10.0 deg
       d = 1, 2        sx = 1 + 0.05 * clip(eps, -2, 2)   horizontal scale, in [0.9, 1.1];
                       sy likewise from eps[2]            vertical scale
       d = 3           h  = 0.075 * clip(eps, -2, 2)      horizontal shear x += h y, |h| <= 0.15
       d = 4, 5        tx, ty = 0.5 * clip(eps, -2, 2)    translation, at most 1 px each way
       d = 6 .. 789    Ex[y, x] = eps[6 + 28 y + x]       the elastic field's x part (C order)
       d = 790 .. 1573 Ey[y, x] = eps[790 + 28 y + x]     its y part
   clip(e, -2, 2) = min(max(e, -2), 2): each affine parameter is a normal with the standard deviation
   above, cut at two of them. The rotation is drawn as r = tan(theta / 2) so that its matrix needs only
   +, * and /: cos theta = (1 - r^2) / (1 + r^2), sin theta = 2 r / (1 + r^2).
2. Elastic field (Simard, Steinkraus & Platt 2003): i.i.d. per-pixel displacements smoothed by a
   Gaussian of sigma = 6 px and scaled by alpha = 30. The kernel g(k) = exp(-k^2 / (2 sigma^2)) for
   |k| <= 24 = 4 sigma, divided by its sum, becomes a 28 x 28 matrix with scipy.ndimage's "reflect"
   boundary (... b a | a b ... y z | z y ...): G[i, j] = the sum of g(k) over the k with
   reflect(i + k) = j, and W = round(G * 2**24). The field is smoothed in integer arithmetic, so no
   summation order can change it (every intermediate is an integer below 2**44, exact in float64):
       Q  = round(E * 2**16)                    E = Ex or Ey, |Q| < 2**19
       P  = round(Q W^T / 2**24)                along x
       S  = round(W P / 2**24)                  along y; every rounding is half to even
       dx = (alpha / sqrt 3) * Sx / 2**16,  dy likewise from Sy (float64, in pixels).
   Simard draws U(-1, 1) per pixel; N(0, 1) / sqrt 3 has its variance, so alpha means the same.
   The displacement's standard deviation is 0.8 px at the centre, 1.1 px over the image (the
   reflected edges add to it).
   Strength: with Simard's sigma = 4, alpha = 34 and rotations and scalings of up to 15 deg and 15%
   (Ciresan et al. 2010), a 1-nearest-neighbour classifier against MNIST's training images gets over
   a third of deformed test digits wrong (over a quarter even after centring them by centre of mass),
   and some become shapes a reader would hesitate over. mnist8m should stay close to MNIST, so this
   scheme takes the smooth end of their sigma and milder affine ranges: the same classifier, after
   centring, labels over 90% right (tests/unit/test_deform.py).
3. Sampling: the digit is scaled by (sx, sy), sheared, rotated by theta and translated by
   (tx, ty) about c, then displaced by the elastic field: output pixel p = (x, y) reads the input at
       q = c + M (p + d(p) - c - t),    M = (Rot(theta) Shear(h) Scale(sx, sy))^-1,
   Rot = [[cos, -sin], [sin, cos]], Shear = [[1, h], [0, 1]], Scale = diag(sx, sy), so
       M = [[(cos + h sin) / sx, (sin - h cos) / sx], [-sin / sy, cos / sy]]
   in float64, elementwise. q is normalised as (2 q + 1) / 28 - 1, cast to float32, and the image
   (as float32 grey levels) read by torch.nn.functional.grid_sample(mode="bilinear",
   padding_mode="zeros", align_corners=False): bilinear interpolation, zero outside the image.
4. Output: round half to even, clip to [0, 255], uint8.

Every step after the normals is elementwise, an exact integer product or grid_sample, whose CPU
kernel computes each output pixel the same way wherever it lies in the batch; so the bytes are
batch-invariant on the CPU (the tests check it).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from vaedist.rng import NOISE_SCHEME, keyed_normal

# The noise scheme is part of the name: the images change when either does.
DEFORM_SCHEME = f"elastic-a30-s6-affine-v1+{NOISE_SCHEME}"
STREAM_DEFORM = 3  # evaluate.py's streams are 0, 1, 2 (vaedist.rng)
SPLIT = "train"    # mnist8m deforms training images only; its test split is MNIST's
SIZE = 28

# Affine ranges: parameter = scale * clip(eps, -CLIP, CLIP) (module docstring, step 1).
CLIP = 2.0
ROT_HALF_TAN = 0.0437  # r = tan(theta / 2); 2 atan(0.0874) = 10.0 deg
SCALE = 0.05           # sx, sy in [0.9, 1.1]
SHEAR = 0.075          # |h| <= 0.15
SHIFT_PX = 0.5         # |tx|, |ty| <= 1 px
# Elastic field (Simard et al. 2003).
SIGMA_PX = 6.0
ALPHA = 30.0
RADIUS_PX = 24         # kernel truncated at 4 sigma, as scipy.ndimage.gaussian_filter's default
FIELD_BITS, KERNEL_BITS = 16, 24

NUM_AFFINE = 6
DIM = NUM_AFFINE + 2 * SIZE * SIZE   # 1574 normals per image


@functools.lru_cache(maxsize=1)
def _kernel_matrix() -> torch.Tensor:
    """W = round(G * 2**24), float64 [28, 28]: the truncated, normalised Gaussian with reflect boundary."""
    taps = [math.exp(-k * k / (2 * SIGMA_PX**2)) for k in range(-RADIUS_PX, RADIUS_PX + 1)]
    total = math.fsum(taps)
    g = np.zeros((SIZE, SIZE))
    for i in range(SIZE):
        for k, tap in zip(range(-RADIUS_PX, RADIUS_PX + 1), taps):
            j = i + k
            while not 0 <= j < SIZE:   # scipy's "reflect": the edge pixel repeats
                j = -j - 1 if j < 0 else 2 * SIZE - 1 - j
            g[i, j] += tap / total
    return torch.from_numpy(np.round(g * 2.0**KERNEL_BITS))


def _smooth(field: torch.Tensor) -> torch.Tensor:
    """Gaussian smoothing of float64 integer fields [..., 28, 28] in units of 2**-16 (step 2): exact
    integers throughout (|Q| < 2**19, W's rows sum to about 2**24), so any summation order agrees."""
    w = _kernel_matrix()
    along_x = torch.round(torch.matmul(field, w.T) * 2.0**-KERNEL_BITS)
    return torch.round(torch.matmul(w, along_x) * 2.0**-KERNEL_BITS)


def _check(images_u8, indices, seed) -> None:
    what = "deform"
    if not isinstance(images_u8, np.ndarray) or images_u8.dtype != np.uint8 or images_u8.ndim != 3 \
            or images_u8.shape[1:] != (SIZE, SIZE):
        got = f"{images_u8.dtype} {list(images_u8.shape)}" if isinstance(images_u8, np.ndarray) \
            else type(images_u8).__name__
        raise ValueError(f"{what}: images must be a uint8 numpy array [B, {SIZE}, {SIZE}] of grey levels, got {got}")
    if not isinstance(indices, np.ndarray) or indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        got = f"{indices.dtype} {list(indices.shape)}" if isinstance(indices, np.ndarray) else type(indices).__name__
        raise ValueError(f"{what}: indices must be a 1-D integer numpy array, got {got}")
    if len(indices) != len(images_u8):
        raise ValueError(f"{what}: {len(images_u8)} images but {len(indices)} indices; need one index per image")
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= 2**63):
        raise ValueError(f"{what}: indices must be in [0, 2**63), got {int(indices.min())} .. {int(indices.max())}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not -2**63 <= seed < 2**64:
        raise ValueError(f"{what}: seed must be an int in [-2**63, 2**64), got {seed!r}")


def deform(images_u8: np.ndarray, indices: np.ndarray, seed: int) -> np.ndarray:
    """Image b deformed by the elastic and affine map that (seed, indices[b]) draws: uint8 [B, 28, 28]
    in, uint8 [B, 28, 28] out, as the module docstring defines (scheme DEFORM_SCHEME)."""
    _check(images_u8, indices, seed)
    rows = len(images_u8)
    if rows == 0:
        return np.empty_like(images_u8)
    eps = keyed_normal(torch.from_numpy(indices.astype(np.int64)), seed=int(seed), split=SPLIT,
                       stream=STREAM_DEFORM, num_samples=1, dim=DIM)[:, 0].double()

    # Step 1: the affine parameters, [B, 1, 1] to broadcast over pixels.
    p = eps[:, :NUM_AFFINE].clamp(-CLIP, CLIP).view(rows, NUM_AFFINE, 1, 1)
    r, h = p[:, 0] * ROT_HALF_TAN, p[:, 3] * SHEAR
    sx, sy = 1.0 + p[:, 1] * SCALE, 1.0 + p[:, 2] * SCALE
    tx, ty = p[:, 4] * SHIFT_PX, p[:, 5] * SHIFT_PX
    cos = (1.0 - r * r) / (1.0 + r * r)
    sin = (2.0 * r) / (1.0 + r * r)

    # Step 2: the elastic displacement, [B, 2, 28, 28] in pixels.
    field = torch.round(eps[:, NUM_AFFINE:].reshape(rows, 2, SIZE, SIZE) * 2.0**FIELD_BITS)
    disp = _smooth(field) * (ALPHA / math.sqrt(3.0) * 2.0**-FIELD_BITS)

    # Step 3: where each output pixel reads the input. Separate multiplications and additions (no
    # fused multiply-add), so that every element rounds the same way in vector and scalar code.
    centre = (SIZE - 1) / 2
    coord = torch.arange(SIZE, dtype=torch.float64) - centre
    ux = coord.view(1, 1, SIZE) + disp[:, 0] - tx
    uy = coord.view(1, SIZE, 1) + disp[:, 1] - ty
    qx = ((cos + h * sin) / sx) * ux + ((sin - h * cos) / sx) * uy + centre
    qy = (-sin / sy) * ux + (cos / sy) * uy + centre
    grid = torch.stack([(2.0 * qx + 1.0) / SIZE - 1.0, (2.0 * qy + 1.0) / SIZE - 1.0], dim=-1).float()
    image = torch.from_numpy(np.ascontiguousarray(images_u8, dtype=np.float32)).unsqueeze(1)
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # Step 4.
    return torch.round(out[:, 0]).clamp_(0, 255).to(torch.uint8).numpy()
