"""The training step on static shapes: eager on static buffers, torch.compile'd, or captured as one
CUDA graph, all from the same code (`StaticStep._body`). No Ray, no ranks.

engine.train_steps picks the mode (`resolve_step_mode`, from train.step_mode) and, for any mode but
eager, hands its batches to the `StaticStep` built once per optimiser (`static_step_for`), so the
benchmark's plain loop and the Ray Train workers run the same step whichever mode they run.

What the static step holds on the device, so that a CUDA graph can replay it unchanged:
- the batch: uint8 [batch_size_per_worker, P], each batch copied in; a shorter last batch is padded
  with zero images whose weight is 0 (`weights`), so it runs the same graph (no recapture) and the
  objective (Objective.weighted), its gradient and the epoch's sums count only the real rows;
- the schedules: the epoch's learning rates and KL weights, the Python schedules (engine.learning_rate
  and engine.kl_weight) evaluated per step on the host once per epoch and copied into device tables,
  read at a step counter that the step itself advances; Adam reads its learning rate from a device
  tensor (capturable Adam);
- the randomness: one generator per run, reseeded per epoch from (seed, epoch, rank) exactly as the
  eager loop's (engine.epoch_seed); dynamic binarisation and the reparameterisation noise draw from
  it inside the graph (CUDA's Philox is counter-based: a replay advances the generator's offset as
  the eager kernels would, registered with the graph);
- the sums (loss, recon_nll, kl, objective) accumulated in a float64 buffer, read once per epoch.

With several workers (DDP) the all-reduce stays where DDP puts it, in the backward's bucket hooks,
and so inside the captured graph: NCCL >= 2.9.6 allows capturing it, and PyTorch asks for 11 eager
DDP steps before the capture (WARMUP_STEPS_DDP). auto chooses eager for DDP-wrapped models; an
explicit train.step_mode=cuda_graph captures them.

A model that cannot be captured (a host read such as .item() or a Python branch on a tensor's value
in its forward, data-dependent shapes, CPU tensors created inside it, batch norm) makes the capture
fail: under auto the run warns and goes on with the same step eagerly; under cuda_graph it stops
with an error that says so.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from vaedist.config import TrainConfig
from vaedist.likelihoods import likelihood_of
from vaedist.losses import sample_terms
from vaedist.objectives import objective_for

STEP_MODES = ("auto", "eager", "compile", "cuda_graph")
WARMUP_STEPS = 3
"""Eager steps on a side stream before the capture (PyTorch's recipe: lazily created state such as
Adam's moments and cuBLAS workspaces must exist before it). They are real steps of the run."""
WARMUP_STEPS_DDP = 11
"""The same under DistributedDataParallel, which PyTorch documents as needing 11."""


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def graph_obstacle(cfg: TrainConfig, model: nn.Module | None, mixed_precision: str = "no") -> str | None:
    """Why this run's step cannot be a CUDA graph, or None."""
    if mixed_precision == "fp16" or cfg.mixed_precision == "fp16":
        return "fp16's gradient scaler reads the device every step"
    if cfg.compile:
        return "train.compile wraps the model in torch.compile"
    if model is not None and _has_batch_norm(model):
        return "batch norm: padding the last batch would change its statistics"
    return None


def resolve_step_mode(cfg: TrainConfig, device: torch.device, model: nn.Module | None = None,
                      mixed_precision: str = "no") -> str:
    """train.step_mode on this device: eager, compile or cuda_graph (auto: cuda_graph on CUDA where
    graph_obstacle finds nothing and the model is not DDP-wrapped, else eager)."""
    mode = cfg.step_mode
    if mode not in STEP_MODES:
        raise ValueError(f"train.step_mode: unknown mode {mode!r}; known: {', '.join(STEP_MODES)}")
    if mode == "cuda_graph":
        if device.type != "cuda":
            raise ValueError(f"train.step_mode=cuda_graph needs a CUDA device, but the step runs on {device}; "
                             "use train.step_mode=auto (eager there) or compile")
        obstacle = graph_obstacle(cfg, model, mixed_precision)
        if obstacle:
            raise ValueError(f"train.step_mode=cuda_graph: {obstacle}; use train.step_mode=eager or auto")
    if mode != "auto":
        return mode
    if device.type != "cuda" or graph_obstacle(cfg, model, mixed_precision) or (model is not None and _is_ddp(model)):
        return "eager"
    return "cuda_graph"


def graph_autocast(device: torch.device, mixed_precision: str):
    """bf16 autocast without its weight-cast cache, which a graph must not hold across replays."""
    if device.type != "cuda" or mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=False)


class StaticStep:
    """The training step on static buffers for one model and optimiser (module doc). mode: cuda_graph,
    compile, or static (the same code eagerly: the fallback, and what CPU tests exercise)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 device: torch.device, mode: str, mixed_precision: str = "no"):
        if mode not in ("static", "compile", "cuda_graph"):
            raise ValueError(f"StaticStep: mode must be static, compile or cuda_graph, got {mode!r}")
        self.model, self.optimizer, self.cfg, self.device, self.mode = model, optimizer, cfg, device, mode
        self.explicit = cfg.step_mode == mode
        core = _unwrap(model)
        self.likelihood = likelihood_of(core)
        self.objective = objective_for(cfg)
        batch, pixels = cfg.batch_size_per_worker, core.num_pixels
        self.images = torch.zeros(batch, pixels, dtype=torch.uint8, device=device)
        self.rows = torch.arange(batch, device=device)
        self.weights = torch.ones(batch, dtype=torch.float32, device=device)
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)
        self.counter = torch.zeros(1, dtype=torch.int64, device=device)
        self.lr_table = torch.zeros(0, dtype=torch.float32, device=device)
        self.kl_table = torch.zeros(0, dtype=torch.float32, device=device)
        self.generator = torch.Generator(device=device)
        self.autocast = graph_autocast(device, mixed_precision)
        self.filled = batch
        self.graph: torch.cuda.CUDAGraph | None = None
        self.warmup_left = WARMUP_STEPS_DDP if _is_ddp(model) else WARMUP_STEPS
        self.forward = torch.compile(self._forward) if mode == "compile" else self._forward
        if mode == "cuda_graph":
            self._make_capturable()

    def _make_capturable(self) -> None:
        """Adam reads its learning rate from self.lr and keeps its step counters on the device."""
        self.lr = torch.full((), self.cfg.lr, dtype=torch.float32, device=self.device)
        for group in self.optimizer.param_groups:
            group["capturable"] = True
            group["lr"] = self.lr
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(self.device, torch.float32)
        self.side_stream = torch.cuda.Stream(device=self.device)

    def reseed(self, seed: int) -> torch.Generator:
        """Seed the run's generator for an epoch (engine.epoch_seed); it also shuffles."""
        self.generator.manual_seed(seed)
        return self.generator

    def load_schedule(self, learning_rates: list[float], kl_weights: list[float], capacity: int = 0) -> None:
        """The epoch's schedules into the device tables (sized max(steps, capacity) before the
        capture, fixed after it), the step counter and the sums to zero."""
        n = len(learning_rates)
        if n > self.lr_table.numel():
            n_alloc = max(n, capacity)
            if self.graph is not None:
                raise RuntimeError(f"StaticStep: an epoch of {n} steps after a graph captured for "
                                   f"{self.lr_table.numel()}")
            self.lr_table = torch.zeros(n_alloc, dtype=torch.float32, device=self.device)
            self.kl_table = torch.zeros(n_alloc, dtype=torch.float32, device=self.device)
        tables = torch.tensor([learning_rates, kl_weights], dtype=torch.float32)
        if self.device.type == "cuda":  # pinned, so that the copy does not wait for the device
            tables = tables.pin_memory()
        self.lr_table[:n].copy_(tables[0], non_blocking=True)
        self.kl_table[:n].copy_(tables[1], non_blocking=True)
        self.learning_rates = learning_rates
        self.counter.zero_()
        self.totals.zero_()

    def stage(self, images_u8: torch.Tensor) -> int:
        """Copy a batch into the static buffer; a short one is padded with zero images of weight 0."""
        n, batch = images_u8.shape[0], self.images.shape[0]
        if n > batch:
            raise ValueError(f"a batch of {n} rows exceeds train.batch_size_per_worker={batch}")
        self.images[:n].copy_(images_u8, non_blocking=True)
        if n < batch:
            self.images[n:].zero_()
        if n != self.filled:
            self.weights.copy_(self.rows < n)
            self.filled = n
        return n

    def _forward(self, images_u8: torch.Tensor, weights: torch.Tensor, kl_w: torch.Tensor):
        """The objective (Objective.weighted) and the weighted sums of the batch: engine.train_step's
        forward, with the padding masked."""
        x = self.likelihood.train_input(images_u8, self.generator)
        with self.autocast:
            terms = sample_terms(self.model, x, self.objective.num_samples, generator=self.generator)
            parts = terms.parts()
            value = self.objective.weighted(terms, kl_w, weights)
        sums = torch.stack([(parts.loss * weights).sum(), (parts.recon_nll * weights).sum(),
                            (parts.kl * weights).sum(), value.detach() * weights.sum()]).double()
        return value, sums

    def _body(self) -> None:
        """One step from the static buffers: what the CUDA graph holds."""
        kl_w = self.kl_table.index_select(0, self.counter).view(())
        if self.mode == "cuda_graph":
            self.lr.copy_(self.lr_table.index_select(0, self.counter).view(()))
        value, sums = self.forward(self.images, self.weights, kl_w)
        value.backward()
        if self.cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.totals += sums.detach()
        self.counter += 1

    def _eager(self, step: int) -> None:
        if self.mode != "cuda_graph":
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rates[step]
        self.optimizer.zero_grad(set_to_none=True)
        self._body()

    def step(self, step: int) -> None:
        """Step `step` of the epoch on the staged batch."""
        if self.mode != "cuda_graph":
            return self._eager(step)
        if self.graph is not None:
            return self.graph.replay()
        if self.warmup_left > 0:
            self.warmup_left -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side_stream):
                self._eager(step)
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
            return None
        self._capture(step)

    def _capture(self, step: int) -> None:
        """Capture the step (capturing runs nothing), then replay it for this batch."""
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(self.generator)
        try:
            # thread_local: other threads of the process (Ray's) may use CUDA while this one captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._body()
        except Exception as err:  # any failure inside a capture means this model cannot be captured
            message = (f"train.step_mode: capturing the training step as a CUDA graph failed ({type(err).__name__}: "
                       f"{err}). Models that read tensors on the host in forward (.item(), Python branches on "
                       "values), change shapes with the data or make CPU tensors there cannot be captured")
            if self.explicit:
                raise RuntimeError(message + "; use train.step_mode=eager") from err
            warnings.warn(message + "; training goes on with the same step run eagerly", RuntimeWarning)
            self.mode = "static"
            self.generator = self._unregistered(self.generator)
            for group in self.optimizer.param_groups:
                group["lr"] = float(self.lr)
            return self._eager(step)
        self.graph = graph
        graph.replay()

    def _unregistered(self, generator: torch.Generator) -> torch.Generator:
        """A generator with `generator`'s state that no (failed) capture ever held."""
        fresh = torch.Generator(device=self.device)
        try:
            fresh.set_state(generator.get_state())
        except RuntimeError:
            fresh.manual_seed(generator.initial_seed())
        return fresh

    def run(self, batches: Iterable[torch.Tensor], num_steps: int, learning_rates: list[float],
            kl_weights: list[float], capacity: int = 0,
            on_progress: Callable[[int, torch.Tensor, int], None] | None = None) -> tuple[torch.Tensor, int]:
        """`num_steps` steps over `batches`; returns the float64 sums [4] (a copy) and the sample
        count. on_progress(steps done, sums so far, count) runs after every step (it decides when to
        read the sums)."""
        self.load_schedule(learning_rates, kl_weights, capacity)
        self.model.train()
        count = 0
        for i, images in zip(range(num_steps), batches):
            count += self.stage(images)
            self.step(i)
            if on_progress is not None:
                on_progress(i + 1, self.totals, count)
        return self.totals.clone(), count


def static_step_for(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
                    mode: str, mixed_precision: str = "no") -> StaticStep:
    """The StaticStep of this optimiser, built on first use and kept on it (one capture per run)."""
    step = getattr(optimizer, "_vaedist_static_step", None)
    if step is None or step.model is not model or step.cfg is not cfg:
        step = StaticStep(model, optimizer, cfg, device, mode, mixed_precision)
        optimizer._vaedist_static_step = step
    return step
