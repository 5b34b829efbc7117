"""Ray Train: data-parallel VAE training over the WebDataset shards (TorchTrainer, DDP).

    vaedist train --config configs/debug.yaml
    ray job submit --working-dir . -- python jobs/train.py --config configs/debug.yaml

The per-worker loop has three Ray touchpoints, labelled RAY (1)-(3): this worker's share of the
shards, prepare_model (DDP), and report (metrics + checkpoint). Everything else is engine.py.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from vaedist import storage
from vaedist.checkpoint import (CheckpointError, best_checkpoint_dir, check_model_compatible, checkpoint_dir_name,
                                latest_checkpoint_dir, load_checkpoint, newest_readable_checkpoint, read_metrics,
                                save_checkpoint, write_metrics)
from vaedist.config import Config, ConfigError, config_from_dict
from vaedist.data import DataError, load_split_arrays, manifest_hash, read_checked_shard, read_manifest
from vaedist.engine import evaluate_sums, make_grad_scaler, make_optimizer, train_epoch
from vaedist.model import VAE

log = logging.getLogger("vaedist.train")
FAIL_ENV = "VAEDIST_FAIL_AT_EPOCH"


# ---------------------------------------------------------------------------------------------
# Shards: which worker reads which, and how many steps every rank takes.

def split_shards(manifest: dict, split: str, max_shards: int) -> list[dict]:
    shards = manifest["splits"][split]["shards"]
    return shards[:max_shards] if max_shards else shards


def shards_for_rank(shards: list[dict], rank: int, world_size: int) -> list[dict]:
    """Round-robin: shard i goes to rank i mod world_size."""
    return shards[rank::world_size]


def steps_per_epoch(shards: list[dict], world_size: int, batch_size: int, max_steps: int = 0) -> int:
    """The same for every rank: the smallest rank's full batches (unequal counts would hang DDP)."""
    per_rank = [sum(s["num_samples"] for s in shards_for_rank(shards, r, world_size)) for r in range(world_size)]
    steps = min(per_rank) // batch_size
    return min(steps, max_steps) if max_steps else steps


def _load_rank_arrays(shards_dir: str, shards: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    paths = [storage.join(shards_dir, s["path"]) for s in shards]
    if not paths:
        return np.zeros(0, np.int64), np.zeros((0, 784), np.uint8), np.zeros(0, np.int64)
    return load_split_arrays(paths, [s["num_samples"] for s in shards])


def _all_reduce_sums(sums: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each entry over all ranks (exact global means: sum and count, not a mean of means)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def _rank_fingerprints(model: torch.nn.Module, device: torch.device) -> list[float]:
    """Every rank's sum of all parameters (float64), gathered: equal iff DDP kept replicas in sync."""
    total = torch.tensor([sum(float(p.detach().double().sum()) for p in model.parameters())],
                         dtype=torch.float64, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return total.tolist()
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    return [float(t) for t in gathered]


def _rank_node_ids() -> list[str]:
    """Every rank's Ray node id, gathered: where the worker group was placed."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [node_id]
    gathered: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(gathered, node_id)
    return gathered


def _newer_unregistered_checkpoint(run_dir: str, registered: dict | None, rank: int,
                                   device: torch.device) -> dict | None:
    """A complete checkpoint in the run directory that is newer than the one Ray restored, if any.

    Ray Train registers a reported checkpoint only when its controller next polls the workers
    (every 2 s); a node lost inside that window takes the newest checkpoints out of Ray's records
    although their files are safely in storage, and without this the run would retrain those epochs,
    or start over. Rank 0 chooses, so every rank loads the same one. Ray never deletes a checkpoint it
    did not register, so that one stays beside the kept ones."""
    state = None
    if rank == 0:
        state = newest_readable_checkpoint(run_dir, registered["epoch"] if registered is not None else -1, device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [state["path"] if state is not None else None]
        dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
        if rank != 0 and box[0] is not None:
            state = load_checkpoint(box[0], map_location=device)
    return state


def _unwrap(model: torch.nn.Module) -> VAE:
    return getattr(model, "module", model)


def _maybe_inject_fault(cfg: Config, epoch: int, rank: int, run_dir: str) -> None:
    """Tests: rank 0 dies once at the start of the configured epoch. A marker in the run directory
    makes it once per run, so the restarted worker group goes on."""
    fail_at = int(os.environ.get(FAIL_ENV, cfg.train.fail_at_epoch))
    marker = storage.join(run_dir, f".fault-injected-epoch-{epoch}")
    if fail_at == epoch and rank == 0 and not storage.exists(marker):
        storage.write_bytes(marker, b"")
        raise RuntimeError(f"injected fault at the start of epoch {epoch} ({FAIL_ENV} / train.fail_at_epoch)")


# ---------------------------------------------------------------------------------------------
# The per-worker loop.

def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"])
    run_dir, shards_dir, expected_hash = loop_config["run_dir"], loop_config["shards_dir"], loop_config["manifest_hash"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    # RAY (1): this worker's share of the shards (round-robin by rank), decoded once into memory.
    manifest = read_manifest(shards_dir)
    train_shards = split_shards(manifest, "train", cfg.data.max_train_shards)
    test_shards = split_shards(manifest, "test", cfg.data.max_test_shards)
    my_train = shards_for_rank(train_shards, rank, world_size)
    my_test = shards_for_rank(test_shards, rank, world_size)
    num_steps = steps_per_epoch(train_shards, world_size, cfg.train.batch_size_per_worker,
                                cfg.train.max_steps_per_epoch)
    full_steps = steps_per_epoch(train_shards, world_size, cfg.train.batch_size_per_worker)
    _, train_images, _ = _load_rank_arrays(shards_dir, my_train)
    test_indices, test_images, _ = _load_rank_arrays(shards_dir, my_test)
    train_images_dev = torch.from_numpy(train_images).to(device) if cfg.data.cache_in_memory else None

    # RAY (2): DDP (a no-op wrapper with one worker) and device placement.
    model = ray.train.torch.prepare_model(VAE(cfg.model))
    node_ids = _rank_node_ids()
    optimizer = make_optimizer(model, cfg.train)
    scaler = make_grad_scaler(device, cfg.train.mixed_precision)

    start_epoch, global_step, history, restored_from = 0, 0, [], -1
    state = None
    checkpoint = ray.train.get_checkpoint()  # the latest: after a worker failure, or on a rerun
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(ckpt_dir, map_location=device)
    state = _newer_unregistered_checkpoint(run_dir, state, rank, device) or state
    if state is not None:
        check_model_compatible(state, cfg)
        if state["manifest_hash"] != expected_hash:
            raise CheckpointError(f"checkpoint {state['path']} was trained on shards with manifest hash "
                                  f"{state['manifest_hash'][:12]}, but {shards_dir} has {expected_hash[:12]}")
        _unwrap(model).load_state_dict(state["model"])
        if state.get("optimizer"):
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        history, restored_from = list(state.get("history", [])), state["epoch"]

    for epoch in range(start_epoch, cfg.train.epochs):
        _maybe_inject_fault(cfg, epoch, rank, run_dir)
        wall = time.perf_counter()
        if train_images_dev is None:  # streaming: decode this worker's shards again, inside the timing
            _, imgs, _ = _load_rank_arrays(shards_dir, my_train)
            images = torch.from_numpy(imgs).to(device)
        else:
            images = train_images_dev
        sums = train_epoch(model, optimizer, images, cfg.train, epoch=epoch, rank=rank, num_steps=num_steps,
                           steps_per_epoch=full_steps, start_step=global_step, device=device,
                           mixed_precision=cfg.train.mixed_precision, scaler=scaler)
        global_step += num_steps
        train = _all_reduce_sums({k: sums[k] for k in ("loss", "recon_nll", "kl", "count")}, device)
        epoch_seconds = time.perf_counter() - wall
        # Every rank decides alike (from the epoch alone), so the all-reduce inside stays matched.
        if (epoch + 1) % cfg.train.eval_every_epochs == 0 or epoch == cfg.train.epochs - 1:
            test = _all_reduce_sums(evaluate_sums(_unwrap(model), test_images, test_indices, "test", cfg.train.seed,
                                                  device), device)
            test_metrics = {"test_loss": test["loss"] / max(test["count"], 1),
                            "test_recon_nll": test["recon_nll"] / max(test["count"], 1),
                            "test_kl": test["kl"] / max(test["count"], 1), "test_count": int(test["count"])}
        else:
            test_metrics = {"test_loss": None, "test_recon_nll": None, "test_kl": None, "test_count": 0}
        metrics = {
            "kind": "epoch", "epoch": epoch, "step": global_step,
            "train_loss": train["loss"] / train["count"], "train_recon_nll": train["recon_nll"] / train["count"],
            "train_kl": train["kl"] / train["count"], **test_metrics,
            "samples_per_s": train["count"] / epoch_seconds, "epoch_seconds": epoch_seconds,
            "world_size": world_size, "restored_from_epoch": restored_from,
            "rank_param_sums": _rank_fingerprints(model, device), "rank_node_ids": node_ids,
        }
        history.append(metrics)

        # RAY (3): report metrics with a checkpoint; rank 0 writes it, Ray persists it to storage.
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_checkpoint(tmp, model_state=_unwrap(model).state_dict(), optimizer_state=optimizer.state_dict(),
                                epoch=epoch, global_step=global_step, config=cfg, manifest_hash=expected_hash,
                                history=history, scaler_state=scaler.state_dict() if scaler else None)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            # Ray ranks checkpoints by test_loss and needs a number: NaN ranks an unevaluated epoch
            # last, so it is kept only while it is the latest.
            scored = {**metrics, "test_loss": math.nan if metrics["test_loss"] is None else metrics["test_loss"]}
            ray.train.report(scored, checkpoint=ckpt, checkpoint_dir_name=checkpoint_dir_name(epoch))
        on_rank_zero(rank, write_metrics, run_dir, history)

    if cfg.train.num_samples_iw_final > 0 and not _has_final(run_dir, cfg.train.epochs):
        final = _all_reduce_sums(evaluate_sums(_unwrap(model), test_images, test_indices, "test", cfg.train.seed, device,
                                               batch_size=100, num_samples_iw=cfg.train.num_samples_iw_final), device)
        row = {"kind": "final", "epoch": cfg.train.epochs - 1, "num_samples_iw": cfg.train.num_samples_iw_final,
               "test_nll_iw": -final["log_px"] / final["count"], "test_loss": final["loss"] / final["count"],
               "test_count": int(final["count"])}
        ray.train.report(row)
        on_rank_zero(rank, write_metrics, run_dir, history + [row])


def _has_final(run_dir: str, epochs: int) -> bool:
    return any(r.get("kind") == "final" and r.get("epoch") == epochs - 1 for r in read_metrics(run_dir))


def on_rank_zero(rank: int, fn, *args, **kwargs):
    """The one gate for side effects (files, logs) that only rank 0 may perform."""
    if rank == 0:
        return fn(*args, **kwargs)
    return None


# ---------------------------------------------------------------------------------------------
# The driver.

@dataclass
class TrainResult:
    run_dir: str
    latest_checkpoint: str | None
    best_checkpoint: str | None
    metrics: list[dict]

    @property
    def final(self) -> dict | None:
        rows = [r for r in self.metrics if r.get("kind") == "final"]
        return rows[-1] if rows else None

    @property
    def epochs(self) -> list[dict]:
        return [r for r in self.metrics if r.get("kind") == "epoch"]


def run_dir_of(cfg: Config) -> str:
    return storage.join(storage.absolute(cfg.output.storage_path), cfg.output.run_name)


def preflight(cfg: Config) -> str:
    """Everything that can be checked before the cluster starts work. Returns the manifest hash."""
    shards_dir = storage.absolute(cfg.data.shards_dir)
    if not storage.exists(shards_dir):
        raise DataError(f"shards directory {shards_dir} does not exist; run `vaedist data prepare` first")
    manifest = read_manifest(shards_dir)
    train_shards = split_shards(manifest, "train", cfg.data.max_train_shards)
    test_shards = split_shards(manifest, "test", cfg.data.max_test_shards)
    if not train_shards:
        raise DataError(f"{shards_dir}: the manifest lists no training shards")
    for shard in train_shards + test_shards:
        read_checked_shard(shards_dir, shard)
    if cfg.scaling.num_workers > len(train_shards):
        raise ConfigError(f"scaling.num_workers: {cfg.scaling.num_workers} workers but only {len(train_shards)} "
                          f"training shards in {shards_dir}; use at most {len(train_shards)} workers "
                          "(or prepare smaller shards: data.samples_per_shard)")
    steps = steps_per_epoch(train_shards, cfg.scaling.num_workers, cfg.train.batch_size_per_worker)
    if steps == 0:
        raise ConfigError(f"train.batch_size_per_worker: {cfg.train.batch_size_per_worker} is larger than a "
                          f"worker's share of the training data; no full batch per epoch")
    digest = manifest_hash(shards_dir)
    state = newest_readable_checkpoint(run_dir_of(cfg))
    if state is not None:  # a rerun resumes: refuse a checkpoint that cannot fit before starting
        check_model_compatible(state, cfg)
        if state["manifest_hash"] != digest:
            raise CheckpointError(f"run {run_dir_of(cfg)} was trained on different shards (manifest "
                                  f"{state['manifest_hash'][:12]} vs {digest[:12]} in {shards_dir}); "
                                  "use a new output.run_name")
    return digest


def ray_address(address: str | None = None) -> str | None:
    """The cluster to join: the given address, else $RAY_ADDRESS; None means an embedded local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS / the given address, or start an embedded local Ray. Its dashboard listens on
    127.0.0.1 only; Ray Train's placement-group cleaner polls the State API it serves."""
    import ray

    if ray.is_initialized():
        return
    address = ray_address(address)
    # Ray starts workers at nice 15. On a small machine every wake-up of Ray's own processes then
    # preempts one thread of the worker's 2-thread OpenMP team and stalls the other at its barrier:
    # measured here, 0.77 of plain-PyTorch throughput at nice 15 vs 0.96 at nice 0 (README,
    # Performance). An embedded Ray is ours alone, so its workers run at normal priority; set
    # RAY_worker_niceness yourself to choose otherwise.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # One machine has no node to be preempted; Ray Train's watcher for that is one more idle
        # actor process waking up beside the training worker.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        # "local": a new instance of our own; a bare ray.init() would join whatever cluster
        # /tmp/ray last recorded, which is not "embedded".
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", log_to_driver=True)


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the training run cfg.output.run_name; returns its checkpoints and metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    digest = preflight(cfg)
    init_ray(cfg.scaling.address)
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0)
    if need > cpus:
        # Ray Train would wait for the resources forever (it retries starting the worker group
        # without limit): right on an autoscaling cluster, a hang on one that cannot grow.
        embedded = ray_address(cfg.scaling.address) is None
        message = (f"scaling.num_workers x scaling.cpus_per_worker: {cfg.scaling.num_workers} x "
                   f"{cfg.scaling.cpus_per_worker:g} = {need:g} CPUs, but "
                   f"{'the embedded local Ray' if embedded else 'the Ray cluster'} has {cpus:g}")
        if embedded:
            raise ConfigError(message + "; use fewer workers or CPUs per worker")
        log.warning("%s; the run waits until the cluster (its autoscaler) provides them", message)
    if cfg.scaling.use_gpu:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < cfg.scaling.num_workers:
            raise ConfigError(f"scaling.use_gpu: the config asks for {cfg.scaling.num_workers} GPU worker(s) but the "
                              f"Ray cluster has {gpus:g} GPU(s); set scaling.use_gpu=false or add GPU nodes")
    run_dir = run_dir_of(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir, "manifest_hash": digest,
                           "shards_dir": storage.absolute(cfg.data.shards_dir)},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker,
                                                           **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        run_config=RunConfig(
            name=cfg.output.run_name,
            storage_path=storage.absolute(cfg.output.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.checkpoints_to_keep,
                                               checkpoint_score_attribute="test_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.output.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return TrainResult(run_dir=run_dir, latest_checkpoint=latest_checkpoint_dir(run_dir),
                       best_checkpoint=best_checkpoint_dir(run_dir), metrics=read_metrics(run_dir))
