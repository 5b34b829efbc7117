"""Building blocks the model families share (vaedist/model.py, vaedist/hierarchical.py). Torch only."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "softplus": nn.Softplus, "tanh": nn.Tanh}


def mlp(widths: list[int], activation: str) -> nn.Sequential:
    """Linear layers between consecutive widths, each followed by the activation."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Linear(w_in, w_out), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class ToImage(nn.Module):
    """[B, H*W*C] flattened channels last (the shards' layout) -> [B, C, H, W] (what Conv2d takes).
    One module in the place of the Unflatten it replaced, so earlier checkpoints keep their keys."""

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = tuple(image_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.image_shape).permute(0, 3, 1, 2)


class FromImage(nn.Module):
    """[B, K, H, W] -> [B, H*W*K] channels last: ToImage's inverse, and the layout the likelihood
    reads its K parameters per position in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


class ToParameters(nn.ConvTranspose2d):
    """The conv decoder's last transposed convolution, whose output is the likelihood's parameters.
    With many of them per position (the mixture's 10K for colour) it runs channels-last on the CPU:
    its output is then already in the [B, H, W, K] order FromImage flattens (a view, not a copy of
    the largest tensor of the model), and oneDNN's kernel measured 2.4x faster forward for K = 100
    and 2.5x for 50, with bit-identical values (`python benchmarks/likelihoods.py --encode`).
    For a few channels (Bernoulli's 1, a logistic's 6) it stays as it was: channels-last measured no
    faster forward and slower backward there. Same parameters, so checkpoints load either way."""

    MIN_CHANNELS_LAST = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self.out_channels >= self.MIN_CHANNELS_LAST:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def norm(kind: str, channels: int) -> list[nn.Module]:
    """model.norm for a hidden feature map; [] for none. group: gcd(channels, 32) groups (Wu & He
    2018's 32 where the channels allow); layer: one group, i.e. LayerNorm over (C, H, W) with a
    per-channel affine. Both normalise each datapoint alone; batch couples a training batch."""
    if kind == "none":
        return []
    if kind == "batch":
        return [nn.BatchNorm2d(channels)]
    return [nn.GroupNorm(math.gcd(channels, 32) if kind == "group" else 1, channels)]


class ResBlock(nn.Module):
    """x + conv3x3(act(norm(conv3x3(act(norm(x)))))): a pre-activation residual block (He et al.
    2016) that keeps the resolution and channels."""

    def __init__(self, channels: int, activation: str, norm_kind: str):
        super().__init__()
        self.body = nn.Sequential(
            *norm(norm_kind, channels), ACTIVATIONS[activation](), nn.Conv2d(channels, channels, 3, padding=1),
            *norm(norm_kind, channels), ACTIVATIONS[activation](), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)
