"""model.kind=hierarchical: the numerics (each group's KL against Monte Carlo, the importance estimate
against exact quadrature, the one-layer model as a special case), the objectives and a few training
steps on real MNIST, evaluation's per-group columns, and the config's checks. No Ray."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from vaedist.config import ConfigError, ModelConfig, TrainConfig, load_config
from vaedist.engine import make_optimizer, train_epoch
from vaedist.evaluate import evaluate_batch
from vaedist.hierarchical import HierarchicalVAE
from vaedist.losses import gaussian_log_prob, importance_log_px, sample_terms
from vaedist.model import VAE, build_model
from vaedist.objectives import OBJECTIVES
from vaedist.data import fixed_binarize

from conftest import REPO

ARRANGEMENTS = ["top-down", "bottom-up"]
VARIANTS = ["top-down", "bottom-up", "conv"]  # the arrangements with MLP stages, and conv stages (top-down)


def hier(hierarchy: str = "top-down", groups=(3, 2), widths=((16, 12), (10, 8)), image_shape=(28, 28, 1),
         seed: int = 0, activation: str = "tanh", **conv) -> HierarchicalVAE:
    """hierarchy "conv": top-down with conv stages (widths then default to one stride-2 convolution
    of 8 channels per group, with a residual block and group norm)."""
    torch.manual_seed(seed)
    if hierarchy == "conv":
        hierarchy, widths = "top-down", (widths if widths != ((16, 12), (10, 8)) else ((8,), (8,)))
        conv = {"group_stage": "conv", "res_blocks_per_stage": 1, "norm": "group", **conv}
    model_cfg = ModelConfig(kind="hierarchical", latent_groups=list(groups), latent_dim=sum(groups),
                            group_hidden_dims=[list(w) for w in widths], hierarchy=hierarchy, activation=activation,
                            **conv)
    return build_model(model_cfg, image_shape)


def binary_batch(n: int = 4, pixels: int = 784, seed: int = 1) -> torch.Tensor:
    return (torch.rand(n, pixels, generator=torch.Generator().manual_seed(seed)) < 0.3).float()


def copy_parameters(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    """dst's parameters, in order, set to src's (the shapes must agree one by one)."""
    pairs = list(zip(src.parameters(), dst.parameters(), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            assert a.shape == b.shape
            b.copy_(a)


# ---------------------------------------------------------------------------------------------
# Numerics.

@pytest.mark.parametrize("hierarchy", VARIANTS)
def test_each_groups_kl_term_matches_its_monte_carlo_estimate(hierarchy):
    """The analytic KL of each group given its sampled parents, averaged over the parents' samples,
    against the mean of log q(z_l | ...) - log p(z_l | ...) at samples of z_l (the definition)."""
    model = hier(hierarchy).double()
    x = binary_batch(2).double()
    samples = 1000 if hierarchy == "conv" else 5000  # conv stages cost more per sample; the bound widens to fit
    eps = torch.randn(2, samples, model.latent_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        posterior = model.posterior(x)
        chain = model.chain(posterior.features, eps)
        d1, d2 = model.latent_groups
        z1, z2 = chain.z[..., :d1], chain.z[..., d1:]
        mu_p, logvar_p = model.to_prior[0](model.prior_state[0](z2)).chunk(2, dim=-1)
        sampled = {
            0: gaussian_log_prob(z1, chain.mu[..., :d1], chain.logvar[..., :d1]) - gaussian_log_prob(z1, mu_p, logvar_p),
            1: (gaussian_log_prob(z2, chain.mu[..., d1:], chain.logvar[..., d1:])
                + 0.5 * (math.log(2 * math.pi) + z2.pow(2)).sum(-1)),
        }
    for group, mc in sampled.items():
        term = chain.kl_per_dim_groups[group].expand(-1, samples, -1).sum(-1)    # [B, S]
        stderr = mc.std(dim=1) / math.sqrt(samples)
        assert torch.all((term.mean(1) - mc.mean(1)).abs() < 4 * stderr + 1e-9), (group, term.mean(1), mc.mean(1))
        assert torch.all(term.mean(1) > 0)
    # The groups' terms add up to the sampled KL of the joint, sample by sample in expectation.
    total = sum(t.expand(-1, samples, -1).sum(-1) for t in chain.kl_per_dim_groups)
    stderr = float((-chain.log_ratio).std() / math.sqrt(samples))
    assert torch.allclose(total.mean(1), (-chain.log_ratio).mean(1), atol=4 * stderr)


def exact_log_px(model: HierarchicalVAE, x: torch.Tensor, half_width: float = 10.0, points: int = 161) -> torch.Tensor:
    """log p(x) = log ∫∫ p(x|z1) p(z1|z2) N(z2; 0, 1) dz1 dz2 by the trapezoid rule on a grid, for two
    one-dimensional groups (float64). The integrand is smooth and decays like a Gaussian, so the
    rule converges fast: 161 points agree with 401 to 1e-12 here."""
    grid = torch.linspace(-half_width, half_width, points, dtype=torch.float64)
    step = grid[1] - grid[0]
    weights = torch.full((points,), float(step), dtype=torch.float64)
    weights[0] = weights[-1] = step / 2
    z1, z2 = torch.meshgrid(grid, grid, indexing="ij")                      # [G, G]
    with torch.no_grad():
        mu_p, logvar_p = model.to_prior[0](model.prior_state[0](z2.reshape(-1, 1))).chunk(2, dim=-1)
        log_prior = (-0.5 * (math.log(2 * math.pi) + logvar_p[:, 0] + (z1.reshape(-1) - mu_p[:, 0]).pow(2)
                             * torch.exp(-logvar_p[:, 0])) - 0.5 * (math.log(2 * math.pi) + z2.reshape(-1).pow(2)))
        params = model.decode(torch.stack([z1.reshape(-1), z2.reshape(-1)], dim=-1))   # [G*G, F]
        log_w = torch.log(weights)[:, None] + torch.log(weights)[None, :]
        out = []
        for xi in x:
            log_lik = model.likelihood.log_prob(params, xi.expand(params.shape[0], -1))
            out.append(torch.logsumexp(log_lik + log_prior + log_w.reshape(-1), dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("hierarchy", ARRANGEMENTS)
def test_importance_estimate_of_log_px_against_exact_quadrature(hierarchy):
    """Two one-dimensional groups, two Bernoulli pixels: every x in {0, 1}^2, log p(x) integrated on a
    grid. The IW estimate with K = 8000 is within 0.05 nats of it (a missing or misplaced density
    term would be off by nats) and the ELBO below it; the four probabilities sum to 1 (the grid
    covers the mass)."""
    model = hier(hierarchy, groups=(1, 1), widths=((4,), (4,)), image_shape=(1, 2, 1), seed=2).double()
    x = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float64)
    exact = exact_log_px(model, x)
    assert torch.exp(exact).sum().item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        estimate = importance_log_px(model, x, 8000, chunk_size=8000, generator=torch.Generator().manual_seed(0))
        elbo = -sample_terms(model, x, 2000, generator=torch.Generator().manual_seed(1)).parts().loss
    assert torch.allclose(estimate, exact, atol=0.05), (estimate, exact)
    assert torch.all(elbo < exact + 1e-3)


@pytest.mark.parametrize("hierarchy", VARIANTS)
def test_one_group_is_the_one_layer_vae(hierarchy):
    """The same weights, the same noise: the same loss and parts, importance weights and evaluation rows
    (conv stages: the conv family's)."""
    torch.manual_seed(0)
    if hierarchy == "conv":
        vae = VAE(ModelConfig(kind="conv", latent_dim=5, hidden_dims=[8, 16], res_blocks_per_stage=1, norm="group"))
    else:
        vae = VAE(ModelConfig(latent_dim=5, hidden_dims=[32, 16]))
    model = hier(hierarchy, groups=(5,), widths=((8, 16),) if hierarchy == "conv" else ((32, 16),), activation="elu")
    copy_parameters(vae, model)
    x = binary_batch(6)
    eps = torch.randn(6, 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = sample_terms(vae, x, 3, eps=eps), sample_terms(model, x, 3, eps=eps)
        for name in ("loss", "recon_nll", "kl", "kl_groups"):
            assert torch.allclose(getattr(a.parts(), name), getattr(b.parts(), name), rtol=1e-6, atol=1e-5), name
        assert torch.allclose(a.log_weights(), b.log_weights(), rtol=1e-6, atol=1e-4)
        assert torch.allclose(a.kl_per_dim(), b.kl_per_dim(), rtol=1e-6, atol=1e-6)
        rows = [evaluate_batch(m.eval(), x, np.arange(6), "test", 0, num_samples_mc=2, num_samples_iw=10)
                for m in (vae, model)]
    for name, value in rows[0].items():
        assert torch.allclose(value.double(), rows[1][name].double(), rtol=1e-6, atol=1e-4), name


def test_a_top_group_that_carries_nothing_leaves_the_one_layer_model():
    """Top-down, two groups, the top one empty: q(z2|x) = p(z2) = N(0, I) and p(z1|z2) = N(0, I), with
    z1's posterior reading only the bottom-up features. Its loss, parts and importance weights are the
    one-layer VAE's on the same z1 noise, whatever the top group's noise; kl_2 is 0."""
    torch.manual_seed(0)
    vae = VAE(ModelConfig(latent_dim=4, hidden_dims=[24]))
    model = hier("top-down", groups=(4, 3), widths=((24,), (10,)), activation="elu")
    with torch.no_grad():
        model.encoder[0].load_state_dict(vae.encoder.state_dict())
        model.decoder.load_state_dict(vae.decoder.state_dict())
        for layer in (model.to_posterior[1], model.to_prior[0]):   # q(z2|x) and p(z1|z2): N(0, I)
            layer.weight.zero_()
            layer.bias.zero_()
        head = model.to_posterior[0]                                # reads [d_1, t_1]: only d_1 counts
        head.weight.zero_()
        head.weight[:, :24].copy_(vae.to_posterior.weight)
        head.bias.copy_(vae.to_posterior.bias)
    x = binary_batch(5)
    gen = torch.Generator().manual_seed(0)
    eps1, eps2 = torch.randn(5, 4, 4, generator=gen), torch.randn(5, 4, 3, generator=gen)
    with torch.no_grad():
        a, b = sample_terms(vae, x, 4, eps=eps1), sample_terms(model, x, 4, eps=torch.cat([eps1, eps2], -1))
        pa, pb = a.parts(), b.parts()
    assert torch.equal(pb.kl_groups[:, 1], torch.zeros(5))
    for name in ("loss", "recon_nll", "kl"):
        assert torch.allclose(getattr(pa, name), getattr(pb, name), rtol=1e-6, atol=1e-5), name
    assert torch.allclose(a.log_weights(), b.log_weights(), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("hierarchy", VARIANTS)
@pytest.mark.parametrize("objective", ["elbo", "beta", "iwae", "free-bits"])
def test_every_objective_trains_every_layer(hierarchy, objective):
    """Each objective is finite and its gradient reaches every parameter (the priors' layers included:
    DDP refuses a parameter that gets none); non-zero, except where free bits floor a group's KL."""
    model = hier(hierarchy)
    cfg = TrainConfig(objective=objective, **{"beta": {"beta": 2.0}, "iwae": {"iwae_samples": 3},
                                              "free-bits": {"free_bits": 0.5}}.get(objective, {}))
    obj = OBJECTIVES[objective].from_config(cfg)
    value = obj(sample_terms(model, binary_batch(), obj.num_samples, generator=torch.Generator().manual_seed(0)), 0.5)
    value.backward()
    assert torch.isfinite(value)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    if objective != "free-bits":
        assert [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0] == []


def test_iwae_with_one_sample_is_the_elbo_with_the_sampled_kl():
    model = hier("top-down")
    x, eps = binary_batch(), torch.randn(4, 1, 5, generator=torch.Generator().manual_seed(0))
    terms = sample_terms(model, x, 1, eps=eps)
    iwae = OBJECTIVES["iwae"](num_samples=1)(terms)
    assert torch.allclose(iwae, -(terms.log_px_z[:, 0] + terms.log_ratio[:, 0]).mean())


@pytest.mark.parametrize("floor", [0.0, 0.5, 2.0])
def test_free_bits_per_group_floors_each_groups_batch_mean(floor):
    cfg = load_config(None, ["train.objective=free-bits", f"train.free_bits={floor}", "train.free_bits_per=group"]).train
    objective = OBJECTIVES["free-bits"].from_config(cfg)
    terms = sample_terms(hier("top-down"), binary_batch(8), 1, generator=torch.Generator().manual_seed(0))
    kl_groups = terms.parts().kl_groups.mean(dim=0)
    expected = -terms.log_px_z.mean() + torch.clamp(kl_groups, min=floor).sum()
    assert torch.allclose(objective(terms), expected, rtol=1e-6)
    if floor == 0.0:   # no floor: the ELBO
        assert torch.allclose(objective(terms), OBJECTIVES["elbo"]()(terms), rtol=1e-6)


def test_free_bits_per_needs_the_free_bits_objective():
    with pytest.raises(ConfigError, match="^train.free_bits_per: only train.objective=free-bits uses it"):
        load_config(None, ["train.free_bits_per=group"])


@pytest.mark.parametrize("hierarchy", VARIANTS)
def test_evaluation_rows_split_the_kl_by_group_exactly(hierarchy):
    """loss = recon_nll + (kl_1 + kl_2) and kl = kl_1 + kl_2 exactly (float64), the same in any batch."""
    model = hier(hierarchy).eval()
    x = binary_batch(6)
    rows = evaluate_batch(model, x, np.arange(6), "test", 0, num_samples_mc=3, num_samples_iw=8)
    assert rows["kl_groups"].shape == (6, 2) and rows["kl_groups"].dtype == torch.float64
    assert rows["mu"].shape == rows["z"].shape == (6, model.latent_dim)
    groups = rows["kl_groups"]
    assert torch.equal(rows["kl"], groups[:, 0] + groups[:, 1])
    assert torch.equal(rows["loss"], rows["recon_nll"] + (groups[:, 0] + groups[:, 1]))
    assert torch.all(rows["log_px"] >= -rows["loss"] - 1.0)   # the IW bound sits above the ELBO, up to noise
    half = evaluate_batch(model, x[3:], np.arange(3, 6), "test", 0, num_samples_mc=3, num_samples_iw=8)
    for name in ("kl_groups", "loss", "log_px", "z"):
        assert torch.allclose(rows[name][3:], half[name], atol=1e-5), name


@pytest.mark.parametrize("hierarchy", ["one layer", *VARIANTS])
def test_kl_per_dim_column_sums_to_each_groups_term(hierarchy):
    """encode.kl_per_dim's column: each group's dimensions sum to its kl_groups entry (float32), and the
    table keeps it as a float32[latent_dim] vector."""
    from vaedist import schema

    torch.manual_seed(0)
    model = VAE(ModelConfig(latent_dim=4, hidden_dims=[16])) if hierarchy == "one layer" else hier(hierarchy)
    x = binary_batch(5)
    rows = evaluate_batch(model.eval(), x, np.arange(5), "test", 0, num_samples_mc=3, kl_per_dim=True)
    sums = torch.stack([t.sum(-1) for t in rows["kl_dims"].split(model.latent_groups, dim=-1)], dim=-1)
    assert torch.allclose(sums.double(), rows["kl_groups"], rtol=1e-5, atol=1e-5)
    columns = {name: value.numpy() for name, value in rows.items()}
    columns.update(key=[f"test-{i}" for i in range(5)], split=["test"] * 5, index=np.arange(5),
                   label=np.zeros(5, np.int64), shard=["s"] * 5)
    table = schema.to_table(columns, model.latent_dim, None, model.latent_groups)
    assert table.schema.field("kl_dims").type == schema.pa.list_(schema.pa.float32(), model.latent_dim)
    assert "kl_dims" not in evaluate_batch(model, x, np.arange(5), "test", 0)


@pytest.mark.parametrize("hierarchy", VARIANTS)
def test_mean_path_and_samples(hierarchy):
    """encode's mu is the chain at zero noise; a top-down model's top group is q(z_L|x) itself;
    ancestral samples are images in [0, 1]."""
    model = hier(hierarchy).eval()
    x = binary_batch(3)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        posterior = model.posterior(x)
        assert torch.equal(posterior.sample(torch.zeros(3, model.latent_dim)), mu)
        if hierarchy != "bottom-up":
            top_mu, _ = model.to_posterior[-1](model.features(x)[-1]).chunk(2, dim=-1)
            assert torch.allclose(mu[:, 3:], top_mu)
        images = model.sample(5, torch.Generator().manual_seed(0))
    assert images.shape == (5, 784) and images.min() >= 0 and images.max() <= 1


def test_burdas_two_layer_architecture_exactly():
    """latent_groups [100, 50], group_hidden_dims [[200, 200], [100, 100]], tanh, bottom-up: the layers
    of Burda et al. (2016), section 5, in both directions."""
    cfg = load_config(None, ["model.kind=hierarchical", "model.hierarchy=bottom-up", "model.latent_groups=[100, 50]",
                             "model.latent_dim=150", "model.group_hidden_dims=[[200, 200], [100, 100]]",
                             "model.activation=tanh"])
    model = build_model(cfg.model)
    linear = lambda m: [(l.in_features, l.out_features) for l in m.modules() if isinstance(l, torch.nn.Linear)]
    assert linear(model.encoder[0]) + linear(model.to_posterior[0]) == [(784, 200), (200, 200), (200, 200)]
    assert linear(model.encoder[1]) + linear(model.to_posterior[1]) == [(100, 100), (100, 100), (100, 100)]
    assert linear(model.prior_state[0]) + linear(model.to_prior[0]) == [(50, 100), (100, 100), (100, 200)]
    assert linear(model.decoder) == [(100, 200), (200, 200), (200, 784)]
    containers = (torch.nn.Linear, torch.nn.Sequential, torch.nn.ModuleList, HierarchicalVAE)
    assert {type(m) for m in model.modules() if not isinstance(m, containers)} == {torch.nn.Tanh}


def test_a_few_steps_on_real_mnist_reduce_the_loss(mnist_dir):
    """engine's loop, as Ray Train's workers and the benchmark run it: the training sums fall from one
    epoch to the next and so does the loss of held-out images."""
    from vaedist.data.sources import load_mnist

    images, _, _ = load_mnist("test", mnist_dir)
    images = images.reshape(len(images), -1)
    model = hier("top-down", groups=(8, 4), widths=((64,), (32,)))
    cfg = TrainConfig(batch_size_per_worker=50, lr=3e-3, lr_schedule="constant", seed=0)
    optimizer = make_optimizer(model, cfg)
    x = fixed_binarize(images[1000:1300], np.arange(1000, 1300), "test")

    def held_out() -> float:
        with torch.no_grad():
            return float(evaluate_batch(model.eval(), x, np.arange(1000, 1300), "test", 0)["loss"].mean())

    before = held_out()
    sums = [train_epoch(model, optimizer, torch.from_numpy(images[:1000]), cfg, epoch=e, rank=0, num_steps=10,
                        steps_per_epoch=10, start_step=10 * e, device=torch.device("cpu")) for e in range(2)]
    after = held_out()
    assert sums[1]["loss"] < sums[0]["loss"]
    assert after < before - 100, (before, after)


# ---------------------------------------------------------------------------------------------
# Config.

@pytest.mark.parametrize("overrides,key", [
    (["model.latent_groups=[4, 4]"], "model.latent_groups"),
    (["model.hierarchy=bottom-up"], "model.hierarchy"),
    (["model.kind=hierarchical"], "model.latent_groups"),
    (["model.kind=hierarchical", "model.latent_groups=[4, 4]"], "model.latent_dim"),
    (["model.kind=hierarchical", "model.latent_groups=[4, 0]", "model.latent_dim=4"], "model.latent_groups[1]"),
    (["model.kind=hierarchical", "model.latent_groups=[4, 4]", "model.latent_dim=8", "model.group_hidden_dims=[[8]]"],
     "model.group_hidden_dims"),
    (["model.kind=hierarchical", "model.latent_groups=[4, 4]", "model.latent_dim=8",
      "model.group_hidden_dims=[[8], []]"], "model.group_hidden_dims[1]"),
    (["model.kind=hierarchical", "model.latent_groups=[4, 4]", "model.latent_dim=8", "model.hidden_dims=[64]",
      "model.group_hidden_dims=[[8], [8]]"], "model.hidden_dims"),
    (["model.kind=hierarchical", "model.latent_groups=[4, 4]", "model.latent_dim=8", "model.hierarchy=sideways"],
     "model.hierarchy"),
    (["model.kind=hierarchical", "model.latent_groups=[4, 4]", "model.latent_dim=8", "model.group_stage=conv",
      "model.hierarchy=bottom-up"], "model.group_stage"),
    (["model.kind=hierarchical", "model.latent_groups=[4, 4]", "model.latent_dim=8", "model.norm=group"], "model.norm"),
    (["model.group_stage=conv"], "model.group_stage"),
])
def test_bad_hierarchical_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        load_config(None, overrides)


def test_conv_stages_need_images_their_strides_divide():
    cfg = ModelConfig(kind="hierarchical", latent_groups=[4, 2, 2], latent_dim=8, group_stage="conv",
                      group_hidden_dims=[[8], [8], [8]])
    with pytest.raises(ConfigError, match=r"^model.group_hidden_dims: .* 2\^3 = 8, but they are 28x28"):
        build_model(cfg)
    assert build_model(cfg, (32, 32, 3)).sample(2).shape == (2, 32 * 32 * 3)


def test_without_group_widths_every_stage_takes_hidden_dims():
    cfg = load_config(None, ["model.kind=hierarchical", "model.latent_groups=[4, 2]", "model.latent_dim=6",
                             "model.hidden_dims=[64, 32]"])
    assert cfg.model.stage_widths() == [[64, 32], [64, 32]]
    model = build_model(cfg.model)
    assert model.latent_groups == (4, 2) and model.latent_dim == 6


# ---------------------------------------------------------------------------------------------
# The latent table.

def table_of(model, x: torch.Tensor, lineage: dict | None = None):
    from vaedist import schema

    n = x.shape[0]
    rows = evaluate_batch(model.eval(), x, np.arange(n), "test", 0, num_samples_mc=2, num_samples_iw=4)
    columns = {name: value.numpy() for name, value in rows.items()}
    columns.update(key=[f"test-{i:05d}" for i in range(n)], split=["test"] * n, index=np.arange(n),
                   label=np.zeros(n, np.int64), shard=["s"] * n, source=["f"] * n)
    return schema.to_table(columns, model.latent_dim, lineage, model.latent_groups)


def test_a_table_of_several_groups_has_kl_groups_and_duckdb_sums_them_to_the_loss():
    import duckdb

    from vaedist import schema

    model = hier("top-down", groups=(3, 2, 2), widths=((16,), (12,), (8,)))
    table = table_of(model, binary_batch(6))
    assert table.schema.field("kl_groups").type == schema.pa.list_(schema.pa.float64(), 3)
    assert schema.num_groups_of(table.schema) == 3 and schema.latent_dim_of(table.schema) == 7
    con = duckdb.connect()
    con.register("latents", table)
    bad = con.sql("SELECT count(*) FROM latents WHERE loss != recon_nll + list_sum(kl_groups::DOUBLE[]) "
                  "OR kl != kl_groups[1] + kl_groups[2] + kl_groups[3] OR kl_groups[3] <= 0").fetchall()[0][0]
    assert bad == 0


def test_a_one_group_table_is_what_it_was():
    """A one-group model's rows (evaluation now also returns kl_groups) make the same table as
    before the column existed, and its lineage has no latent_groups key."""
    from vaedist import schema
    from vaedist.lineage import Lineage

    torch.manual_seed(0)
    lineage = Lineage(latent_dim=4, config={"model": {"latent_dim": 4}})
    assert "latent_groups" not in lineage.to_dict()
    for model in (VAE(ModelConfig(latent_dim=4, hidden_dims=[16])), hier(groups=(4,), widths=((16,),))):
        table = table_of(model, binary_batch(3), lineage)
        assert table.schema == schema.arrow_schema(4, lineage)
        assert table.schema.names == [c for c in schema.COLUMNS if c not in ("epoch", "kl_groups", "kl_dims")]
        assert table.schema.metadata == schema.arrow_schema(4, lineage).metadata


def test_per_group_analyses(tmp_path):
    """Active units, KL by group and by group and class over a published two-group table; a one-group
    table is refused by name."""
    import json

    import pyarrow.parquet as pq

    from vaedist import schema
    from vaedist.analyses import QueryError, active_units_by_group, kl_by_group, kl_by_group_and_class
    from vaedist.lineage import Lineage

    def publish(model, name: str) -> str:
        groups = list(model.latent_groups) if len(model.latent_groups) > 1 else None
        lineage = Lineage(latent_dim=model.latent_dim, latent_groups=groups)
        table = table_of(model, binary_batch(40, seed=5), lineage)
        table = table.set_column(table.schema.get_field_index("label"), "label",
                                 schema.pa.array(np.arange(40) % 2, schema.pa.int64()))
        (tmp_path / name).mkdir()
        pq.write_table(table, tmp_path / name / "test_000000.parquet")
        (tmp_path / name / schema.LINEAGE_FILE).write_text(json.dumps(lineage.to_dict()))
        (tmp_path / name / schema.SUCCESS_FILE).write_text("")
        return str(tmp_path / name)

    model = hier("top-down", groups=(3, 2))
    with torch.no_grad():   # the top group's mean ignores x: no active unit there
        model.to_posterior[1].weight[:2].zero_()
    two = publish(model, "two")
    kl = kl_by_group(two).to_pylist()
    assert [r["group"] for r in kl] == [1, 2] and all(r["count"] == 40 for r in kl)
    assert sum(r["kl_share_of_total"] for r in kl) == pytest.approx(1.0)
    assert sum(r["kl_share_mean"] for r in kl) == pytest.approx(1.0)
    rows = evaluate_batch(model.eval(), binary_batch(40, seed=5), np.arange(40), "test", 0, num_samples_mc=2)
    assert [r["kl_mean"] for r in kl] == pytest.approx(rows["kl_groups"].mean(0).tolist())
    by_class = kl_by_group_and_class(two).to_pylist()
    assert [(r["label"], r["group"]) for r in by_class] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    units = active_units_by_group(two, threshold=1e-6).to_pylist()
    assert units == [{"group": 1, "units": 3, "active_units": 3}, {"group": 2, "units": 2, "active_units": 0}]
    one = publish(hier(groups=(4,), widths=((16,),)), "one")
    with pytest.raises(QueryError, match="one latent group"):
        kl_by_group(one)
    # `vaedist query` runs them by their registered names.
    from click.testing import CliRunner

    from vaedist.cli import cli

    result = CliRunner().invoke(cli, ["query", "active-units-by-group", "--threshold", "1e-6", "--latents", two,
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.output.splitlines()] == units
    refused = CliRunner().invoke(cli, ["query", "kl-by-group", "--latents", one])
    assert refused.exit_code == 1 and "one latent group" in refused.output and "Traceback" not in refused.output


def test_kl_by_group_over_epochs(tmp_path):
    """A table of two checkpoints (as vaedist encode --epochs writes it): each epoch's group terms and
    shares; a table of one checkpoint is refused by name."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vaedist import schema
    from vaedist.analyses import QueryError, kl_by_group_over_epochs
    from vaedist.lineage import Lineage

    lineage = Lineage(latent_dim=5, latent_groups=[3, 2], epochs=[0, 4])
    tables, x = [], binary_batch(10, seed=7)
    for epoch, seed in ((0, 0), (4, 1)):
        table = table_of(hier("top-down", seed=seed), x, lineage)
        tables.append(table.append_column("epoch", pa.array([epoch] * 10, pa.int64())))
    (tmp_path / "t").mkdir()
    pq.write_table(pa.concat_tables(tables), tmp_path / "t" / "part.parquet")
    (tmp_path / "t" / schema.LINEAGE_FILE).write_text(json.dumps(lineage.to_dict()))
    (tmp_path / "t" / schema.SUCCESS_FILE).write_text("")
    rows = kl_by_group_over_epochs(str(tmp_path / "t")).to_pylist()
    assert [(r["epoch"], r["group"]) for r in rows] == [(0, 1), (0, 2), (4, 1), (4, 2)]
    for i, table in enumerate(tables):
        means = np.stack(table.column("kl_groups").to_pylist()).mean(0)
        assert [r["kl_mean"] for r in rows[2 * i:2 * i + 2]] == pytest.approx(means.tolist())
        assert sum(r["kl_share_of_total"] for r in rows[2 * i:2 * i + 2]) == pytest.approx(1.0)
    pq.write_table(tables[0].drop_columns(["epoch"]), tmp_path / "t" / "part.parquet")
    with pytest.raises(QueryError, match="encodes one checkpoint"):
        kl_by_group_over_epochs(str(tmp_path / "t"))


def test_the_cost_per_step_benchmark_is_a_command():
    from click.testing import CliRunner

    from vaedist.cli import cli

    result = CliRunner().invoke(cli, ["bench", "hierarchy", "--help"])
    assert result.exit_code == 0 and "vaedist bench hierarchy --config configs/hier-mnist.yaml" in result.output


def test_the_cost_per_step_benchmark_compares_the_configs_hierarchy_with_its_one_layer_family():
    """Burda et al.'s pair by default; a conv hierarchy against configs/conv.yaml's model, and any
    hierarchy against --baseline's, each one-layer model with the hierarchy's likelihood."""
    from vaedist.bench.hierarchy import compared_models

    burda = compared_models(load_config(REPO / "configs" / "mnist.yaml"))
    assert (burda["one layer"]["hidden_dims"], burda["two layers"]["latent_groups"]) == ([200, 200], [100, 50])
    conv = compared_models(load_config(REPO / "configs" / "hier-conv.yaml", ["model.likelihood=discretized-logistic"]))
    assert conv["one layer"]["kind"] == "conv" and conv["one layer"]["hidden_dims"] == [32, 64]
    assert conv["one layer"]["likelihood"] == conv["two layers"]["likelihood"] == "discretized-logistic"
    assert conv["two layers"]["latent_groups"] == [32, 16]
    colour = compared_models(load_config(REPO / "configs" / "hier-twemoji.yaml"), REPO / "configs" / "twemoji.yaml")
    assert colour["one layer"]["hidden_dims"] == [32, 64, 128]
    assert colour["one layer"]["mixture_components"] == colour["two layers"]["mixture_components"] == 5


def test_the_quality_benchmark_splits_active_units_and_kl_by_group():
    """`vaedist bench objectives --quality` on a model of several groups: each group's active units
    (of the dimensions given as active), its mean KL term over the split with training's fixed noise,
    and shares of the total KL that sum to 1."""
    from vaedist.bench.objectives import group_summary

    model = hier("bottom-up").eval()
    images = np.random.default_rng(0).integers(0, 256, size=(1010, 784), dtype=np.uint8)
    indices = np.arange(1010)  # two chunks of the summary's 1000
    active = torch.tensor([True, False, True, False, True])
    summary = group_summary(model, images, indices, 0, active, (3, 2))
    assert summary["active_units_by_group"] == [2, 1]
    x = fixed_binarize(images, indices, "test", 0)
    with torch.no_grad():
        rows = evaluate_batch(model, x, indices, "test", 0)
    assert summary["kl_by_group"] == pytest.approx(rows["kl_groups"].mean(dim=0).tolist(), rel=1e-5)  # batches of 1000 vs one of 1010
    assert sum(summary["kl_share_by_group"]) == pytest.approx(1.0)
