"""The VAE module: shapes, both families, sampling, and that gradients reach every parameter."""

import pytest
import torch

from vaedist.config import ModelConfig
from vaedist.losses import batch_loss, negative_elbo
from vaedist.model import VAE


@pytest.mark.parametrize("cfg", [ModelConfig(kind="mlp", latent_dim=6, hidden_dims=[32, 16]),
                                 ModelConfig(kind="conv", latent_dim=4, hidden_dims=[8, 16])], ids=["mlp", "conv"])
def test_shapes_and_gradients(cfg):
    torch.manual_seed(0)
    model = VAE(cfg)
    x = torch.bernoulli(torch.full((5, 784), 0.3))
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, cfg.latent_dim)
    assert model.decode(torch.zeros(5, 3, cfg.latent_dim)).shape == (5, 3, 784)
    logits, mu2, _ = model(x)
    assert logits.shape == (5, 784) and torch.equal(mu, mu2)
    batch_loss(negative_elbo(model, x, num_samples=2)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_reparameterize_is_mu_plus_sigma_eps():
    mu, logvar, eps = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    torch.testing.assert_close(VAE.reparameterize(mu, logvar, eps), mu + torch.exp(0.5 * logvar) * eps)
    many = VAE.reparameterize(mu, logvar, torch.randn(3, 4, 2))
    assert many.shape == (3, 4, 2)


def test_samples_from_the_prior_are_binary_and_seeded():
    model = VAE(ModelConfig(latent_dim=3, hidden_dims=[16]))
    a = model.sample(8, generator=torch.Generator().manual_seed(1))
    b = model.sample(8, generator=torch.Generator().manual_seed(1))
    assert a.shape == (8, 784) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    probs = model.sample(8, mean=True)
    assert probs.min() >= 0 and probs.max() <= 1


def test_conv_refuses_image_sides_not_divisible_by_4():
    with pytest.raises(ValueError, match=r"divisible by 4, got image shape \(30, 28, 1\)"):
        VAE(ModelConfig(kind="conv", hidden_dims=[8, 16]), image_shape=(30, 28, 1))


@pytest.mark.parametrize("kind,hidden", [("mlp", [32]), ("conv", [8, 16])])
def test_other_image_shapes_colour_included(kind, hidden):
    model = VAE(ModelConfig(kind=kind, latent_dim=3, hidden_dims=hidden), image_shape=(32, 24, 3))
    x = torch.bernoulli(torch.full((2, 32 * 24 * 3), 0.5))
    logits, mu, _ = model(x)
    assert logits.shape == (2, 32 * 24 * 3) and mu.shape == (2, 3) and model.num_pixels == 2304
