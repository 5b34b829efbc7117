"""vaedist.rng: keyed noise and fixed binarisation computed with tensor operations on any device.

Statistics use 10^6 draws from fixed seeds, so they are deterministic; each bound is about five
standard errors of the statistic under the null, loose enough for a correct generator and tight
enough to catch a broken one (a lost bit, a shared counter, a wrong formula).
"""

from __future__ import annotations

import hashlib
import math
import struct

import pytest
import torch

from vaedist import rng
from vaedist.data import binarize, load_mnist

N = 10**6
SE = 1 / math.sqrt(N)


def draw(rows: int = 1000, samples: int = 50, dim: int = 20, **kwargs) -> torch.Tensor:
    """10^6 draws by default: [rows, samples, dim]."""
    args = {"seed": 0, "split": "test", "stream": rng.STREAM_IW, **kwargs}
    return rng.keyed_normal(torch.arange(rows), num_samples=samples, dim=dim, **args)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# --- a scalar re-implementation of the module docstring's definition ------------------------------

M64, M32 = 2**64 - 1, 2**32 - 1


def ref_splitmix64(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_hash32(x: int) -> int:
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & M32
    return ((x ^ (x >> 15)) * 0x846CA68B) & M32


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def ref_normal(index: int, s: int, d: int, seed: int, split: str, stream: int) -> float:
    tag = int.from_bytes(hashlib.sha256(f"vaedist-noise/{split}/{stream}".encode()).digest()[:8], "big")
    base = ref_splitmix64((seed % 2**64) ^ tag)
    k = ref_splitmix64(base + (index + 1) * 0x9E3779B97F4A7C15)
    a, m = k & M32, (k >> 32) | 1

    def top24(sample: int) -> int:
        w = ref_hash32(((sample * 2**16 + d) * m + a) & M32)
        return (w >> 8) - (2**24 if w >> 31 else 0)   # signed

    pair = s // 2
    u = (top24(2 * pair) + 2**23 + 1) / 2**24
    theta = 2 * f32(top24(2 * pair + 1) * f32(math.pi / 2**24))
    r = math.sqrt(-2 * math.log(u))
    return r * math.cos(theta) if s % 2 == 0 else r * math.sin(theta)


@pytest.mark.parametrize("seed,split,stream", [(0, "test", 1), (7, "train", 0), (2**64 - 1, "train", 2), (-5, "test", 9)])
def test_matches_scalar_reference(seed, split, stream):
    indices = [0, 1, 41, 59999, 2**40 + 3]
    samples, dim = 9, 5
    eps = rng.keyed_normal(torch.tensor(indices), seed=seed, split=split, stream=stream, num_samples=samples, dim=dim)
    for b, index in enumerate(indices):
        for s in range(samples):
            for d in range(dim):
                assert float(eps[b, s, d]) == pytest.approx(ref_normal(index, s, d, seed, split, stream),
                                                            rel=1e-5, abs=2e-6), (index, s, d)


def test_scalar_helpers_match_the_tensor_versions():
    values = [0, 1, 2**31, 2**32 - 1, 0xDEADBEEF, 2**63, 2**64 - 1, 12345678901234567]
    z = torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64)
    assert [v % 2**64 for v in rng.splitmix64(z).tolist()] == [ref_splitmix64(v) for v in values]
    assert [rng.splitmix64_int(v) for v in values] == [ref_splitmix64(v) for v in values]


# Six values each of two datapoints, pinned: a change to the scheme must come with a new NOISE_SCHEME
# (the latent table's lineage records it) and new values here.
GOLDEN = {
    "hash32-boxmuller-tan-v1": [
        1.1803991794586182, 1.7403466701507568, 0.813117504119873, 0.3492358326911926, 0.6206503510475159,
        -0.950802206993103, 0.06544071435928345, 0.12421774864196777, 1.2103123664855957, 0.8339005708694458,
        0.05246301367878914, -2.1241841316223145],
}


def test_scheme_is_pinned():
    assert rng.NOISE_SCHEME in GOLDEN, f"new scheme {rng.NOISE_SCHEME!r}: pin its values in GOLDEN"
    eps = rng.keyed_normal(torch.tensor([0, 12345]), seed=0, split="test", stream=rng.STREAM_MC,
                           num_samples=2, dim=3)
    assert eps.flatten().tolist() == pytest.approx(GOLDEN[rng.NOISE_SCHEME], rel=1e-6, abs=1e-7)


# --- distribution ---------------------------------------------------------------------------------

def test_moments():
    x = draw().double().flatten()
    mean, var = float(x.mean()), float(x.var())
    z = (x - mean) / math.sqrt(var)
    skew, kurt = float((z**3).mean()), float((z**4).mean()) - 3
    assert abs(mean) < 5 * SE
    assert abs(var - 1) < 5 * math.sqrt(2) * SE
    assert abs(skew) < 5 * math.sqrt(6) * SE
    assert abs(kurt) < 5 * math.sqrt(24) * SE


def test_kolmogorov_smirnov_against_standard_normal():
    x = torch.sort(draw(seed=3, split="train").double().flatten()).values
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    i = torch.arange(1, N + 1, dtype=torch.float64)
    stat = float(torch.maximum(i / N - cdf, cdf - (i - 1) / N).max())
    # Asymptotic critical value at alpha = 0.001: sqrt(-ln(0.0005) / 2) / sqrt(n) = 1.949 / sqrt(n).
    assert stat < 1.949 * SE, stat


@pytest.mark.parametrize("threshold", [1.0, 2.0, 3.0, 4.0])
def test_tail_frequencies(threshold):
    x = draw(seed=5).flatten()
    p = math.erfc(threshold / math.sqrt(2))          # P(|Z| > threshold)
    count = int((x.abs() > threshold).sum())
    assert abs(count - N * p) < 5 * math.sqrt(N * p * (1 - p)) + 1, (count, N * p)


def test_finite_and_bounded():
    x = draw(rows=2000, seed=11)
    assert torch.isfinite(x).all()
    assert float(x.abs().max()) <= math.sqrt(48 * math.log(2)) + 1e-5


# --- independence ---------------------------------------------------------------------------------

BOUND = 5 * SE  # |corr| of 10^6 independent pairs: standard error 1 / sqrt(n)


def test_neighbouring_keys_uncorrelated():
    x = draw(rows=1001, samples=50, dim=20)
    assert abs(corr(x[:-1], x[1:])) < BOUND


@pytest.mark.parametrize("lag", [1, 2, 8, 16])
def test_neighbouring_samples_uncorrelated(lag):
    x = draw(rows=1000, samples=50 + lag, dim=20)
    assert abs(corr(x[:, :-lag], x[:, lag:])) < BOUND * 1.1


@pytest.mark.parametrize("lag", [1, 2])
def test_neighbouring_dims_uncorrelated(lag):
    x = draw(rows=1000, samples=50, dim=20 + lag)
    assert abs(corr(x[:, :, :-lag], x[:, :, lag:])) < BOUND * 1.1


def test_box_muller_partners_independent():
    """Samples 2i and 2i + 1 share a radius and an angle: uncorrelated, and so are their squares
    (which a shared radius with a wrong angle would correlate)."""
    x = draw(rows=1000, samples=100, dim=20)
    even, odd = x[:, 0::2], x[:, 1::2]
    assert abs(corr(even, odd)) < BOUND * 1.5
    assert abs(corr(even**2, odd**2)) < BOUND * 1.5


@pytest.mark.parametrize("other", [{"stream": rng.STREAM_MC}, {"stream": rng.STREAM_Z}, {"seed": 1},
                                   {"split": "train"}])
def test_streams_seeds_and_splits_uncorrelated(other):
    x, y = draw(), draw(**other)
    assert abs(corr(x, y)) < BOUND
    assert abs(corr(x**2, y**2)) < BOUND


# --- keyed: the same numbers for the same key ------------------------------------------------------

KW = {"seed": 3, "split": "train", "stream": rng.STREAM_MC, "num_samples": 7, "dim": 5}


def test_batch_invariance():
    indices = torch.tensor([5, 0, 77, 59999, 12, 13, 40000, 3])
    full = rng.keyed_normal(indices, **KW)
    alone = torch.stack([rng.keyed_normal(indices[i:i + 1], **KW)[0] for i in range(len(indices))])
    assert torch.equal(full, alone)
    perm = torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))
    assert torch.equal(rng.keyed_normal(indices[perm], **KW), full[perm])
    split = torch.cat([rng.keyed_normal(indices[:3], **KW), rng.keyed_normal(indices[3:], **KW)])
    assert torch.equal(split, full)
    repeated = rng.keyed_normal(torch.cat([indices, indices[:2]]), **KW)
    assert torch.equal(repeated[-2:], full[:2])


def test_deterministic_across_calls_and_index_dtypes():
    indices = torch.arange(100, 140)
    first = rng.keyed_normal(indices, **KW)
    assert torch.equal(rng.keyed_normal(indices, **KW), first)
    assert torch.equal(rng.keyed_normal(indices.to(torch.int32), **KW), first)


def test_element_depends_on_its_sample_and_dim_only():
    """K = 5 gives the first 5 samples of K = 12, dim = 3 the first 3 dims of dim = 8 (odd counts too)."""
    indices = torch.arange(10)
    big = rng.keyed_normal(indices, **{**KW, "num_samples": 12, "dim": 8})
    for samples, dim in [(5, 8), (12, 3), (1, 1), (11, 7)]:
        small = rng.keyed_normal(indices, **{**KW, "num_samples": samples, "dim": dim})
        assert torch.equal(small, big[:, :samples, :dim])


@pytest.mark.parametrize("chunk", [1, 2, 7, 100, 333])
def test_drawn_in_chunks_equals_drawn_at_once(chunk):
    """first_sample: K drawn chunk by chunk (odd offsets included) is the same noise as K at once."""
    indices = torch.tensor([3, 1, 4, 1000])
    full = rng.keyed_normal(indices, **{**KW, "num_samples": 1000})
    parts = [rng.keyed_normal(indices, **{**KW, "num_samples": min(chunk, 1000 - s)}, first_sample=s)
             for s in range(0, 1000, chunk)]
    assert torch.equal(torch.cat(parts, dim=1), full)


def test_independent_of_blocking(monkeypatch):
    """The CPU path works in cache-sized blocks; results do not depend on the block size, also when a
    block splits a row's samples or starts at an odd sample."""
    indices = torch.arange(37) * 101
    kw = {**KW, "num_samples": 25, "dim": 6}
    reference = rng.keyed_normal(indices, **kw)
    for block in (12, 100, 1000, 2**20):
        monkeypatch.setattr(rng, "_CPU_BLOCK", block)
        assert torch.equal(rng.keyed_normal(indices, **kw), reference), block
        assert torch.equal(rng.keyed_normal(indices, **{**kw, "num_samples": 10}, first_sample=5),
                           reference[:, 5:15]), block


def test_dtype_and_empty_shapes():
    indices = torch.arange(4)
    x32 = rng.keyed_normal(indices, **KW)
    x64 = rng.keyed_normal(indices, **KW, dtype=torch.float64)
    assert x64.dtype == torch.float64 and torch.equal(x64, x32.double())
    assert rng.keyed_normal(torch.arange(0), **KW).shape == (0, 7, 5)
    assert rng.keyed_normal(indices, **{**KW, "num_samples": 0}).shape == (4, 0, 5)


@pytest.mark.parametrize("change,message", [
    ({"split": "val"}, "unknown split 'val'"),
    ({"num_samples": -1}, "num_samples must be an int"),
    ({"num_samples": 2**16 + 1}, "num_samples must be an int"),
    ({"dim": 2.0}, "dim must be an int"),
    ({"stream": -1}, "stream must be an int >= 0, got -1"),
    ({"seed": 0.5}, "seed must be an int, got 0.5"),
    ({"first_sample": -2}, "first_sample must be an int >= 0"),
    ({"first_sample": 2**16 - 3}, r"first_sample \+ num_samples must be <= 65536, got 65533 \+ 7"),
    ({"indices": torch.tensor([1.0])}, "indices must be a 1-D integer tensor"),
    ({"indices": torch.tensor([[1]])}, "indices must be a 1-D integer tensor"),
    ({"indices": torch.tensor([3, -1])}, "indices must be >= 0, got -1"),
    ({"dtype": torch.int32}, "dtype must be a floating-point dtype"),
])
def test_keyed_normal_rejects_bad_input(change, message):
    args = {"indices": torch.arange(3), **KW, **change}
    with pytest.raises(ValueError, match=message):
        rng.keyed_normal(args.pop("indices"), **args)


# --- fixed binarisation: bit-identical to the NumPy reference ---------------------------------------

@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return {split: load_mnist(split, mnist_dir)[0] for split in ("train", "test")}


@pytest.mark.parametrize("split,seed", [("test", 0), ("train", 0), ("train", 12345), ("test", 2**64 - 1)])
def test_fixed_binarize_equals_reference_on_mnist(mnist, split, seed):
    images = torch.from_numpy(mnist[split][:3000])
    indices = torch.arange(len(images)) + (1000 if split == "train" else 0)
    expected = binarize.fixed_binarize(images, indices, split, seed)
    got = rng.fixed_binarize(images, indices, split, seed)
    assert got.dtype == torch.float32 and got.shape == (len(images), images[0].numel())
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shape", [(5, 784), (4, 28, 28), (3, 32, 32, 3), (6, 1), (2, 7, 11, 1), (0, 9)])
def test_fixed_binarize_equals_reference_on_other_shapes(shape):
    g = torch.Generator().manual_seed(len(shape))
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    indices = torch.randint(0, 2**40, (shape[0],), generator=g)
    for split, seed in [("train", 0), ("test", 99)]:
        assert torch.equal(rng.fixed_binarize(images, indices, split, seed),
                           binarize.fixed_binarize(images, indices, split, seed))


def test_fixed_binarize_extremes_and_batch_invariance():
    images = torch.tensor([[0] * 50 + [255] * 50] * 4, dtype=torch.uint8)
    x = rng.fixed_binarize(images, torch.arange(4), "test", 0)
    assert (x[:, :50] == 0).all() and (x[:, 50:] == 1).all()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (9, 5, 5), dtype=torch.uint8, generator=g)
    indices = torch.arange(9) * 7
    full = rng.fixed_binarize(images, indices, "train", 1)
    assert torch.equal(torch.cat([rng.fixed_binarize(images[i:i + 1], indices[i:i + 1], "train", 1)
                                  for i in range(9)]), full)


@pytest.mark.parametrize("images,indices,message", [
    (torch.zeros(2, 4), torch.arange(2), "images must be a uint8 tensor"),
    (torch.zeros(4, dtype=torch.uint8), torch.arange(4), "images must be a uint8 tensor"),
    (torch.zeros(2, 4, dtype=torch.uint8), torch.arange(3), "indices must be a 1-D integer tensor of 2"),
    (torch.zeros(2, 4, dtype=torch.uint8), torch.tensor([0, -2]), "indices must be >= 0"),
])
def test_fixed_binarize_rejects_bad_input(images, indices, message):
    with pytest.raises(ValueError, match=message):
        rng.fixed_binarize(images, indices, "test", 0)


# --- CUDA -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """Integer parts bit-exact, noise to float32 rounding of log, sqrt and tan, pixels bit-exact."""
    z = torch.randint(-2**63, 2**63 - 1, (10000,), dtype=torch.int64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(rng.splitmix64(z.cuda()).cpu(), rng.splitmix64(z))
    words = ((z << 32) >> 32).to(torch.int32)  # the low halves, as int32 bits

    def hashed(device: str) -> torch.Tensor:
        h = words.to(device)
        rng._hash_words(h, torch.empty_like(h), rng._constants(h.device))
        return h.cpu()

    assert torch.equal(hashed("cuda"), hashed("cpu"))

    indices = torch.arange(3000) * 17
    for kw in (KW, {**KW, "num_samples": 1000, "dim": 50}, {**KW, "num_samples": 1}):
        cpu = rng.keyed_normal(indices, **kw)
        gpu = rng.keyed_normal(indices.cuda(), **kw)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    full = rng.keyed_normal(indices[:64].cuda(), **{**KW, "num_samples": 301})
    chunks = [rng.keyed_normal(indices[:64].cuda(), **{**KW, "num_samples": min(100, 301 - s)}, first_sample=s)
              for s in range(0, 301, 100)]
    assert torch.equal(torch.cat(chunks, dim=1), full)
    assert torch.equal(rng.keyed_normal(indices[:64].flip(0).cuda(), **KW), rng.keyed_normal(indices[:64].cuda(), **KW).flip(0))
    g = torch.Generator().manual_seed(2)
    for shape in [(3000, 28, 28), (50, 32, 32, 3)]:
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        idx = torch.arange(shape[0]) * 3
        gpu = rng.fixed_binarize(images.cuda(), idx.cuda(), "test", 4)
        assert gpu.device.type == "cuda"
        assert torch.equal(gpu.cpu(), rng.fixed_binarize(images, idx, "test", 4))


# --- the benchmark beside the package ---------------------------------------------------------------------

def test_noise_benchmark_runs_and_prints_ratios():
    """benchmarks/noise.py (beside the package, not in it) still runs against today's vaedist.rng."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "noise.py"
    spec = importlib.util.spec_from_file_location("noise_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines: list[str] = []
    module.bench_noise(echo=lines.append, rows=8, repeats=2)
    output = "\n".join(lines)
    assert output.count("ratio new/old") == 4, output
    assert rng.NOISE_SCHEME in output
