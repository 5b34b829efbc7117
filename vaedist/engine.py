"""The training step, schedule and epoch loop over uint8 image batches. No Ray, no ranks.

Both the Ray Train workers and the plain-PyTorch benchmark baseline run exactly this code, so the
benchmark measures what Ray and the data path add, not a difference in the loop.

Nothing here reads a tensor back to the host per step: the step's sums stay on the device and the
epoch reads them once (a host sync per step would stall a GPU's queue, where a step of this model
is far shorter than the sync). Randomness (shuffling, binarisation, the reparameterisation noise)
comes from one generator per (seed, epoch, rank): ranks draw different noise, and a resumed epoch
draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from vaedist.config import TrainConfig
from vaedist.evaluate import evaluate_batch
from vaedist.likelihoods import likelihood_of
from vaedist.losses import sample_terms
from vaedist.objectives import Objective, objective_for
from vaedist.step import resolve_step_mode, static_step_for

SUM_KEYS = ("loss", "recon_nll", "kl")
TRAIN_SUM_KEYS = (*SUM_KEYS, "objective")  # training also sums the objective's own value (train.objective)


def optimizer_kernel(cfg: TrainConfig, device: torch.device) -> str:
    """'fused' or 'foreach' for train.optimizer_kernel on this device: auto is fused on CUDA (one
    kernel for every parameter) and foreach on CPU, where fused measured no faster (README,
    Performance)."""
    if cfg.optimizer_kernel != "auto":
        return cfg.optimizer_kernel
    return "fused" if device.type == "cuda" else "foreach"


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   device: torch.device = torch.device("cpu")) -> torch.optim.Optimizer:
    """Adam(W) with the kernel train.optimizer_kernel picks; capturable (its step counters and learning
    rate on the device) where the step will be a CUDA graph (vaedist/step.py)."""
    kernel = {"fused": True} if optimizer_kernel(cfg, device) == "fused" else {"foreach": True}
    if resolve_step_mode(cfg, device, model, cfg.mixed_precision) == "cuda_graph":
        kernel["capturable"] = True
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)


# The optimiser's kernel choice, which load_state_dict would otherwise take from the checkpoint.
KERNEL_FLAGS = ("fused", "foreach", "capturable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore an optimiser's state under this run's kernel (train.optimizer_kernel on this device),
    with Adam's `step` counters where that kernel keeps them.

    torch's load_state_dict takes every param-group setting from the checkpoint, the kernel flags
    included: a run trained on a GPU (fused) and resumed with foreach would silently stay fused, and
    its fused flag would move the counters to the GPU, where the foreach/for-loop kernels read each
    one with .item(), a host sync per parameter tensor per step (found on the H200: bench gpu's test
    tier). So the flags are this optimiser's, and the counters go to the CPU; fused (and capturable)
    Adam wants them on the parameters' device, and load_state_dict moves them there itself."""
    groups = [{**saved, **{flag: group[flag] for flag in KERNEL_FLAGS if flag in group}}
              for saved, group in zip(state["param_groups"], optimizer.param_groups)]
    steps_on_cpu = {**state, "param_groups": groups,
                    "state": {k: {n: (v.cpu() if n == "step" and isinstance(v, torch.Tensor) else v)
                                  for n, v in s.items()} for k, s in state["state"].items()}}
    optimizer.load_state_dict(steps_on_cpu)


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


def train_step(model, optimizer, x: torch.Tensor, cfg: TrainConfig, lr: float, kl_w: float,
               generator: torch.Generator | None = None, autocast=contextlib.nullcontext(),
               scaler: torch.amp.GradScaler | None = None, objective: Objective | None = None) -> torch.Tensor:
    """One optimiser step on x (the likelihood's train_input) minimising `objective` (default: the one
    cfg.objective names). Returns the batch sums of the unweighted (loss, recon_nll, kl) and of the
    objective's value per datapoint, in TRAIN_SUM_KEYS order, as a float64 tensor [4] on x's device,
    not read back (no host sync). One forward pass serves both: with the iwae objective the ELBO's
    reconstruction term is the mean over its k samples."""
    if objective is None:
        objective = objective_for(cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        terms = sample_terms(model, x, objective.num_samples, generator=generator)
        parts = terms.parts()
        value = objective(terms, kl_w)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(value).backward()
        scaler.unscale_(optimizer)
    else:
        value.backward()
    if cfg.grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)  # reads its inf check: the one sync fp16 cannot avoid
        scaler.update()
    else:
        optimizer.step()
    return torch.stack([parts.loss.detach().sum(), parts.recon_nll.detach().sum(),
                        parts.kl.detach().sum(), value.detach() * x.shape[0]]).double()


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one epoch's generator on one worker: ranks differ, a resumed epoch repeats exactly."""
    return (seed * 1_000_003 + epoch) * 1009 + rank


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """Shuffling, dynamic binarisation and reparameterisation noise for one epoch on one worker:
    seeded from (seed, epoch, rank), so ranks differ and a resumed epoch repeats exactly."""
    gen = torch.Generator(device=device)
    gen.manual_seed(epoch_seed(seed, epoch, rank))
    return gen


def memory_batches(images_u8: torch.Tensor, batch_size: int, num_steps: int,
                   generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`num_steps` minibatches of a fresh permutation of images_u8 [N, P] (already on the device)."""
    order = torch.randperm(images_u8.shape[0], generator=generator, device=images_u8.device)
    for i in range(num_steps):
        yield images_u8[order[i * batch_size:(i + 1) * batch_size]]


def train_steps(model, optimizer, batches: torch.Tensor | Iterable[torch.Tensor], cfg: TrainConfig, *,
                epoch: int, rank: int, num_steps: int, steps_per_epoch: int, start_step: int,
                device: torch.device, mixed_precision: str = "no", scaler=None,
                on_progress: Callable[[int, dict[str, float]], None] | None = None) -> tuple[torch.Tensor, int]:
    """`num_steps` optimiser steps, with no read from the device (unless on_progress asks for one
    every cfg.progress_every_steps steps). `batches` is either images_u8 [N, P] on the device
    (shuffled here, from the epoch's generator) or an iterable of uint8 batches [B, P] (a stream,
    already shuffled), moved to the device and binarised there. Returns the sums (loss, recon_nll,
    kl, objective: TRAIN_SUM_KEYS) as a float64 tensor [4] on the device, and the sample count.

    train.step_mode decides how each step runs (vaedist/step.py): eager is the loop below; compile
    and cuda_graph hand the same batches, schedules and generator seed to the run's StaticStep."""
    mode = resolve_step_mode(cfg, device, model, mixed_precision)
    if mode != "eager":
        return static_train_steps(model, optimizer, batches, cfg, mode, epoch=epoch, rank=rank,
                                  num_steps=num_steps, steps_per_epoch=steps_per_epoch, start_step=start_step,
                                  device=device, mixed_precision=mixed_precision, on_progress=on_progress)
    gen = epoch_generator(cfg.seed, epoch, rank, device)
    if isinstance(batches, torch.Tensor):
        batches = memory_batches(batches, cfg.batch_size_per_worker, num_steps, gen)
    autocast = autocast_context(device, mixed_precision)
    likelihood = likelihood_of(model)
    objective = objective_for(cfg)
    totals = torch.zeros(len(TRAIN_SUM_KEYS), dtype=torch.float64, device=device)
    count = 0
    model.train()
    for i, images in zip(range(num_steps), batches):
        step = start_step + i
        x = likelihood.train_input(images.to(device, non_blocking=True), gen)
        totals += train_step(model, optimizer, x, cfg, learning_rate(cfg, step, steps_per_epoch),
                             kl_weight(cfg, step, steps_per_epoch), gen, autocast, scaler, objective)
        count += images.shape[0]
        if on_progress is not None and cfg.progress_every_steps and (i + 1) % cfg.progress_every_steps == 0:
            on_progress(i + 1, {**dict(zip(TRAIN_SUM_KEYS, totals.tolist())), "count": float(count)})
    return totals, count


def static_train_steps(model, optimizer, batches, cfg: TrainConfig, mode: str, *, epoch: int, rank: int,
                       num_steps: int, steps_per_epoch: int, start_step: int, device: torch.device,
                       mixed_precision: str = "no", on_progress=None) -> tuple[torch.Tensor, int]:
    """train_steps through the run's StaticStep (mode: compile, cuda_graph, or static: its code run
    eagerly): the same shuffling and seeds as the eager loop, the schedules evaluated for the epoch's
    steps, progress read as often as the eager loop reads it."""
    static = static_step_for(model, optimizer, cfg, device, mode, mixed_precision)
    gen = static.reseed(epoch_seed(cfg.seed, epoch, rank))
    if isinstance(batches, torch.Tensor):
        batches = memory_batches(batches, cfg.batch_size_per_worker, num_steps, gen)
    steps = range(start_step, start_step + num_steps)
    every = cfg.progress_every_steps

    def progress(done: int, totals: torch.Tensor, count: int) -> None:
        if on_progress is not None and every and done % every == 0:
            on_progress(done, {**dict(zip(TRAIN_SUM_KEYS, totals.tolist())), "count": float(count)})

    return static.run(batches, num_steps, [learning_rate(cfg, s, steps_per_epoch) for s in steps],
                      [kl_weight(cfg, s, steps_per_epoch) for s in steps], capacity=steps_per_epoch,
                      on_progress=progress)


def train_epoch(model, optimizer, batches: torch.Tensor | Iterable[torch.Tensor], cfg: TrainConfig, **kwargs
                ) -> dict[str, float]:
    """train_steps, then the epoch's one read from the device: its sums (loss, recon_nll, kl,
    objective), the sample count and the wall time of the loop."""
    start = time.perf_counter()
    totals, count = train_steps(model, optimizer, batches, cfg, **kwargs)
    sums = dict(zip(TRAIN_SUM_KEYS, totals.tolist()))
    return {**sums, "count": float(count), "seconds": time.perf_counter() - start}


@torch.no_grad()
def evaluate_sums(model, images_u8: np.ndarray, indices: np.ndarray, split: str, seed: int,
                  device: torch.device, batch_size: int = 1000, num_samples_mc: int = 1,
                  num_samples_iw: int = 0, iw_chunk_size: int = 100) -> dict[str, float]:
    """Sums over datapoints of loss, recon_nll, kl (and log_px, and each latent group's KL: sum_keys)
    with the fixed binarisation and per-key noise; the caller reduces sums and counts across workers
    for an exact mean."""
    model.eval()
    keys = sum_keys(model, num_samples_iw)
    groups = len(keys) - keys.index(group_key(1)) if group_key(1) in keys else 0
    totals = torch.zeros(len(keys), dtype=torch.float64, device=device)
    for start in range(0, len(indices), batch_size):
        idx = indices[start:start + batch_size]
        x = likelihood_of(model).eval_input(images_u8[start:start + batch_size], idx, split, seed, device)
        out = evaluate_batch(model, x, idx, split, seed, num_samples_mc, num_samples_iw, iw_chunk_size)
        sums = [out[key].double().sum() for key in keys[:len(keys) - groups]]
        totals += torch.stack([*sums, *out["kl_groups"].double().sum(dim=0)[:groups]])
    return {**dict(zip(keys, totals.tolist())), "count": float(len(indices))}


def group_key(group: int) -> str:
    """evaluate_sums' key for latent group z_group's KL term (1: next to x)."""
    return f"kl_group_{group}"


def sum_keys(model, num_samples_iw: int = 0) -> list[str]:
    """The sums evaluate_sums returns besides count: SUM_KEYS, log_px with importance samples, and for a
    model of several latent groups each group's KL term, z_1 first (one group's is kl itself)."""
    groups = len(getattr(model, "latent_groups", ()))
    return [*SUM_KEYS, *(["log_px"] if num_samples_iw > 0 else []),
            *([group_key(g) for g in range(1, groups + 1)] if groups > 1 else [])]
