"""Training objectives: the scalar a step minimises, from one pass's SampleTerms. Torch only.

One small object per objective, looked up by `train.objective` (OBJECTIVES), so the loop asks it
(`num_samples`, then `objective(terms, kl_weight)`) and never tests a name. Each returns the
minibatch mean per datapoint, in nats. Whatever the objective, a run still reports the plain
negative ELBO l_i and its parts (SampleTerms.parts()); the objective's own value is logged beside
them as `train_objective`, so runs of different objectives compare on the same numbers.

`weighted(terms, kl_weight, weights)` is the same value for a batch padded to a static shape
(vaedist/step.py): weights [B] are 1 for real rows and 0 for padding, every mean is over the real
rows only, and kl_weight may be a tensor on the device; it has no branch on a value, so a CUDA graph
can hold it.

`kl_weight` is the KL warm-up's factor for this step (engine.kl_weight: 0 -> 1, then 1). With
x the data, z_s = mu + sigma * eps_s the S reparameterised samples and KL_j the analytic KL of
latent dimension j:

    elbo       mean_i [ -1/S sum_s log p(x_i|z_s) + w KL_i ]                  (Kingma & Welling 2014)
    beta       mean_i [ -1/S sum_s log p(x_i|z_s) + w beta KL_i ]             (Higgins et al. 2017)
    iwae       mean_i [ -log 1/k sum_s exp(log p(x_i|z_s) + w (log p(z_s) - log q(z_s|x_i))) ]
                                                                               (Burda et al. 2016)
    free-bits  mean_i [ -1/S sum_s log p(x_i|z_s) ] + w sum_j max(lambda, mean_i KL_ij)
                                                                               (Kingma et al. 2016)
               with j a latent dimension, or with train.free_bits_per=group a latent group

With several latent groups (vaedist/hierarchical.py) nothing here changes: KL_i is the sum of the
groups' terms, log p(z_s) - log q(z_s|x_i) the joint over all groups, and free bits floors every
dimension of every group (group l's floor is then lambda * D_l) or, per group, each group's KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from vaedist import registry
from vaedist.config import TrainConfig
from vaedist.losses import GroupedTerms, SampleTerms, batch_loss
from vaedist.registry import check_registry


class Objective:
    """The interface; OBJECTIVES maps each subclass's `name` (a train.objective value) to it."""

    name: ClassVar[str] = ""
    num_samples: int
    """S, draws of z per datapoint that the step's one forward pass makes."""

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Objective":
        raise NotImplementedError

    def __call__(self, terms: SampleTerms | GroupedTerms, kl_weight: float = 1.0) -> torch.Tensor:
        """The minibatch's value to minimise: a scalar, the mean per datapoint, nats."""
        raise NotImplementedError

    def weighted(self, terms: SampleTerms | GroupedTerms, kl_weight, weights: torch.Tensor) -> torch.Tensor:
        """__call__ over the rows whose weight is 1 (the others 0: padding), branch-free."""
        raise NotImplementedError


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The mean of values [B] over the rows of weight 1 (padding has weight 0 and adds exactly 0)."""
    return (values * weights).sum() / weights.sum()


@dataclass(frozen=True)
class ELBO(Objective):
    """The negative ELBO: the reconstruction term averaged over S samples plus the analytic KL."""

    name: ClassVar[str] = "elbo"
    num_samples: int = 1

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "ELBO":
        return cls(cfg.num_samples_mc)

    def __call__(self, terms: SampleTerms | GroupedTerms, kl_weight: float = 1.0) -> torch.Tensor:
        return batch_loss(terms.parts(), kl_weight)

    def weighted(self, terms: SampleTerms | GroupedTerms, kl_weight, weights: torch.Tensor) -> torch.Tensor:
        parts = terms.parts()
        return _weighted_mean(parts.recon_nll + kl_weight * parts.kl, weights)


@dataclass(frozen=True)
class Beta(Objective):
    """β-VAE: the KL weighted by β (and by the warm-up factor on top), β = 1 being the ELBO."""

    name: ClassVar[str] = "beta"
    beta: float = 1.0
    num_samples: int = 1

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Beta":
        return cls(beta=cfg.beta, num_samples=cfg.num_samples_mc)

    def __call__(self, terms: SampleTerms | GroupedTerms, kl_weight: float = 1.0) -> torch.Tensor:
        return batch_loss(terms.parts(), kl_weight * self.beta)

    def weighted(self, terms: SampleTerms | GroupedTerms, kl_weight, weights: torch.Tensor) -> torch.Tensor:
        parts = terms.parts()
        return _weighted_mean(parts.recon_nll + (kl_weight * self.beta) * parts.kl, weights)


@dataclass(frozen=True)
class IWAE(Objective):
    """The importance-weighted bound with k = num_samples samples per datapoint.

    Its gradient is autograd's of the log-sum-exp: -sum_s w~_s grad log w_s, with w~ = softmax_s(log w)
    the normalised importance weights, each log w_s differentiated through the reparameterised z_s
    into the encoder (Burda et al. 2016, section 3). k = 1 is the ELBO with its KL estimated on the one
    sample (log q - log p at z) instead of analytically: equal in expectation to `elbo`, not per draw.

    The KL warm-up scales the sampled log p(z_s) - log q(z_s|x_i) inside each weight (at w = 1 the
    plain bound; at w = 0 a log-mean-exp of the likelihoods). The decoder runs on batch x k samples:
    time and activation memory grow linearly with k (`vaedist bench objectives`)."""

    name: ClassVar[str] = "iwae"
    num_samples: int = 5

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "IWAE":
        return cls(cfg.iwae_samples)

    def __call__(self, terms: SampleTerms | GroupedTerms, kl_weight: float = 1.0) -> torch.Tensor:
        if kl_weight == 1.0:
            log_w = terms.log_weights()
        else:
            log_w = terms.log_px_z + kl_weight * terms.log_prior_ratio()
        k = log_w.shape[1]
        return -(torch.logsumexp(log_w, dim=1) - math.log(k)).mean()

    def weighted(self, terms: SampleTerms | GroupedTerms, kl_weight, weights: torch.Tensor) -> torch.Tensor:
        log_w = terms.log_px_z + kl_weight * terms.log_prior_ratio()
        return -_weighted_mean(torch.logsumexp(log_w, dim=1) - math.log(log_w.shape[1]), weights)


@dataclass(frozen=True)
class FreeBits(Objective):
    """Free bits, the variant of Kingma et al. (2016) with one group per latent dimension (or, with
    per_group, one per latent group of the model): each dimension's (group's) KL, averaged over the
    minibatch, counts as at least `free_bits` nats,
    max(lambda, mean_i KL_ij). A dimension below the floor gets no gradient from the KL term (the
    encoder may use those nats for free); one above it is penalised as in the ELBO. The average is
    over this worker's minibatch (under DDP each rank floors its own batch's average)."""

    name: ClassVar[str] = "free-bits"
    free_bits: float = 0.0
    num_samples: int = 1
    per_group: bool = False
    """Floor each latent group's KL (train.free_bits_per=group) instead of each dimension's."""

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "FreeBits":
        return cls(free_bits=cfg.free_bits, num_samples=cfg.num_samples_mc, per_group=cfg.free_bits_per == "group")

    def _floored(self, terms: SampleTerms | GroupedTerms) -> torch.Tensor:
        """The KL of each floored unit, [B, D] (a dimension) or [B, L] (per_group: a latent group)."""
        kl_per_dim = terms.kl_per_dim()   # [B, D]
        if self.per_group:
            return torch.stack([t.sum(dim=-1) for t in kl_per_dim.split(terms.latent_groups, dim=-1)], dim=-1)
        return kl_per_dim

    def __call__(self, terms: SampleTerms | GroupedTerms, kl_weight: float = 1.0) -> torch.Tensor:
        kl = torch.clamp(self._floored(terms).mean(dim=0), min=self.free_bits).sum()
        return -terms.log_px_z.mean() + kl_weight * kl

    def weighted(self, terms: SampleTerms | GroupedTerms, kl_weight, weights: torch.Tensor) -> torch.Tensor:
        kl_per_unit = (self._floored(terms) * weights.unsqueeze(1)).sum(dim=0) / weights.sum()
        kl = torch.clamp(kl_per_unit, min=self.free_bits).sum()
        return -_weighted_mean(terms.log_px_z.mean(dim=1), weights) + kl_weight * kl


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (ELBO, Beta, IWAE, FreeBits)}
check_registry("train.objective", OBJECTIVES, registry.OBJECTIVES)


def objective_for(cfg: TrainConfig) -> Objective:
    """The objective train.objective names, with its settings from the same config."""
    return OBJECTIVES[cfg.objective].from_config(cfg)
