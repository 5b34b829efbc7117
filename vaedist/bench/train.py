"""`vaedist bench train`: Ray Train + shards (one worker) against a plain PyTorch loop over in-memory
tensors running the same engine.train_epoch, in one run.

    vaedist bench train --config configs/mnist.yaml --epochs 4 --repeats 3
"""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable

import torch

from vaedist import storage
from vaedist.config import Config, config_from_dict
from vaedist.data import load_split_arrays, read_manifest
from vaedist.devices import require_cuda
from vaedist.engine import make_grad_scaler, make_optimizer, train_epoch
from vaedist.model import build_model


def train_images(cfg: Config) -> torch.Tensor:
    """The training split's uint8 images [N, pixels], decoded from the same shards (a) trains on."""
    shards_dir = storage.absolute(cfg.data.shards_dir)
    manifest = read_manifest(shards_dir)
    shards = manifest.split("train").shards
    _, images, _ = load_split_arrays([storage.join(shards_dir, s.path) for s in shards],
                                     [s.num_samples for s in shards], manifest.dataset)
    return torch.from_numpy(images)


def plain_train_epochs(cfg: Config, images_u8: torch.Tensor, epochs: int, steps: int) -> list[float]:
    """(b): the same engine.train_epoch over a tensor already in memory (on the GPU with
    scaling.use_gpu, in train.mixed_precision, as (a)'s worker), no Ray, no shards; samples/s of each epoch."""
    device = require_cuda("the plain loop (scaling.use_gpu)") if cfg.scaling.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, read_manifest(storage.absolute(cfg.data.shards_dir)).dataset.image_shape)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg.train, device)
    scaler = make_grad_scaler(device, cfg.train.mixed_precision)
    if cfg.train.compile:
        model = torch.compile(model)
    images_u8 = images_u8.to(device)
    rates = []
    for epoch in range(epochs):
        r = train_epoch(model, optimizer, images_u8, cfg.train, epoch=epoch, rank=0, num_steps=steps,
                        steps_per_epoch=steps, start_step=epoch * steps, device=device,
                        mixed_precision=cfg.train.mixed_precision, scaler=scaler)
        rates.append(r["count"] / r["seconds"])
    return rates


def _steady(rates: list[float]) -> float:
    """Mean samples/s after the first (warm-up) epoch; equal epochs, so the mean of rates is fair."""
    rest = rates[1:] or rates
    return sum(rest) / len(rest)


def _fmt(rates: list[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in rates)


def bench_train(cfg: Config, epochs: int, repeats: int = 1, echo: Callable[[str], None] = print) -> dict[str, float]:
    """(b), then `repeats` times (a) followed by (b). Each (a) is compared with the mean of the (b)
    runs either side of it, which cancels load that drifts over minutes; the result is the median of
    those ratios. An embedded Ray is shut down after each (a): its idle processes would otherwise
    slow (b) too and hide part of what Ray costs."""
    import ray

    from vaedist.cluster import ray_address
    from vaedist.train import train

    cfg = config_from_dict(cfg.to_dict(), [f"train.epochs={epochs}", "scaling.num_workers=1",
                                           "train.num_samples_iw_final=0", "train.kl_warmup_epochs=0"])
    manifest = read_manifest(storage.absolute(cfg.data.shards_dir))
    n = manifest.split("train").num_samples
    steps = n // cfg.train.batch_size_per_worker
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    images_u8 = train_images(cfg)
    echo(f"model {cfg.model.kind} {cfg.model.hidden_dims} z={cfg.model.latent_dim}, batch {cfg.train.batch_size_per_worker}, "
         f"{steps} steps x {epochs} epochs, {cfg.scaling.cpus_per_worker:g} CPU threads; "
         "samples/s averaged over epochs after the first")
    plain = [plain_train_epochs(cfg, images_u8, epochs, steps)]
    echo(f"(b) plain PyTorch loop, in-memory tensors: {_steady(plain[0]):,.0f} samples/s (per epoch: {_fmt(plain[0])})")
    ray_runs, walls = [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = train(config_from_dict(cfg.to_dict(), [f"output.storage_path={tmp}", f"output.run_name=bench-{i}"]))
            walls.append(time.perf_counter() - start)
        if ray_address(cfg.scaling.address) is None:
            ray.shutdown()
        ray_runs.append([r["samples_per_s"] for r in result.epochs])
        echo(f"(a) Ray Train + WebDataset shards, 1 worker: {_steady(ray_runs[-1]):,.0f} samples/s "
             f"(per epoch: {_fmt(ray_runs[-1])})")
        plain.append(plain_train_epochs(cfg, images_u8, epochs, steps))
        echo(f"(b) plain PyTorch loop, again: {_steady(plain[-1]):,.0f} samples/s (per epoch: {_fmt(plain[-1])})")
    ratios = [_steady(run) / ((_steady(plain[i]) + _steady(plain[i + 1])) / 2) for i, run in enumerate(ray_runs)]
    ratio = statistics.median(ratios)
    if repeats > 1:
        echo("ratio of each (a) to the (b) either side: " + ", ".join(f"{r:.3f}" for r in ratios))
    echo(f"ratio (a)/(b), training epochs{', median' if repeats > 1 else ''}: {ratio:.3f}")
    wall = statistics.median(walls)
    end_to_end = epochs * steps * cfg.train.batch_size_per_worker / wall
    echo(f"end to end incl. Ray start, shard decode, per-epoch eval and checkpoints: {end_to_end:,.0f} samples/s "
         f"({wall:.1f} s wall{', median' if repeats > 1 else ''})")
    return {"ray_samples_per_s": statistics.median(_steady(r) for r in ray_runs),
            "plain_samples_per_s": statistics.median(_steady(r) for r in plain), "ratio": ratio,
            "ratios": ratios, "end_to_end_samples_per_s": end_to_end}


def bench_kernels(cfg: Config, epochs: int = 3, rounds: int = 2, echo: Callable[[str], None] = print) -> dict[str, float]:
    """The plain loop (no Ray) with Adam's foreach and fused kernels, and with the model under
    torch.compile: samples/s of the epochs after the first, the variants interleaved `rounds` times."""
    steps_cfg = config_from_dict(cfg.to_dict(), ["train.kl_warmup_epochs=0"])
    manifest = read_manifest(storage.absolute(cfg.data.shards_dir))
    steps = manifest.split("train").num_samples // cfg.train.batch_size_per_worker
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    images_u8 = train_images(cfg)
    variants = {"foreach Adam": ["train.optimizer_kernel=foreach"], "fused Adam": ["train.optimizer_kernel=fused"],
                "foreach Adam + torch.compile": ["train.optimizer_kernel=foreach", "train.compile=true"]}
    echo(f"plain loop, {cfg.scaling.cpus_per_worker:g} CPU threads, {steps} steps x {epochs} epochs, "
         f"{rounds} rounds of the variants interleaved; samples/s after the first epoch")
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, overrides in variants.items():
            rates[name].append(_steady(plain_train_epochs(config_from_dict(steps_cfg.to_dict(), overrides),
                                                          images_u8, epochs, steps)))
    base = statistics.median(rates["foreach Adam"])
    for name, values in rates.items():
        echo(f"  {name}: {statistics.median(values):,.0f} samples/s (rounds: {_fmt(values)}); "
             f"ratio to foreach {statistics.median(values) / base:.3f}")
    return {name: statistics.median(values) for name, values in rates.items()}
