"""The VAE module: shapes, both families, sampling, and that gradients reach every parameter."""

import pytest
import torch

from vaedist.config import ConfigError, ModelConfig
from vaedist.losses import batch_loss, negative_elbo
from vaedist.model import VAE, check_model


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


def test_conv_refuses_image_sides_not_divisible_by_its_stages():
    with pytest.raises(ConfigError, match=r"model.hidden_dims: model.kind=conv has 2 stride-2 stages .* divisible by "
                                          r"2\^2 = 4, but the images are 30x28x1 .*; use at most 1 stages"):
        VAE(ModelConfig(kind="conv", hidden_dims=[8, 16]), image_shape=(30, 28, 1))
    with pytest.raises(ConfigError, match=r"3 stride-2 stages \(one per entry of model.hidden_dims \[4, 8, 8\]\).*"
                                          r"2\^3 = 8, but the images are 28x28x1 .*at most 2 stages or resize the "
                                          r"images \(data.image_size\) to multiples of 8"):
        check_model(ModelConfig(kind="conv", hidden_dims=[4, 8, 8]), (28, 28, 1))
    with pytest.raises(ConfigError, match=r"but the images are 7x8x3 .*no number of stages fits"):
        check_model(ModelConfig(kind="conv", hidden_dims=[4]), (7, 8, 3))


@pytest.mark.parametrize("kind,hidden", [("mlp", [32]), ("conv", [8, 16])])
def test_other_image_shapes_colour_included(kind, hidden):
    model = VAE(ModelConfig(kind=kind, latent_dim=3, hidden_dims=hidden), image_shape=(32, 24, 3))
    x = torch.bernoulli(torch.full((2, 32 * 24 * 3), 0.5))
    logits, mu, _ = model(x)
    assert logits.shape == (2, 32 * 24 * 3) and mu.shape == (2, 3) and model.num_pixels == 2304


# ---------------------------------------------------------------------------------------------
# The conv family: any depth, residual blocks, normalisation, any image shape the stages divide.

CONV_CASES = [((28, 28, 1), [8, 16], 0, "none"), ((28, 28, 1), [8], 1, "group"), ((32, 32, 3), [8, 16, 16], 1, "batch"),
              ((32, 32, 3), [16], 2, "layer"), ((32, 32, 3), [8, 8, 8], 0, "group"), ((16, 24, 3), [4, 8, 8], 1, "none"),
              ((28, 28, 1), [4, 8], 2, "batch"), ((12, 20, 1), [6, 12], 1, "layer")]


@pytest.mark.parametrize("shape,dims,blocks,norm", CONV_CASES,
                         ids=[f"{h}x{w}x{c}-depth{len(d)}-res{r}-{n}" for (h, w, c), d, r, n in CONV_CASES])
def test_conv_family_shapes_and_gradients(shape, dims, blocks, norm):
    torch.manual_seed(0)
    cfg = ModelConfig(kind="conv", latent_dim=5, hidden_dims=dims, res_blocks_per_stage=blocks, norm=norm)
    check_model(cfg, shape)
    model = VAE(cfg, image_shape=shape)
    pixels = shape[0] * shape[1] * shape[2]
    x = torch.bernoulli(torch.full((4, pixels), 0.4))
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (4, 5)
    assert model.decode(torch.zeros(4, 3, 5)).shape == (4, 3, model.num_params) and model.num_params == pixels
    batch_loss(negative_elbo(model, x, num_samples=2)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    resblocks = [m for m in model.modules() if type(m).__name__ == "ResBlock"]
    assert len(resblocks) == 2 * blocks * len(dims)  # encoder and decoder, each stage
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm))]
    assert (len(norms) > 0) == (norm != "none")


@pytest.mark.parametrize("norm,independent_in_training", [("none", True), ("group", True), ("layer", True),
                                                          ("batch", False)])
def test_which_norms_keep_datapoints_independent(norm, independent_in_training):
    """l_i is per datapoint only if a datapoint's outputs do not depend on the rest of its batch:
    always in evaluation (batch norm then uses its running statistics), in training except for batch."""
    torch.manual_seed(0)
    model = VAE(ModelConfig(kind="conv", latent_dim=4, hidden_dims=[4, 8], res_blocks_per_stage=1, norm=norm))
    x = torch.bernoulli(torch.full((6, 784), 0.4))
    for training in (True, False):
        model.train(training)
        alone, with_others = model.encode(x[:1])[0], model.encode(x)[0][:1]
        same = torch.allclose(alone, with_others, atol=1e-5)
        assert same == (independent_in_training or not training), (norm, training)


# What vaedist/model.py built for kind conv before the family had depth, norms and residual blocks
# (git show 4c04545:vaedist/model.py), reduced to its modules: checkpoints of it must keep loading.
class _OldToImage(torch.nn.Module):
    def __init__(self, image_shape):
        super().__init__()
        self.image_shape = image_shape

    def forward(self, x):
        return x.reshape(x.shape[0], *self.image_shape).permute(0, 3, 1, 2)


class _OldFromImage(torch.nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1).flatten(1)


class _OldConvVAE(torch.nn.Module):
    def __init__(self, latent_dim, hidden_dims, image_shape):
        super().__init__()
        nn = torch.nn
        height, width, channels = image_shape
        c1, c2 = hidden_dims
        h4, w4 = height // 4, width // 4
        self.encoder = nn.Sequential(
            _OldToImage(image_shape),
            nn.Conv2d(channels, c1, 4, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.ELU(),
            nn.Flatten(),
        )
        self.to_posterior = nn.Linear(c2 * h4 * w4, 2 * latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, c2 * h4 * w4), nn.ELU(),
            nn.Unflatten(1, (c2, h4, w4)),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ELU(),
            nn.ConvTranspose2d(c1, channels, 4, stride=2, padding=1),
            _OldFromImage(),
        )


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
def test_checkpoints_of_the_old_two_layer_conv_model_still_load(shape, tmp_path):
    from vaedist.checkpoint import load_model, save_checkpoint
    from vaedist.config import Config

    torch.manual_seed(0)
    old = _OldConvVAE(6, [8, 16], shape)
    cfg = Config(model=ModelConfig(kind="conv", latent_dim=6, hidden_dims=[8, 16]))
    save_checkpoint(str(tmp_path), model_state=old.state_dict(), optimizer_state=None, epoch=0, global_step=0,
                    config=cfg, manifest_hash="x", history=[], image_shape=shape)
    new, _, _ = load_model(str(tmp_path))  # strict: same keys, same shapes
    assert list(new.state_dict()) == list(old.state_dict())
    pixels = shape[0] * shape[1] * shape[2]
    x, z = torch.rand(3, pixels), torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(new.encode(x)[0], old.to_posterior(old.encoder(x)).chunk(2, dim=-1)[0])
        assert torch.equal(new.decode(z), old.decoder(z))


def test_the_conv_decoders_channels_last_output_layer_gives_the_same_parameters():
    """ToParameters runs channels-last for many parameters per position (the mixture's): the values
    are those of the plain transposed convolution, whose checkpoint keys it keeps."""
    from torch import nn

    from vaedist.model import FromImage, ToParameters

    torch.manual_seed(0)
    fast = ToParameters(8, 40, 4, stride=2, padding=1)
    plain = nn.ConvTranspose2d(8, 40, 4, stride=2, padding=1)
    plain.load_state_dict(fast.state_dict())
    h = torch.randn(3, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(FromImage()(fast(h)), FromImage()(plain(h)), rtol=1e-6, atol=1e-6)
    assert fast(h).is_contiguous(memory_format=torch.channels_last)
