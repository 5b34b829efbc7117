"""The objectives against independent computations: Monte Carlo KL, and exact log p(x) by quadrature."""

import math
import subprocess
import sys

import pytest
import torch

from vaedist.config import ModelConfig
from vaedist.likelihoods import Bernoulli
from vaedist.losses import (batch_loss, gaussian_kl, gaussian_log_prob, importance_log_px, negative_elbo,
                            standard_normal_log_prob)
from vaedist.model import VAE


def tiny_vae(latent_dim: int, num_pixels: int = 5, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    model = VAE(ModelConfig(latent_dim=latent_dim, hidden_dims=[8], activation="tanh"), image_shape=(1, num_pixels, 1))
    return model.double().eval()


def exact_log_px(model: VAE, x: torch.Tensor, latent_dim: int) -> torch.Tensor:
    """log p(x) = log \\int p(x|z) N(z; 0, I) dz on a dense grid (trapezoid rule), per datapoint."""
    points = 4001 if latent_dim == 1 else 801
    axis = torch.linspace(-9.0, 9.0, points, dtype=torch.float64)
    if latent_dim == 1:
        grid = axis[:, None]
        weights = torch.full((points,), float(axis[1] - axis[0]), dtype=torch.float64)
        weights[[0, -1]] /= 2
    else:
        grid = torch.cartesian_prod(axis, axis)
        w1 = torch.full((points,), float(axis[1] - axis[0]), dtype=torch.float64)
        w1[[0, -1]] /= 2
        weights = torch.outer(w1, w1).reshape(-1)
    with torch.no_grad():
        logits = model.decode(grid)                                       # [G, P]
        log_joint = Bernoulli().log_prob(logits[None], x[:, None]) + standard_normal_log_prob(grid)[None]
        return torch.logsumexp(log_joint + weights.log()[None], dim=1)   # [B]


def test_analytic_kl_matches_monte_carlo():
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    logvar = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.5
    z = mu[:, None] + torch.exp(0.5 * logvar)[:, None] * torch.randn(4, 200_000, 3, generator=gen, dtype=torch.float64)
    mc = (gaussian_log_prob(z, mu[:, None], logvar[:, None]) - standard_normal_log_prob(z)).mean(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), mc, atol=0.02, rtol=0.0)
    assert torch.all(gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 3)) == 0)


def test_gaussian_log_prob_matches_torch_distributions():
    mu, logvar, z = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(gaussian_log_prob(z, mu, logvar), ref)
    ref_b = torch.distributions.Bernoulli(logits=mu).log_prob((z > 0).float()).sum(-1)
    torch.testing.assert_close(Bernoulli().log_prob(mu, (z > 0).float()), ref_b)


def test_loss_parts_add_up_and_batch_loss_is_mean():
    model = tiny_vae(2, num_pixels=784)
    x = torch.bernoulli(torch.full((16, 784), 0.3, dtype=torch.float64))
    parts = negative_elbo(model, x, num_samples=3)
    assert parts.loss.shape == (16,)
    torch.testing.assert_close(parts.loss, parts.recon_nll + parts.kl)
    torch.testing.assert_close(batch_loss(parts), parts.loss.mean())
    torch.testing.assert_close(batch_loss(parts, kl_weight=0.0), parts.recon_nll.mean())
    assert torch.all(parts.kl >= 0) and torch.all(parts.recon_nll > 0)


def test_given_noise_makes_loss_deterministic_and_shape_checked():
    model = tiny_vae(2)
    x = torch.bernoulli(torch.full((4, 5), 0.5, dtype=torch.float64))
    eps = torch.randn(4, 7, 2, dtype=torch.float64)
    a, b = negative_elbo(model, x, 7, eps=eps), negative_elbo(model, x, 7, eps=eps)
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(ValueError, match="eps must have shape"):
        negative_elbo(model, x, 7, eps=eps[:, :3])


@pytest.mark.parametrize("latent_dim", [1, 2])
def test_importance_estimate_converges_to_quadrature(latent_dim):
    model = tiny_vae(latent_dim)
    gen = torch.Generator().manual_seed(7)
    x = torch.bernoulli(torch.full((6, 5), 0.5, dtype=torch.float64), generator=gen)
    exact = exact_log_px(model, x, latent_dim)
    with torch.no_grad():
        elbo = -negative_elbo(model, x, num_samples=20_000, generator=gen).loss
        estimates = torch.stack([importance_log_px(model, x, 20_000, chunk_size=2500, generator=gen)
                                 for _ in range(8)])
        small_k = torch.stack([importance_log_px(model, x, 2, generator=gen) for _ in range(400)]).mean(0)
    iw, spread = estimates.mean(0), estimates.std(0)
    # Converges: within a few hundredths of a nat of the exact evidence.
    assert torch.all((iw - exact).abs() < 0.03), (iw, exact)
    # A lower bound in expectation: never above the evidence by more than its own Monte Carlo noise.
    # (tol covers the quadrature error and a spread estimated from only 8 draws of a skewed estimator)
    tol = 0.005
    assert torch.all(estimates - exact[None] < 4 * spread[None] + tol)
    assert torch.all(iw - exact < 3 * spread / math.sqrt(len(estimates)) + tol)
    # ELBO <= IW(K=2) <= log p(x): the bound tightens with K (Burda et al., Theorem 1).
    assert torch.all(elbo < exact)
    assert torch.all(elbo <= small_k + 0.01) and torch.all(small_k <= exact + 0.01)
    # The gap is the (positive) KL(q(z|x) || p(z|x)): a random encoder is visibly off.
    assert (exact - elbo).mean() > 0.02


def test_importance_chunking_does_not_change_the_estimate():
    model = tiny_vae(2)
    x = torch.bernoulli(torch.full((3, 5), 0.5, dtype=torch.float64))
    eps = torch.randn(3, 250, 2, dtype=torch.float64)
    with torch.no_grad():
        one = importance_log_px(model, x, 250, chunk_size=250, eps=eps)
        many = importance_log_px(model, x, 250, chunk_size=33, eps=eps)
    torch.testing.assert_close(one, many)


def test_model_and_losses_import_no_ray_files_or_yaml():
    code = ("import sys, vaedist.model, vaedist.losses; "
            "bad = [m for m in ('ray', 'yaml', 'pyarrow', 'webdataset') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
