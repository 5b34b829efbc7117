"""Per-key randomness computed on the tensor's own device by counter-based hashing: no generator
state and no Python loop over rows, so a datapoint gets the same numbers whatever batch, worker or
device it is on. torch only.

    eps = keyed_normal(indices, seed=0, split="test", stream=STREAM_IW, num_samples=1000, dim=50)
    chunk = keyed_normal(indices, seed=0, split="test", stream=STREAM_IW, num_samples=100, dim=50,
                         first_sample=300)                    # == eps[:, 300:400]
    x = fixed_binarize(images_u8, indices, "test", seed=0)

Noise, scheme NOISE_SCHEME = "hash32-boxmuller-tan-v1". Integers are unsigned and wrap (mod 2**64 or
2**32 as the width says), >>> is a logical right shift; floats are IEEE float32.

    splitmix64(z):  z = (z ^ (z >>> 30)) * 0xBF58476D1CE4E5B9                (64-bit; Steele, Lea
                    z = (z ^ (z >>> 27)) * 0x94D049BB133111EB                 & Flood 2014)
                    return z ^ (z >>> 31)
    hash32(x):      x = (x ^ (x >>> 16)) * 0x7FEB352D                         (32-bit; C. Wellons'
                    return (x ^ (x >>> 15)) * 0x846CA68B                      lowbias32, see below)

1. Stream key, once per call: tag = the first 8 bytes, big-endian, of sha256 of the ASCII string
   "vaedist-noise/<split>/<stream>" (e.g. "vaedist-noise/test/1"); base = splitmix64((seed mod 2**64) ^ tag).
2. Row key, per datapoint: k = splitmix64(base + (index + 1) * 0x9E3779B97F4A7C15) (64-bit);
   a = k mod 2**32 (its low half) and m = (k >>> 32) | 1 (its high half, made odd).
3. Words: for sample s and dimension d (both < 2**16), counter c = s * 2**16 + d and
   word w(s, d) = hash32((c * m + a) mod 2**32). Within a row c -> c * m + a is a bijection, so no two
   elements hash the same input; rows differ in both m and a (63 bits), so they share no runs of inputs.
   hash32 is lowbias32 without its last step x ^= x >>> 16, which serves the low bits; only the top
   24 bits of w are read, the well-mixed end of a multiplicative hash (as Knuth's multiplicative hashing
   reads the high bits). Dropping it saves 3 of the 12 tensor passes per word.
4. Normals, Box-Muller over the sample pairs (2i, 2i + 1): for each d, P and Q are the top 24 bits of
   w(2i, d) and w(2i + 1, d) read as signed 24-bit integers (floor(w' / 2**8), w' = w read as a signed
   int32; so P, Q in [-2**23, 2**23); the angle word exists as a counter even when sample 2i + 1 is
   not drawn). Then, in float32,
       u = (P + 2**23 + 1) / 2**24                   in (0, 1], exact
       R = sqrt(-8 ln u)                             twice the Box-Muller radius r = sqrt(-2 ln u)
       x = Q * float32(pi / 2**24)                   theta / 2, in [-pi/2, pi/2]
       t = tan(x);  g = R / (1 + t * t)
       eps(2i, d)     = g - R / 2                    = r (1 - t^2) / (1 + t^2) = r cos(theta)
       eps(2i + 1, d) = g * t                        = r 2t / (1 + t^2)        = r sin(theta)
   (the tangent half-angle formulas: one tan instead of a cos and a sin). |eps| <= sqrt(48 ln 2) = 5.77.
   A float64 request casts these float32 values.

Sample s, dimension d of datapoint `index` is so a function of (seed, split, index, stream, s, d)
only: not of the batch, its order, num_samples, first_sample or dim (K = 500 gives the first 500
samples of K = 1000, and K may be drawn a chunk at a time). The integer parts are bit-exact on every
device (torch's int32 and int64 multiplication wraps on CPU and CUDA; a logical shift is an
arithmetic one and a mask); the floats agree across devices to the rounding of log, sqrt and tan.

Pixels: `fixed_binarize` is the torch twin of vaedist.data.binarize.fixed_binarize, whose docstring
defines it and which stays the reference; splitmix64 in int64 tensor operations, bit-identical, for
any number of pixels (pixel j is the j-th of the image flattened in C order).
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch

from vaedist.data.common import SPLITS

NOISE_SCHEME = "hash32-boxmuller-tan-v1"
# Separate noise streams per purpose, so that changing K does not change the z used for recon_nll.
STREAM_MC, STREAM_IW, STREAM_Z = 0, 1, 2
MAX_SAMPLES = MAX_DIM = 2**16  # s and d share one 32-bit counter, 16 bits each

_MASK64 = 2**64 - 1
_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (the golden ratio in 64 bits)
_SM64 = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, None))
_HASH32 = ((16, 0x7FEB352D), (15, 0x846CA68B))  # lowbias32 without its last xorshift (see docstring)
# Work per block on the CPU, in words (int32, two 2 MB buffers): the ~20 passes over a block run
# from cache, not memory, and Python's ~1.5 us per operation stays small beside each pass (2**18 and
# 2**20 measured slower). Pixels are int64 and fastest at 2**16 (two 512 kB buffers, a core's L2).
_CPU_BLOCK = 2**19
_CPU_BLOCK_PIXELS = 2**16
_GPU_BLOCK = 2**23  # on a GPU only a cap on the work buffers (64 MB for noise)


# --- shared integer pieces ------------------------------------------------------------------------

def _signed(value: int, bits: int) -> int:
    """The two's-complement reading of an unsigned constant, as torch's signed dtypes hold it."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def splitmix64_int(z: int) -> int:
    """splitmix64 on one Python int (mod 2**64): the scalar reference for the tensor version."""
    z &= _MASK64
    for shift, constant in _SM64:
        z ^= z >> shift
        if constant is not None:
            z = (z * constant) & _MASK64
    return z


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors holding uint64 bits (a new tensor)."""
    z, scratch, c = z.clone(), torch.empty_like(z), _constants(z.device)
    _splitmix64_(z, scratch, c)
    return z


def _splitmix64_(z: torch.Tensor, scratch: torch.Tensor, c: dict) -> None:
    for i, (_, constant) in enumerate(_SM64):
        torch.bitwise_right_shift(z, c[f"z_shift{i}"], out=scratch)
        z.bitwise_xor_(scratch.bitwise_and_(c[f"z_mask{i}"]))
        if constant is not None:
            z.mul_(c[f"z_mul{i}"])


def _tag64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _check_split(split: str, what: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{what}: unknown split {split!r}; expected one of {SPLITS}")


def _check_int(value, name: str, what: str, low: int | None = None, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low) \
            or (high is not None and value > high):
        bounds = "".join([f" >= {low}" if low is not None else "", " and" if None not in (low, high) else "",
                          f" <= {high}" if high is not None else ""])
        raise ValueError(f"{what}: {name} must be an int{bounds}, got {value!r}")


def _check_indices(indices, rows: int | None, what: str) -> torch.Tensor:
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool \
            or (rows is not None and indices.numel() != rows):
        want = f"a 1-D integer tensor of {rows} indices" if rows is not None else "a 1-D integer tensor"
        got = f"{indices.dtype} {list(indices.shape)}" if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ValueError(f"{what}: indices must be {want}, got {got}")
    # Checked where it is free: on a GPU, reading the answer would wait for the device.
    if indices.device.type == "cpu" and indices.numel() and bool((indices < 0).any()):
        raise ValueError(f"{what}: datapoint indices must be >= 0, got {int(indices.min())}")
    return indices.to(torch.int64)


def _row_keys(indices: torch.Tensor, base: int) -> torch.Tensor:
    """splitmix64(base + (index + 1) * GAMMA) per row: int64 [B] holding uint64 bits."""
    c = _constants(indices.device)
    z = torch.add(indices, c["one64"]).mul_(c["gamma"]).add_(_signed(base, 64))
    _splitmix64_(z, torch.empty_like(z), c)
    return z


_CONSTANTS = {
    # hash32 (int32 bits)
    **{f"h_shift{i}": (k, torch.int32) for i, (k, _) in enumerate(_HASH32)},
    **{f"h_mask{i}": ((1 << (32 - k)) - 1, torch.int32) for i, (k, _) in enumerate(_HASH32)},
    **{f"h_mul{i}": (_signed(m, 32), torch.int32) for i, (_, m) in enumerate(_HASH32)},
    "s8": (8, torch.int32),
    # Box-Muller (float32)
    "u_offset": ((2**23 + 1) * 2.0**-24, torch.float32),
    "minus8": (-8.0, torch.float32), "angle": (math.pi * 2.0**-24, torch.float32), "one": (1.0, torch.float32),
    # splitmix64 and the pixel comparison (int64 bits)
    **{f"z_shift{i}": (k, torch.int64) for i, (k, _) in enumerate(_SM64)},
    **{f"z_mask{i}": ((1 << (64 - k)) - 1, torch.int64) for i, (k, _) in enumerate(_SM64)},
    **{f"z_mul{i}": (_signed(m, 64), torch.int64) for i, (_, m) in enumerate(_SM64) if m},
    "gamma": (_signed(_GAMMA, 64), torch.int64), "s32": (32, torch.int64), "low32": (0xFFFFFFFF, torch.int64),
    "m255": (255, torch.int64), "one64": (1, torch.int64),
}


@functools.cache
def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """The operands of the tensor operations as 0-dim tensors on `device`, made once per device: on the
    CPU a Python number costs a conversion to a tensor on every call (~1.5 us; a block makes ~25), and
    addcmul takes no number."""
    return {name: torch.tensor(value, dtype=dtype, device=device) for name, (value, dtype) in _CONSTANTS.items()}


# --- noise ----------------------------------------------------------------------------------------

def keyed_normal(indices: torch.Tensor, *, seed: int, split: str, stream: int, num_samples: int, dim: int,
                 first_sample: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise [B, num_samples, dim] on indices.device: element (b, j, d) is sample
    s = first_sample + j of datapoint indices[b], and depends only on (seed, split, indices[b], stream,
    s, d), as the module docstring defines (scheme NOISE_SCHEME). first_sample lets a caller draw K
    samples a chunk at a time and get the same numbers as in one call."""
    what = "keyed_normal"
    _check_split(split, what)
    indices = _check_indices(indices, None, what)
    _check_int(seed, "seed", what)  # any int, taken mod 2**64
    for name, value, high in (("stream", stream, None), ("num_samples", num_samples, MAX_SAMPLES),
                              ("dim", dim, MAX_DIM), ("first_sample", first_sample, MAX_SAMPLES)):
        _check_int(value, name, what, 0, high)
    if first_sample + num_samples > MAX_SAMPLES:
        raise ValueError(f"{what}: first_sample + num_samples must be <= {MAX_SAMPLES}, got "
                         f"{first_sample} + {num_samples}")
    if not dtype.is_floating_point:
        raise ValueError(f"{what}: dtype must be a floating-point dtype, got {dtype}")
    device, rows = indices.device, indices.numel()
    out = torch.empty(rows, num_samples, dim, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out.to(dtype)

    base = splitmix64_int((seed & _MASK64) ^ _tag64(f"vaedist-noise/{split}/{stream}"))
    key = _row_keys(indices, base)
    # a and m as int32 bits, each brought into int32's range (sign-extended) before the cast.
    add = ((key << 32) >> 32).to(torch.int32)
    mul = ((key >> 32) | 1).to(torch.int32)
    # The pairs (2i, 2i + 1) that cover samples [s0, s1).
    s0, s1 = first_sample, first_sample + num_samples
    p0, pairs = s0 // 2, (s1 + 1) // 2 - s0 // 2
    # c * m + a = (s * 2**16 * m + a) + d * m: a per-(row, sample) term plus a per-(row, dim) term, so
    # the hash's input costs one broadcast addition. Lane 0 holds samples 2i (the u words), lane 1
    # samples 2i + 1 (the angle words), each one contiguous half of the word buffer.
    sample = torch.arange(2 * p0, 2 * (p0 + pairs), dtype=torch.int32, device=device).view(pairs, 2).T
    per_sample = ((sample * 2**16).view(2, 1, pairs, 1) * mul.view(1, rows, 1, 1)).add_(add.view(1, rows, 1, 1))
    per_dim = (torch.arange(dim, dtype=torch.int32, device=device) * mul.view(rows, 1)).view(1, rows, 1, dim)

    block = _CPU_BLOCK if device.type == "cpu" else _GPU_BLOCK
    pairs_per_block = max(1, min(pairs, block // (2 * dim)))
    rows_per_block = max(1, min(rows, block // (2 * dim * pairs_per_block)))
    work = _Work(rows_per_block, pairs_per_block, dim, device)
    for r0 in range(0, rows, rows_per_block):
        r1 = min(rows, r0 + rows_per_block)
        for q0 in range(0, pairs, pairs_per_block):
            q1 = min(pairs, q0 + pairs_per_block)
            h, scratch = work.block(r1 - r0, q1 - q0)
            torch.add(per_sample[:, r0:r1, q0:q1], per_dim[:, r0:r1], out=h)
            _hash_words(h, scratch, work.c)
            g, radius, tan = _box_muller(h, scratch, work.c)
            _write_pairs(g, radius, tan, out[r0:r1], s0, s1, 2 * (p0 + q0))
    return out if dtype == torch.float32 else out.to(dtype)


class _Work:
    """Two int32 block buffers, made once per call and reused by every block: the words and a scratch
    buffer for the hash; then the scratch holds the floats (u, x) and the words' buffer (R, t)."""

    def __init__(self, rows: int, pairs: int, dim: int, device: torch.device):
        self.h = torch.empty(2, rows, pairs, dim, dtype=torch.int32, device=device)
        self.scratch = torch.empty_like(self.h)
        self.c = _constants(device)

    def block(self, rows: int, pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.h[:, :rows, :pairs], self.scratch[:, :rows, :pairs]


def _hash_words(h: torch.Tensor, scratch: torch.Tensor, c: dict) -> None:
    """h = hash32(h) in place, on int32 bits."""
    for i in range(len(_HASH32)):
        torch.bitwise_right_shift(h, c[f"h_shift{i}"], out=scratch)
        h.bitwise_xor_(scratch.bitwise_and_(c[f"h_mask{i}"])).mul_(c[f"h_mul{i}"])


def _box_muller(h: torch.Tensor, scratch: torch.Tensor, c: dict) -> tuple[torch.Tensor, ...]:
    """Step 4 of the module docstring for the words h [2, R, P, D] (lane 0: u, lane 1: angle):
    (g, R, t), [R, P, D] each, in the memory of h and scratch."""
    # On signed bits h >> 8 = (h >>> 8) - 2**23 * (top bit): the words' top 24 bits, offset by
    # -2**23, integers that float32 holds exactly.
    h.bitwise_right_shift_(c["s8"])
    f = scratch.view(torch.float32).copy_(h)
    u, x = f[0], f[1]
    radius, tan = h.view(torch.float32)  # h is free now
    torch.add(c["u_offset"], u, alpha=2.0**-24, out=u)      # u = (P + 2**23 + 1) / 2**24, exact
    torch.sqrt(u.log_().mul_(c["minus8"]), out=radius)     # R = sqrt(-8 ln u) = 2r
    torch.tan(x.mul_(c["angle"]), out=tan)                  # t = tan(theta / 2)
    torch.addcmul(c["one"], tan, tan, out=x)                # 1 + t^2
    torch.div(radius, x, out=u)                             # g = R / (1 + t^2)
    return u, radius, tan


def _write_pairs(g, radius, tan, out, s0: int, s1: int, first: int) -> None:
    """Write the samples in [s0, s1) that a block's pairs make (its pair 0 is samples first and
    first + 1) into out [R, s1 - s0, D]: cos halves g - R / 2 at even samples, sin halves g t at odd."""
    lo, hi = max(s0, first), min(s1, first + 2 * g.shape[1])
    even, odd = lo + (lo & 1), lo + 1 - (lo & 1)
    n_even, n_odd = len(range(even, hi, 2)), len(range(odd, hi, 2))
    e, o = (even - first) // 2, (odd - first) // 2
    torch.add(g[:, e:e + n_even], radius[:, e:e + n_even], alpha=-0.5, out=out[:, even - s0:hi - s0:2])
    torch.mul(g[:, o:o + n_odd], tan[:, o:o + n_odd], out=out[:, odd - s0:hi - s0:2])


# --- pixels ---------------------------------------------------------------------------------------

def fixed_binarize(images_u8: torch.Tensor, indices: torch.Tensor, split: str, seed: int = 0) -> torch.Tensor:
    """float32 {0, 1} [B, P] on the images' device, P = the pixels of one image flattened (any shape):
    pixel j of datapoint (split, index) is 1 iff r * 255 < pixel * 2**32, r = splitmix64(row + (j + 1) *
    GAMMA) >>> 32, row = splitmix64(stream + (index + 1) * GAMMA), stream = splitmix64((seed mod 2**64)
    ^ the first 8 bytes (big-endian) of sha256(split)): bit-identical to
    vaedist.data.binarize.fixed_binarize, the documented reference."""
    what = "fixed_binarize"
    _check_split(split, what)
    if not isinstance(images_u8, torch.Tensor) or images_u8.dtype != torch.uint8 or images_u8.dim() < 2:
        got = f"{images_u8.dtype} {list(images_u8.shape)}" if isinstance(images_u8, torch.Tensor) \
            else type(images_u8).__name__
        raise ValueError(f"{what}: images must be a uint8 tensor [B, ...] of grey levels, got {got}")
    rows = images_u8.shape[0]
    indices = _check_indices(indices, rows, what).to(images_u8.device)
    _check_int(seed, "seed", what)
    pixels = images_u8.reshape(rows, math.prod(images_u8.shape[1:]))
    device, num_pixels = pixels.device, pixels.shape[1]
    out = torch.empty(rows, num_pixels, dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out

    stream = splitmix64_int((seed & _MASK64) ^ _tag64(split))
    row_key = _row_keys(indices, stream).view(rows, 1)
    c = _constants(device)
    cols = torch.arange(1, num_pixels + 1, dtype=torch.int64, device=device).mul_(c["gamma"])
    block = _CPU_BLOCK_PIXELS if device.type == "cpu" else _GPU_BLOCK
    rows_per_block = max(1, min(rows, block // num_pixels))
    z = torch.empty(rows_per_block, num_pixels, dtype=torch.int64, device=device)
    scratch = torch.empty_like(z)
    level = torch.empty(rows_per_block, num_pixels, dtype=torch.uint8, device=device)
    for r0 in range(0, rows, rows_per_block):
        r1 = min(rows, r0 + rows_per_block)
        zb, sb, lb = z[: r1 - r0], scratch[: r1 - r0], level[: r1 - r0]
        torch.add(row_key[r0:r1], cols, out=zb)
        _splitmix64_(zb, sb, c)
        # r * 255 < pixel * 2**32 <=> floor(r * 255 / 2**32) < pixel (pixel an integer): a uint8
        # comparison, with no widened copy of the pixels.
        zb.bitwise_right_shift_(c["s32"]).bitwise_and_(c["low32"]).mul_(c["m255"]).bitwise_right_shift_(c["s32"])
        lb.copy_(zb)
        torch.lt(lb, pixels[r0:r1], out=out[r0:r1])
    return out
