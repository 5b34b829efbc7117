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
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


class Likelihood:
    """The interface; subclasses register themselves in LIKELIHOODS under `name`."""

    name: str = ""
    binarised: bool = False
    """Whether the data are binarised draws (then the table's numbers depend on the draw's seed)."""

    def __init__(self, model_cfg=None):
        self.model_cfg = model_cfg  # options such as mixture_components live in the model's config

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

    def params_per_pixel(self, channels: int) -> int:
        return channels

    def train_input(self, images_u8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from vaedist.data.binarize import dynamic_binarize

        return dynamic_binarize(images_u8, generator)

    def eval_input(self, images_u8, indices, split: str, seed: int, device: torch.device) -> torch.Tensor:
        """The fixed binarisation per (seed, split, index): hashed on the device on a GPU (the uint8
        pixels cross, not four times as many float bytes), in NumPy on the CPU, where it measured
        faster for encode's 128-row batches (README, Performance). Both are bit-identical."""
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


LIKELIHOODS: dict[str, Callable[..., Likelihood]] = {"bernoulli": Bernoulli}


def get_likelihood(model_cfg) -> Likelihood:
    """The likelihood a ModelConfig names (its `likelihood` field; Bernoulli for configs without one)."""
    name = getattr(model_cfg, "likelihood", "bernoulli")
    if name not in LIKELIHOODS:
        raise ValueError(f"model.likelihood: unknown likelihood {name!r}; known: {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name](model_cfg)


def likelihood_of(model) -> Likelihood:
    """The likelihood of a VAE, also when wrapped (DistributedDataParallel keeps it in .module)."""
    return getattr(model, "module", model).likelihood


def bits_per_dim(nats, num_subpixels: int):
    """Nats per datapoint -> bits per sub-pixel: nats / (H * W * C * ln 2)."""
    return nats / (num_subpixels * LN2)
