"""`vaedist bench hierarchy`: the training step of a model of several latent groups against the
one-layer model it extends, in one run, each with the ELBO and with IWAE k = 5, through the plain
engine loop (engine.train_epoch, the code Ray Train's workers run) on the shards' training images in
memory. By default Burda et al.'s one- and two-stochastic-layer MNIST models
(configs/burda-1layer-mnist.yaml, configs/hier-mnist.yaml); with a hierarchical config, its model
against the one-layer model of --baseline (configs/conv.yaml for conv stages), both with the
config's likelihood.

    vaedist bench hierarchy --config configs/hier-mnist.yaml --steps 50 --rounds 3
    vaedist bench hierarchy --config configs/hier-conv.yaml --set model.likelihood=discretized-logistic

The variants run in interleaved rounds (A B C D, A B C D, ...), so load that drifts over minutes
weighs on each alike; each figure is the median over rounds of the steady epochs' time per step.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Callable

import torch

from vaedist import storage
from vaedist.bench.train import train_images
from vaedist.config import Config, config_from_dict, load_config
from vaedist.data import read_manifest
from vaedist.devices import require_cuda
from vaedist.engine import make_optimizer, train_epoch
from vaedist.model import build_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MODELS = {"one layer": "burda-1layer-mnist.yaml", "two layers": "hier-mnist.yaml"}
ONE_LAYER = {"mlp": MODELS["one layer"], "conv": "conv.yaml"}  # the baseline for each kind of stage
LIKELIHOOD_KEYS = ("likelihood", "mixture_components", "gaussian_scale")
OBJECTIVES = {"elbo": ["train.objective=elbo", "train.iwae_samples=null"],
              "iwae k=5": ["train.objective=iwae", "train.iwae_samples=5"]}


def compared_models(cfg: Config, baseline: str | None = None) -> dict[str, dict]:
    """{"one layer", "two layers": model settings}: cfg's model if it is hierarchical (else
    configs/hier-mnist.yaml's), and the model of the baseline config file (default: Burda et al.'s
    one layer for MLP stages, configs/conv.yaml for conv stages), with cfg's likelihood when cfg's
    model is the hierarchical one."""
    if cfg.model.kind != "hierarchical":
        return {name: vars(load_config(CONFIGS / file).model) for name, file in MODELS.items()}
    one = vars(load_config(baseline or CONFIGS / ONE_LAYER[cfg.model.group_stage]).model)
    return {"one layer": {**one, **{key: getattr(cfg.model, key) for key in LIKELIHOOD_KEYS}},
            "two layers": vars(cfg.model)}


def _variant(cfg: Config, model: dict, objective: list[str]) -> Config:
    """cfg's training settings and data with the given model settings and the objective."""
    values = {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], **model}}
    return config_from_dict(values, [*objective, "train.kl_warmup_epochs=0", "train.lr_schedule=constant"])


def _seconds_per_step(cfg: Config, images_u8: torch.Tensor, device: torch.device, steps: int, epochs: int) -> float:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, read_manifest(storage.absolute(cfg.data.shards_dir)).dataset.image_shape).to(device)
    optimizer = make_optimizer(model, cfg.train, device)
    times = []
    for epoch in range(epochs):
        r = train_epoch(model, optimizer, images_u8, cfg.train, epoch=epoch, rank=0, num_steps=steps,
                        steps_per_epoch=steps, start_step=epoch * steps, device=device)
        times.append(r["seconds"] / steps)
    return statistics.mean(times[1:] or times)  # the first epoch warms up


def bench_hierarchy(cfg: Config, steps: int = 50, rounds: int = 3, epochs: int = 2, baseline: str | None = None,
                    echo: Callable[[str], None] = print) -> dict[tuple[str, str], float]:
    """Milliseconds per training step of each (model, objective), and each against the one-layer model
    with the same objective (compared_models says which models)."""
    device = require_cuda("the benchmark (scaling.use_gpu)") if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    images_u8 = train_images(cfg).to(device)
    variants = {(m, o): _variant(cfg, model, args) for m, model in compared_models(cfg, baseline).items()
                for o, args in OBJECTIVES.items()}
    echo(f"{steps} steps x {epochs} epochs per variant, batch {cfg.train.batch_size_per_worker}, {rounds} "
         f"interleaved rounds, on {device}")
    measured: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    for _ in range(rounds):
        for key, variant in variants.items():
            measured[key].append(_seconds_per_step(variant, images_u8, device, steps, epochs))
    ms = {key: 1000 * statistics.median(values) for key, values in measured.items()}
    for (model, objective), value in ms.items():
        ratio = value / ms[("one layer", objective)]
        echo(f"  {model:<10}  {objective:<9}  {value:8.2f} ms/step  x{ratio:.2f} of one layer")
    return ms
