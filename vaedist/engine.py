"""The training step, schedule and epoch loop over in-memory uint8 images. No Ray, no ranks.

Both the Ray Train workers and the plain-PyTorch benchmark baseline run exactly this code, so the
benchmark measures what Ray and the shard path add, not a difference in the loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from vaedist.config import TrainConfig
from vaedist.data import dynamic_binarize, fixed_binarize
from vaedist.evaluate import evaluate_batch
from vaedist.losses import batch_loss, negative_elbo


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then constant or cosine decay to lr_min_ratio * lr, as a function of the step
    (so resuming needs only the step count, no scheduler state)."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    total = max(1, cfg.epochs * steps_per_epoch - warmup)
    progress = min(1.0, (step - warmup) / total)
    floor = cfg.lr * cfg.lr_min_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def kl_weight(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Deterministic KL warm-up (Bowman et al. 2016; Sonderby et al. 2016): 0 -> 1 linearly."""
    ramp = cfg.kl_warmup_epochs * steps_per_epoch
    return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16/fp16 autocast on CUDA; a no-op elsewhere (CPU runs in float32)."""
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_grad_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not."""
    if device.type == "cuda" and mixed_precision == "fp16":
        return torch.amp.GradScaler("cuda")
    return None


@dataclass
class StepStats:
    loss: float
    recon_nll: float
    kl: float


def train_step(model, optimizer, x: torch.Tensor, cfg: TrainConfig, lr: float, kl_w: float,
               autocast=contextlib.nullcontext(), scaler: torch.amp.GradScaler | None = None) -> StepStats:
    """One optimiser step on binarised x; returns the batch sums of the unweighted terms."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        parts = negative_elbo(model, x, cfg.num_samples_mc)
        objective = batch_loss(parts, kl_w)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(objective).backward()
        scaler.unscale_(optimizer)
    else:
        objective.backward()
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepStats(float(parts.loss.detach().sum()), float(parts.recon_nll.detach().sum()),
                     float(parts.kl.detach().sum()))


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Shuffling and dynamic binarisation for one epoch on one worker: seeded from (seed, epoch, rank)."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)
    return gen


def train_epoch(model, optimizer, images_u8: torch.Tensor, cfg: TrainConfig, *, epoch: int, rank: int,
                num_steps: int, steps_per_epoch: int, start_step: int, device: torch.device,
                mixed_precision: str = "no", scaler=None) -> dict[str, float]:
    """`num_steps` minibatches from a fresh permutation of images_u8 [N, P] (already on `device`).
    Returns sums (loss, recon_nll, kl), the sample count and the wall time of the loop."""
    gen = epoch_generator(cfg.seed, epoch, rank, device)
    order = torch.randperm(images_u8.shape[0], generator=gen, device=device)
    batch = cfg.batch_size_per_worker
    autocast = autocast_context(device, mixed_precision)
    sums = {"loss": 0.0, "recon_nll": 0.0, "kl": 0.0}
    model.train()
    start = time.perf_counter()
    for i in range(num_steps):
        step = start_step + i
        x = dynamic_binarize(images_u8[order[i * batch:(i + 1) * batch]], gen)
        stats = train_step(model, optimizer, x, cfg, learning_rate(cfg, step, steps_per_epoch),
                           kl_weight(cfg, step, steps_per_epoch), autocast, scaler)
        sums["loss"] += stats.loss
        sums["recon_nll"] += stats.recon_nll
        sums["kl"] += stats.kl
    return {**sums, "count": float(num_steps * batch), "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate_sums(model, images_u8: np.ndarray, indices: np.ndarray, split: str, seed: int,
                  device: torch.device, batch_size: int = 1000, num_samples_mc: int = 1,
                  num_samples_iw: int = 0, iw_chunk_size: int = 100) -> dict[str, float]:
    """Sums over datapoints of loss, recon_nll, kl (and log_px) with the fixed binarisation and
    per-key noise; the caller reduces sums and counts across workers for an exact mean."""
    model.eval()
    sums = {"loss": 0.0, "recon_nll": 0.0, "kl": 0.0, "count": 0.0}
    if num_samples_iw > 0:
        sums["log_px"] = 0.0
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        x = fixed_binarize(images_u8[start:start + batch_size], idx, split, seed).to(device)
        out = evaluate_batch(model, x, idx, split, seed, num_samples_mc, num_samples_iw, iw_chunk_size)
        for key in sums:
            if key != "count":
                sums[key] += float(out[key].double().sum())
        sums["count"] += len(idx)
    return sums
