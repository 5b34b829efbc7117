"""A worked example of vaedist's custom-model protocol: a conv encoder with a dense head, and a
decoder that mirrors it, in plain PyTorch.

    model:
      kind: custom
      factory: toyvae.model:build
      kwargs: {channels: 16, hidden: 128}

vaedist calls build(image_shape=(H, W, C), latent_dim=D, params_per_pixel=K, **kwargs) and uses the
module's encode(x) -> (mu, logvar) and decode(z) -> parameters (vaedist/custom_model.py).
"""

from __future__ import annotations

import torch
from torch import nn


class ToyVAE(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], latent_dim: int, params_per_pixel: int,
                 channels: int = 16, hidden: int = 128):
        super().__init__()
        height, width, colours = image_shape
        if height % 4 or width % 4:
            raise ValueError(f"toyvae halves height and width twice: {height}x{width} is not divisible by 4")
        self.image_shape, self.latent_dim, self.params_per_pixel = image_shape, latent_dim, params_per_pixel
        self.low_res = (2 * channels, height // 4, width // 4)
        flat = 2 * channels * (height // 4) * (width // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(colours, channels, 3, padding=1), nn.SiLU(),
            nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.SiLU(),      # H -> H/2
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1), nn.SiLU(),  # H/2 -> H/4
            nn.Flatten(), nn.Linear(flat, hidden), nn.SiLU(),
            nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, flat), nn.SiLU(),
            nn.Unflatten(1, self.low_res),
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1), nn.SiLU(),  # H/4 -> H/2
            nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1), nn.SiLU(),      # H/2 -> H
            nn.Conv2d(channels, params_per_pixel, 3, padding=1))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, H*W*C], channels last as vaedist's shards store pixels -> [B, C, H, W] for Conv2d.
        images = x.reshape(x.shape[0], *self.image_shape).permute(0, 3, 1, 2)
        mu, logvar = self.encoder(images).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # z: [..., D] (vaedist passes [B, S, D] for S samples per datapoint): decode them as one batch
        # and give the leading dimensions back.
        lead = z.shape[:-1]
        out = self.decoder(z.reshape(-1, self.latent_dim))          # [N, K, H, W]
        return out.permute(0, 2, 3, 1).reshape(*lead, -1)           # [..., H*W*K], channels last


def build(image_shape: tuple[int, int, int], latent_dim: int, params_per_pixel: int, **kwargs) -> ToyVAE:
    """vaedist's factory: the protocol's three arguments, then model.kwargs."""
    return ToyVAE(image_shape, latent_dim, params_per_pixel, **kwargs)
