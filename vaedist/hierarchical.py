"""Hierarchical VAEs (`model.kind: hierarchical`): L groups of latents z = (z_1, ..., z_L), z_1
next to x and z_L at the top, with MLP or conv stages between them (model.group_stage). Torch only.

Generative path (both arrangements), a Markov chain from the top:
    p(z_L) = N(0, I),   p(z_l | z_l+1) = N(mu_p, diag e^logvar_p) from an MLP of z_l+1,
    p(x | z_1) the likelihood's parameters from an MLP of z_1.
Inference (model.hierarchy):
    top-down   a deterministic bottom-up pass d_l = MLP_l(d_l-1), d_0 = x; q(z_L | x) from d_L; below
               the top q(z_l | z_>l, x) = N(mu_p + dmu, diag e^(logvar_p + dlogvar)), (dmu, dlogvar) a
               linear map of [d_l, t_l], where t_l is the generative path's state from which p(z_l | z_l+1)
               is read: the Ladder VAE's arrangement (Sønderby et al. 2016) with NVAE's posterior
               relative to the prior (Vahdat & Kautz 2020, eq. 2).
    bottom-up  q(z_1 | x) from MLP_1(x), q(z_l | z_l-1) from MLP_l(z_l-1): Burda et al. (2016)'s
               architecture (latent_groups [100, 50], group_hidden_dims [[200, 200], [100, 100]], tanh).
Each stage has model.group_hidden_dims[l] (else hidden_dims) widths: an MLP's, or the channels of a
conv stage's stride-2 convolutions with residual blocks (top-down only: each group is a vector read
from its stage's feature map, one resolution per stage); the generative stage above a level mirrors
the inference stage below it.

The KL splits into one term per group (losses.GroupedTerms). Top-down: every group's term is the
analytic KL(q(z_l | z_>l, x) || p(z_l | z_l+1)) given the sampled parents, the lower-variance choice.
Bottom-up: the top group's is analytic given the sampled z_L-1; a lower group's prior depends on the
group above, itself sampled from z_l, so its term is log q - log p at the sample (Monte Carlo).

One group is the mlp (or conv) family of vaedist/model.py: the same layers in the same parameter
order, so the same weights give the same loss (a test checks it). The noise of S samples is [B, S, latent_dim],
split into the groups in latent_groups' order, z_1 first, as is every concatenation of groups here.
Under autocast the layers run in half precision and the densities in float32 (q's and p's parameters
are cast up, as the one-layer losses do).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaedist.config import ConfigError, ModelConfig
from vaedist.layers import ACTIVATIONS, FromImage, ResBlock, ToImage, ToParameters, mlp, norm
from vaedist.likelihoods import Likelihood, get_likelihood
from vaedist.losses import (GroupedTerms, _acc, gaussian_kl_between_per_dim, gaussian_kl_per_dim, gaussian_log_prob,
                            gaussian_log_prob_per_dim, log_px_given_z, standard_normal_log_prob)


Stages = tuple[list[nn.Module], list[int], nn.Module, list[nn.Module], list[int]]


def _mlp_stages(cfg: ModelConfig, image_shape: tuple[int, int, int], num_params: int, params_per_pixel: int) -> Stages:
    """(inference stages, their output widths, p(x|z_1)'s network, the prior states' networks, the
    prior states' widths) of MLP stages: stage l reads x (l = 0), else the stage below's features
    (top-down) or the group below (bottom-up)."""
    groups, widths, act = cfg.latent_groups, cfg.stage_widths(), cfg.activation
    num, top_down = len(groups), cfg.hierarchy == "top-down"
    inputs = [math.prod(image_shape)] + [widths[l - 1][-1] if top_down else groups[l - 1] for l in range(1, num)]
    encoder = [mlp([inputs[l], *widths[l]], act) for l in range(num)]
    decoder = nn.Sequential(mlp([groups[0], *reversed(widths[0])], act), nn.Linear(widths[0][0], num_params))
    prior_state = [mlp([groups[l + 1], *reversed(widths[l + 1])], act) for l in range(num - 1)]
    return encoder, [w[-1] for w in widths], decoder, prior_state, [widths[l + 1][0] for l in range(num - 1)]


class OnVectors(nn.Module):
    """A network of [N, in] applied to [..., in] (leading dimensions flattened into N and restored)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out = self.net(v.reshape(-1, v.shape[-1]))
        return out.reshape(*v.shape[:-1], out.shape[-1])


def _down(c_in: int, channels: list[int], act: str, norm_kind: str, blocks: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for c_prev, c in zip([c_in, *channels], channels):
        layers += [nn.Conv2d(c_prev, c, 4, stride=2, padding=1), *norm(norm_kind, c), ACTIVATIONS[act]()]
        layers += [ResBlock(c, act, norm_kind) for _ in range(blocks)]
    return layers


def _up(c_out: int, channels: list[int], act: str, norm_kind: str, blocks: int, to_params: bool) -> list[nn.Module]:
    """_down's mirror, to c_out channels; to_params: the last layer emits the likelihood's parameters."""
    dims = [c_out, *channels]
    layers: list[nn.Module] = []
    for i in reversed(range(1, len(dims))):
        layers += [ResBlock(dims[i], act, norm_kind) for _ in range(blocks)]
        last = i == 1 and to_params  # emits the likelihood's parameters: the conv family's ToParameters
        layers.append((ToParameters if last else nn.ConvTranspose2d)(dims[i], dims[i - 1], 4, stride=2, padding=1))
        if not last:
            layers += [*norm(norm_kind, dims[i - 1]), ACTIVATIONS[act]()]
    return layers


def _conv_stages(cfg: ModelConfig, image_shape: tuple[int, int, int], num_params: int, params_per_pixel: int
                 ) -> Stages:
    """_mlp_stages' five for conv stages (top-down only): stage l maps the feature map below (the
    image for l = 0) through its stride-2 convolutions and residual blocks, and hands on its map
    flattened; a group's prior state is the mirror of the stage above it, from the group above,
    flattened at the resolution of the group's own stage."""
    height, width, channels = image_shape
    widths, act, norm_kind, blocks = cfg.stage_widths(), cfg.activation, cfg.norm, cfg.res_blocks_per_stage
    groups, num = cfg.latent_groups, len(cfg.latent_groups)
    total = sum(len(w) for w in widths)
    if height % 2 ** total or width % 2 ** total:
        raise ConfigError(f"model.group_hidden_dims: conv stages halve height and width once per entry ({total} in "
                          f"{widths}), which needs images divisible by 2^{total} = {2 ** total}, but they are "
                          f"{height}x{width}; use fewer entries or resize the images (data.image_size)")
    shapes, h, w = [], height, width      # each stage's output (channels, height, width)
    for stage in widths:
        h, w = h // 2 ** len(stage), w // 2 ** len(stage)
        shapes.append((stage[-1], h, w))
    ins = [channels] + [shapes[l - 1][0] for l in range(1, num)]
    encoder = [nn.Sequential(ToImage(image_shape) if l == 0 else nn.Unflatten(1, shapes[l - 1]),
                             *_down(ins[l], widths[l], act, norm_kind, blocks), nn.Flatten()) for l in range(num)]
    decoder = OnVectors(nn.Sequential(
        nn.Linear(groups[0], math.prod(shapes[0])), ACTIVATIONS[act](), nn.Unflatten(1, shapes[0]),
        *_up(params_per_pixel, widths[0], act, norm_kind, blocks, to_params=True), FromImage()))
    prior_state = [OnVectors(nn.Sequential(
        nn.Linear(groups[l + 1], math.prod(shapes[l + 1])), ACTIVATIONS[act](), nn.Unflatten(1, shapes[l + 1]),
        *_up(shapes[l][0], widths[l + 1], act, norm_kind, blocks, to_params=False), nn.Flatten())) for l in range(num - 1)]
    sizes = [math.prod(s) for s in shapes]
    return encoder, sizes, decoder, prior_state, sizes[:-1]


class Chain:
    """One pass down the groups for S samples: z [B, S, D] and q's parameters mu, logvar ([B, S, D],
    concatenated only when asked: training needs neither), groups concatenated z_1 first; each group's
    KL term per dimension and log p(z) - log q(z|x) at the samples [B, S]."""

    def __init__(self, zs, mus, logvars, kl_per_dim_groups, log_ratio):
        self.z = torch.cat(zs, dim=-1)
        self._mus, self._logvars = mus, logvars
        self.kl_per_dim_groups, self.log_ratio = tuple(kl_per_dim_groups), log_ratio

    def _joined(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.expand(-1, self.z.shape[1], -1) for t in parts], dim=-1)

    @property
    def mu(self) -> torch.Tensor:
        return self._joined(self._mus)

    @property
    def logvar(self) -> torch.Tensor:
        return self._joined(self._logvars)


class HierarchicalPosterior:
    """q(z_1..L | x) for a batch: the deterministic pass over x is done once; terms(eps) and sample(eps)
    run the groups' chain for given noise. mu, logvar: every group's q parameters along the mean path
    (each parent group at its posterior mean), z_1 first; in the top-down arrangement the top group's
    are exactly q(z_L | x)'s, in the bottom-up one the bottom group's are exactly q(z_1 | x)'s."""

    def __init__(self, model: "HierarchicalVAE", x: torch.Tensor):
        self.model, self.x = model, x
        self.features = model.features(x)
        self._mean_path: Chain | None = None  # computed on first use: training never asks for it

    def _mean(self) -> Chain:
        if self._mean_path is None:
            zeros = torch.zeros(self.x.shape[0], 1, self.model.latent_dim, device=self.x.device, dtype=self.x.dtype)
            self._mean_path = self.model.chain(self.features, zeros)
        return self._mean_path

    @property
    def mu(self) -> torch.Tensor:
        return self._mean().mu[:, 0]

    @property
    def logvar(self) -> torch.Tensor:
        return self._mean().logvar[:, 0]

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """One joint sample of all groups [B, D] for noise eps [B, D]."""
        return self.model.chain(self.features, eps.unsqueeze(1)).z[:, 0]

    def terms(self, eps: torch.Tensor) -> GroupedTerms:
        """The terms of S joint samples per datapoint, eps [B, S, D]."""
        chain = self.model.chain(self.features, eps)
        params = self.model.decode(chain.z)
        return GroupedTerms(log_px_z=log_px_given_z(self.model, params, self.x),
                            kl_per_dim_groups=chain.kl_per_dim_groups, log_ratio=chain.log_ratio, z=chain.z)


class HierarchicalVAE(nn.Module):
    """The protocol of vaedist.model.VAE (encode, decode, posterior, terms_of_forward, sample;
    latent_dim, latent_groups, likelihood, image_shape, num_params) for L groups of latents."""

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int],
                 likelihood: Likelihood | None = None):
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(int(d) for d in image_shape)
        height, width, channels = self.image_shape
        self.num_pixels = height * width * channels
        self.likelihood = likelihood if likelihood is not None else get_likelihood(cfg, channels)
        self.num_params = self.likelihood.num_params(self.image_shape)
        self.latent_groups = tuple(cfg.latent_groups)
        self.latent_dim = sum(self.latent_groups)
        self.top_down = cfg.hierarchy == "top-down"
        self.net = None  # not a custom model
        build = _conv_stages if cfg.group_stage == "conv" else _mlp_stages
        stages = build(cfg, self.image_shape, self.num_params, self.likelihood.params_per_pixel(channels))
        encoder, feature_widths, decoder, prior_state, state_widths = stages
        groups, num = self.latent_groups, len(self.latent_groups)
        # Registered in this order so that one group's parameters come in the order of the one-group
        # family (mlp or conv) it extends.
        self.encoder = nn.ModuleList(encoder)
        # q's head per group: below the top (top-down), it also reads the generative state t_l.
        head_in = [feature_widths[l] + (state_widths[l] if self.top_down and l < num - 1 else 0) for l in range(num)]
        self.to_posterior = nn.ModuleList(nn.Linear(head_in[l], 2 * groups[l]) for l in range(num))
        self.decoder = decoder
        # p(z_l | z_l+1) for l < L: the state t_l from z_l+1 (mirroring stage l+1), then its head.
        self.prior_state = nn.ModuleList(prior_state)
        self.to_prior = nn.ModuleList(nn.Linear(state_widths[l], 2 * groups[l]) for l in range(num - 1))

    # -- inference ---------------------------------------------------------------------------

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """What of q depends on x alone. top-down: the bottom-up pass d_1..d_L, each [B, width];
        bottom-up: the first stage's features (q(z_1 | x) is read from them)."""
        if not self.top_down:
            return [self.encoder[0](x)]
        feats, h = [], x
        for stage in self.encoder:
            h = stage(h)
            feats.append(h)
        return feats

    def chain(self, features: list[torch.Tensor], eps: torch.Tensor) -> Chain:
        """z and its terms for noise eps [B, S, D]; features from self.features(x)."""
        return (self._top_down if self.top_down else self._bottom_up)(features, eps)

    def _top_down(self, feats: list[torch.Tensor], eps: torch.Tensor) -> Chain:
        num, eps_groups = len(self.latent_groups), eps.split(self.latent_groups, dim=-1)
        zs, mus, logvars, kls = [None] * num, [None] * num, [None] * num, [None] * num
        mu, logvar = _acc(self.to_posterior[-1](feats[-1])).unsqueeze(1).chunk(2, dim=-1)   # q(z_L | x), [B, 1, D_L]
        z = mu + torch.exp(0.5 * logvar) * eps_groups[-1]
        kls[-1] = gaussian_kl_per_dim(mu, logvar)
        log_ratio = standard_normal_log_prob(z) - gaussian_log_prob(z, mu, logvar)
        zs[-1], mus[-1], logvars[-1] = z, mu, logvar
        for l in range(num - 2, -1, -1):
            state = self.prior_state[l](z)                                              # t_l, [B, S, width]
            mu_p, logvar_p = _acc(self.to_prior[l](state)).chunk(2, dim=-1)
            d = feats[l].unsqueeze(1).expand(-1, state.shape[1], -1)
            d_mu, d_logvar = _acc(self.to_posterior[l](torch.cat([d, state], dim=-1))).chunk(2, dim=-1)
            mu, logvar = mu_p + d_mu, logvar_p + d_logvar
            z = mu + torch.exp(0.5 * logvar) * eps_groups[l]
            kls[l] = gaussian_kl_between_per_dim(mu, logvar, mu_p, logvar_p)
            log_ratio = log_ratio + gaussian_log_prob(z, mu_p, logvar_p) - gaussian_log_prob(z, mu, logvar)
            zs[l], mus[l], logvars[l] = z, mu, logvar
        return Chain(zs, mus, logvars, kls, log_ratio)

    def _bottom_up(self, feats: list[torch.Tensor], eps: torch.Tensor) -> Chain:
        num, eps_groups = len(self.latent_groups), eps.split(self.latent_groups, dim=-1)
        zs, mus, logvars, kls = [], [], [], [None] * num
        h = feats[0].unsqueeze(1)                                                       # [B, 1, width]
        for l in range(num):
            if l > 0:
                h = self.encoder[l](zs[-1])                                             # q(z_l | z_l-1)
            mu, logvar = _acc(self.to_posterior[l](h)).chunk(2, dim=-1)
            zs.append(mu + torch.exp(0.5 * logvar) * eps_groups[l])
            mus.append(mu)
            logvars.append(logvar)
        kls[-1] = gaussian_kl_per_dim(mus[-1], logvars[-1])
        log_ratio = standard_normal_log_prob(zs[-1]) - gaussian_log_prob(zs[-1], mus[-1], logvars[-1])
        for l in range(num - 2, -1, -1):
            mu_p, logvar_p = _acc(self.to_prior[l](self.prior_state[l](zs[l + 1]))).chunk(2, dim=-1)
            log_p = gaussian_log_prob_per_dim(zs[l], mu_p, logvar_p)
            log_q = gaussian_log_prob_per_dim(zs[l], mus[l], logvars[l])
            kls[l] = log_q - log_p
            log_ratio = log_ratio + (log_p - log_q).sum(dim=-1)
        return Chain(zs, mus, logvars, kls, log_ratio)

    def posterior(self, x: torch.Tensor) -> HierarchicalPosterior:
        return HierarchicalPosterior(self, x)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) [B, latent_dim] of every group along the mean path (HierarchicalPosterior)."""
        posterior = self.posterior(x)
        return posterior.mu, posterior.logvar

    # -- generation --------------------------------------------------------------------------

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters of p(x | z_1) for z [..., latent_dim] (all groups; p(x | z)
        reads only z_1) -> [..., num_params]."""
        return self.decoder(z[..., :self.latent_groups[0]])

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> GroupedTerms:
        """The training pass: S joint samples per datapoint (eps [B, S, D]; None: one fresh sample)
        and every term the objectives ask for, computed here so that DDP, which hooks forward,
        synchronises the gradients of the priors' layers too."""
        if eps is None:
            eps = torch.randn(x.shape[0], 1, self.latent_dim, device=x.device, dtype=x.dtype)
        return self.posterior(x).terms(eps)

    def terms_of_forward(self, out: GroupedTerms, x: torch.Tensor, eps: torch.Tensor) -> GroupedTerms:
        return out

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None,
               mean: bool = False) -> torch.Tensor:
        """Ancestral sampling: z_L ~ N(0, I), z_l ~ p(z_l | z_l+1), x ~ p(x | z_1), as images in [0, 1]
        [num_samples, num_pixels]. mean=True returns the mean of p(x | z_1) instead."""
        device = next(self.parameters()).device
        eps = torch.randn(num_samples, self.latent_dim, generator=generator, device=device)
        return self.decode_prior_sample(eps, mean, generator)

    def prior_chain(self, eps: torch.Tensor) -> torch.Tensor:
        """z of all groups [N, latent_dim] from noise eps [N, latent_dim] through the generative path."""
        eps_groups = eps.split(self.latent_groups, dim=-1)
        zs = [None] * len(self.latent_groups)
        zs[-1] = eps_groups[-1]
        for l in range(len(zs) - 2, -1, -1):
            mu_p, logvar_p = self.to_prior[l](self.prior_state[l](zs[l + 1])).chunk(2, dim=-1)
            zs[l] = mu_p + torch.exp(0.5 * logvar_p) * eps_groups[l]
        return torch.cat(zs, dim=-1)

    def decode_prior_sample(self, eps: torch.Tensor, mean: bool = False,
                            generator: torch.Generator | None = None) -> torch.Tensor:
        params = self.decode(self.prior_chain(eps))
        return self.likelihood.mean(params) if mean else self.likelihood.sample(params, generator)
