"""The likelihoods (vaedist.likelihoods) against independent float64 computations: every discrete
likelihood sums to 1 over the 256 levels, per-datapoint values match reference implementations
written here, the IW estimate converges to log p(x) by quadrature with each, the Gaussian's
evaluation noise is keyed, and configs that do not fit the data are refused naming the keys."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from vaedist.config import ConfigError, ModelConfig, load_config
from vaedist.evaluate import evaluate_batch
from vaedist.likelihoods import (LIKELIHOODS, MIN_LOG_SCALE, bits_per_dim, dequantize, get_likelihood,
                                 scale_8bit)
from vaedist.losses import importance_log_px, negative_elbo, standard_normal_log_prob
from vaedist.model import VAE
from vaedist.rng import splitmix64_int

LEVELS = torch.arange(256, dtype=torch.uint8)
EIGHT_BIT = ("discretized-logistic", "discretized-logistic-mixture", "gaussian")
# Locations and log-scales on [-1, 1]'s scale, from far outside the range to tiny and huge scales.
LOCATIONS = [-40.0, -1.3, -1.0, -0.5, -0.0039, 0.0, 0.2, 0.999, 1.0, 3.0]
LOG_SCALES = [-30.0, -12.0, -9.0, -7.0, -4.5, -2.0, 0.0, 2.0, 6.0, 12.0]


def likelihood(name: str, channels: int = 1, **options):
    return get_likelihood(ModelConfig(likelihood=name, **options), channels)


# ---------------------------------------------------------------------------------------------
# float64 references, written from the definitions (not from vaedist's code paths).

def ref_logistic_bins(mu: float, scale: float) -> np.ndarray:
    """P(v), v = 0..255, of a logistic(mu, scale) cut at the 255 edges (v + 1/2) / 127.5 - 1, the
    outer bins open: CDF differences in float64."""
    edges = (np.arange(255) + 0.5) / 127.5 - 1
    with np.errstate(over="ignore"):  # exp overflows to inf far in the lower tail: the CDF is then 0
        cdf = np.concatenate([[0.0], 1 / (1 + np.exp(-(edges - mu) / scale)), [1.0]])
    return np.diff(cdf)


def ref_dl_log_prob(params: np.ndarray, levels: np.ndarray) -> float:
    """sum_j log P(v_j) with params [(mu, log s)] per sub-pixel, log s floored as documented."""
    total = 0.0
    for (mu, log_s), v in zip(params.reshape(-1, 2), levels):
        total += math.log(ref_logistic_bins(mu, math.exp(max(log_s, MIN_LOG_SCALE)))[v])
    return total


def ref_mixture_log_prob(params: np.ndarray, levels: np.ndarray, k: int, channels: int) -> float:
    """PixelCNN++'s mixture, position by position and component by component, in float64."""
    per_pixel = 3 * k if channels == 1 else 10 * k
    total = 0.0
    for p, v in zip(params.reshape(-1, per_pixel), levels.reshape(-1, channels)):
        x = v / 127.5 - 1
        logits, rest = p[:k], p[k:]
        mus, log_ss = rest[:channels * k].reshape(channels, k), rest[channels * k:2 * channels * k].reshape(channels, k)
        coeffs = np.tanh(rest[2 * channels * k:].reshape(3, k)) if channels == 3 else None
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        prob = 0.0
        for j in range(k):
            joint = weights[j]
            for c in range(channels):
                mu = mus[c, j]
                if c == 1:
                    mu += coeffs[0, j] * x[0]
                if c == 2:
                    mu += coeffs[1, j] * x[0] + coeffs[2, j] * x[1]
                joint *= ref_logistic_bins(mu, math.exp(max(log_ss[c, j], MIN_LOG_SCALE)))[v[c]]
            prob += joint
        total += math.log(prob)
    return total


def ref_dequantize(level: int, index: int, split: str, seed: int, j: int) -> float:
    """DEQUANTIZE_SCHEME from its docstring, on Python integers."""
    import hashlib

    gamma, mask = 0x9E3779B97F4A7C15, 2**64 - 1
    tag = int.from_bytes(hashlib.sha256(f"vaedist-dequantize/{split}".encode()).digest()[:8], "big")
    stream = splitmix64_int((seed % 2**64) ^ tag)
    row = splitmix64_int((stream + (index + 1) * gamma) & mask)
    r = splitmix64_int((row + (j + 1) * gamma) & mask) >> 48
    return (level * 2**16 + r) / 2**24


# ---------------------------------------------------------------------------------------------
# Discrete likelihoods sum to 1.

def test_discretized_logistic_sums_to_one_over_the_256_levels():
    lik = likelihood("discretized-logistic")
    x = scale_8bit(LEVELS)[:, None]                                      # [256, 1]: every level of one sub-pixel
    gen = torch.Generator().manual_seed(3)
    random = torch.stack([torch.randn(40, generator=gen) * 2, torch.randn(40, generator=gen) * 4], dim=1)
    params = torch.cat([torch.tensor([[m, s] for m in LOCATIONS for s in LOG_SCALES]), random])   # [N, 2]
    totals = lik.log_prob(params[None], x[:, None]).double().exp().sum(0)                       # [N]
    assert (totals - 1).abs().max().item() < 1e-5, params[(totals - 1).abs().argmax()]


@pytest.mark.parametrize("k", [1, 3])
def test_grey_mixture_sums_to_one_over_the_256_levels(k):
    lik = likelihood("discretized-logistic-mixture", mixture_components=k)
    x = scale_8bit(LEVELS)[:, None]
    gen, trials = torch.Generator().manual_seed(k), 100
    logits = torch.randn(trials, k, generator=gen) * 3
    mus = torch.tensor(LOCATIONS)[torch.randint(len(LOCATIONS), (trials, k), generator=gen)]
    log_ss = torch.tensor(LOG_SCALES)[torch.randint(len(LOG_SCALES), (trials, k), generator=gen)]
    params = torch.cat([logits, mus, log_ss], dim=1)                                            # [N, 3K]
    totals = lik.log_prob(params[None], x[:, None]).double().exp().sum(0)
    assert (totals - 1).abs().max().item() < 1e-5, params[(totals - 1).abs().argmax()]


def test_rgb_mixture_factorises_into_conditionals_that_each_sum_to_one():
    """P(R, G, B) = P(R) P(G | R) P(B | R, G) for one component: summing B out of the likelihood's joint
    gives the reference P(R) P(G | R) for every (R, G) of a grid, and summing G and B out gives P(R),
    so each conditional sums to 1 (P(R) does by the test above: a discretised logistic)."""
    lik = likelihood("discretized-logistic-mixture", 3, mixture_components=1)
    gen = torch.Generator().manual_seed(5)
    levels = torch.arange(256)
    for trial in range(3):
        # logit, 3 locations, 3 log-scales (one extreme), 3 coefficients (tanh applied by the likelihood)
        params = torch.cat([torch.zeros(1), torch.rand(3, generator=gen) * 2.4 - 1.2,
                            torch.tensor([LOG_SCALES[trial * 2 + 1], -3.0, -1.0]), torch.randn(3, generator=gen) * 2])
        mu, log_s, coeff = params[1:4].double(), params[4:7].double(), torch.tanh(params[7:10].double())
        scale = torch.exp(log_s.clamp(min=MIN_LOG_SCALE))
        for r in (0, 100, 255):
            xr = r / 127.5 - 1
            p_r = ref_logistic_bins(float(mu[0]), float(scale[0]))[r]
            p_g = ref_logistic_bins(float(mu[1] + coeff[0] * xr), float(scale[1]))
            # All (G, B) for this R: 65,536 joint probabilities from the likelihood.
            grid = torch.stack([torch.full((65536,), r), levels.repeat_interleave(256), levels.repeat(256)], dim=1)
            joint = lik.log_prob(params[None], scale_8bit(grid.to(torch.uint8))).double().exp().view(256, 256)
            assert abs(joint.sum().item() - p_r) < 1e-5 * max(1.0, p_r), (trial, r)       # sum_G sum_B = P(R)
            if p_r > 1e-3:  # relative to P(R), where float32 resolves it
                np.testing.assert_allclose(joint.sum(1).numpy() / p_r, p_g, atol=1e-5)     # sum_B = P(R) P(G|R)


# ---------------------------------------------------------------------------------------------
# Per-datapoint values against the float64 references.

@pytest.mark.parametrize("name,channels", [("discretized-logistic", 1), ("discretized-logistic", 3),
                                           ("discretized-logistic-mixture", 1),
                                           ("discretized-logistic-mixture", 3)])
def test_log_prob_matches_the_float64_reference(name, channels):
    k = 3
    lik = likelihood(name, channels, mixture_components=k)
    shape = (2, 3, channels)
    gen = torch.Generator().manual_seed(channels)
    images = torch.randint(0, 256, (4, math.prod(shape)), generator=gen, dtype=torch.uint8)
    images[0, :4] = torch.tensor([0, 255, 0, 255], dtype=torch.uint8)   # the tail bins
    # Moderate parameters: where float64 CDF differences are exact enough to be the reference (the
    # extremes are the sum-to-one tests' business).
    params = torch.randn(4, lik.num_params(shape), generator=gen) * 0.8
    got = lik.log_prob(params, lik.eval_input(images, np.arange(4), "test", 0, torch.device("cpu")))
    for i in range(4):
        p, v = params[i].double().numpy(), images[i].numpy().astype(int)
        want = ref_dl_log_prob(p, v) if name == "discretized-logistic" else ref_mixture_log_prob(p, v, k, channels)
        assert got[i].item() == pytest.approx(want, rel=2e-5, abs=1e-3), (i, got[i].item(), want)


@pytest.mark.parametrize("scale", ["per-subpixel", "per-image"])
def test_gaussian_log_prob_matches_torch_distributions(scale):
    lik = likelihood("gaussian", gaussian_scale=scale)
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (3, 12), generator=gen, dtype=torch.uint8)
    x = lik.eval_input(images, np.arange(3), "train", 1, torch.device("cpu"))
    params = torch.randn(3, 24, generator=gen) * 0.5
    pairs = params.double().view(3, 12, 2)
    log_sigma = pairs[..., 1] if scale == "per-subpixel" else pairs[..., 1].mean(-1, keepdim=True).expand(3, 12)
    want = torch.distributions.Normal(pairs[..., 0], log_sigma.exp()).log_prob(x.double()).sum(-1) - 12 * math.log(256)
    torch.testing.assert_close(lik.log_prob(params, x).double(), want, rtol=1e-5, atol=1e-4)


def test_bernoulli_log_prob_matches_torch_distributions_and_keeps_its_layout():
    lik = likelihood("bernoulli")
    assert lik.params_per_pixel(1) == 1 and lik.params_per_pixel(3) == 3 and lik.binarised
    logits = torch.randn(4, 10, dtype=torch.float64)
    x = torch.bernoulli(torch.full((4, 10), 0.3, dtype=torch.float64))
    want = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(lik.log_prob(logits, x), want)


def test_gaussian_is_a_lower_bound_on_its_discretised_likelihood():
    """E_u[log N((v + u) / 256)] - ln 256 <= log of the mass N puts on v's bin (Jensen), with the
    expectation by quadrature over u."""
    lik = likelihood("gaussian")
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    for v, mu, log_sigma in [(0, 0.0, -5.0), (17, 0.1, -3.0), (128, 0.9, -1.0), (255, 0.999, -6.0), (60, 0.5, 1.0)]:
        x = ((v + u) / 256)[:, None]
        bound = lik.log_prob(torch.tensor([[mu, log_sigma]], dtype=torch.float64), x).mean().item()
        normal = torch.distributions.Normal(torch.tensor(mu, dtype=torch.float64), math.exp(log_sigma))
        mass = (normal.cdf(torch.tensor((v + 1) / 256, dtype=torch.float64))
                - normal.cdf(torch.tensor(v / 256, dtype=torch.float64))).item()
        assert bound <= math.log(mass) + 1e-9, (v, mu, log_sigma)


# ---------------------------------------------------------------------------------------------
# A decoder sure of the true pixels; the IW estimate by quadrature.

class FixedDecoder(nn.Module):
    """The VAE protocol with a decoder that ignores z and returns fixed parameters (the true pixels
    at a tiny scale), so recon_nll isolates the likelihood."""

    def __init__(self, lik, params: torch.Tensor):
        super().__init__()
        self.likelihood, self.latent_dim, self.params = lik, 2, params
        self.scale = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return torch.zeros(x.shape[0], 2) + self.scale, torch.zeros(x.shape[0], 2)

    def decode(self, z):
        return self.params.expand(*z.shape[:-1], self.params.shape[-1])

    @staticmethod
    def reparameterize(mu, logvar, eps):
        return mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps

    def forward(self, x, eps):
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, eps)), mu, logvar


@pytest.mark.parametrize("name,channels", [("discretized-logistic", 1), ("discretized-logistic", 3),
                                           ("discretized-logistic-mixture", 1),
                                           ("discretized-logistic-mixture", 3)])
def test_a_tiny_scale_on_the_true_pixels_gives_zero_recon_nll(name, channels):
    k = 2
    lik = likelihood(name, channels, mixture_components=k)
    image = torch.tensor([[0, 1, 127, 128, 254, 255] * channels], dtype=torch.uint8)
    x = lik.eval_input(image, [0], "test", 0, torch.device("cpu"))
    n = x.shape[1] // channels
    if name == "discretized-logistic":
        params = torch.stack([x[0], torch.full_like(x[0], -30.0)], dim=1).reshape(1, -1)
    else:  # every component on the true pixel at a tiny scale, colour coefficients 0
        pixels = x[0].view(n, channels)
        blocks = [torch.zeros(n, k), pixels.repeat_interleave(k, dim=1), torch.full((n, channels * k), -30.0)]
        if channels == 3:
            blocks.append(torch.zeros(n, 3 * k))
        params = torch.cat(blocks, dim=1).reshape(1, -1)
    parts = negative_elbo(FixedDecoder(lik, params), x, num_samples=3)
    assert 0 <= parts.recon_nll.item() < 1e-6 * x.shape[1]
    # ... and a scale of one bin on a location half a bin off costs about ln 2 per sub-pixel at least.
    assert lik.log_prob(params + torch.where(params == -30.0, 0.0, 1 / 255), x).item() < -0.3 * x.shape[1]


def tiny_vae(name: str, latent_dim: int = 1, shape=(1, 5, 1), seed: int = 0, **options) -> VAE:
    torch.manual_seed(seed)
    cfg = ModelConfig(latent_dim=latent_dim, hidden_dims=[8], activation="tanh", likelihood=name,
                      mixture_components=2, **options)
    return VAE(cfg, image_shape=shape).double().eval()


def exact_log_px(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log int p(x|z) N(z; 0, 1) dz for a 1-D latent, trapezoid rule on a dense grid."""
    axis = torch.linspace(-9.0, 9.0, 4001, dtype=torch.float64)
    weights = torch.full((4001,), float(axis[1] - axis[0]), dtype=torch.float64)
    weights[[0, -1]] /= 2
    with torch.no_grad():
        log_joint = model.likelihood.log_prob(model.decode(axis[:, None])[None], x[:, None]) \
            + standard_normal_log_prob(axis[:, None])[None]
        return torch.logsumexp(log_joint + weights.log()[None], dim=1)


@pytest.mark.parametrize("name,shape,options", [("discretized-logistic", (1, 5, 1), {}),
                                                ("discretized-logistic-mixture", (1, 2, 3), {}),
                                                ("gaussian", (1, 5, 1), {"gaussian_scale": "per-image"})])
def test_importance_estimate_converges_to_quadrature(name, shape, options):
    model = tiny_vae(name, shape=shape, **options)
    # The decoder's last layer scaled up, so that p(x|z) depends on z and q(z|x) is visibly off.
    with torch.no_grad():
        model.decoder[-1].weight.mul_(3)
    gen = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (4, math.prod(shape)), generator=gen, dtype=torch.uint8)
    x = model.likelihood.eval_input(images, np.arange(4), "test", 0, torch.device("cpu")).double()
    exact = exact_log_px(model, x)
    with torch.no_grad():
        elbo = -negative_elbo(model, x, num_samples=5000, generator=gen).loss
        estimates = torch.stack([importance_log_px(model, x, 5000, chunk_size=5000, generator=gen)
                                 for _ in range(5)])
    iw, spread = estimates.mean(0), estimates.std(0)
    assert torch.all((iw - exact).abs() < 0.03 + 3 * spread), (iw, exact)
    assert torch.all(iw - exact < 3 * spread / math.sqrt(len(estimates)) + 0.005)
    assert torch.all(elbo < exact) and (exact - elbo).mean() > 0.01


# ---------------------------------------------------------------------------------------------
# Inputs, means, samples; bits per dimension.

def test_gaussian_evaluation_noise_is_keyed_and_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 20), generator=gen, dtype=torch.uint8)
    lik = likelihood("gaussian")
    cpu = torch.device("cpu")
    x = lik.eval_input(images, np.arange(10, 16), "test", 3, cpu)
    # The same key gives the same noise in any batch and order; another seed, split or index does not.
    again = lik.eval_input(images[[4, 1]], np.array([14, 11]), "test", 3, cpu)
    assert torch.equal(again, x[[4, 1]])
    for other in (lik.eval_input(images, np.arange(10, 16), "test", 4, cpu),
                  lik.eval_input(images, np.arange(10, 16), "train", 3, cpu),
                  lik.eval_input(images, np.arange(11, 17), "test", 3, cpu)):
        assert not torch.equal(other, x)
    # Each value is the documented one to the bit and lies in its level's bin.
    for i, j in [(0, 0), (2, 7), (5, 19)]:
        assert x[i, j].item() == ref_dequantize(int(images[i, j]), 10 + i, "test", 3, j)
    assert torch.equal(torch.floor(x * 256).to(torch.uint8), images)
    assert torch.equal(lik.to_image(x) * 255, images.float())
    train = lik.train_input(images, torch.Generator().manual_seed(1))
    assert torch.equal(torch.floor(train * 256).to(torch.uint8), images)
    assert not torch.equal(train, lik.train_input(images, torch.Generator().manual_seed(2)))
    with pytest.raises(TypeError, match="uint8"):
        dequantize(images.float(), torch.arange(6), "test", 0)


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_eight_bit_inputs_are_deterministic_and_invert_to_the_image(name):
    lik = likelihood(name)
    images = LEVELS[None].repeat(2, 1)
    x = lik.eval_input(images, np.arange(2), "test", 0, torch.device("cpu"))
    assert torch.equal(torch.round(lik.to_image(x) * 255), images.float())
    if name != "gaussian":  # no noise: training and evaluation see the same numbers
        assert torch.equal(lik.train_input(images, torch.Generator()), x)
        assert x.min().item() == -1.0 and x.max().item() == 1.0


@pytest.mark.parametrize("name", list(LIKELIHOODS))
@pytest.mark.parametrize("channels", [1, 3])
def test_mean_and_sample_are_images_in_the_unit_interval(name, channels):
    model = tiny_vae(name, latent_dim=3, shape=(4, 4, channels)).float()
    gen = torch.Generator().manual_seed(0)
    samples = model.sample(5, gen)
    means = model.sample(5, torch.Generator().manual_seed(0), mean=True)
    assert samples.shape == means.shape == (5, 16 * channels)
    for images in (samples, means):
        assert images.min() >= 0 and images.max() <= 1
    if name != "bernoulli":  # 8-bit draws: levels / 255
        torch.testing.assert_close(samples * 255, torch.round(samples * 255), atol=1e-4, rtol=0)
    assert torch.equal(model.sample(5, torch.Generator().manual_seed(0)), samples)  # the generator decides


def test_mixture_samples_follow_the_mixture():
    """A two-component grey mixture, weights 0.25 / 0.75 at levels 40 and 200, tiny scales: the draws'
    histogram has those weights, and the mean image is their weighted mean."""
    lik = likelihood("discretized-logistic-mixture", mixture_components=2)
    x40, x200 = 40 / 127.5 - 1, 200 / 127.5 - 1
    params = torch.tensor([[0.0, math.log(3.0), x40, x200, -12.0, -12.0]]).repeat(4000, 1)
    draws = torch.round(lik.sample(params, torch.Generator().manual_seed(0)) * 255)
    assert set(draws.unique().tolist()) == {40.0, 200.0}
    assert (draws == 200).float().mean().item() == pytest.approx(0.75, abs=0.03)
    assert lik.mean(params[:1]).item() == pytest.approx((0.25 * 40 + 0.75 * 200) / 255, abs=1e-5)


def ref_dl_mean(mu: np.ndarray, scale: float) -> np.ndarray:
    """E[v / 127.5 - 1] of the discretised logistic with open end bins, for an array of locations:
    -1 + (2/255) sum_i P(X > edge_i) over the 255 edges, in float64."""
    edges = (np.arange(255) + 0.5) / 127.5 - 1
    return -1 + (2 / 255) * (1 / (1 + np.exp((edges - mu[..., None]) / scale))).sum(-1)


def ref_rgb_mixture_mean(p: np.ndarray, k: int) -> np.ndarray:
    """The exact mean colour of one RGB position's mixture (10K parameters), on [-1, 1]'s scale:
    per component, E[R], E[G] = sum_r P(r) E[G | r], E[B] = sum_{r,g} P(r) P(g | r) E[B | r, g],
    all over the 256 discrete levels (the couplings act on the drawn, binned R and G)."""
    levels = np.arange(256) / 127.5 - 1
    logits, mus = p[:k], p[k:4 * k].reshape(3, k)
    scales = np.exp(np.maximum(p[4 * k:7 * k].reshape(3, k), MIN_LOG_SCALE))
    alpha, beta, gamma = np.tanh(p[7 * k:].reshape(3, k))
    weights = np.exp(logits - logits.max())
    weights /= weights.sum()
    total = np.zeros(3)
    for j in range(k):
        p_r = ref_logistic_bins(mus[0, j], scales[0, j])                                  # [256]
        mu_g = mus[1, j] + alpha[j] * levels                                               # per r
        p_g = np.stack([ref_logistic_bins(m, scales[1, j]) for m in mu_g])                # [r, g]
        mu_b = mus[2, j] + beta[j] * levels[:, None] + gamma[j] * levels[None, :]          # [r, g]
        e_b = np.stack([ref_dl_mean(row, scales[2, j]) for row in mu_b])                   # [r, g]
        total += weights[j] * np.array([p_r @ levels, p_r @ ref_dl_mean(mu_g, scales[1, j]),
                                        p_r @ (p_g * e_b).sum(1)])
    return total


@pytest.mark.parametrize("couplings", [(0.0, 0.0, 0.0), (0.8, -0.6, 0.5)])
def test_rgb_mixture_mean_and_samples_match_the_exact_mean_colour(couplings):
    """Two RGB positions, three components with distinct colours, weights and (for the second case)
    colour couplings: the likelihood's mean image and the average of 20,000 draws both match the
    exact mean colour computed here over the 256 levels (scales of a few bins, locations inside the
    range, so the mean's clipping of locations is exact to 1e-4)."""
    k = 3
    lik = likelihood("discretized-logistic-mixture", 3, mixture_components=k)
    # Per position: logits, locations (channel-major c * K + k), log-scales, then atanh of the couplings.
    locations = [np.array([[0.6, -0.4, 0.1], [-0.5, 0.3, 0.0], [0.2, 0.4, -0.6]]),
                 np.array([[-0.3, 0.5, 0.2], [0.4, -0.2, -0.5], [-0.1, 0.1, 0.3]])]
    logits = [np.array([0.5, -1.0, 1.2]), np.array([-0.3, 0.9, 0.0])]
    log_scales = np.log(np.array([[0.02, 0.04, 0.03], [0.03, 0.02, 0.05], [0.04, 0.03, 0.02]]))
    coeffs = np.arctanh(np.repeat(np.array(couplings)[:, None], k, axis=1)) * np.array([1.0, 0.7, 1.2])
    positions = [np.concatenate([logits[i], locations[i].ravel(), log_scales.ravel(), coeffs.ravel()])
                 for i in range(2)]
    params = torch.tensor(np.concatenate(positions), dtype=torch.float32)[None]                 # [1, 2 * 10K]
    want = np.concatenate([(ref_rgb_mixture_mean(p, k) + 1) / 2 for p in positions])           # [R0 G0 B0 R1 G1 B1]
    np.testing.assert_allclose(lik.mean(params)[0].double().numpy(), want, atol=2e-4)
    draws = lik.sample(params.expand(20000, -1), torch.Generator().manual_seed(1))
    # The draws' spread is about 0.2 per sub-pixel: the average of 20,000 is good to about 0.0015.
    np.testing.assert_allclose(draws.double().mean(0).numpy(), want, atol=0.006)
    if couplings != (0.0, 0.0, 0.0):  # the couplings move the colour: a mean that ignored them fails
        uncoupled = np.concatenate([(ref_rgb_mixture_mean(np.concatenate([p[:7 * k], np.zeros(3 * k)]), k) + 1) / 2
                                    for p in positions])
        assert np.abs(uncoupled - want).max() > 0.05


def test_evaluation_reports_bits_per_dimension():
    model = tiny_vae("discretized-logistic", latent_dim=2, shape=(2, 3, 1)).float()
    images = torch.randint(0, 256, (3, 6), dtype=torch.uint8)
    x = model.likelihood.eval_input(images, np.arange(3), "test", 0, torch.device("cpu"))
    out = evaluate_batch(model, x, np.arange(3), "test", 0, num_samples_mc=2, num_samples_iw=4)
    torch.testing.assert_close(out["bpd"], out["loss"] / (6 * math.log(2)))
    torch.testing.assert_close(out["bpd_iw"], -out["log_px"] / (6 * math.log(2)))
    assert bits_per_dim(6 * math.log(2) * 1.5, 6) == pytest.approx(1.5)


# ---------------------------------------------------------------------------------------------
# Configuration and compatibility.

def test_a_likelihood_that_does_not_fit_the_data_is_refused_naming_the_keys():
    with pytest.raises(ConfigError, match=r"data\.binarize=false does not fit model\.likelihood=bernoulli"):
        load_config(None, ["data.binarize=false"])
    with pytest.raises(ConfigError, match=r"data\.binarize=true does not fit model\.likelihood=gaussian"):
        load_config(None, ["data.binarize=true", "model.likelihood=gaussian"])
    assert load_config(None, ["data.binarize=false", "model.likelihood=discretized-logistic"]).data.binarize is False
    with pytest.raises(ConfigError, match="model.likelihood: must be one of 'bernoulli', 'discretized-logistic'"):
        load_config(None, ["model.likelihood=poisson"])
    with pytest.raises(ConfigError, match="model.mixture_components: must be > 0"):
        load_config(None, ["model.mixture_components=0"])
    with pytest.raises(ConfigError, match="model.gaussian_scale: must be one of"):
        load_config(None, ["model.gaussian_scale=per-pixel"])
    with pytest.raises(ValueError, match="model.likelihood=discretized-logistic-mixture takes images of 1 or 3"):
        VAE(ModelConfig(likelihood="discretized-logistic-mixture"), image_shape=(4, 4, 2))


def test_configs_without_a_likelihood_build_todays_bernoulli_model():
    """A checkpoint's config from before likelihoods existed has no such key: the same model as ever."""
    cfg = load_config(None, [])
    assert cfg.model.likelihood == "bernoulli"
    model = VAE(cfg.model)
    assert model.likelihood.name == "bernoulli" and model.num_params == 784
    sizes = {name: VAE(ModelConfig(likelihood=name, mixture_components=10), (28, 28, 1)).num_params
             for name in LIKELIHOODS}
    assert sizes == {"bernoulli": 784, "discretized-logistic": 1568, "discretized-logistic-mixture": 784 * 30,
                     "gaussian": 1568}
    assert VAE(ModelConfig(likelihood="discretized-logistic-mixture"), (32, 32, 3)).num_params == 1024 * 100


def test_the_mixture_in_row_chunks_gives_the_values_of_one_call():
    """Evaluation scores the mixture a few rows at a time on the CPU (likelihoods.rows_in_chunks); each
    row's value must be the one a single call gives, whatever the chunking, and with autograd on
    (training: one call) too."""
    from vaedist import likelihoods

    lik = likelihood("discretized-logistic-mixture", 3, mixture_components=4)
    shape = (4, 4, 3)
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (6, math.prod(shape)), generator=gen, dtype=torch.uint8)
    x = lik.eval_input(images, np.arange(6), "test", 0, torch.device("cpu")).unsqueeze(1)   # [6, 1, P]
    params = torch.randn(6, 5, lik.num_params(shape), generator=gen)                       # [6, 5, F]
    whole = lik._log_prob(params, x)
    old = likelihoods.CPU_CHUNK_ELEMENTS
    try:
        for elements in (1, 7 * 48 * 4, 10**9):   # one row per chunk, 7 rows (a ragged last chunk), one call
            likelihoods.CPU_CHUNK_ELEMENTS = elements
            with torch.no_grad():
                assert torch.equal(lik.log_prob(params, x), whole), elements
        likelihoods.CPU_CHUNK_ELEMENTS = 1
        assert torch.equal(lik.log_prob(params.requires_grad_(), x).detach(), whole)
    finally:
        likelihoods.CPU_CHUNK_ELEMENTS = old
