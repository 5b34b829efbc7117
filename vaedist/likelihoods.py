"""Decoder distributions p(x|z): one object per likelihood, looked up by `model.likelihood`. Torch only.

A likelihood owns everything that depends on how pixels are modelled, so the training loop,
evaluation, encode and the report ask it and never test its name:

- `params_per_pixel(channels)`: how many numbers the decoder emits per pixel position (h, w); the
  decoder's flat output is [..., H * W * params_per_pixel] in channels-last order, as the shards
  store pixels. Bernoulli's is `channels`, so checkpoints from before likelihoods existed load as is.
- `train_input(images_u8, generator)` / `eval_input(images_u8, indices, split, seed, device)`: the
  transform from the stored uint8 pixels [B, P] to what the model sees and what `log_prob` scores
  (one tensor for both), fresh every step in training, fixed per datapoint key in evaluation.
- `log_prob(params, x)`: log p(x|z) per datapoint, in nats of the 8-bit (or binarised) data,
  summed over the P sub-pixels; params [..., F] broadcast against x [..., P].
- `mean(params)`, `sample(params, generator)`: images in [0, 1] [..., P], for the report.
- `to_image(x)`: what `*_input` returned, as an image in [0, 1], for the report's input rows.
- `binarised`: whether the model sees binarised draws (tables then compare only with binarised ones).

The likelihoods (README, "What is computed", has the formulas):
- `bernoulli`: binarised pixels, one logit per sub-pixel.
- `discretized-logistic`: the 256 levels of each sub-pixel as bins of a logistic (location and
  log-scale per sub-pixel), input v / 127.5 - 1.
- `discretized-logistic-mixture`: PixelCNN++'s mixture of `model.mixture_components` of them per
  pixel, with its linear dependence between colour channels.
- `gaussian`: N(mu, sigma^2) per sub-pixel, sigma learned per sub-pixel or per image
  (`model.gaussian_scale`), on uniformly dequantised pixels (v + u) / 256, minus ln 256 per sub-pixel,
  so that it bounds a discrete likelihood of the 8-bit data from below.
All four are in nats of the data they model, so bits/dim (`bits_per_dim`) compare across the 8-bit
ones; Bernoulli's are bits of the binarised draws, a different data set.
"""

from __future__ import annotations

import hashlib
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vaedist import registry
from vaedist.registry import check_registry

LN2 = math.log(2.0)
LN256 = math.log(256.0)
LOG_2PI = math.log(2 * math.pi)


class Likelihood:
    """The interface; subclasses register themselves in LIKELIHOODS under `name`."""

    name: str = ""
    binarised: bool = False
    """Whether the data are binarised draws (then the table's numbers depend on the draw's seed)."""

    input_note: str = "input"
    """How the report describes what the model sees; `{seed}` is train.seed."""
    mean_note: str = "the mean of p(x|z)"
    """How the report describes mean(params)."""

    def __init__(self, model_cfg=None, channels: int | None = None):
        self.model_cfg = model_cfg  # options such as mixture_components live in the model's config
        self.channels = channels    # the images' C where the parameters' layout needs it (the mixture)

    def params_per_pixel(self, channels: int) -> int:
        raise NotImplementedError

    def num_params(self, image_shape: tuple[int, int, int]) -> int:
        """The decoder's flat output size for images (H, W, C)."""
        height, width, channels = image_shape
        return height * width * self.params_per_pixel(channels)

    def train_input(self, images_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def eval_input(self, images_u8, indices, split: str, seed: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Bernoulli(Likelihood):
    """Independent Bernoulli per sub-pixel on binarised pixels: grey level / 255 is the probability
    of a 1 (Kingma & Welling's MNIST setting). The decoder emits one logit per sub-pixel."""

    name = "bernoulli"
    binarised = True
    input_note = "binarised input (fixed binarisation, seed train.seed = {seed})"
    mean_note = "sigmoid(decode(z)), the decoder's pixel probabilities"

    def params_per_pixel(self, channels: int) -> int:
        return channels

    def train_input(self, images_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from vaedist.data.binarize import dynamic_binarize

        return dynamic_binarize(images_u8, generator)

    def eval_input(self, images_u8, indices, split: str, seed: int, device: torch.device) -> torch.Tensor:
        """The fixed binarisation per (seed, split, index): hashed on the device on a GPU (the uint8
        pixels cross, not four times as many float bytes), in NumPy on the CPU, where it measured
        faster for encode's 128-row batches (docs: performance). Both are bit-identical."""
        if device.type == "cuda":
            from vaedist.rng import fixed_binarize as fixed_binarize_on_device

            images = torch.as_tensor(images_u8).to(device, non_blocking=True)
            return fixed_binarize_on_device(images, torch.as_tensor(np.asarray(indices), device=device), split, seed)
        from vaedist.data.binarize import fixed_binarize

        return fixed_binarize(images_u8, indices, split, seed).to(device)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """sum_pixels [x log sigmoid(l) + (1-x) log(1 - sigmoid(l))], stable in the logits l."""
        params, x = torch.broadcast_tensors(params, x.to(params.dtype))
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(params), generator=generator)


# --- 8-bit likelihoods ----------------------------------------------------------------------------

MIN_LOG_SCALE = -9.0
"""Floor on every log-scale (in the units of the likelihood's input): e^-9 = 1.2e-4 is 1/32 of half a
bin of [-1, 1], so a confident decoder can still give its pixel's bin a probability of 1 - 1e-13, while
1 / scale stays far from float32's overflow (PixelCNN++ floors at -7, which caps a bin at 0.97)."""
HALF_BIN = 1.0 / 255.0  # half the width of one of the 256 bins of [-1, 1]


def _check_u8(images_u8, what: str) -> None:
    if not isinstance(images_u8, torch.Tensor) or images_u8.dtype != torch.uint8:
        got = images_u8.dtype if isinstance(images_u8, torch.Tensor) else type(images_u8).__name__
        raise TypeError(f"{what} takes a uint8 tensor of 8-bit levels, got {got}")


def _as_u8(images_u8, device: torch.device) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(images_u8)) if not isinstance(images_u8, torch.Tensor) else images_u8
    return images.to(device, non_blocking=True)


def scale_8bit(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 levels v -> float32 v / 127.5 - 1 in [-1, 1] (0 -> -1 and 255 -> 1 exactly)."""
    _check_u8(images_u8, "scale_8bit")
    return images_u8.float().div_(127.5).sub_(1.0)


def _check_size(name: str, params: torch.Tensor, expected: int) -> None:
    if params.shape[-1] != expected:
        raise ValueError(f"{name}: the decoder gave {params.shape[-1]} parameters per datapoint, expected "
                         f"{expected} for these images")


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - e^-d) for d > 0 as log(-expm1(-d)): exact to float32 near 0, where it matters (a narrow
    bin's log-probability). Maechler (2012) switches to log1p(-e^-d) above ln 2 for the relative
    accuracy of a result near 0; here it is added to log-probabilities, and its absolute error there
    is below 6e-8 (half an ulp of 1), so the one branch costs a third of the two that torch.where
    computes in full."""
    return torch.log(-torch.expm1(-d))


def discretized_logistic_log_prob(x: torch.Tensor, mu: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(bin of x) under a logistic(mu, e^log_scale) cut into the 256 bins of [-1, 1]
    (x = v / 127.5 - 1), bins 0 and 255 extended to -inf and +inf. See DiscretizedLogistic."""
    inv_scale = torch.exp(-log_scale)
    # The edges from the level v, (v +- 1/2) / 127.5 - 1, so that neighbouring bins share an edge to
    # the bit and their probabilities add up (from x +- 1/255 they differ by float32 rounding, which a
    # scale of 1e-4 turns into 1e-4 of probability).
    level = torch.round((x + 1) * 127.5)
    upper = inv_scale * ((level + 0.5) / 127.5 - 1 - mu)   # a: the bin's upper edge, standardised
    minus_lower = inv_scale * (mu - ((level - 0.5) / 127.5 - 1))  # -b, b its lower edge (exactly -b)
    log_cdf_upper = F.logsigmoid(upper)          # log sigmoid(a): bin 0, whose lower edge is -inf
    log_sf_lower = F.logsigmoid(minus_lower)     # log(1 - sigmoid(b)): bin 255, whose upper edge is +inf
    # log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(1 - e^-(a - b)), a - b = (2/255) / s
    log_mid = log_cdf_upper + log_sf_lower + _log1mexp(inv_scale * (2 * HALF_BIN))
    return torch.where(level < 0.5, log_cdf_upper, torch.where(level > 254.5, log_sf_lower, log_mid))


CPU_CHUNK_ELEMENTS = 1 << 16
"""Elements of a likelihood's per-component tensors evaluated at once on the CPU (rows_in_chunks):
256 KiB of float32 each, so the dozen of them alive at a time fit in a core's L2 cache. Measured
against 2^14 ... 2^20 and unchunked on the mixture (32x32x3, K = 10): 2^16 was fastest, 2.2x
faster than unchunked (`python benchmarks/likelihoods.py --encode`)."""
GPU_CHUNK_ELEMENTS = 1 << 26
"""The same on a GPU, where it only bounds memory (256 MiB per intermediate): a batch of the mixture
below it is one call, as it streams at the device's bandwidth either way."""


def rows_in_chunks(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], params: torch.Tensor,
                   x: torch.Tensor, elements_per_row: int) -> torch.Tensor:
    """fn(params, x) -> [...] over the broadcast leading dimensions of params [..., F] and x [..., P],
    a chunk of rows at a time (CPU_CHUNK_ELEMENTS / elements_per_row rows on the CPU, GPU_CHUNK_ELEMENTS
    on a GPU), so that memory (and on the CPU the cache) holds one chunk's intermediates, not the whole
    batch's. Rows are independent, so the values are those of one call. One call where autograd
    records (training: the backward keeps every chunk's intermediates anyway, and the chunks measured
    ~8% slower there) and while torch.compile traces."""
    budget = CPU_CHUNK_ELEMENTS if params.device.type == "cpu" else GPU_CHUNK_ELEMENTS
    per_chunk = max(1, budget // max(1, elements_per_row))
    lead = torch.broadcast_shapes(params.shape[:-1], x.shape[:-1])
    rows = math.prod(lead)
    recording = torch.is_grad_enabled() and (params.requires_grad or x.requires_grad)
    if rows <= per_chunk or recording or torch.compiler.is_compiling():
        return fn(params, x)
    flat_params = params.expand(*lead, params.shape[-1]).reshape(rows, params.shape[-1])
    flat_x = x.expand(*lead, x.shape[-1]).reshape(rows, x.shape[-1])
    return torch.cat([fn(flat_params[i:i + per_chunk], flat_x[i:i + per_chunk])
                      for i in range(0, rows, per_chunk)]).reshape(lead)


def _uniform(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) float32 of `shape` on like's device, drawn on the generator's device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32).to(like.device)


def _logistic_sample(mu: torch.Tensor, log_scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = _uniform(mu.shape, mu, generator).clamp_(1e-6, 1 - 1e-6)
    return mu + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))


def _to_bin(x: torch.Tensor) -> torch.Tensor:
    """A value on [-1, 1]'s scale -> the centre of its bin, v / 127.5 - 1 (beyond the ends: the end bins)."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def _pairs(name: str, params: torch.Tensor, num_subpixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """params [..., 2P] read as P interleaved (location, log-scale) pairs; the log-scale floored."""
    if num_subpixels is not None:
        _check_size(name, params, 2 * num_subpixels)
    if params.shape[-1] % 2:
        raise ValueError(f"{name}: expects 2 parameters per sub-pixel, got {params.shape[-1]} in all")
    pairs = params.unflatten(-1, (params.shape[-1] // 2, 2))
    return pairs[..., 0], pairs[..., 1].clamp(min=MIN_LOG_SCALE)


class DiscretizedLogistic(Likelihood):
    """8-bit sub-pixels as 256 bins of a logistic (Kingma et al. 2016, IAF; Salimans et al. 2017,
    PixelCNN++): level v is read as x = v / 127.5 - 1 in [-1, 1], its bin is [x - 1/255, x + 1/255],
    and bins 0 and 255 take the tails, so the 256 probabilities sum to 1. The decoder emits a location
    and a log-scale per sub-pixel, interleaved: params [..., 2P] read as [..., P, (mu, log s)] (any
    fixed order serves a learned decoder; this one does not depend on the channel count).

    log P(bin) = log(sigmoid(a) - sigmoid(b)), a = (x + 1/255 - mu) / s, b = (x - 1/255 - mu) / s, is
    computed as log sigmoid(a) + log sigmoid(-b) + log(1 - e^-(a - b)), from the identity
    sigmoid(a) - sigmoid(b) = sigmoid(a) sigmoid(-b) (1 - e^(b - a)), with a - b = (2/255) / s formed
    directly: no difference of two nearly equal CDFs, so it neither underflows nor cancels in float32
    for any location or scale. PixelCNN++'s code subtracts the CDFs and so needs its fallback
    log pdf(x) - log 127.5 where the difference is below 1e-5 (an approximation); here every bin is
    exact in log space, and the edge cases are log sigmoid(a) at bin 0 and log sigmoid(-b) at bin 255
    (its log_cdf_plus and log_one_minus_cdf_min)."""

    name = "discretized-logistic"
    input_note = "8-bit input"
    mean_note = "the decoder's locations, clipped to the pixel range"

    def params_per_pixel(self, channels: int) -> int:
        return 2 * channels

    def train_input(self, images_u8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return scale_8bit(images_u8)

    def eval_input(self, images_u8, indices, split: str, seed: int, device: torch.device) -> torch.Tensor:
        """v / 127.5 - 1, as in training: deterministic, so indices, split and seed play no part."""
        return scale_8bit(_as_u8(images_u8, device))

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mu, log_scale = _pairs(self.name, params, x.shape[-1])
        return discretized_logistic_log_prob(x, mu, log_scale).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The location clipped to [-1, 1], as an image in [0, 1] (the discretised mean but for the
        tails' clipping: close enough to show)."""
        mu, _ = _pairs(self.name, params)
        return (mu.clamp(-1, 1) + 1) / 2

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mu, log_scale = _pairs(self.name, params)
        return (_to_bin(_logistic_sample(mu, log_scale, generator)) + 1) / 2

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) / 2


class DiscretizedLogisticMixture(Likelihood):
    """PixelCNN++'s mixture of K discretised logistics per pixel position (Salimans et al. 2017,
    section 2.1-2.2), K = model.mixture_components. For colour (C = 3) each component's channels
    depend linearly on the channels before them, mu_G = m_G + alpha x_R and
    mu_B = m_B + beta x_R + gamma x_G (alpha, beta, gamma = tanh of decoder outputs), so
    P(R, G, B) = sum_k pi_k P(R | k) P(G | R, k) P(B | R, G, k) is a proper joint over the 256^3
    colours. For C = 1 it is the plain mixture.

    Per pixel position the decoder emits, in this order: K mixture logits, C x K locations, C x K
    log-scales (channel-major: c * K + k) and, for C = 3, 3 x K coefficients (alpha, beta, gamma):
    10K numbers for RGB, as PixelCNN++, and 3K for grey. Only C = 1 and C = 3 are defined."""

    name = "discretized-logistic-mixture"
    input_note = "8-bit input"
    mean_note = "the mixture's mean image"

    @property
    def components(self) -> int:
        return int(getattr(self.model_cfg, "mixture_components", 10))

    def params_per_pixel(self, channels: int) -> int:
        if channels not in (1, 3):
            raise ValueError(f"model.likelihood={self.name} takes images of 1 or 3 channels, got {channels}")
        return self.components * (3 if channels == 1 else 1 + 3 * channels)

    def train_input(self, images_u8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return scale_8bit(images_u8)

    def eval_input(self, images_u8, indices, split: str, seed: int, device: torch.device) -> torch.Tensor:
        """v / 127.5 - 1, as in training (deterministic)."""
        return scale_8bit(_as_u8(images_u8, device))

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1) / 2

    def _channels(self, size: int, num_subpixels: int | None) -> int:
        """C from the constructor, else from the sizes: params of N * 3K (grey) or N * 10K (RGB)."""
        if self.channels is not None:
            return self.channels
        k = self.components
        fits = [c for c in (1, 3) if (num_subpixels is None or num_subpixels % c == 0)
                and size % self.params_per_pixel(c) == 0
                and (num_subpixels is None or size == num_subpixels // c * self.params_per_pixel(c))]
        if len(fits) != 1:
            raise ValueError(f"{self.name}: {size} parameters per datapoint fit "
                             f"{'neither' if not fits else 'both'} grey ({3 * k} per pixel) "
                             f"{'nor' if not fits else 'and'} RGB ({10 * k} per pixel) images"
                             + (f" of {num_subpixels} sub-pixels" if num_subpixels is not None else "")
                             + f" (model.mixture_components={k})")
        return fits[0]

    def _unpack(self, params: torch.Tensor, num_subpixels: int | None = None):
        """(logits [..., N, K], locations [..., N, C, K], log-scales [..., N, C, K], coefficients
        [..., N, 3, K] or None, C)."""
        k, channels = self.components, self._channels(params.shape[-1], num_subpixels)
        per_pixel = self.params_per_pixel(channels)
        if num_subpixels is not None:
            _check_size(self.name, params, num_subpixels // channels * per_pixel)
        p = params.unflatten(-1, (params.shape[-1] // per_pixel, per_pixel))
        ck = channels * k
        logits = p[..., :k]
        locations = p[..., k:k + ck].unflatten(-1, (channels, k))
        log_scales = p[..., k + ck:k + 2 * ck].unflatten(-1, (channels, k)).clamp(min=MIN_LOG_SCALE)
        coeffs = torch.tanh(p[..., k + 2 * ck:].unflatten(-1, (3, k))) if channels == 3 else None
        return logits, locations, log_scales, coeffs, channels

    @staticmethod
    def _shifted(locations: torch.Tensor, coeffs: torch.Tensor | None, red, green) -> torch.Tensor:
        """Each channel's location given the channels before it (red, green: [..., N, K] or broadcastable)."""
        if coeffs is None:
            return locations
        return torch.stack(torch.broadcast_tensors(
            locations[..., 0, :],
            locations[..., 1, :] + coeffs[..., 0, :] * red,
            locations[..., 2, :] + coeffs[..., 1, :] * red + coeffs[..., 2, :] * green), dim=-2)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A few rows at a time on the CPU (rows_in_chunks): its ~20 elementwise passes over the
        [..., N, C, K] components then stay in cache instead of streaming a tensor of the size of
        the decoder's output through memory each time. Each row's value is the same either way."""
        return rows_in_chunks(self._log_prob, params, x, x.shape[-1] * self.components)

    def _log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        logits, locations, log_scales, coeffs, channels = self._unpack(params, x.shape[-1])
        xs = x.unflatten(-1, (x.shape[-1] // channels, channels)).unsqueeze(-1)      # [..., N, C, 1]
        mu = self._shifted(locations, coeffs, xs[..., 0, :], xs[..., 1, :] if channels == 3 else None)
        per_component = discretized_logistic_log_prob(xs, mu, log_scales).sum(-2)    # [..., N, K]
        return torch.logsumexp(F.log_softmax(logits, dim=-1) + per_component, dim=-1).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """sum_k pi_k E[x | k], E[x | k] per channel from the clipped means of the channels before it,
        as an image in [0, 1] [..., P]."""
        logits, locations, _, coeffs, channels = self._unpack(params)
        red = locations[..., 0, :].clamp(-1, 1)
        green = (locations[..., 1, :] + coeffs[..., 0, :] * red).clamp(-1, 1) if channels == 3 else None
        means = self._shifted(locations, coeffs, red, green).clamp(-1, 1)                  # [..., N, C, K]
        pixel = (torch.softmax(logits, dim=-1).unsqueeze(-2) * means).sum(-1)             # [..., N, C]
        return (pixel.flatten(-2) + 1) / 2

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A component per position (Gumbel-max), then R, G given R, B given R and G, each rounded to
        its bin before it conditions the next."""
        logits, locations, log_scales, coeffs, channels = self._unpack(params)
        gumbel = -torch.log(-torch.log(_uniform(logits.shape, logits, generator).clamp_(1e-10, 1 - 1e-7)))
        pick = (logits + gumbel).argmax(-1, keepdim=True).unsqueeze(-2)                   # [..., N, 1, 1]

        def chosen(t: torch.Tensor) -> torch.Tensor:                                      # [..., N, c, K] -> [..., N, c]
            return t.gather(-1, pick.expand(*t.shape[:-1], 1)).squeeze(-1)

        mu, log_scale = chosen(locations), chosen(log_scales)
        coeff = chosen(coeffs) if coeffs is not None else None
        drawn: list[torch.Tensor] = []
        for c in range(channels):
            m = mu[..., c]
            if c == 1:
                m = m + coeff[..., 0] * drawn[0]
            elif c == 2:
                m = m + coeff[..., 1] * drawn[0] + coeff[..., 2] * drawn[1]
            drawn.append(_to_bin(_logistic_sample(m, log_scale[..., c], generator)))
        return (torch.stack(drawn, dim=-1).flatten(-2) + 1) / 2


# --- the Gaussian on dequantised pixels ---------------------------------------------------------------

DEQUANTIZE_SCHEME = "splitmix64-dequantize16-v1"


def dequantize(images_u8: torch.Tensor, indices: torch.Tensor, split: str, seed: int = 0) -> torch.Tensor:
    """The evaluation's dequantised pixels, float32 [B, P] on the images' device, scheme DEQUANTIZE_SCHEME:
    sub-pixel j (row-major (H, W, C) order) of datapoint (split, index) with level v is

        y = (v * 2**16 + r) / 2**24,   r = splitmix64(row + (j + 1) * GAMMA) >>> 48   (the top 16 bits)
        row = splitmix64(stream + (index + 1) * GAMMA)
        stream = splitmix64((seed mod 2**64) ^ the first 8 bytes, big-endian, of
                            sha256("vaedist-dequantize/<split>"))

    in 64-bit unsigned arithmetic mod 2**64 (splitmix64 and GAMMA as vaedist.rng defines them), i.e.
    y = (v + u) / 256 with u = r / 2**16 uniform on a grid of 2**16 points in [0, 1). y is an integer
    below 2**24 times 2**-24, so float32 holds it exactly: the result is bit-identical on every device
    (the integer steps are torch's wrapping int64 operations, as in vaedist.rng)."""
    from vaedist.rng import splitmix64, splitmix64_int

    _check_u8(images_u8, "dequantize")
    rows = images_u8.shape[0]
    pixels = images_u8.reshape(rows, -1)
    index = indices.to(device=pixels.device, dtype=torch.int64).reshape(-1)
    if index.numel() != rows:
        raise ValueError(f"dequantize: {index.numel()} indices for {rows} images")
    if index.device.type == "cpu" and rows and bool((index < 0).any()):
        raise ValueError(f"dequantize: datapoint indices must be >= 0, got {int(index.min())}")
    tag = int.from_bytes(hashlib.sha256(f"vaedist-dequantize/{split}".encode()).digest()[:8], "big")
    stream = _signed64(splitmix64_int((int(seed) % 2**64) ^ tag))
    gamma = _signed64(0x9E3779B97F4A7C15)
    row = splitmix64((index + 1) * gamma + stream)
    cols = torch.arange(1, pixels.shape[1] + 1, dtype=torch.int64, device=pixels.device) * gamma
    r = (splitmix64(row.view(rows, 1) + cols) >> 48) & 0xFFFF   # arithmetic shift, then the top 16 bits
    return (pixels.to(torch.int64) * 2**16 + r).to(torch.float32) * 2.0**-24


def _signed64(value: int) -> int:
    value &= 2**64 - 1
    return value - 2**64 if value >> 63 else value


class Gaussian(Likelihood):
    """A Gaussian per sub-pixel with a learned scale, on pixels dequantised with uniform noise,
    y = (v + u) / 256 in [0, 1), u ~ U[0, 1) (Theis et al. 2016). The bins [v / 256, (v + 1) / 256)
    have width 1/256, so E_u[log N(y; mu, sigma)] - ln 256 <= log of the probability the Gaussian
    gives v's bin (Jensen): log_prob = sum log N(y; mu, sigma) - P ln 256 is, in expectation over u,
    a lower bound in nats on a discrete likelihood of the 8-bit data, and its bits/dim compare with
    the discrete likelihoods' (mass outside [0, 1) only loosens the bound).

    The decoder emits (mu, log s) per sub-pixel, interleaved as the discretised logistic's:
    params [..., P, 2]. `model.gaussian_scale`:
    - per-subpixel: sigma = e^(log s) of each sub-pixel;
    - per-image: one sigma per image (and per z): log sigma = the mean of the P log-scale outputs.
      The scale stays a decoder output, so the likelihood holds no state, any model family (the MLP,
      the conv decoders, a custom factory) emits it like the per-sub-pixel one, and the two share one
      layout; a learned scalar parameter could not depend on z and would be state outside the
      decoder that each family would have to own.

    Training draws u fresh every step; evaluation takes it from a hash keyed by (seed, split, index,
    sub-pixel): `dequantize`."""

    name = "gaussian"
    input_note = "input (dequantised with seed train.seed = {seed}, shown at its 8-bit level)"
    mean_note = "the Gaussian's means, clipped to [0, 1]"

    @property
    def per_image(self) -> bool:
        return getattr(self.model_cfg, "gaussian_scale", "per-subpixel") == "per-image"

    def params_per_pixel(self, channels: int) -> int:
        return 2 * channels

    def train_input(self, images_u8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_u8(images_u8, "gaussian train_input")
        return images_u8.float().add_(_uniform(images_u8.shape, images_u8, generator)).div_(256.0)

    def eval_input(self, images_u8, indices, split: str, seed: int, device: torch.device) -> torch.Tensor:
        images = _as_u8(images_u8, device)
        return dequantize(images, torch.as_tensor(np.asarray(indices)).to(device), split, seed)

    def _split(self, params: torch.Tensor, num_subpixels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = _pairs(self.name, params, num_subpixels)
        if self.per_image:
            log_sigma = params.unflatten(-1, (-1, 2))[..., 1].mean(-1, keepdim=True).clamp(min=MIN_LOG_SCALE)
        return mu, log_sigma

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mu, log_sigma = self._split(params, x.shape[-1])
        z = (x - mu) * torch.exp(-log_sigma)
        return (-0.5 * (LOG_2PI + z * z) - log_sigma).sum(-1) - x.shape[-1] * LN256

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        mu, _ = self._split(params)
        return mu.clamp(0, 1)

    def sample(self, params: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """y ~ N(mu, sigma^2) read back as its 8-bit level floor(256 y), as an image level / 255."""
        mu, log_sigma = self._split(params)
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype,
                            device=generator.device if generator is not None else mu.device).to(mu.device)
        y = mu + torch.exp(log_sigma) * noise
        return torch.floor(y.clamp(0, 1) * 256).clamp_(max=255) / 255

    def to_image(self, x: torch.Tensor) -> torch.Tensor:
        """The dequantised input back at its 8-bit level (floor(256 y) / 255: the stored image)."""
        return torch.floor(x * 256) / 255


LIKELIHOODS: dict[str, Callable[..., Likelihood]] = {
    cls.name: cls for cls in (Bernoulli, DiscretizedLogistic, DiscretizedLogisticMixture, Gaussian)}
check_registry("model.likelihood", LIKELIHOODS, registry.LIKELIHOODS)
check_registry("binarised likelihoods", {n: c for n, c in LIKELIHOODS.items() if c.binarised},
               [n for n in registry.LIKELIHOODS if n in registry.BINARISED_LIKELIHOODS])


def get_likelihood(model_cfg, channels: int | None = None) -> Likelihood:
    """The likelihood a ModelConfig names (its `likelihood` field; Bernoulli for configs without one,
    such as checkpoints from before likelihoods existed). `channels`: the images' C, which the
    mixture's mean and sample need for some image sizes (its log_prob reads it from x)."""
    name = getattr(model_cfg, "likelihood", "bernoulli")
    if name not in LIKELIHOODS:
        raise ValueError(f"model.likelihood: unknown likelihood {name!r}; known: {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name](model_cfg, channels)


def likelihood_of(model) -> Likelihood:
    """The likelihood of a VAE, also when wrapped (DistributedDataParallel keeps it in .module)."""
    return getattr(model, "module", model).likelihood


def bits_per_dim(nats, num_subpixels: int):
    """Nats per datapoint -> bits per sub-pixel (bits/dim): nats / (H * W * C * ln 2)."""
    return nats / (num_subpixels * LN2)
