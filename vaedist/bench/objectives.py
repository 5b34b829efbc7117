"""`vaedist bench objectives`: the cost of a training step under the iwae objective against the elbo
objective's, for k = 1, 5, 50, on the same model, the same batch, in one run.

    vaedist bench objectives --config configs/mnist.yaml --steps 10 --rounds 3

Each variant is engine.train_step (what training runs) on its own copy of the same initial model and
Adam, on one batch of the training split binarised once. The variants run `steps` steps each, in
turn, `rounds` times (so load that drifts over minutes falls on all of them alike), after one warm-up
step each; time per step is the median over all timed steps. Memory, three ways:

- saved for backward: the bytes of the tensors autograd keeps from the forward pass for the backward
  pass (parameters excluded), counted with torch.autograd.graph.saved_tensors_hooks on one step.
  Deterministic: the activations that grow with k.
- peak RSS over a step (CPU): the process's resident high-water mark (VmHWM, reset through
  /proc/self/clear_refs before the step) minus its resident size before the step, with glibc's
  mmap threshold pinned at 64 KiB so freed tensors go back to the system and each step starts from
  the same resident size. The median over the timed steps; it includes gradients and Adam's update.
- on CUDA instead: torch.cuda.max_memory_allocated over the step minus memory_allocated before it.
"""

from __future__ import annotations

import copy
import ctypes
import statistics
import time
from typing import Callable

import torch

from vaedist import storage
from vaedist.config import Config, config_from_dict
from vaedist.data import load_split_arrays, read_manifest
from vaedist.engine import epoch_generator, make_optimizer, train_epoch, train_step
from vaedist.likelihoods import likelihood_of
from vaedist.losses import sample_terms
from vaedist.model import VAE, build_model
from vaedist.objectives import ELBO, IWAE, Objective

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MIB = 2 ** 20


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _pin_mmap_threshold() -> bool:
    """Large blocks mmapped and unmapped on free, with no dynamic threshold (which would keep freed
    activations resident after the first step, hiding the next step's peak). False where unsupported."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024))
    except OSError:
        return False


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def saved_for_backward_bytes(fn: Callable[[], torch.Tensor], exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves during fn() (a forward pass returning a scalar),
    other than those in `exclude` (the parameters')."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage_ = t.untyped_storage()
        if storage_.data_ptr() not in exclude:
            seen[storage_.data_ptr()] = storage_.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _batch(cfg: Config, device: torch.device, generator: torch.Generator, model: VAE) -> torch.Tensor:
    """One training batch from the first training shard, through the likelihood's training transform."""
    shards_dir = storage.absolute(cfg.data.shards_dir)
    manifest = read_manifest(shards_dir)
    shard = manifest.split("train").shards[0]
    _, images, _ = load_split_arrays([storage.join(shards_dir, shard.path)], [shard.num_samples],
                                     manifest.dataset)
    images = torch.from_numpy(images[:cfg.train.batch_size_per_worker]).to(device)
    return likelihood_of(model).train_input(images, generator)


def bench_objectives(cfg: Config, ks: tuple[int, ...] = (1, 5, 50), steps: int = 10, rounds: int = 3,
                     device: str = "cpu", echo: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    cfg = config_from_dict(cfg.to_dict(), ["train.kl_warmup_epochs=0"])
    dev = torch.device(device)
    if dev.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    info = read_manifest(storage.absolute(cfg.data.shards_dir)).dataset
    torch.manual_seed(cfg.train.seed)
    initial = build_model(cfg.model, info.image_shape).to(dev)
    gen = epoch_generator(cfg.train.seed, 0, 0, dev)
    x = _batch(cfg, dev, gen, initial)
    variants: dict[str, Objective] = {"elbo (S=1)": ELBO(1), **{f"iwae k={k}": IWAE(k) for k in ks}}
    state = {}
    for name in variants:
        model = copy.deepcopy(initial)
        state[name] = (model, make_optimizer(model, cfg.train, dev))
    rss = dev.type == "cpu" and _pin_mmap_threshold() and _reset_peak_rss()
    batch = x.shape[0]
    echo(f"model {cfg.model.kind} {cfg.model.hidden_dims} z={cfg.model.latent_dim}, batch {batch}, on {dev}"
         + (f", {torch.get_num_threads()} CPU threads" if dev.type == "cpu" else "")
         + f"; {rounds} rounds x {steps} steps per variant, interleaved; median time per step")

    def step(name: str) -> None:
        model, optimizer = state[name]
        train_step(model, optimizer, x, cfg.train, cfg.train.lr, 1.0, gen, objective=variants[name])

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    saved, times, peaks = {}, {name: [] for name in variants}, {name: [] for name in variants}
    for name, objective in variants.items():
        step(name)  # warm-up: Adam's state, lazy kernels
        model = state[name][0]
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved[name] = saved_for_backward_bytes(
            lambda: objective(sample_terms(model, x, objective.num_samples, generator=gen)), params)
    for _ in range(rounds):
        for name in variants:
            for _ in range(steps):
                sync()
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    before = torch.cuda.memory_allocated(dev)
                elif rss:
                    before = _proc_status_kib("VmRSS") * 1024
                    _reset_peak_rss()
                start = time.perf_counter()
                step(name)
                sync()
                times[name].append(time.perf_counter() - start)
                if dev.type == "cuda":
                    peaks[name].append(torch.cuda.max_memory_allocated(dev) - before)
                elif rss:
                    peaks[name].append(_proc_status_kib("VmHWM") * 1024 - before)
    base = "elbo (S=1)"
    t0, s0 = statistics.median(times[base]), saved[base]
    p0 = statistics.median(peaks[base]) if peaks[base] else None
    peak_label = "peak allocated (CUDA)" if dev.type == "cuda" else "peak RSS over a step"
    results = {}
    for name in variants:
        t, s = statistics.median(times[name]), saved[name]
        p = statistics.median(peaks[name]) if peaks[name] else None
        line = (f"  {name:>11}: {t * 1e3:9.1f} ms/step (x{t / t0:6.2f}), {batch / t:10,.0f} samples/s; "
                f"saved for backward {s / MIB:8.1f} MiB (x{s / s0:6.2f})")
        if p is not None and p0:
            line += f"; {peak_label} {p / MIB:8.1f} MiB (x{p / p0:6.2f})"
        echo(line)
        results[name] = {"seconds_per_step": t, "time_ratio": t / t0, "saved_bytes": s, "saved_ratio": s / s0,
                         **({"peak_bytes": p, "peak_ratio": p / p0} if p is not None and p0 else {})}
    if dev.type == "cpu" and not rss:
        echo("  (peak RSS not measured: /proc/self/clear_refs or glibc's mallopt is unavailable here)")
    return results


# ---------------------------------------------------------------------------------------------
# Quality: the objectives trained on the same architecture and budget, compared on the same numbers.

QUALITY_RUNS = {
    "elbo": ["train.objective=elbo"],
    "iwae5": ["train.objective=iwae", "train.iwae_samples=5"],
    "iwae50": ["train.objective=iwae", "train.iwae_samples=50"],
    "beta0.5": ["train.objective=beta", "train.beta=0.5"],
    "beta2": ["train.objective=beta", "train.beta=2"],
}
ACTIVE_UNIT_THRESHOLD = 0.01  # Cov_x(E_q[z_d|x]) > 0.01, as `vaedist query active-units` (Burda et al. 2016)
# Every run starts from the config with no objective's own setting, so that a config trained with
# one objective (configs/hier-mnist.yaml: iwae, k = 5) still gives each run exactly the objective named.
OBJECTIVE_RESET = ["train.iwae_samples=null", "train.beta=null", "train.free_bits=null",
                   "train.free_bits_per=dimension"]


def quality_run_config(cfg: Config, name: str, epochs: int) -> Config:
    """cfg with QUALITY_RUNS[name]'s objective, and only its, trained `epochs` epochs."""
    return config_from_dict(cfg.to_dict(), [f"train.epochs={epochs}", *OBJECTIVE_RESET, *QUALITY_RUNS[name]])


def _split(cfg: Config, split: str, rows: int = 0):
    shards_dir = storage.absolute(cfg.data.shards_dir)
    manifest = read_manifest(shards_dir)
    shards = manifest.split(split).shards
    indices, images, _ = load_split_arrays([storage.join(shards_dir, s.path) for s in shards],
                                           [s.num_samples for s in shards], manifest.dataset)
    return (indices[:rows], images[:rows]) if rows else (indices, images)


def bench_quality(cfg: Config, runs: list[str], epochs: int, nll_rows: int = 1000, nll_samples: int = 1000,
                  echo: Callable[[str], None] = print, save_dir: str | None = None,
                  progress_seconds: float = 60.0) -> dict[str, dict[str, float]]:
    """Each objective in `runs` (QUALITY_RUNS' names) trained `epochs` epochs from the same initial
    weights with the plain engine loop (engine.train_epoch, what the Ray Train workers run, as `bench
    train`'s baseline), one after another, then on MNIST's test split with its fixed binarisation and
    per-key noise (engine.evaluate_sums, as training's own evaluation): the negative ELBO (S = 1) over
    the whole split, the importance-weighted NLL (K = nll_samples) over its first nll_rows datapoints
    and over the whole split the active units, dimensions whose posterior mean varies more than 0.01.
    With save_dir, each trained model is a checkpoint in save_dir/<run> that `vaedist encode
    --checkpoint` reads. A line of progress every progress_seconds of training."""
    from vaedist.checkpoint import save_checkpoint
    from vaedist.data import manifest_hash
    from vaedist.engine import evaluate_sums

    dev = torch.device("cpu")
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    _, train_u8 = _split(cfg, "train")
    test_idx, test_u8 = _split(cfg, "test")
    images = torch.from_numpy(train_u8)
    shards_dir = storage.absolute(cfg.data.shards_dir)
    info = read_manifest(shards_dir).dataset
    if save_dir:
        storage.makedirs(save_dir)  # a path that cannot hold the models fails now, not after the training
        data_hash = manifest_hash(shards_dir)
    widths = cfg.model.stage_widths() if cfg.model.kind == "hierarchical" else cfg.model.hidden_dims
    echo(f"model {cfg.model.kind} {widths} {cfg.model.activation} z={cfg.model.latent_dim}, "
         f"batch {cfg.train.batch_size_per_worker}, {epochs} epochs, lr {cfg.train.lr:g} {cfg.train.lr_schedule}, "
         f"{torch.get_num_threads()} CPU threads; test NLL with K = {nll_samples} over the first {nll_rows} test "
         f"images, negative ELBO and active units over all {len(test_idx)}")
    results = {}
    for name in runs:
        run_cfg = quality_run_config(cfg, name, epochs)
        torch.manual_seed(run_cfg.train.seed)
        model = build_model(run_cfg.model, info.image_shape)
        optimizer = make_optimizer(model, run_cfg.train, dev)
        steps = images.shape[0] // run_cfg.train.batch_size_per_worker
        start = last = time.perf_counter()
        for epoch in range(epochs):
            sums = train_epoch(model, optimizer, images, run_cfg.train, epoch=epoch, rank=0, num_steps=steps,
                               steps_per_epoch=steps, start_step=epoch * steps, device=dev)
            if time.perf_counter() - last >= progress_seconds and epoch + 1 < epochs:
                last = time.perf_counter()
                echo(f"  {name:>8}: epoch {epoch + 1}/{epochs}  train -ELBO {sums['loss'] / sums['count']:7.2f}, "
                     f"objective {sums['objective'] / sums['count']:7.2f}  ({last - start:.0f} s)")
        train_seconds = time.perf_counter() - start
        if save_dir:
            save_checkpoint(storage.join(save_dir, name), model_state=model.state_dict(),
                            optimizer_state=optimizer.state_dict(), epoch=epochs - 1, global_step=epochs * steps,
                            config=run_cfg, manifest_hash=data_hash, history=[], dataset=info.name,
                            image_shape=info.image_shape)
        test = evaluate_sums(model, test_u8, test_idx, "test", run_cfg.train.seed, dev)
        nll = evaluate_sums(model, test_u8[:nll_rows], test_idx[:nll_rows], "test", run_cfg.train.seed, dev,
                            batch_size=100, num_samples_iw=nll_samples)
        with torch.no_grad():
            x = likelihood_of(model).eval_input(test_u8, test_idx, "test", run_cfg.train.seed, dev)
            mu = torch.cat([model.encode(x[i:i + 1000])[0] for i in range(0, x.shape[0], 1000)])
        active_dims = mu.double().var(dim=0, unbiased=False) > ACTIVE_UNIT_THRESHOLD
        row = {"test_loss": test["loss"] / test["count"], "test_nll_iw": -nll["log_px"] / nll["count"],
               "test_loss_nll_rows": nll["loss"] / nll["count"], "active_units": int(active_dims.sum()),
               "train_loss": sums["loss"] / sums["count"], "train_objective": sums["objective"] / sums["count"],
               "train_seconds": train_seconds}
        groups = tuple(model.latent_groups)
        if len(groups) > 1:
            row.update(group_summary(model, test_u8, test_idx, run_cfg.train.seed, active_dims, groups))
        results[name] = row
        echo(f"  {name:>8}: test -ELBO {row['test_loss']:7.2f}  test NLL {row['test_nll_iw']:7.2f} "
             f"(-ELBO {row['test_loss_nll_rows']:7.2f} on those rows)  active units "
             f"{row['active_units']:2d}/{cfg.model.latent_dim}  "
             f"last epoch: train -ELBO {row['train_loss']:7.2f}, objective {row['train_objective']:7.2f}  "
             f"({train_seconds:.0f} s training)")
        if len(groups) > 1:
            echo("            per group, z_1 first: " + "; ".join(
                f"active {a}/{n}, KL {k:.2f} nats ({100 * s:.1f}% of the total)"
                for a, n, k, s in zip(row["active_units_by_group"], groups, row["kl_by_group"],
                                      row["kl_share_by_group"])))
    return results


def group_summary(model, test_u8, test_idx, seed: int, active_dims: torch.Tensor,
                  groups: tuple[int, ...]) -> dict[str, list]:
    """A model of several latent groups, over the test split: each group's active units (of
    active_dims, the dimensions whose posterior mean varies more than ACTIVE_UNIT_THRESHOLD), its mean
    KL term (S = 1, the fixed noise of training's evaluation) and its share of the total KL: what
    `vaedist query active-units-by-group` and `kl-by-group` give from an encoded table."""
    from vaedist.evaluate import evaluate_batch

    kl_groups = torch.zeros(len(groups), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(test_idx), 1000):
            idx = test_idx[start:start + 1000]
            x = likelihood_of(model).eval_input(test_u8[start:start + 1000], idx, "test", seed, torch.device("cpu"))
            kl_groups += evaluate_batch(model, x, idx, "test", seed, 1, 0)["kl_groups"].double().sum(dim=0)
    kl_mean = kl_groups / len(test_idx)
    return {"active_units_by_group": [int(a.sum()) for a in active_dims.split(groups)],
            "kl_by_group": kl_mean.tolist(), "kl_share_by_group": (kl_groups / kl_groups.sum()).tolist()}
