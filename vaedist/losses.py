"""Per-datapoint objectives, in nats, each of shape [B]. Torch only.

For datapoint x_i (Kingma & Welling 2014, eq. 3 and Appendix B):
    l_i = -E_{q(z|x_i)}[log p(x_i|z)] + KL(q(z|x_i) || N(0, I))    (the negative ELBO)
The expectation is a Monte Carlo average over S reparameterised samples; the KL is analytic.
Because log p(x) = ELBO + KL(q(z|x) || p(z|x)), the importance-weighted estimate (Burda et al. 2016)
    log p(x_i) ~= log (1/K) sum_k p(x_i|z_k) p(z_k) / q(z_k|x_i),   z_k ~ q(z|x_i)
is a tighter lower bound that approaches log p(x_i) as K grows; -loss <= log p(x) always.

`model` is a VAE-like module: forward(x, eps) -> (params, mu, logvar), encode(x) -> (mu, logvar),
decode(z [.., D]) -> params [.., F], and attributes latent_dim and likelihood (vaedist.likelihoods),
whose log_prob(params, x) is log p(x|z). Noise `eps` may be passed ([B, S, D]) so callers can make
it per-datapoint reproducible.

Several latent groups (vaedist/hierarchical.py) fit the same functions through two methods a model
may have: `terms_of_forward(forward's output, x, eps)` -> the pass's terms, and `posterior(x)` -> a
posterior that draws terms for given noise; without them, a model is read as one Gaussian group
(forward's (params, mu, logvar), encode's (mu, logvar)). The terms object (SampleTerms for one
Gaussian group with prior N(0, I), GroupedTerms for L groups) answers what the ELBO, the importance
weights and the objectives ask: parts() (with the KL of each group), log_weights(),
log_prior_ratio(), kl_per_dim().
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vaedist.likelihoods import likelihood_of

LOG_2PI = math.log(2 * math.pi)


@dataclass
class LossParts:
    """Per-datapoint terms, each [B], in nats."""
    loss: torch.Tensor       # l_i = recon_nll + kl = -ELBO
    recon_nll: torch.Tensor  # -E_q[log p(x_i|z)]
    kl: torch.Tensor         # KL(q(z|x_i) || p(z))
    kl_groups: torch.Tensor | None = None  # [B, L]: each latent group's term of kl, z_1 (next to x) first


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_j, e^logvar_j) || N(0, 1)) of each latent dimension j = -1/2 (1 + logvar_j - mu_j^2 - e^logvar_j)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag e^logvar) || N(0, I)), the sum over dimensions of gaussian_kl_per_dim  (K&W App. B)."""
    return gaussian_kl_per_dim(mu, logvar).sum(dim=-1)


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag e^logvar), summed over the last dimension."""
    return -0.5 * torch.sum(LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar), dim=-1)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * torch.sum(LOG_2PI + z.pow(2), dim=-1)


def gaussian_log_prob_per_dim(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z_j; mu_j, e^logvar_j) of each dimension j (gaussian_log_prob before the sum)."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))


def gaussian_kl_between_per_dim(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor,
                                logvar_p: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_q, e^logvar_q) || N(mu_p, e^logvar_p)) of each dimension
    = 1/2 (logvar_p - logvar_q + (e^logvar_q + (mu_q - mu_p)^2) / e^logvar_p - 1)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Accumulate in at least float32: under autocast the decoder may return bf16/fp16."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _noise(mu: torch.Tensor, num_samples: int, eps: torch.Tensor | None,
           generator: torch.Generator | None) -> torch.Tensor:
    if eps is not None:
        expected = (mu.shape[0], num_samples, mu.shape[1])
        if tuple(eps.shape) != expected:
            raise ValueError(f"eps must have shape {expected} (batch, samples, latent), got {tuple(eps.shape)}")
        return eps.to(device=mu.device, dtype=mu.dtype)
    shape = (mu.shape[0], num_samples, mu.shape[1])
    if generator is None:
        return torch.randn(shape, device=mu.device, dtype=mu.dtype)
    # Draw on the generator's device, then move: a CPU generator stays usable for a GPU model.
    return torch.randn(shape, generator=generator, device=generator.device, dtype=mu.dtype).to(mu.device)


def latent_dim_of(model) -> int:
    """The latent size of a VAE, also when wrapped (DistributedDataParallel keeps it in .module)."""
    return getattr(model, "module", model).latent_dim


@dataclass
class SampleTerms:
    """What one pass through the model gives for S samples per datapoint: enough for the ELBO and for
    any objective built on the same samples (vaedist.objectives)."""
    log_px_z: torch.Tensor  # log p(x_i|z_s), [B, S]
    z: torch.Tensor         # the reparameterised samples, [B, S, D]
    mu: torch.Tensor        # q(z|x_i)'s mean, [B, D]
    logvar: torch.Tensor    # q(z|x_i)'s log-variance, [B, D]

    @property
    def latent_groups(self) -> tuple[int, ...]:
        return (self.mu.shape[-1],)

    def parts(self) -> LossParts:
        """l_i with its parts: the reconstruction term averaged over the S samples, the KL analytic."""
        recon_nll = -self.log_px_z.mean(dim=1)
        kl = gaussian_kl(self.mu, self.logvar)
        return LossParts(loss=recon_nll + kl, recon_nll=recon_nll, kl=kl, kl_groups=kl.unsqueeze(-1))

    def kl_per_dim(self) -> torch.Tensor:
        """Each latent dimension's analytic KL, [B, D]."""
        return gaussian_kl_per_dim(self.mu, self.logvar)

    def log_prior_ratio(self) -> torch.Tensor:
        """log p(z_s) - log q(z_s|x_i), [B, S]: the sampled KL's negative."""
        return (standard_normal_log_prob(self.z)
                - gaussian_log_prob(self.z, self.mu.unsqueeze(1), self.logvar.unsqueeze(1)))

    def log_weights(self) -> torch.Tensor:
        """log p(x_i|z_s) + log p(z_s) - log q(z_s|x_i), [B, S]: the importance weights of z_s."""
        return (self.log_px_z + standard_normal_log_prob(self.z)
                - gaussian_log_prob(self.z, self.mu.unsqueeze(1), self.logvar.unsqueeze(1)))


@dataclass
class GroupedTerms:
    """SampleTerms of L latent groups z = (z_1, ..., z_L), z_1 next to x, for S samples per datapoint.

    kl_per_dim_groups[l] [B, S or 1, D_l] is group l's term of the KL, per dimension, for each sample of
    the groups it is conditioned on: analytic KL(q(z_l | parents) || p(z_l | z_>l)) where both
    Gaussians are fixed by the sampled parents, else log q - log p at the sampled z_l (a one-sample
    Monte Carlo term); size 1 in the sample axis where it depends on no sample. Their expectation
    sums to E_q[log q(z|x) - log p(z)], so parts() is the negative ELBO. log_ratio [B, S] is
    sum_l log p(z_l | z_>l) - log q(z_l | ...) at the samples: the importance weights' latent part."""
    log_px_z: torch.Tensor                 # log p(x_i | z_s), [B, S]
    kl_per_dim_groups: tuple[torch.Tensor, ...]
    log_ratio: torch.Tensor                # [B, S]
    z: torch.Tensor                        # the samples, all groups concatenated, [B, S, D]

    @property
    def latent_groups(self) -> tuple[int, ...]:
        return tuple(t.shape[-1] for t in self.kl_per_dim_groups)

    def parts(self) -> LossParts:
        recon_nll = -self.log_px_z.mean(dim=1)
        kl_groups = torch.stack([t.mean(dim=1).sum(dim=-1) for t in self.kl_per_dim_groups], dim=-1)
        kl = kl_groups.sum(dim=-1)
        return LossParts(loss=recon_nll + kl, recon_nll=recon_nll, kl=kl, kl_groups=kl_groups)

    def kl_per_dim(self) -> torch.Tensor:
        """Each latent dimension's KL term averaged over the samples, [B, D], groups in order."""
        return torch.cat([t.mean(dim=1) for t in self.kl_per_dim_groups], dim=-1)

    def log_prior_ratio(self) -> torch.Tensor:
        return self.log_ratio

    def log_weights(self) -> torch.Tensor:
        return self.log_px_z + self.log_ratio


def log_px_given_z(model, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """log p(x_i|z_s) [B, S] from the decoder's parameters [B, S, F], accumulated in float32 or wider."""
    return likelihood_of(model).log_prob(_acc(params), x.unsqueeze(1).to(_acc(params).dtype))


def _terms(model, params: torch.Tensor, x: torch.Tensor, z: torch.Tensor, mu: torch.Tensor,
           logvar: torch.Tensor) -> SampleTerms:
    """SampleTerms from the decoder's parameters [B, S, F] of S samples per datapoint."""
    return SampleTerms(log_px_z=log_px_given_z(model, params, x), z=_acc(z), mu=_acc(mu), logvar=_acc(logvar))


def gaussian_terms_of_forward(model, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor,
                              eps: torch.Tensor) -> SampleTerms:
    """SampleTerms of a one-group model's forward output (params [B, S, F], mu, logvar) for noise eps."""
    params, mu, logvar = out
    return _terms(model, params, x, model.reparameterize(mu, logvar, eps.to(mu.dtype)), mu, logvar)


class GaussianPosterior:
    """q(z|x) = N(mu, diag e^logvar) of a one-group model, computed once by model.encode(x) and reused
    by the ELBO, the importance weights and the table's z."""

    def __init__(self, model, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor):
        self.model, self.x, self.mu, self.logvar = model, x, mu, logvar

    def sample(self, eps: torch.Tensor) -> torch.Tensor:
        """z = mu + sigma * eps for eps [B, D]."""
        return self.mu + torch.exp(0.5 * self.logvar) * eps

    def terms(self, eps: torch.Tensor) -> SampleTerms:
        """The terms of S samples, eps [B, S, D]."""
        mu, logvar = self.mu, self.logvar
        z = self.model.reparameterize(mu, logvar, eps.to(device=mu.device, dtype=mu.dtype))
        return _terms(self.model, self.model.decode(z), self.x, z, mu, logvar)


def posterior_of(model, x: torch.Tensor):
    """model.posterior(x), or for a model without one, the Gaussian of its encode(x)."""
    if hasattr(model, "posterior"):
        return model.posterior(x)
    return GaussianPosterior(model, x, *model.encode(x))


def sample_terms(model, x: torch.Tensor, num_samples: int = 1, eps: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> SampleTerms | GroupedTerms:
    """One forward pass with `num_samples` draws of z per datapoint. Calls model(x, eps), so a
    DDP-wrapped model syncs gradients, and the model's terms_of_forward on what it returned."""
    shape_ref = torch.empty(x.shape[0], latent_dim_of(model), device=x.device, dtype=x.dtype)
    noise = _noise(shape_ref, num_samples, eps, generator)
    module = getattr(model, "module", model)
    out = model(x, noise)
    if hasattr(module, "terms_of_forward"):
        return module.terms_of_forward(out, x, noise)
    return gaussian_terms_of_forward(module, out, x, noise)


def negative_elbo(model, x: torch.Tensor, num_samples: int = 1, eps: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> LossParts:
    """l_i with its parts, the reconstruction term averaged over `num_samples` draws of z."""
    return sample_terms(model, x, num_samples, eps, generator).parts()


def negative_elbo_given_posterior(model, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                                  eps: torch.Tensor) -> LossParts:
    """negative_elbo for a q(z|x) already computed by model.encode(x): evaluation encodes once and
    reuses (mu, logvar) for the ELBO, the importance weights and z. eps [B, S, D]."""
    _noise(mu, eps.shape[1], eps, None)  # shape check
    return GaussianPosterior(model, x, mu, logvar).terms(eps).parts()


def batch_loss(parts: LossParts, kl_weight: float = 1.0) -> torch.Tensor:
    """The minibatch objective: the mean of l_i (kl_weight < 1 only during KL warm-up)."""
    if kl_weight == 1.0:
        return parts.loss.mean()
    return (parts.recon_nll + kl_weight * parts.kl).mean()


def importance_log_px(model, x: torch.Tensor, num_samples: int, chunk_size: int = 100,
                      eps: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      posterior=None) -> torch.Tensor:
    """log p(x_i) ~= logmeanexp_k [log p(x_i|z_k) + log p(z_k) - log q(z_k|x_i)], K = num_samples
    (with several latent groups, p(z) and q(z|x) are the joint densities over all groups).

    Evaluated `chunk_size` samples at a time with a running log-sum-exp, so K = 1000 costs
    memory for chunk_size decoder passes per datapoint, not K. `posterior`, an earlier
    model.posterior(x) (or, for a one-group model, (mu, logvar) from model.encode(x)), saves encoding
    again. `eps` [B, K, D] is the noise, or a callable (start, k) -> [B, k, D] that draws it chunk by
    chunk (so K x D noise is never held at once).
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    if posterior is None:
        posterior = posterior_of(model, x)
    elif isinstance(posterior, tuple):
        posterior = GaussianPosterior(model, x, *(_acc(t) for t in posterior))
    mu = _acc(posterior.mu)
    if isinstance(eps, torch.Tensor):
        _noise(mu, num_samples, eps, None)  # shape check
    running = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=mu.dtype)
    for start in range(0, num_samples, chunk_size):
        k = min(chunk_size, num_samples - start)
        if eps is None:
            noise = _noise(mu, k, None, generator)
        elif isinstance(eps, torch.Tensor):
            noise = eps[:, start:start + k]
        else:
            noise = eps(start, k)
        log_w = posterior.terms(noise.to(device=mu.device, dtype=mu.dtype)).log_weights()  # [B, k]
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=1))
    return running - math.log(num_samples)
