"""The VAE: encoder q(z|x) (diagonal Gaussian), decoder p(x|z) (the likelihood `model.likelihood` names).

Single-device model code: it knows nothing of Ray, ranks or files (Kingma & Welling, 2014).
"""

from __future__ import annotations

import torch
from torch import nn

from vaedist.config import ModelConfig
from vaedist.likelihoods import Likelihood, get_likelihood

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "softplus": nn.Softplus, "tanh": nn.Tanh}
MNIST_SHAPE = (28, 28, 1)


class _ToImage(nn.Module):
    """[B, H*W*C] flattened channels last (the shards' layout) -> [B, C, H, W] (what Conv2d takes).
    One module in the place of the Unflatten it replaced, so earlier checkpoints keep their keys."""

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = image_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.image_shape).permute(0, 3, 1, 2)


class _FromImage(nn.Module):
    """[B, C, H, W] -> [B, H*W*C] channels last: _ToImage's inverse."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).flatten(1)


def _mlp(widths: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths, widths[1:]):
        layers += [nn.Linear(w_in, w_out), _ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """x in [B, num_pixels] (the likelihood's input transform of the pixels) -> q(z|x) =
    N(mu, diag exp(logvar)); z -> the likelihood's parameters [.., num_params].

    image_shape (height, width, channels) comes from the dataset's manifest; pixels are flattened
    channels last, as the shards store them, and so are the decoder's parameters (params_per_pixel
    per position). The conv family halves height and width twice, so both must be divisible by 4."""

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int] = MNIST_SHAPE,
                 likelihood: Likelihood | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(int(d) for d in image_shape)
        height, width, channels = self.image_shape
        self.num_pixels = num_pixels = height * width * channels
        self.likelihood = likelihood if likelihood is not None else get_likelihood(cfg)
        self.num_params = self.likelihood.num_params(self.image_shape)
        out_channels = self.likelihood.params_per_pixel(channels)
        self.latent_dim = cfg.latent_dim
        act = cfg.activation
        if cfg.kind == "mlp":
            widths = [num_pixels, *cfg.hidden_dims]
            self.encoder = _mlp(widths, act)
            self.to_posterior = nn.Linear(widths[-1], 2 * cfg.latent_dim)
            self.decoder = nn.Sequential(_mlp([cfg.latent_dim, *reversed(widths[1:])], act),
                                         nn.Linear(widths[1], self.num_params))
        else:
            if height % 4 or width % 4:
                raise ValueError(f"the conv model halves height and width twice: they must be divisible by 4, "
                                 f"got image shape {self.image_shape}")
            c1, c2 = cfg.hidden_dims
            h4, w4 = height // 4, width // 4
            self.encoder = nn.Sequential(
                _ToImage(self.image_shape),
                nn.Conv2d(channels, c1, 4, stride=2, padding=1), _ACTIVATIONS[act](),  # H -> H/2
                nn.Conv2d(c1, c2, 4, stride=2, padding=1), _ACTIVATIONS[act](),        # H/2 -> H/4
                nn.Flatten(),
            )
            self.to_posterior = nn.Linear(c2 * h4 * w4, 2 * cfg.latent_dim)
            self.decoder = nn.Sequential(
                nn.Linear(cfg.latent_dim, c2 * h4 * w4), _ACTIVATIONS[act](),
                nn.Unflatten(1, (c2, h4, w4)),
                nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), _ACTIVATIONS[act](),    # H/4 -> H/2
                nn.ConvTranspose2d(c1, out_channels, 4, stride=2, padding=1),               # H/2 -> H
                _FromImage(),
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x): (mu, logvar), each [B, latent_dim]."""
        mu, logvar = self.to_posterior(self.encoder(x)).chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters of p(x|z) for z of shape [..., latent_dim] -> [..., num_params]."""
        lead = z.shape[:-1]
        return self.decoder(z.reshape(-1, self.latent_dim)).reshape(*lead, self.num_params)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps with eps ~ N(0, I): differentiable in (mu, logvar)."""
        if eps.dim() == mu.dim() + 1:  # [B, S, D] samples per datapoint
            mu, logvar = mu.unsqueeze(1), logvar.unsqueeze(1)
        return mu + torch.exp(0.5 * logvar) * eps

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(params, mu, logvar). eps [B, S, D] gives S reparameterised samples per datapoint and the
        likelihood's parameters [B, S, F]; without it, one fresh sample and [B, F]. Training goes through forward so
        that DDP, which hooks forward, synchronises the gradients."""
        mu, logvar = self.encode(x)
        if eps is None:
            eps = torch.randn_like(mu)
        return self.decode(self.reparameterize(mu, logvar, eps)), mu, logvar

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               mean: bool = False) -> torch.Tensor:
        """Generate: z ~ N(0, I), x ~ p(x|z), as images in [0, 1] [num_samples, num_pixels].
        mean=True returns the mean of p(x|z) instead (Bernoulli: the pixel probabilities)."""
        device = next(self.parameters()).device
        z = torch.randn(num_samples, self.latent_dim, generator=generator, device=device)
        params = self.decode(z)
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

