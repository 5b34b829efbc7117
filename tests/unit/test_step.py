"""The static-shape training step (vaedist/step.py) on the CPU: a padded and masked batch gives the
loss and gradients of the unpadded one for every objective and model family (one latent group or
several, whose terms are losses.GroupedTerms), the step on static buffers follows the eager loop step
by step (schedules, seeds, sums), and the mode switch refuses what cannot work,
naming the key. The CUDA graph and torch.compile's step (whose compilation takes a minute on two
loaded cores) are tested in tests/gpu."""

from __future__ import annotations

import pytest
import torch

from vaedist.config import ConfigError, ModelConfig, TrainConfig, config_from_dict
from vaedist.engine import kl_weight, learning_rate, make_optimizer, static_train_steps, train_epoch
from vaedist.losses import sample_terms
from vaedist.model import VAE, build_model
from vaedist.objectives import objective_for
from vaedist.step import StaticStep, resolve_step_mode, static_step_for

CPU = torch.device("cpu")
OBJECTIVES = [dict(objective="elbo", num_samples_mc=2), dict(objective="beta", beta=3.0),
              dict(objective="iwae", iwae_samples=3), dict(objective="free-bits", free_bits=0.5),
              dict(objective="free-bits", free_bits=0.5, free_bits_per="group")]
FAMILIES = ("mlp", "hierarchical")


def tiny(seed: int = 0, family: str = "mlp", **model) -> VAE:
    """latent_dim 4: one group, or (hierarchical) groups of 2 and 2."""
    torch.manual_seed(seed)
    if family == "hierarchical":
        return build_model(ModelConfig(kind="hierarchical", latent_dim=4, latent_groups=[2, 2],
                                       group_hidden_dims=[[32], [16]], **model))
    return VAE(ModelConfig(latent_dim=4, hidden_dims=[32], **model))


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train", OBJECTIVES, ids=[o["objective"] + ("-per-group" if "free_bits_per" in o else "")
                                                   for o in OBJECTIVES])
def test_a_padded_batch_masked_by_weights_gives_the_unpadded_loss_and_gradients(train, family):
    cfg = TrainConfig(**train)
    objective = objective_for(cfg)
    gen = torch.Generator().manual_seed(0)
    real, padded = 5, 8
    x = torch.bernoulli(torch.rand(padded, 784, generator=gen), generator=gen)
    x[real:] = 0  # what StaticStep.stage puts in the padding
    eps = torch.randn(padded, objective.num_samples, 4, generator=gen)
    kl_w = torch.tensor(0.3)
    weights = (torch.arange(padded) < real).float()
    model_a, model_b = tiny(family=family), tiny(family=family)
    want = objective(sample_terms(model_a, x[:real], objective.num_samples, eps=eps[:real]), 0.3)
    got = objective.weighted(sample_terms(model_b, x, objective.num_samples, eps=eps), kl_w, weights)
    want.backward()
    got.backward()
    # Equal up to float32 summation order (sums over 5 and 8 rows group their terms differently).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    # Several groups chain more float32 sums (gradients up to ~10, near-zero ones off by a few 1e-5
    # under IWAE); in float64 the two agree to 1e-15.
    torch.testing.assert_close(grads(model_b), grads(model_a), rtol=1e-5, atol=1e-6 if family == "mlp" else 1e-4)


def _pair(family: str = "mlp", **train):
    cfg = TrainConfig(batch_size_per_worker=16, lr=1e-3, epochs=2, warmup_epochs=0.5, kl_warmup_epochs=1.5,
                      lr_schedule="cosine", **train)
    model_a, model_b = tiny(family=family), tiny(family=family)
    return cfg, (model_a, make_optimizer(model_a, cfg)), (model_b, make_optimizer(model_b, cfg))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_static_step_follows_the_eager_loop_with_its_schedules_seeds_and_sums(family):
    cfg, (eager, eager_opt), (static_model, static_opt) = _pair(family)
    images = torch.randint(0, 256, (96, 784), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for epoch in range(2):
        kwargs = dict(epoch=epoch, rank=0, num_steps=6, steps_per_epoch=6, start_step=6 * epoch, device=CPU)
        want = train_epoch(eager, eager_opt, images, cfg, **kwargs)
        totals, count = static_train_steps(static_model, static_opt, images, cfg, "static", **kwargs)
        static = static_step_for(static_model, static_opt, cfg, CPU, "static")
        # The schedules as device tables are the Python schedules, step by step.
        steps = range(6 * epoch, 6 * epoch + 6)
        assert static.lr_table.tolist() == torch.tensor([learning_rate(cfg, s, 6) for s in steps]).tolist()
        assert static.kl_table.tolist() == torch.tensor([kl_weight(cfg, s, 6) for s in steps]).tolist()
        assert int(static.counter) == 6 and count == want["count"] == 96
        # Weighted means (sum / count) against means: float32 rounding apart.
        for key, got in zip(("loss", "recon_nll", "kl", "objective"), totals.tolist()):
            assert got == pytest.approx(want[key], rel=1e-5), (epoch, key)
    torch.testing.assert_close(torch.cat([p.flatten() for p in static_model.parameters()]),
                               torch.cat([p.flatten() for p in eager.parameters()]), rtol=1e-4, atol=1e-6)


def test_a_short_last_batch_is_padded_counted_and_masked():
    cfg = TrainConfig(batch_size_per_worker=16, lr=1e-3)
    model = tiny()
    static = StaticStep(model, make_optimizer(model, cfg), cfg, CPU, "static")
    batches = [torch.randint(0, 256, (n, 784), dtype=torch.uint8) for n in (16, 16, 7)]
    static.reseed(0)
    totals, count = static.run(batches, 3, [1e-3] * 3, [1.0] * 3)
    assert count == 39
    assert static.weights.tolist() == [1.0] * 7 + [0.0] * 9
    assert not static.images[7:].any()
    # The sums cover 39 rows: a mean loss of a few hundred nats, not 48 rows' worth or 32's.
    assert 100 < totals[0].item() / 39 < 1000
    with pytest.raises(ValueError, match="batch_size_per_worker=16"):
        static.stage(torch.zeros(17, 784, dtype=torch.uint8))




def test_step_mode_auto_is_eager_on_the_cpu_and_cuda_graph_is_refused_there():
    assert resolve_step_mode(TrainConfig(), CPU) == "eager"
    assert resolve_step_mode(TrainConfig(step_mode="compile"), CPU) == "compile"
    with pytest.raises(ValueError, match="train.step_mode=cuda_graph needs a CUDA device"):
        resolve_step_mode(TrainConfig(step_mode="cuda_graph"), CPU)
    # auto keeps eager where a graph cannot hold the step, also on CUDA.
    assert resolve_step_mode(TrainConfig(mixed_precision="fp16"), torch.device("cuda")) == "eager"
    assert resolve_step_mode(TrainConfig(), torch.device("cuda"), tiny(norm="batch", kind="conv")) == "eager"


@pytest.mark.parametrize("overrides,match", [
    ({"train": {"step_mode": "graph"}}, "train.step_mode"),
    ({"train": {"step_mode": "cuda_graph", "mixed_precision": "fp16"}}, "gradient scaler"),
    ({"train": {"step_mode": "cuda_graph", "compile": True}}, "train.compile=false"),
    ({"train": {"step_mode": "cuda_graph"}, "model": {"kind": "conv", "norm": "batch"}}, "batch norm"),
])
def test_step_modes_that_cannot_work_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(overrides)
