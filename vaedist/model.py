"""The VAE: encoder q(z|x) (diagonal Gaussian), decoder p(x|z) (the likelihood `model.likelihood` names).

Single-device model code: it knows nothing of Ray, ranks or files (Kingma & Welling, 2014). Four
families (`model.kind`): an MLP, a conv family of stride-2 stages with optional residual blocks and
normalisation, the user's own module (vaedist/custom_model.py), and several groups of latents
(vaedist/hierarchical.py), all behind one interface; build_model builds the one the config names.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vaedist.config import ConfigError, ModelConfig
from vaedist.custom_model import CHECK_BATCH, build_custom, check_protocol
from vaedist.hierarchical import HierarchicalVAE
from vaedist.layers import (ACTIVATIONS as _ACTIVATIONS, FromImage, ResBlock, ToImage, ToParameters,
                            mlp as _mlp, norm as _norm)
from vaedist.likelihoods import Likelihood, get_likelihood
from vaedist.losses import GaussianPosterior, SampleTerms, gaussian_terms_of_forward

MNIST_SHAPE = (28, 28, 1)


# ---------------------------------------------------------------------------------------------
# The conv family.

def check_conv_geometry(cfg: ModelConfig, image_shape: tuple[int, int, int]) -> None:
    """The conv family halves height and width once per stage (model.hidden_dims has one channel
    count per stage): both must be divisible by 2^stages. Raises ConfigError naming the keys."""
    height, width, channels = image_shape
    stages = len(cfg.hidden_dims)
    factor = 2 ** stages
    if height % factor or width % factor:
        fits = max(s for s in range(stages + 1) if height % 2 ** s == 0 and width % 2 ** s == 0)
        raise ConfigError(
            f"model.hidden_dims: model.kind=conv has {stages} stride-2 stages (one per entry of "
            f"model.hidden_dims {cfg.hidden_dims}), which need image height and width divisible by "
            f"2^{stages} = {factor}, but the images are {height}x{width}x{channels} (height x width x channels); "
            + (f"use at most {fits} stages" if fits else "no number of stages fits")
            + f" or resize the images (data.image_size) to multiples of {factor}")


def _conv_nets(cfg: ModelConfig, image_shape: tuple[int, int, int], out_channels: int
               ) -> tuple[nn.Sequential, nn.Linear, nn.Sequential]:
    """(encoder, to_posterior, decoder) of the conv family. Each stage: a 4x4 stride-2 convolution
    (H -> H/2), its norm, the activation, then res_blocks_per_stage residual blocks; the decoder
    mirrors it with transposed convolutions, the last of which emits the likelihood's parameters.
    With no residual blocks and no norm the layer indices are those of the two-stage model that
    came before, so its checkpoints load unchanged."""
    check_conv_geometry(cfg, image_shape)
    height, width, channels = image_shape
    act, norm, blocks = cfg.activation, cfg.norm, cfg.res_blocks_per_stage
    dims = list(cfg.hidden_dims)
    factor = 2 ** len(dims)
    h, w = height // factor, width // factor
    enc: list[nn.Module] = [ToImage(image_shape)]
    for c_in, c_out in zip([channels, *dims], dims):
        enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), *_norm(norm, c_out), _ACTIVATIONS[act]()]
        enc += [ResBlock(c_out, act, norm) for _ in range(blocks)]
    enc.append(nn.Flatten())
    dec: list[nn.Module] = [nn.Linear(cfg.latent_dim, dims[-1] * h * w), _ACTIVATIONS[act](),
                            nn.Unflatten(1, (dims[-1], h, w))]
    for i in reversed(range(len(dims))):
        dec += [ResBlock(dims[i], act, norm) for _ in range(blocks)]
        if i > 0:
            dec += [nn.ConvTranspose2d(dims[i], dims[i - 1], 4, stride=2, padding=1), *_norm(norm, dims[i - 1]),
                    _ACTIVATIONS[act]()]
        else:
            dec += [ToParameters(dims[0], out_channels, 4, stride=2, padding=1), FromImage()]
    return nn.Sequential(*enc), nn.Linear(dims[-1] * h * w, 2 * cfg.latent_dim), nn.Sequential(*dec)


# ---------------------------------------------------------------------------------------------
# The VAE.

class VAE(nn.Module):
    """x in [B, num_pixels] (the likelihood's input transform of the pixels) -> q(z|x) =
    N(mu, diag exp(logvar)); z -> the likelihood's parameters [.., num_params].

    image_shape (height, width, channels) comes from the dataset's manifest; pixels are flattened
    channels last, as the shards store them, and so are the decoder's parameters (params_per_pixel
    per position). mlp and conv hold encoder, to_posterior and decoder; custom holds the module its
    factory returned as `net` (vaedist/custom_model.py), so a checkpoint's keys say which it is."""

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int] = MNIST_SHAPE,
                 likelihood: Likelihood | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(int(d) for d in image_shape)
        height, width, channels = self.image_shape
        self.num_pixels = num_pixels = height * width * channels
        self.likelihood = likelihood if likelihood is not None else get_likelihood(cfg, channels)
        self.num_params = self.likelihood.num_params(self.image_shape)
        out_channels = self.likelihood.params_per_pixel(channels)
        self.latent_dim = cfg.latent_dim
        self.latent_groups = (cfg.latent_dim,)  # one group (vaedist/hierarchical.py has several)
        act = cfg.activation
        self.net: nn.Module | None = None
        if cfg.kind == "mlp":
            widths = [num_pixels, *cfg.hidden_dims]
            self.encoder = _mlp(widths, act)
            self.to_posterior = nn.Linear(widths[-1], 2 * cfg.latent_dim)
            self.decoder = nn.Sequential(_mlp([cfg.latent_dim, *reversed(widths[1:])], act),
                                         nn.Linear(widths[1], self.num_params))
        elif cfg.kind == "conv":
            self.encoder, self.to_posterior, self.decoder = _conv_nets(cfg, self.image_shape, out_channels)
        else:
            self.net = build_custom(cfg, self.image_shape, out_channels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x): (mu, logvar), each [B, latent_dim]."""
        if self.net is not None:
            return self.net.encode(x)
        mu, logvar = self.to_posterior(self.encoder(x)).chunk(2, dim=-1)
        return mu, logvar

    def posterior(self, x: torch.Tensor) -> GaussianPosterior:
        """q(z|x), encoded once: evaluation draws the ELBO's, the importance weights' and the table's
        samples from it (losses.GaussianPosterior)."""
        return GaussianPosterior(self, x, *self.encode(x))

    def terms_of_forward(self, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor,
                         eps: torch.Tensor) -> SampleTerms:
        """The training pass's terms from forward(x, eps)'s output (losses.sample_terms calls it)."""
        return gaussian_terms_of_forward(self, out, x, eps)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters of p(x|z) for z of shape [..., latent_dim] -> [..., num_params]."""
        if self.net is not None:
            return self.net.decode(z)  # the protocol: leading dims kept (checked before training)
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


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int] = MNIST_SHAPE,
                likelihood: Likelihood | None = None) -> VAE | HierarchicalVAE:
    """The model model.kind names, for images of image_shape (height, width, channels)."""
    family = HierarchicalVAE if cfg.kind == "hierarchical" else VAE
    return family(cfg, image_shape, likelihood)


def check_model(cfg: ModelConfig, image_shape: tuple[int, int, int],
                batch: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0) -> None:
    """Before any cluster work: build the model for these images (the conv geometry, the factory)
    and, for model.kind=custom, run the protocol's checks (custom_model.check_protocol) on the first
    CHECK_BATCH datapoints of batch = (indices [N], images [N, H*W*C] uint8), which it then needs.
    Raises ConfigError (FactoryError) naming the key or factory."""
    torch.manual_seed(seed)
    model = build_model(cfg, image_shape)
    if cfg.kind != "custom":
        return
    indices, images_u8 = batch
    n = min(CHECK_BATCH, len(indices))
    x = model.likelihood.eval_input(images_u8[:n], indices[:n], "train", seed, torch.device("cpu"))
    check_protocol(model, x, cfg.factory)
