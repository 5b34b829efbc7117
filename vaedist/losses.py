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

    def parts(self) -> LossParts:
        """l_i with its parts: the reconstruction term averaged over the S samples, the KL analytic."""
        recon_nll = -self.log_px_z.mean(dim=1)
        kl = gaussian_kl(self.mu, self.logvar)
        return LossParts(loss=recon_nll + kl, recon_nll=recon_nll, kl=kl)

    def log_weights(self) -> torch.Tensor:
        """log p(x_i|z_s) + log p(z_s) - log q(z_s|x_i), [B, S]: the importance weights of z_s."""
        return (self.log_px_z + standard_normal_log_prob(self.z)
                - gaussian_log_prob(self.z, self.mu.unsqueeze(1), self.logvar.unsqueeze(1)))


def _terms(model, params: torch.Tensor, x: torch.Tensor, z: torch.Tensor, mu: torch.Tensor,
           logvar: torch.Tensor) -> SampleTerms:
    """SampleTerms from the decoder's parameters [B, S, F] of S samples per datapoint."""
    log_px_z = likelihood_of(model).log_prob(_acc(params), x.unsqueeze(1).to(_acc(params).dtype))
    return SampleTerms(log_px_z=log_px_z, z=_acc(z), mu=_acc(mu), logvar=_acc(logvar))


def sample_terms(model, x: torch.Tensor, num_samples: int = 1, eps: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> SampleTerms:
    """One forward pass with `num_samples` draws of z per datapoint. Calls model(x, eps) ->
    (params [B, S, F], mu, logvar), so a DDP-wrapped model syncs gradients."""
    shape_ref = torch.empty(x.shape[0], latent_dim_of(model), device=x.device, dtype=x.dtype)
    noise = _noise(shape_ref, num_samples, eps, generator)
    params, mu, logvar = model(x, noise)
    z = getattr(model, "module", model).reparameterize(mu, logvar, noise.to(mu.dtype))
    return _terms(model, params, x, z, mu, logvar)


def negative_elbo(model, x: torch.Tensor, num_samples: int = 1, eps: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> LossParts:
    """l_i with its parts, the reconstruction term averaged over `num_samples` draws of z."""
    return sample_terms(model, x, num_samples, eps, generator).parts()


def negative_elbo_given_posterior(model, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                                  eps: torch.Tensor) -> LossParts:
    """negative_elbo for a q(z|x) already computed by model.encode(x): evaluation encodes once and
    reuses (mu, logvar) for the ELBO, the importance weights and z. eps [B, S, D]."""
    _noise(mu, eps.shape[1], eps, None)  # shape check
    z = model.reparameterize(mu, logvar, eps.to(device=mu.device, dtype=mu.dtype))
    return _terms(model, model.decode(z), x, z, mu, logvar).parts()


def batch_loss(parts: LossParts, kl_weight: float = 1.0) -> torch.Tensor:
    """The minibatch objective: the mean of l_i (kl_weight < 1 only during KL warm-up)."""
    if kl_weight == 1.0:
        return parts.loss.mean()
    return (parts.recon_nll + kl_weight * parts.kl).mean()


def importance_log_px(model, x: torch.Tensor, num_samples: int, chunk_size: int = 100,
                      eps: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """log p(x_i) ~= logmeanexp_k [log p(x_i|z_k) + log p(z_k) - log q(z_k|x_i)], K = num_samples.

    Evaluated `chunk_size` samples at a time with a running log-sum-exp, so K = 1000 costs
    memory for chunk_size decoder passes per datapoint, not K. `posterior` = (mu, logvar) from an
    earlier model.encode(x) saves encoding again. `eps` [B, K, D] is the noise, or a callable
    (start, k) -> [B, k, D] that draws it chunk by chunk (so K x D noise is never held at once).
    """
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    mu, logvar = posterior if posterior is not None else model.encode(x)
    mu, logvar = _acc(mu), _acc(logvar)
    if isinstance(eps, torch.Tensor):
        _noise(mu, num_samples, eps, None)  # shape check
    x = x.to(mu.dtype)
    running = torch.full((x.shape[0],), -math.inf, device=x.device, dtype=mu.dtype)
    for start in range(0, num_samples, chunk_size):
        k = min(chunk_size, num_samples - start)
        if eps is None:
            noise = _noise(mu, k, None, generator)
        elif isinstance(eps, torch.Tensor):
            noise = eps[:, start:start + k]
        else:
            noise = eps(start, k)
        noise = noise.to(device=mu.device, dtype=mu.dtype)
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * noise     # [B, k, D]
        log_w = (likelihood_of(model).log_prob(_acc(model.decode(z)), x.unsqueeze(1))
                 + standard_normal_log_prob(z)
                 - gaussian_log_prob(z, mu.unsqueeze(1), logvar.unsqueeze(1)))  # [B, k]
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=1))
    return running - math.log(num_samples)
