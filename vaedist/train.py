"""Ray Train: data-parallel VAE training over the WebDataset shards (TorchTrainer, DDP).

    vaedist train --config configs/debug.yaml
    ray job submit --working-dir . -- python jobs/train.py --config configs/debug.yaml

The per-worker loop has three Ray touchpoints, labelled RAY (1)-(3): this worker's share of the
data, prepare_model (DDP), and report (metrics + checkpoint). Everything else is engine.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from vaedist import collective, storage
from vaedist.checkpoint import (KEPT_DIR, CheckpointError, CheckpointState, best_checkpoint_dir, check_data_compatible,
                                check_model_compatible, checkpoint_dir_name, latest_checkpoint_dir, load_checkpoint,
                                newest_readable_checkpoint, read_metrics, run_dir_of, save_checkpoint, write_metrics)
from vaedist.cluster import check_resources, init_ray
from vaedist.config import Config, ConfigError, config_from_dict
from vaedist.console import EpochDisplay, is_verbose, score_for_ray
from vaedist.data import (DataError, DatasetInfo, Manifest, ShardEntry, load_split_arrays, manifest_hash,
                          read_checked_shard, read_manifest)
from vaedist.devices import CudaUnavailableError, require_cuda
from vaedist.engine import (TRAIN_SUM_KEYS, evaluate_sums, group_key, load_optimizer_state, make_grad_scaler,
                            make_optimizer, sum_keys, train_epoch)
from vaedist.errors import ToldError, original, root_cause, train_worker_log
from vaedist.ingest import choose_ingest, stream_dataset, stream_epoch, stream_steps
from vaedist.likelihoods import bits_per_dim
from vaedist.model import VAE, build_model, check_model
from vaedist.tracking import TrainTracker, check_uri, resolve_uri
from vaedist.registry import EXTERNAL_SOURCES
from vaedist.storage import StorageError
from vaedist.user_code import model_runtime_env

log = logging.getLogger("vaedist.train")
FAIL_ENV = "VAEDIST_FAIL_AT_EPOCH"


# ---------------------------------------------------------------------------------------------
# Shards: which worker reads which, and how many steps every rank takes.

def split_shards(manifest: Manifest, split: str, max_shards: int) -> list[ShardEntry]:
    shards = list(manifest.split(split).shards)
    return shards[:max_shards] if max_shards else shards


def shards_for_rank(shards: list[ShardEntry], rank: int, world_size: int) -> list[ShardEntry]:
    """Round-robin: shard i goes to rank i mod world_size."""
    return shards[rank::world_size]


def steps_per_epoch(shards: list[ShardEntry], world_size: int, batch_size: int, max_steps: int = 0) -> int:
    """`memory` ingest: the same for every rank, the smallest rank's full batches (unequal counts
    would hang DDP)."""
    per_rank = [sum(s.num_samples for s in shards_for_rank(shards, r, world_size)) for r in range(world_size)]
    steps = min(per_rank) // batch_size
    return min(steps, max_steps) if max_steps else steps


def _load_rank_arrays(shards_dir: str, shards: list[ShardEntry],
                      info: DatasetInfo) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    paths = [storage.join(shards_dir, s.path) for s in shards]
    return load_split_arrays(paths, [s.num_samples for s in shards], info)


def _evaluate(model, test_data, shards_dir: str, info: DatasetInfo, seed: int, device: torch.device,
              **kwargs) -> dict[str, float]:
    """This rank's sums over its test shards: from arrays held in memory, or (stream ingest) read
    one shard at a time, so that no more than a shard of the test split is in memory at once."""
    if isinstance(test_data, tuple):
        indices, images = test_data
        return evaluate_sums(model, images, indices, "test", seed, device, **kwargs)
    total: dict[str, float] = {}
    for shard in test_data:
        indices, images, _ = _load_rank_arrays(shards_dir, [shard], info)
        for key, value in evaluate_sums(model, images, indices, "test", seed, device, **kwargs).items():
            total[key] = total.get(key, 0.0) + value
    # A rank without test shards still sends every key: the ranks' sums are reduced key by key.
    return total or {**{key: 0.0 for key in sum_keys(model, kwargs.get("num_samples_iw", 0))}, "count": 0.0}


def _rank_node_ids() -> list[str]:
    """Every rank's Ray node id, gathered: where the worker group was placed."""
    import ray

    return collective.gather_objects(ray.get_runtime_context().get_node_id())


def _newer_unregistered_checkpoint(run_dir: str, registered: CheckpointState | None, rank: int,
                                   device: torch.device) -> CheckpointState | None:
    """A complete checkpoint in the run directory that is newer than the one Ray restored, if any.

    Ray Train registers a reported checkpoint only when its controller next polls the workers
    (every 2 s); a node lost inside that window takes the newest checkpoints out of Ray's records
    although their files are safely in storage, and without this the run would retrain those epochs,
    or start over. Rank 0 chooses, so every rank loads the same one. Ray never deletes a checkpoint it
    did not register, so that one stays beside the kept ones."""
    state = None
    if rank == 0:
        state = newest_readable_checkpoint(run_dir, registered.epoch if registered is not None else -1)
    path = collective.broadcast_object(state.path if state is not None else None, device)
    if rank != 0 and path is not None:
        state = load_checkpoint(path)
    return state


def _unwrap(model: torch.nn.Module) -> VAE:
    """The VAE inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _maybe_inject_fault(cfg: Config, epoch: int, rank: int, run_dir: str) -> None:
    """Tests: rank 0 dies once at the start of the configured epoch. A marker in the run directory
    makes it once per run, so the restarted worker group goes on."""
    fail_at = int(os.environ.get(FAIL_ENV, cfg.train.fail_at_epoch))
    marker = storage.join(run_dir, f".fault-injected-epoch-{epoch}")
    if fail_at == epoch and rank == 0 and not storage.exists(marker):
        storage.write_bytes(marker, b"")
        raise RuntimeError(f"injected fault at the start of epoch {epoch} ({FAIL_ENV} / train.fail_at_epoch)")


def _progress_logger(rank: int, epoch: int, num_steps: int):
    """train.progress_every_steps: rank 0 logs the running mean of l_i."""
    def log_progress(step: int, sums: dict[str, float]) -> None:
        on_rank_zero(rank, log.info, "epoch %d step %d/%d: train l_i %.3f", epoch, step, num_steps,
                     sums["loss"] / max(sums["count"], 1))
    return log_progress


def kept_epochs(cfg: Config) -> set[int]:
    """Epochs whose checkpoints are kept for good (output.keep_epochs, output.keep_every_epochs)."""
    every = cfg.output.keep_every_epochs
    periodic = {e for e in range(cfg.train.epochs) if every and (e + 1) % every == 0}
    return set(cfg.output.keep_epochs) | periodic


def _keep_copy(local_dir: str, run_dir: str, epoch: int) -> None:
    """Copy a checkpoint Ray will rotate away to run_dir/kept/epoch-NNNN, for good."""
    target = storage.join(run_dir, KEPT_DIR, checkpoint_dir_name(epoch))
    for name in sorted(os.listdir(local_dir)):
        storage.write_bytes(storage.join(target, name), open(os.path.join(local_dir, name), "rb").read())


def _report(metrics: dict, checkpoint, run_dir: str, epoch: int) -> None:
    """ray.train.report: Ray uploads the checkpoint into run_dir/epoch-NNNN (through vaedist's storage
    filesystem: its timeouts and retries). An upload that still fails (a full disk, S3 failing for
    good) is raised naming the directory, its torn files deleted: earlier checkpoints are untouched
    and a rerun resumes from the newest."""
    import ray.train

    name = checkpoint_dir_name(epoch) if checkpoint else None
    try:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
    except OSError as e:
        if checkpoint is None:
            raise
        target = storage.join(run_dir, name)
        with contextlib.suppress(OSError):
            storage.rmtree(target)
        raise StorageError(f"saving the checkpoint of epoch {epoch} to {target} failed: {e}") from None


# ---------------------------------------------------------------------------------------------
# The per-worker loop: setup, this rank's data, restoring, one epoch's metrics, the final estimate.

def _setup_worker(cfg: Config, rank: int) -> torch.device:
    """This worker's device and threads, and the same initial weights on every rank."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if cfg.scaling.use_gpu:
        require_cuda(f"training worker {rank} (scaling.use_gpu)")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    return device


@dataclass
class _RankData:
    """A rank's share. memory: its round-robin training shards, decoded once, on its device, and its
    test shards decoded; stream: its share of the Ray Dataset (anew each epoch) and its test shards,
    read one at a time by _evaluate."""
    train: Any
    test: Any
    num_steps: int
    """Steps this rank takes per epoch (train.max_steps_per_epoch caps the driver's count)."""


def _rank_data(cfg: Config, shards_dir: str, info: DatasetInfo, ingest: str, steps_per_epoch: int, rank: int,
               world_size: int, device: torch.device) -> _RankData:
    import ray.train

    manifest = read_manifest(shards_dir)
    train_shards = split_shards(manifest, "train", cfg.data.max_train_shards)
    my_test = shards_for_rank(split_shards(manifest, "test", cfg.data.max_test_shards), rank, world_size)
    cap = cfg.train.max_steps_per_epoch
    num_steps = min(steps_per_epoch, cap) if cap else steps_per_epoch
    if ingest == "memory":
        _, train_images, _ = _load_rank_arrays(shards_dir, shards_for_rank(train_shards, rank, world_size), info)
        test_indices, test_images, _ = _load_rank_arrays(shards_dir, my_test, info)
        return _RankData(torch.from_numpy(train_images).to(device), (test_indices, test_images), num_steps)
    return _RankData(ray.train.get_dataset_shard("train"), my_test, num_steps)


def _restore(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, run_dir: str,
             shards_dir: str, info: DatasetInfo, expected_hash: str, rank: int,
             device: torch.device) -> tuple[int, int, list[dict], int]:
    """(start epoch, global step, history, restored-from epoch or -1) after loading the newest
    checkpoint, if any: Ray's (after a worker failure, or on a rerun) or a newer one it missed."""
    import ray.train

    state = None
    checkpoint = ray.train.get_checkpoint()  # the latest: after a worker failure, or on a rerun
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state = load_checkpoint(ckpt_dir)  # on the CPU: see engine.load_optimizer_state
    state = _newer_unregistered_checkpoint(run_dir, state, rank, device) or state
    if state is None:
        return 0, 0, [], -1
    check_model_compatible(state, cfg)
    check_data_compatible(state, info.name, info.image_shape, shards_dir)
    if state.manifest_hash != expected_hash:
        raise CheckpointError(f"checkpoint {state.path} was trained on shards with manifest hash "
                              f"{state.manifest_hash[:12]}, but {shards_dir} has {expected_hash[:12]}")
    _unwrap(model).load_state_dict(state.model)
    if state.optimizer:
        load_optimizer_state(optimizer, state.optimizer)
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
    return state.epoch + 1, state.global_step, list(state.history), state.epoch


def _test_metrics(model: torch.nn.Module, data: _RankData, cfg: Config, shards_dir: str, info: DatasetInfo,
                  epoch: int, device: torch.device) -> dict[str, Any]:
    """The test split's means on epochs that evaluate (train.eval_every_epochs, and the last), summed
    over the ranks. Every rank decides alike (from the epoch alone), so the collectives stay matched."""
    if (epoch + 1) % cfg.train.eval_every_epochs != 0 and epoch != cfg.train.epochs - 1:
        return {"test_loss": None, "test_recon_nll": None, "test_kl": None, "test_count": 0, "test_bpd": None}
    test = collective.all_reduce_sums(_evaluate(_unwrap(model), data.test, shards_dir, info, cfg.train.seed, device),
                                      device)
    count = max(test["count"], 1)
    metrics = {"test_loss": test["loss"] / count, "test_recon_nll": test["recon_nll"] / count,
               "test_kl": test["kl"] / count, "test_count": int(test["count"])}
    metrics["test_bpd"] = bits_per_dim(metrics["test_loss"], math.prod(info.image_shape))
    if group_key(1) in test:  # a model of several latent groups: each one's term of test_kl, z_1 first
        groups = len(_unwrap(model).latent_groups)
        metrics["test_kl_groups"] = [test[group_key(g)] / count for g in range(1, groups + 1)]
    return metrics


def _final_estimate(model: torch.nn.Module, data: _RankData, cfg: Config, shards_dir: str, info: DatasetInfo,
                    device: torch.device) -> dict[str, Any]:
    """train.num_samples_iw_final: the test split's importance-sampled -log p(x), summed over the ranks."""
    final = collective.all_reduce_sums(_evaluate(_unwrap(model), data.test, shards_dir, info, cfg.train.seed,
                                                 device, batch_size=100,
                                                 num_samples_iw=cfg.train.num_samples_iw_final), device)
    row = {"kind": "final", "epoch": cfg.train.epochs - 1, "num_samples_iw": cfg.train.num_samples_iw_final,
           "test_nll_iw": -final["log_px"] / final["count"], "test_loss": final["loss"] / final["count"],
           "test_count": int(final["count"])}
    row["test_bpd_iw"] = bits_per_dim(row["test_nll_iw"], math.prod(info.image_shape))
    row["test_bpd"] = bits_per_dim(row["test_loss"], math.prod(info.image_shape))
    return row


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(loop_config["config"])
    run_dir, shards_dir, expected_hash = loop_config["run_dir"], loop_config["shards_dir"], loop_config["manifest_hash"]
    info, ingest = DatasetInfo.from_manifest(loop_config["dataset"]), loop_config["ingest"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = _setup_worker(cfg, rank)

    # RAY (1): this worker's share of the data. memory: its round-robin shards, decoded once;
    # stream: its equal share of the Ray Dataset the driver built, anew each epoch.
    data = _rank_data(cfg, shards_dir, info, ingest, loop_config["steps_per_epoch"], rank, world_size, device)

    # RAY (2): DDP (a no-op wrapper with one worker) and device placement.
    model = ray.train.torch.prepare_model(build_model(cfg.model, info.image_shape))
    if cfg.train.compile:
        model = torch.compile(model)
    node_ids = _rank_node_ids()
    optimizer = make_optimizer(model, cfg.train, device)
    scaler = make_grad_scaler(device, cfg.train.mixed_precision)
    start_epoch, global_step, history, restored_from = _restore(cfg, model, optimizer, scaler, run_dir, shards_dir,
                                                                info, expected_hash, rank, device)

    # Rank 0 records the run in MLflow (when tracking is on): the same MLflow run after a restart.
    tracker = None
    if loop_config.get("tracking_uri"):
        tracker = on_rank_zero(rank, TrainTracker, loop_config["tracking_uri"], cfg.tracking.experiment, run_dir,
                               cfg.output.run_name, cfg.to_dict(), manifest_hash=expected_hash, history=history,
                               tags=loop_config.get("tracking_tags"))
    keep = kept_epochs(cfg)
    last = cfg.train.epochs - 1
    for epoch in range(start_epoch, cfg.train.epochs):
        _maybe_inject_fault(cfg, epoch, rank, run_dir)
        wall = time.perf_counter()
        if ingest == "memory":
            batches: Any = data.train
        else:
            batches = (b["image"] for b in stream_epoch(data.train, cfg.train.batch_size_per_worker,
                                                         cfg.data.shuffle_buffer_rows, cfg.train.seed, epoch, rank,
                                                         device))
        sums = train_epoch(model, optimizer, batches, cfg.train, epoch=epoch, rank=rank, num_steps=data.num_steps,
                           steps_per_epoch=loop_config["steps_per_epoch"], start_step=global_step, device=device,
                           mixed_precision=cfg.train.mixed_precision, scaler=scaler,
                           on_progress=_progress_logger(rank, epoch, data.num_steps))
        global_step += data.num_steps
        train = collective.all_reduce_sums({k: sums[k] for k in (*TRAIN_SUM_KEYS, "count")}, device)
        epoch_seconds = time.perf_counter() - wall
        metrics = {
            "kind": "epoch", "epoch": epoch, "step": global_step,
            "train_loss": train["loss"] / train["count"], "train_recon_nll": train["recon_nll"] / train["count"],
            "train_kl": train["kl"] / train["count"], "train_objective": train["objective"] / train["count"],
            **_test_metrics(model, data, cfg, shards_dir, info, epoch, device),
            "samples_per_s": train["count"] / epoch_seconds, "epoch_seconds": epoch_seconds,
            "world_size": world_size, "restored_from_epoch": restored_from, "ingest": ingest,
            "rank_sample_counts": [int(c) for c in collective.gather_floats(
                torch.tensor([sums["count"]], dtype=torch.float64, device=device))],
            "rank_param_sums": collective.param_fingerprints(model, device), "rank_node_ids": node_ids,
        }
        history.append(metrics)
        save_now = (epoch + 1) % cfg.output.checkpoint_every_epochs == 0 or epoch == last or epoch in keep

        # RAY (3): report metrics, with a checkpoint on checkpoint epochs; rank 0 writes it, Ray
        # persists it to storage.
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and save_now:
                save_checkpoint(tmp, model_state=_unwrap(model).state_dict(), optimizer_state=optimizer.state_dict(),
                                epoch=epoch, global_step=global_step, config=cfg, manifest_hash=expected_hash,
                                history=history, scaler_state=scaler.state_dict() if scaler else None,
                                dataset=info.name, image_shape=info.image_shape)
                if epoch in keep:
                    _keep_copy(tmp, run_dir, epoch)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            scored = {**metrics, "test_loss": score_for_ray(metrics["test_loss"])}
            _report(scored, ckpt, run_dir, epoch)
        if save_now:
            on_rank_zero(rank, write_metrics, run_dir, history)
        if tracker:
            tracker.log_epoch(metrics)  # after write_metrics: its best-checkpoint tag reads metrics.jsonl

    # Rank 0 decides whether the final estimate is still to do and tells the others: every rank
    # reading metrics.jsonl itself, right after rank 0 rewrote it, could read it torn.
    todo = cfg.train.num_samples_iw_final > 0 and (rank != 0 or not _has_final(read_metrics(run_dir), cfg.train.epochs))
    if collective.broadcast_object(todo, device):
        row = _final_estimate(model, data, cfg, shards_dir, info, device)
        ray.train.report(row)
        on_rank_zero(rank, write_metrics, run_dir, history + [row])
        if tracker:
            tracker.log_final(row)
    if tracker:
        tracker.finish()


def _has_final(rows: list[dict], epochs: int) -> bool:
    """Whether a run's metrics rows hold the final estimate of a run of `epochs` epochs."""
    return any(r.get("kind") == "final" and r.get("epoch") == epochs - 1 for r in rows)


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


@dataclass
class Plan:
    """What preflight found: the data, how it reaches the workers, and how many steps they take."""
    manifest_hash: str
    info: DatasetInfo
    train_shards: list[ShardEntry]
    ingest: str
    ingest_reason: str
    steps_per_epoch: int
    finished: bool = False  # the run holds every epoch (and the final estimate asked for): nothing to train


def preflight(cfg: Config) -> Plan:
    """Everything that can be checked before the cluster starts work."""
    shards_dir = storage.absolute(cfg.data.shards_dir)
    if not storage.exists(shards_dir):
        raise DataError(f"shards directory {shards_dir} does not exist; run `vaedist data prepare` first")
    manifest = read_manifest(shards_dir)
    info = manifest.dataset
    # data.dataset names only the built-ins; shards of your own images are named after their source.
    external = manifest.source_kind in EXTERNAL_SOURCES
    if not external and info.name != cfg.data.dataset:
        raise DataError(f"{shards_dir} holds {info.name} (its manifest.json says so), but data.dataset is "
                        f"{cfg.data.dataset!r}; point data.shards_dir at {cfg.data.dataset} shards or set "
                        f"data.dataset={info.name}")
    train_shards = split_shards(manifest, "train", cfg.data.max_train_shards)
    test_shards = split_shards(manifest, "test", cfg.data.max_test_shards)
    if not train_shards:
        raise DataError(f"{shards_dir}: the manifest lists no training shards")
    # The model fits these images (the conv geometry), and a custom factory passes its checks on a batch.
    batch = _load_rank_arrays(shards_dir, train_shards[:1], info)[:2] if cfg.model.kind == "custom" else None
    check_model(cfg.model, info.image_shape, batch, cfg.train.seed)
    num_train = sum(s.num_samples for s in train_shards)
    ingest, why = choose_ingest(cfg.data, info, num_train, cfg.scaling.num_workers)
    if ingest == "memory":
        for shard in train_shards + test_shards:
            read_checked_shard(shards_dir, shard)
        if cfg.scaling.num_workers > len(train_shards):
            raise ConfigError(f"scaling.num_workers: {cfg.scaling.num_workers} workers but only {len(train_shards)} "
                              f"training shards in {shards_dir}; use at most {len(train_shards)} workers "
                              "(or prepare smaller shards: data.samples_per_shard, or set data.ingest=stream)")
        steps = steps_per_epoch(train_shards, cfg.scaling.num_workers, cfg.train.batch_size_per_worker)
    else:
        # Sizes only: reading every byte of a large dataset here would double its first epoch. The
        # decode tasks check each shard's sha256 as they read it, and name any that fails.
        for shard in train_shards + test_shards:
            path = storage.join(shards_dir, shard.path)
            if not storage.exists(path):
                raise DataError(f"shard {path} is missing")
            if storage.size(path) != shard.bytes:
                raise DataError(f"shard {path}: size mismatch, {storage.size(path)} bytes but the manifest says "
                                f"{shard.bytes} (truncated or overwritten)")
        steps = stream_steps(num_train, cfg.scaling.num_workers, cfg.train.batch_size_per_worker)
    if steps == 0:
        raise ConfigError(f"train.batch_size_per_worker: {cfg.train.batch_size_per_worker} is larger than a "
                          f"worker's share of the training data; no full batch per epoch")
    digest = manifest_hash(shards_dir)
    state = newest_readable_checkpoint(run_dir_of(cfg))
    if state is not None:  # a rerun resumes: refuse a checkpoint that cannot fit before starting
        check_model_compatible(state, cfg)
        check_data_compatible(state, info.name, info.image_shape, shards_dir)
        if state.manifest_hash != digest:
            raise CheckpointError(f"run {run_dir_of(cfg)} was trained on different shards (manifest "
                                  f"{state.manifest_hash[:12]} vs {digest[:12]} in {shards_dir}); "
                                  "use a new output.run_name")
    return Plan(digest, info, train_shards, ingest, why, steps, _finished(cfg, state))


def _finished(cfg: Config, state: CheckpointState | None) -> bool:
    """Whether the run's storage holds the last epoch's checkpoint, every epoch's metrics and, when
    train.num_samples_iw_final asks for it, the final estimate: a rerun would start Ray Train to train
    nothing."""
    epochs = cfg.train.epochs
    if state is None or state.epoch != epochs - 1:
        return False
    rows = read_metrics(run_dir_of(cfg))
    recorded = {r["epoch"] for r in rows if r.get("kind") == "epoch"}
    return set(range(epochs)) <= recorded and (cfg.train.num_samples_iw_final == 0 or _has_final(rows, epochs))


def _our_error(error: BaseException) -> BaseException | None:
    """The vaedist input error (bad data, checkpoint, CUDA) behind a failed run, if that is what failed:
    raised again on the driver with its own message instead of Ray's wrapped traceback."""
    failures = list(getattr(error, "worker_failures", {}).values()) or [error]
    for failure in failures:
        seen = failure
        while seen is not None:
            for kind in (DataError, CheckpointError, CudaUnavailableError, StorageError):
                if isinstance(seen, kind):
                    message = str(seen).strip().splitlines()
                    text = next((line for line in reversed(message) if kind.__name__ in line), message[-1])
                    return kind(text.split(f"{kind.__name__}: ", 1)[-1])
            seen = seen.__cause__
    return None


def train(cfg: Config, echo: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) the training run cfg.output.run_name; returns its checkpoints and metrics.
    Each epoch's line (or a bar, on a terminal) shows as the epoch ends; `echo` prints the lines."""
    plan = preflight(cfg)
    if plan.finished:  # a rerun after a later step failed (`vaedist run`): no cluster start, no Ray Train
        (echo or log.info)(f"run {run_dir_of(cfg)} is finished (train.epochs = {cfg.train.epochs}): nothing to "
                           "train; more train.epochs resume it, a new output.run_name starts another run")
        return train_result(cfg)
    tracking_uri = resolve_uri(cfg)  # on the driver: a submitted job's environment names the store
    if tracking_uri:
        check_uri(tracking_uri, cfg.tracking.experiment)
    init_ray(cfg.scaling.address)
    workers, cpus = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    check_resources("training", [
        ("CPU", workers * cpus, f"scaling.num_workers x scaling.cpus_per_worker = {workers} x {cpus:g}",
         "use fewer workers or CPUs per worker"),
        ("GPU", workers if cfg.scaling.use_gpu else 0, f"scaling.use_gpu with scaling.num_workers = {workers}",
         "set scaling.use_gpu=false, or run on a cluster with GPU nodes"),
    ], cfg.scaling.address)
    log.info("ingest: %s, %s", plan.ingest, plan.ingest_reason)
    progress = tempfile.NamedTemporaryFile(prefix="vaedist-epochs-", suffix=".jsonl", delete=False).name
    with EpochDisplay(progress, cfg.train.epochs, echo=echo) as display:
        fit(make_trainer(cfg, plan, tracking_uri, callbacks=[display.callback()]))
    return train_result(cfg)


def make_trainer(cfg: Config, plan: Plan, tracking_uri: str | None, callbacks: list | None = None,
                 tracking_tags: dict[str, str] | None = None):
    """The TorchTrainer of run cfg.output.run_name (and its Ray Dataset, for stream ingest), on a
    connected Ray. `vaedist train` fits one; `vaedist sweep` fits one inside each Tune trial, with
    Tune's report callback and the MLflow parent run's tags."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    workers, cpus = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    run_dir = run_dir_of(cfg)
    shards_dir = storage.absolute(cfg.data.shards_dir)
    datasets = {}
    if plan.ingest == "stream":
        limit = (workers * cfg.train.max_steps_per_epoch * cfg.train.batch_size_per_worker
                 if cfg.train.max_steps_per_epoch else 0)
        datasets["train"] = stream_dataset(shards_dir, plan.train_shards, plan.info, cfg.train.seed, limit)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": run_dir, "manifest_hash": plan.manifest_hash,
                           "shards_dir": shards_dir, "dataset": plan.info.to_manifest(), "ingest": plan.ingest,
                           "steps_per_epoch": plan.steps_per_epoch, "tracking_uri": tracking_uri,
                           "tracking_tags": tracking_tags},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cpus, **({"GPU": 1} if cfg.scaling.use_gpu else {})}),
        datasets=datasets or None,
        dataset_config=DataConfig(datasets_to_split=["train"]) if datasets else None,
        run_config=RunConfig(
            name=cfg.output.run_name,
            **storage.ray_storage(cfg.output.storage_path),  # the same S3 client settings as vaedist's
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.checkpoints_to_keep,
                                               checkpoint_score_attribute="test_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=cfg.output.max_failures),
            callbacks=list(callbacks or []),
            # model.kind=custom: the factory's package, shipped to every worker (checked there first).
            worker_runtime_env=model_runtime_env(cfg.model),
        ),
    )


class TrainingError(ToldError):
    """A training run failed: what its worker raised, in one line, and where Ray's traceback is. Its
    __cause__ is the worker's own exception (Ray brings it back without its traceback)."""


def fit(trainer) -> None:
    """trainer.fit(). A failed run raises TrainingError, or a vaedist input error (bad data,
    checkpoint, CUDA) as itself: one line either way, not Ray's traceback of every attempt."""
    from ray.train import TrainingFailedError

    start = time.time()
    try:
        trainer.fit()
    except TrainingFailedError as e:
        ours = _our_error(e)
        if ours is not None:
            raise ours from None
        log.log(logging.INFO if is_verbose() else logging.DEBUG, "the training run's error, in full: %s: %s",
                type(e).__name__, e)
        max_failures = getattr(trainer.run_config.failure_config, "max_failures", 0)
        attempts = f" after {max_failures + 1} attempts (output.max_failures = {max_failures})" \
            if max_failures > 0 else ""
        where = train_worker_log(e, start)
        raise TrainingError(f"training failed{attempts}: {root_cause(e)}"
                            + (f" (Ray's traceback: {where})" if where else "")) from original(e)


def train_result(cfg: Config) -> TrainResult:
    """What the run directory of cfg.output.run_name holds now."""
    run_dir = run_dir_of(cfg)
    return TrainResult(run_dir=run_dir, latest_checkpoint=latest_checkpoint_dir(run_dir),
                       best_checkpoint=best_checkpoint_dir(run_dir), metrics=read_metrics(run_dir))
