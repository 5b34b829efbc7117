"""Training objectives (vaedist/objectives.py): each against the ELBO where they coincide, free bits'
floor dimension by dimension, the IWAE bound above the ELBO in expectation, the engine minimising and
reporting the configured objective, and bad settings named. No Ray."""

from __future__ import annotations

import typing

import pytest
import torch

from vaedist.config import ConfigError, ModelConfig, TrainConfig, load_config
from vaedist.engine import TRAIN_SUM_KEYS, make_optimizer, train_epoch, train_step
from vaedist.losses import SampleTerms, gaussian_kl, gaussian_log_prob, sample_terms, standard_normal_log_prob
from vaedist.model import VAE
from vaedist.objectives import ELBO, IWAE, OBJECTIVES, Beta, FreeBits, Objective, objective_for


def tiny_vae(latent_dim: int = 3, num_pixels: int = 12, seed: int = 0) -> VAE:
    torch.manual_seed(seed)
    model = VAE(ModelConfig(latent_dim=latent_dim, hidden_dims=[16], activation="tanh"),
                image_shape=(1, num_pixels, 1))
    return model.double()


def binary_batch(rows: int, num_pixels: int = 12, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((rows, num_pixels), 0.3, dtype=torch.float64), generator=gen)


def value_and_grads(model: VAE, objective, x: torch.Tensor, eps: torch.Tensor, kl_weight: float = 1.0):
    model.zero_grad()
    value = objective(sample_terms(model, x, eps.shape[1], eps=eps), kl_weight)
    value.backward()
    return value.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same(a, b, **tol) -> None:
    torch.testing.assert_close(a[0], b[0], **tol)
    for ga, gb in zip(a[1], b[1]):
        torch.testing.assert_close(ga, gb, **tol)


def elbo_with_sampled_kl(terms: SampleTerms, kl_weight: float = 1.0) -> torch.Tensor:
    """The one-sample ELBO with its KL estimated at the sample, log q(z|x) - log p(z): the form the
    IWAE bound takes at k = 1 (Burda et al. 2016, section 3)."""
    sampled_kl = (gaussian_log_prob(terms.z, terms.mu.unsqueeze(1), terms.logvar.unsqueeze(1))
                  - standard_normal_log_prob(terms.z)).mean(1)
    return (-terms.log_px_z.mean(1) + kl_weight * sampled_kl).mean()


def test_every_configurable_objective_has_an_object():
    names = typing.get_args(typing.get_type_hints(TrainConfig)["objective"])
    assert set(names) == set(OBJECTIVES)
    cfgs = {"elbo": [], "beta": ["train.beta=2"], "iwae": ["train.iwae_samples=7"],
            "free-bits": ["train.free_bits=0.25"]}
    built = {name: objective_for(load_config(None, ["train.objective=" + name, *extra]).train)
             for name, extra in cfgs.items()}
    assert built == {"elbo": ELBO(1), "beta": Beta(beta=2.0), "iwae": IWAE(7), "free-bits": FreeBits(free_bits=0.25)}
    assert built["iwae"].num_samples == 7 and built["elbo"].num_samples == 1


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_iwae_with_one_sample_is_the_elbo_estimated_at_that_sample(kl_weight):
    model, x = tiny_vae(), binary_batch(8)
    eps = torch.randn(8, 1, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_same(value_and_grads(model, IWAE(1), x, eps, kl_weight),
                value_and_grads(model, elbo_with_sampled_kl, x, eps, kl_weight))


def test_iwae_with_one_sample_equals_the_elbo_in_expectation():
    """elbo's KL is analytic, IWAE's (k = 1) is sampled: over many draws of the noise, values and
    gradients agree (the datapoints repeated R times, each copy with its own noise: one average over R)."""
    model, repeats = tiny_vae(), 20_000
    x = binary_batch(4).repeat(repeats, 1)
    eps = torch.randn(x.shape[0], 1, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    iwae, elbo = value_and_grads(model, IWAE(1), x, eps), value_and_grads(model, ELBO(1), x, eps)
    assert not torch.equal(iwae[0], elbo[0])  # not equal per draw...
    torch.testing.assert_close(iwae[0], elbo[0], rtol=2e-3, atol=0.0)  # ...but in expectation
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    g_iwae, g_elbo = flat(iwae[1]), flat(elbo[1])
    assert torch.linalg.vector_norm(g_iwae - g_elbo) < 0.03 * torch.linalg.vector_norm(g_elbo)


@pytest.mark.parametrize("kl_weight", [1.0, 0.3])
def test_beta_one_is_the_elbo(kl_weight):
    model, x = tiny_vae(), binary_batch(8)
    eps = torch.randn(8, 2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_same(value_and_grads(model, Beta(beta=1.0, num_samples=2), x, eps, kl_weight),
                value_and_grads(model, ELBO(2), x, eps, kl_weight), rtol=0.0, atol=0.0)
    # beta multiplies the warm-up's weight on the KL
    terms = sample_terms(model, x, 2, eps=eps)
    parts = terms.parts()
    torch.testing.assert_close(Beta(beta=4.0)(terms, kl_weight), (parts.recon_nll + kl_weight * 4.0 * parts.kl).mean())


def test_free_bits_floors_only_the_dimensions_below_it():
    # Three latent dimensions whose batch-averaged KL is ~0.02, ~0.5 and ~2 nats; the floor is 0.3.
    gen = torch.Generator().manual_seed(5)
    mu = torch.randn(16, 3, generator=gen, dtype=torch.float64) * torch.tensor([0.2, 1.0, 2.0], dtype=torch.float64)
    logvar = torch.randn(16, 3, generator=gen, dtype=torch.float64) * 0.05
    log_px_z = -torch.rand(16, 2, generator=gen, dtype=torch.float64) * 50
    kl_per_dim = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean(0)
    below = kl_per_dim < 0.3
    assert below.tolist() == [True, False, False], kl_per_dim

    def grads(objective, kl_weight):
        leaves = [t.clone().requires_grad_(True) for t in (log_px_z, mu, logvar)]
        terms = SampleTerms(log_px_z=leaves[0], z=torch.zeros(16, 2, 3, dtype=torch.float64), mu=leaves[1],
                            logvar=leaves[2])
        value = objective(terms, kl_weight)
        value.backward()
        return value.detach(), [t.grad for t in leaves]

    for kl_weight in (1.0, 0.5):
        (fb, (g_px, g_mu, g_logvar)), (el, (e_px, e_mu, e_logvar)) = (grads(FreeBits(free_bits=0.3), kl_weight),
                                                                      grads(ELBO(2), kl_weight))
        torch.testing.assert_close(g_px, e_px)  # the reconstruction term is the ELBO's
        assert torch.all(g_mu[:, below] == 0) and torch.all(g_logvar[:, below] == 0)  # floored: no KL gradient
        torch.testing.assert_close(g_mu[:, ~below], e_mu[:, ~below])                   # above: the ELBO's
        torch.testing.assert_close(g_logvar[:, ~below], e_logvar[:, ~below])
        floored = torch.clamp(kl_per_dim, min=0.3).sum()
        torch.testing.assert_close(fb, -log_px_z.mean() + kl_weight * floored)
        assert fb > el  # the floor only ever adds
    # A zero floor is the ELBO.
    terms = SampleTerms(log_px_z=log_px_z, z=torch.zeros(16, 2, 3, dtype=torch.float64), mu=mu, logvar=logvar)
    torch.testing.assert_close(FreeBits(free_bits=0.0)(terms), ELBO(2)(terms))
    torch.testing.assert_close(ELBO(2)(terms), (-log_px_z.mean(1) + gaussian_kl(mu, logvar)).mean())


def test_the_iwae_bound_is_above_the_elbo_and_tightens_with_k_in_expectation():
    """On a fixed model and batch, averaged over 300 draws of the noise: ELBO <= L_5 <= L_50, by margins
    of many standard errors (the bounds are negated objectives). One forward pass per k: the batch
    repeated 300 times, each copy with its own noise, then each copy's objective."""
    model, repeats, rows = tiny_vae(latent_dim=2, num_pixels=30, seed=7), 300, 16
    x = binary_batch(rows, num_pixels=30).repeat(repeats, 1)
    bounds = {}
    with torch.no_grad():
        for name, objective in (("elbo", ELBO(1)), (5, IWAE(5)), (50, IWAE(50))):
            terms = sample_terms(model, x, objective.num_samples, generator=torch.Generator().manual_seed(8))
            copies = [SampleTerms(*(t[r * rows:(r + 1) * rows] for t in (terms.log_px_z, terms.z, terms.mu,
                                                                           terms.logvar))) for r in range(repeats)]
            bounds[name] = -torch.stack([objective(c) for c in copies])
    stats = {k: (v.mean(), v.std() / len(v) ** 0.5) for k, v in bounds.items()}
    for low, high in (("elbo", 5), (5, 50)):
        gap = stats[high][0] - stats[low][0]
        standard_error = (stats[high][1] ** 2 + stats[low][1] ** 2) ** 0.5
        assert gap > 5 * standard_error and gap > 0.05, (low, high, gap, standard_error)


class HalfELBO(Objective):
    """An objective from outside vaedist: the loop takes it without being edited."""
    name = "half-elbo"
    num_samples = 3

    def __call__(self, terms: SampleTerms, kl_weight: float = 1.0) -> torch.Tensor:
        return 0.5 * terms.parts().loss.mean()


@pytest.mark.parametrize("objective", [ELBO(2), Beta(beta=3.0), IWAE(5), FreeBits(free_bits=1.0), HalfELBO()],
                         ids=lambda o: o.name)
def test_a_step_minimises_the_objective_and_reports_the_elbo_of_the_same_samples(objective):
    model, x = tiny_vae(), binary_batch(8)
    cfg = TrainConfig(lr_schedule="constant")
    expected_terms = sample_terms(model, x, objective.num_samples, generator=torch.Generator().manual_seed(6))
    expected_parts, expected_value = expected_terms.parts(), objective(expected_terms, 0.5)
    before = [p.detach().clone() for p in model.parameters()]
    sums = train_step(model, make_optimizer(model, cfg), x, cfg, 1e-3, 0.5, torch.Generator().manual_seed(6),
                      objective=objective)
    assert sums.dtype == torch.float64 and sums.shape == (len(TRAIN_SUM_KEYS),)
    torch.testing.assert_close(sums, torch.stack([expected_parts.loss.sum(), expected_parts.recon_nll.sum(),
                                                  expected_parts.kl.sum(), expected_value * 8]).double().detach())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("overrides", [["train.objective=iwae", "train.iwae_samples=4"],
                                       ["train.objective=free-bits", "train.free_bits=0.5"],
                                       ["train.objective=beta", "train.beta=0.5", "train.kl_warmup_epochs=1"]])
def test_an_epoch_of_each_objective_reports_its_value_beside_the_elbo(overrides):
    torch.manual_seed(0)
    cfg = load_config(None, ["train.batch_size_per_worker=16", "train.lr_schedule=constant", *overrides]).train
    model = VAE(ModelConfig(latent_dim=4, hidden_dims=[32]))
    images = torch.randint(0, 256, (64, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    sums = train_epoch(model, make_optimizer(model, cfg), images, cfg, epoch=0, rank=0, num_steps=4,
                       steps_per_epoch=4, start_step=0, device=torch.device("cpu"))
    assert set(TRAIN_SUM_KEYS) <= set(sums) and sums["count"] == 64
    assert sums["loss"] == pytest.approx(sums["recon_nll"] + sums["kl"])
    assert sums["objective"] != pytest.approx(sums["loss"])  # its own value, not the ELBO again


@pytest.mark.parametrize("settings", [{"objective": "iwae", "iwae_samples": 3},
                                      {"objective": "free-bits", "free_bits": 0.5},
                                      {"objective": "beta", "beta": 2.0, "kl_warmup_epochs": 1.0}],
                         ids=lambda s: s["objective"])
def test_no_objective_reads_the_device_per_step(settings):
    from test_engine import SyncCounter, run_epoch, setup  # tests/unit/test_engine.py's sync counter

    counts = {}
    for steps in (2, 8):
        cfg, model, optimizer, images = setup(**settings)
        run_epoch(cfg, model, optimizer, images, 0, steps=1)  # creates Adam's state
        with SyncCounter({id(s["step"]) for s in optimizer.state.values()}) as counter:
            run_epoch(cfg, model, optimizer, images, 1, steps=steps)
        counts[steps] = counter.calls
    assert counts[2] == counts[8] and len(counts[8]) <= 1, counts


@pytest.mark.parametrize("overrides, message", [
    (["train.objective=beta", "train.beta=0"], "train.beta: must be > 0, got 0.0"),
    (["train.objective=beta"], "train.beta: train.objective=beta needs it"),
    (["train.beta=4"], "train.beta: is 4.0 but only train.objective=beta uses it (objective is elbo)"),
    (["train.objective=iwae", "train.iwae_samples=0"], "train.iwae_samples: must be >= 1, got 0"),
    (["train.objective=iwae"], "train.iwae_samples: train.objective=iwae needs it"),
    (["train.objective=beta", "train.beta=2", "train.iwae_samples=5"],
     "train.iwae_samples: is 5 but only train.objective=iwae uses it (objective is beta)"),
    (["train.objective=iwae", "train.iwae_samples=5", "train.num_samples_mc=4"],
     "train.num_samples_mc: is 4, but train.objective=iwae draws train.iwae_samples samples"),
    (["train.objective=iwae", "train.iwae_samples=2.5"], "train.iwae_samples: must be int or null, got 2.5"),
    (["train.objective=free-bits", "train.free_bits=-0.1"], "train.free_bits: must be >= 0, got -0.1"),
    (["train.free_bits=1"], "train.free_bits: is 1.0 but only train.objective=free-bits uses it"),
    (["train.objective=vae"], "train.objective: must be one of 'elbo', 'beta', 'iwae', 'free-bits', got 'vae'"),
])
def test_bad_objective_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_iwae_saves_activations_linear_in_k():
    """What `vaedist bench objectives` counts: the bytes autograd keeps for the backward pass grow by
    the same amount with every extra sample (the decoder runs on batch x k samples of z)."""
    from vaedist.bench.objectives import saved_for_backward_bytes

    model, x = tiny_vae(), binary_batch(32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {k: saved_for_backward_bytes(lambda: IWAE(k)(sample_terms(model, x, k)), params) for k in (1, 5, 9)}
    assert saved[5] - saved[1] == saved[9] - saved[5] > 0, saved
    assert saved[9] > 4 * saved[1], saved


@pytest.mark.parametrize("config", ["configs/mnist.yaml", "configs/hier-mnist.yaml"])
def test_each_quality_run_trains_the_objective_it_names_whatever_the_config_trains(config):
    """configs/hier-mnist.yaml trains iwae k = 5: its `elbo` run must still be the ELBO, not k = 5."""
    from vaedist.bench.objectives import QUALITY_RUNS, quality_run_config

    expected = {"elbo": ("elbo", None, None), "iwae5": ("iwae", 5, None), "iwae50": ("iwae", 50, None),
                "beta0.5": ("beta", None, 0.5), "beta2": ("beta", None, 2.0)}
    assert set(expected) == set(QUALITY_RUNS)
    for name, (objective, k, beta) in expected.items():
        train = quality_run_config(load_config(config), name, 3).train
        assert (train.objective, train.iwae_samples, train.beta, train.epochs) == (objective, k, beta, 3), name


def test_the_quality_benchmark_saves_each_model_as_a_checkpoint(small_shards, tmp_path):
    """`bench objectives --quality --save DIR`: each run's model lands in DIR/<run> as a checkpoint
    whose model scores what the benchmark reported, and long training prints its progress."""
    from vaedist.bench.objectives import _split, bench_quality
    from vaedist.checkpoint import load_model
    from vaedist.engine import evaluate_sums
    from vaedist.storage import StorageError

    cfg = load_config("configs/debug.yaml", [f"data.shards_dir={small_shards}", "train.batch_size_per_worker=500"])
    lines = []
    rows = bench_quality(cfg, ["elbo", "iwae5"], 2, nll_rows=20, nll_samples=8, echo=lines.append,
                         save_dir=str(tmp_path / "models"), progress_seconds=0)
    assert sum(" epoch 1/2 " in line for line in lines) == 2  # one per run; the last epoch has its result line
    indices, images = _split(cfg, "test")
    for name in ("elbo", "iwae5"):
        model, run_cfg, state = load_model(str(tmp_path / "models" / name))
        assert (run_cfg.train.objective, state.epoch, state.global_step) == (name[:4], 1, 2 * 4000 // 500)
        test = evaluate_sums(model, images, indices, "test", run_cfg.train.seed, torch.device("cpu"))
        assert test["loss"] / test["count"] == pytest.approx(rows[name]["test_loss"], rel=1e-6)

    (tmp_path / "a-file").write_text("")
    lines.clear()
    with pytest.raises(StorageError, match="a-file"):  # before any training
        bench_quality(cfg, ["elbo"], 2, echo=lines.append, save_dir=str(tmp_path / "a-file" / "models"))
    assert not any("epoch" in line for line in lines)
