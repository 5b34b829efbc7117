"""Ray Data batch job: encode every datapoint with a checkpoint into a Parquet latent table.

    vaedist encode --config configs/debug.yaml [--checkpoint outputs/runs/debug] [--out outputs/latents]
    vaedist encode --config configs/debug.yaml --epochs 0,1      # several checkpoints, one table
    vaedist encode --checkpoint outputs/runs/vae-fashion-mnist --shards outputs/shards   # other data that fits
    ray job submit --working-dir . -- python jobs/encode.py --config configs/debug.yaml

files to write (a row each: a group of consecutive shards of one split) -> map_batches(TableFileWriter
actors: read each shard, check its sha256, encode it batch by batch with each checkpoint, write the
group's Parquet file whole) into a hidden staging directory -> verify one row per datapoint (per
checkpoint) -> lineage + _SUCCESS -> publish (vaedist.tables).

A crash at any point leaves a complete table at the published path or, for the instant of a local
swap or the span of an object store's copy, beside it, where readers find it and the next encode
puts it back (vaedist.tables); a table verified in staging is published, never thrown away.
The staging directory is named by a hash of the job's identity (checkpoints and their weights,
manifest, lineage, settings that change a bit of the output) and each file by its shards, so a
rerun of the same job after its driver or cluster died keeps the files the killed job finished,
checked file by file, and encodes only the rest: the table is byte-identical to an uninterrupted
run's.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
import uuid
import warnings
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch

from vaedist import __version__, schema, storage, tables
from vaedist.checkpoint import (CheckpointError, CheckpointState, best_checkpoint_dir, check_data_compatible,
                                checkpoint_for_epoch, config_of, kept_checkpoint_dirs, load_checkpoint, load_model,
                                run_dir_of)
from vaedist.config import Config, EncodeConfig
from vaedist.console import RowsDisplay, is_verbose
from vaedist.data import (DataError, DatasetInfo, Manifest, ShardEntry, key_for, manifest_hash, read_checked_shard,
                          read_manifest, read_sources)
from vaedist.data.shards import decode_shard_bytes
from vaedist.devices import require_cuda
from vaedist.errors import ray_log_dir, root_cause
from vaedist.rng import NOISE_SCHEME
from vaedist.evaluate import evaluate_batch
from vaedist.likelihoods import get_likelihood
from vaedist.lineage import Lineage, write_lineage
from vaedist.tracking import check_uri, log_encode, resolve_uri

log = logging.getLogger("vaedist.encode")
FAIL_ENV = "VAEDIST_ENCODE_FAIL_AFTER_BATCHES"
ROWS_PER_FILE = 20_000  # ~13 MB files for 50 latents: a handful of files, not thousands
MIN_FILES = 8  # a small table still gives as many actors work (a file is one actor's task)


class EncodeError(ValueError):
    """The encode job cannot run or its output does not verify; the message names the path."""


# ---------------------------------------------------------------------------------------------
# What the Ray Data actors run.

def read_shard(shards_dir: str, shard: ShardEntry, split: str, info: DatasetInfo) -> dict[str, np.ndarray]:
    """One shard (its manifest entry), checked against the manifest's size and sha256 as it is read,
    -> one row per datapoint (decoded by the fast reader)."""
    buf = read_checked_shard(shards_dir, shard)
    _, indices, images, labels = decode_shard_bytes(buf, storage.join(shards_dir, shard.path),
                                                    shard.num_samples, info)
    return {"key": np.array([key_for(split, int(i)) for i in indices], dtype=object),
            "split": np.full(len(indices), split, dtype=object), "index": indices, "label": labels,
            "shard": np.full(len(indices), shard.path, dtype=object), "image": images}


class LatentEncoder:
    """Loads the checkpoints once per actor. Called with a batch of shard rows (the manifest's entry
    and the split), it reads each shard and yields latent-table rows, `batch_size` datapoints at a
    time; with several checkpoints (training dynamics), a row per datapoint per checkpoint, marked
    with the checkpoint's epoch, all drawn with the same per-key noise.

    Reading inside the actor, rather than in a task stage before it, is deliberate: a separate
    stage needs its own worker processes, each importing torch, and on a small machine starting
    those cost more than the whole encode (measured: 12 extra processes, ~35 s on 2 cores)."""

    def __init__(self, checkpoints: list[str], shards_dir: str, dataset: dict, batch_size: int, num_samples_mc: int,
                 num_samples_iw: int, iw_chunk_size: int, seed: int, use_gpu: bool, num_threads: int,
                 lineage: Lineage | None, epochs: list[int] | None = None, fail_after_batches: int = -1,
                 kl_per_dim: bool = False):
        # A GPU actor whose CUDA does not work must fail, not compute on the CPU holding its GPU.
        self.device = require_cuda("an encode actor (encode.use_gpu)") if use_gpu else torch.device("cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, num_threads))
        loaded = [load_model(c, map_location=self.device) for c in checkpoints]
        self.models = [model for model, _, _ in loaded]
        self.binarize_seed = loaded[0][1].train.seed  # the training run's evaluation binarisation
        self.epochs = epochs
        self.info = DatasetInfo.from_manifest(dataset)
        self.shards_dir, self.batch_size = shards_dir, batch_size
        self.num_samples_mc, self.num_samples_iw, self.iw_chunk_size = num_samples_mc, num_samples_iw, iw_chunk_size
        self.seed, self.lineage, self.fail_after_batches, self.batches = seed, lineage, fail_after_batches, 0
        self.kl_per_dim = kl_per_dim
        self.manifest: Manifest | None = None  # read on first use, for the datapoints' sources
        self.sources: dict[str, np.ndarray] = {}

    def sources_of(self, split: str, indices: np.ndarray) -> np.ndarray:
        """Where each datapoint came from (vaedist.data.read_sources). A split whose manifest entry names a
        sources file (external data) has it read once per actor, not once per shard."""
        if self.manifest is None:
            self.manifest = read_manifest(self.shards_dir)
        if self.manifest.split(split).sources is None:
            return read_sources(self.shards_dir, self.manifest, split, indices)
        if split not in self.sources:
            self.sources[split] = read_sources(self.shards_dir, self.manifest, split)
        return self.sources[split][indices]

    def __call__(self, shards: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for entry, split in zip(shards["entry"], shards["split"]):
            rows = read_shard(self.shards_dir, ShardEntry.from_dict(json.loads(entry)), str(split), self.info)
            rows["source"] = self.sources_of(str(split), rows["index"])
            for start in range(0, len(rows["key"]), self.batch_size):
                yield self.encode_rows({name: value[start:start + self.batch_size] for name, value in rows.items()})

    def encode_rows(self, rows: dict[str, np.ndarray]) -> pa.Table:
        """Decoded datapoints of one split (read_shard's columns) -> latent-table rows."""
        if 0 <= self.fail_after_batches <= self.batches:
            raise RuntimeError(f"injected fault after {self.batches} batches ({FAIL_ENV})")
        self.batches += 1
        split = str(rows["split"][0])
        # The checkpoints are of one run, so one likelihood: its input is computed once for all.
        x = self.models[0].likelihood.eval_input(rows["image"], rows["index"], split, self.binarize_seed, self.device)
        tables = []
        for i, model in enumerate(self.models):
            out = evaluate_batch(model, x, rows["index"], split, self.seed, self.num_samples_mc,
                                 self.num_samples_iw, self.iw_chunk_size, kl_per_dim=self.kl_per_dim)
            columns = {name: value.cpu().numpy() for name, value in out.items()}
            columns.update({name: rows[name] for name in ("key", "split", "index", "label", "shard", "source")})
            if self.epochs is not None:
                columns["epoch"] = np.full(len(rows["key"]), self.epochs[i], np.int64)
            tables.append(schema.to_table(columns, model.latent_dim, self.lineage, model.latent_groups))
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


class TableFileWriter:
    """An encode actor: called with a batch of file rows (file_plan), it encodes each file's shards
    with a LatentEncoder and writes the file into the staging directory whole (tables.write_file),
    so a file there is finished; yields (file, rows) per file."""

    def __init__(self, staging: str, **encoder_kwargs: Any):
        self.staging, self.encoder = staging, LatentEncoder(**encoder_kwargs)

    def __call__(self, files: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for name, split, entries in zip(files["file"], files["split"], files["entries"]):
            parts = [table for entry in json.loads(entries)
                     for table in self.encoder({"entry": [json.dumps(entry, sort_keys=True)], "split": [split]})]
            table = pa.concat_tables(parts)
            tables.write_file(storage.join(self.staging, str(name)), table)
            yield {"file": np.array([name], dtype=object), "rows": np.array([table.num_rows])}


# ---------------------------------------------------------------------------------------------
# Checks before any work, verification and publication after.

def resolve_checkpoint(cfg: Config, checkpoint: str | None) -> str:
    """--checkpoint, else encode.checkpoint, else the best checkpoint of output.run_name."""
    chosen = checkpoint or cfg.encode.checkpoint
    if chosen:
        return storage.absolute(chosen)
    best = best_checkpoint_dir(run_dir_of(cfg))
    if best is None:
        raise CheckpointError(f"no checkpoint given and run {run_dir_of(cfg)} has none; train first or pass --checkpoint")
    return best


def resolve_epoch_checkpoints(cfg: Config, checkpoint: str | None, epochs: list[int] | None,
                              all_kept: bool) -> list[tuple[int, str]]:
    """(epoch, checkpoint dir) for --epochs / --all-kept, from the run directory that --checkpoint
    (or encode.checkpoint) names, else output.run_name's."""
    run_dir = storage.absolute(checkpoint or cfg.encode.checkpoint or run_dir_of(cfg))
    if not storage.exists(run_dir):
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if all_kept:
        found = kept_checkpoint_dirs(run_dir)
        if not found:
            raise CheckpointError(f"run {run_dir} kept no checkpoints for good; train with output.keep_epochs "
                                  "(or output.keep_every_epochs), or give --epochs")
        return found
    if len(set(epochs)) != len(epochs):
        raise EncodeError(f"--epochs lists an epoch twice: {epochs}")
    return [(epoch, checkpoint_for_epoch(run_dir, epoch)) for epoch in sorted(epochs)]


def check_output_path(out: str) -> None:
    """The published path may be absent, empty, or an earlier vaedist table; nothing else is overwritten."""
    try:
        tables.check_replaceable(out)
    except tables.TableError as e:
        raise EncodeError(str(e)) from None


def file_plan(manifest: Manifest, splits: list[str], rows_per_file: int) -> list[dict[str, Any]]:
    """The table's files: consecutive shards of one split, grouped until a file holds at least
    min(rows_per_file, all rows / MIN_FILES) datapoints, named `<split>-<n>.parquet`. Fixed by the
    manifest alone (not by the cluster), so a rerun plans the same files."""
    total = sum(manifest.split(split).num_samples for split in splits)
    least = max(1, min(rows_per_file, math.ceil(total / MIN_FILES)))
    files: list[dict[str, Any]] = []
    for split in splits:
        groups, group = [], []
        for shard in manifest.split(split).shards:
            group.append(shard)
            if sum(s.num_samples for s in group) >= least:
                groups.append(group)
                group = []
        groups += [group] if group else []
        files += [{"file": f"{split}-{n:05d}.parquet", "split": split,
                   "entries": json.dumps([s.to_dict() for s in g], sort_keys=True),
                   "datapoints": sum(s.num_samples for s in g)} for n, g in enumerate(groups)]
    return files


def job_key(lineage: Lineage, states: list[CheckpointState], cfg: Config, plan: list[dict[str, Any]]) -> str:
    """A hash of what decides every byte of the table: the lineage (checkpoints, data, seeds, sample
    counts, versions), the checkpoints' weights, the file plan and the settings that change floating
    point results (batch size, IW chunk, CPU threads per actor, GPU), and encode.kl_per_dim, which adds
    a column (files with and without it must not make one table). Not the number of actors."""
    ec = cfg.encode
    h = hashlib.sha256(json.dumps({
        "lineage": lineage.to_dict(), "plan": [(f["file"], f["entries"]) for f in plan], "batch_size": ec.batch_size,
        "iw_chunk_size": ec.iw_chunk_size, "cpus_per_actor": ec.cpus_per_actor, "use_gpu": ec.use_gpu,
        "kl_per_dim": ec.kl_per_dim,
    }, sort_keys=True, default=str).encode())
    for st in states:
        for name, tensor in sorted(st.model.items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def reuse_finished(staging: str, plan: list[dict[str, Any]], lineage: Lineage,
                   copies: int) -> list[dict[str, Any]]:
    """The files of `plan` still to encode: a file a killed run of the same job left in `staging` is
    kept when its footer shows the planned rows and this job's lineage; anything else there (a
    file that does not check, a half-written temporary) is deleted."""
    import pyarrow.parquet as pq

    planned = {f["file"]: f for f in plan}
    todo = {f["file"] for f in plan}
    want = json.loads(json.dumps(lineage.to_dict(), sort_keys=True, default=str))
    fs, root = storage.resolve(staging)
    for name in storage.listdir(staging):
        path = storage.join(staging, name)
        if name in planned:
            try:
                with fs.open_input_file(f"{root.rstrip('/')}/{name}") as f:
                    footer = pq.ParquetFile(f)
                    ok = (footer.metadata.num_rows == planned[name]["datapoints"] * copies
                          and _as_json(schema.lineage_of(footer.schema_arrow)) == want)
            except (OSError, pa.ArrowException):
                ok = False
            if ok:
                todo.discard(name)
                continue
        storage.rmtree(path)
    return [f for f in plan if f["file"] in todo]


def _as_json(lineage: Lineage | None) -> Any:
    """A lineage as its JSON reads back, for comparing one written into a file with this job's."""
    return None if lineage is None else json.loads(json.dumps(lineage.to_dict(), sort_keys=True, default=str))


def verify_table(path: str, expected: dict[str, int], epochs: list[int] | None = None) -> dict[str, int]:
    """Exactly one row per datapoint (per checkpoint): row counts per split equal the manifest's
    (times the epochs), no (key, epoch) twice. Counted with Arrow over the key and split columns
    only, so a table of millions of rows is checked without a Python object per row."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads  # driver only: keeps the encoder actors' start-up lighter

    fs, _ = storage.resolve(path)
    files = [storage.join(path, f) for f in storage.listdir(path) if f.endswith(".parquet")]
    if not files:
        raise EncodeError(f"{path}: the encode job wrote no Parquet files")
    dataset = pads.dataset([storage.resolve(f)[1] for f in files], filesystem=fs, format="parquet")
    columns = ["key", "split"] + (["epoch"] if epochs is not None else [])
    table = dataset.to_table(columns=columns)
    per_split = pc.value_counts(table["split"])
    counts = {str(s): int(n) // (len(epochs) if epochs else 1)
              for s, n in zip(per_split.field("values").to_pylist(), per_split.field("counts").to_pylist())}
    if counts != expected or (epochs and table.num_rows != sum(expected.values()) * len(epochs)):
        raise EncodeError(f"{path}: rows per split {counts} differ from the manifest's {expected}"
                          + (f" for each of {len(epochs)} checkpoints" if epochs else ""))
    unique = table["key"] if epochs is None else pc.binary_join_element_wise(
        table["key"], pc.cast(table["epoch"], pa.string()), "@")
    if pc.count_distinct(unique).as_py() != table.num_rows:
        raise EncodeError(f"{path}: duplicate {'keys' if epochs is None else '(key, epoch) pairs'} in the latent table")
    if epochs is not None:
        found = sorted(pc.unique(table["epoch"]).to_pylist())
        if found != sorted(epochs):
            raise EncodeError(f"{path}: epochs {found} in the table, expected {sorted(epochs)}")
    return counts


def encoder_kwargs(cfg: Config, checkpoints: list[str], shards_dir: str, dataset: dict, lineage: Lineage | None,
                   epochs: list[int] | None = None) -> dict[str, Any]:
    """LatentEncoder's arguments from cfg.encode (shared by the job and the benchmark's plain loop)."""
    ec = cfg.encode
    return {"checkpoints": checkpoints, "shards_dir": shards_dir, "dataset": dataset, "batch_size": ec.batch_size,
            "num_samples_mc": ec.num_samples_mc, "num_samples_iw": ec.num_samples_iw,
            "iw_chunk_size": ec.iw_chunk_size, "seed": ec.seed, "use_gpu": ec.use_gpu, "kl_per_dim": ec.kl_per_dim,
            "num_threads": int(ec.cpus_per_actor), "lineage": lineage, "epochs": epochs,
            "fail_after_batches": int(os.environ.get(FAIL_ENV, -1))}


# An encode actor's memory, for the request Ray schedules it by: its worker process (Python, torch,
# pyarrow, Ray) and the weights, then per batch the decoder's output for each of its samples
# (batch_size x samples x pixels x the likelihood's parameters per pixel, float32) and the terms the
# likelihood computes from it: ~1.25x that output at its peak, measured for the conv family with the
# logistic mixture on 32x32 colour images; 1.5x here. Ray Data warns (in its log) when an actor's
# peak exceeds its request, or when the request is under 1.25x the peak: the headroom it advises.
ACTOR_PROCESS_BYTES = 768 * 2**20
DECODED_PEAK_FACTOR = 1.5
RAY_DATA_HEADROOM = 1.25


def actor_memory_bytes(ec: EncodeConfig, model_cfg: Any, image_shape: tuple[int, int, int],
                       states: list[CheckpointState]) -> int:
    """What one encode actor needs in host memory at its peak, with Ray Data's headroom."""
    weights = sum(t.numel() * t.element_size() for st in states for t in st.model.values() if torch.is_tensor(t))
    height, width, channels = image_shape
    samples = max(ec.num_samples_mc, min(ec.num_samples_iw, ec.iw_chunk_size))
    per_pixel = get_likelihood(model_cfg, channels).params_per_pixel(channels)
    decoded = 4 * ec.batch_size * samples * height * width * per_pixel
    on_host = 0 if ec.use_gpu else DECODED_PEAK_FACTOR * decoded  # a GPU actor's batch lives on its GPU
    return math.ceil(RAY_DATA_HEADROOM * (ACTOR_PROCESS_BYTES + 2 * weights + on_host))


def memory_request(need: int, concurrency: int, address: str | None) -> int:
    """need, or less where the cluster could not place encode.concurrency actors asking for it: as
    much as the largest node holds (on the embedded Ray, that node's share per actor). The request is
    what Ray schedules by; an actor that needs more still runs, and Ray Data says so in its log."""
    import ray

    from vaedist.cluster import is_embedded

    nodes = [n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")]
    largest = int(max(nodes, default=0))
    if not largest:
        return need
    return min(need, largest // concurrency if is_embedded(address) else largest)


def shard_rows(manifest: Manifest, splits: list[str]) -> list[dict[str, str]]:
    """The job's input: a row per shard, its manifest entry (as JSON) and split."""
    return [{"entry": json.dumps(s.to_dict(), sort_keys=True), "split": split}
            for split in splits for s in manifest.split(split).shards]


# Ray Data warns, on every job, that GPU actors which also ask for CPUs are "experimental"; an encode
# actor needs both (its GPU, and CPUs to decode shards: encode.cpus_per_actor), and the jobs on an
# H200 ran so without a hitch. The warning is dropped for the encode job's span only.
GPU_AND_CPU_WARNING = "Specifying both num_cpus and num_gpus for map tasks is experimental"
MAP_OPERATOR_LOGGER = "ray.data._internal.execution.operators.map_operator"


class _DropGpuAndCpuWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(GPU_AND_CPU_WARNING)


@contextlib.contextmanager
def gpu_and_cpu_warning_dropped() -> Iterator[None]:
    logger, drop = logging.getLogger(MAP_OPERATOR_LOGGER), _DropGpuAndCpuWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# Ray Data's issue detectors (an operator's memory per worker, a task that seems to hang) warn every
# 30 s in several lines of advice on Ray Data's settings: for its log, not for the console.
ISSUE_DETECTION_LOGGER = "ray.data._internal.issue_detection"


class _ForTheLogOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR and not record.name.startswith(ISSUE_DETECTION_LOGGER)


@contextlib.contextmanager
def ray_data_reports_to_its_log_only() -> Iterator[None]:
    """During the job, Ray Data's ERROR records (a failed actor's traceback, twice, and its retry
    advice: ~140 lines) and its issue detectors' advice go to its log file only, not to the console,
    unless --verbose: a failed job's error then ends the output in one line (root_cause), naming
    that log, and a job that succeeds prints only its progress."""
    import ray.data  # noqa: F401  (sets up Ray Data's handlers)

    consoles = [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)] if not is_verbose() else []
    drop = _ForTheLogOnly()
    for handler in consoles:
        handler.addFilter(drop)
    try:
        yield
    finally:
        for handler in consoles:
            handler.removeFilter(drop)


def ray_data_log() -> str | None:
    """Where Ray Data writes its log for this Ray session (None when Ray is not running here)."""
    directory = ray_log_dir("ray-data")
    return storage.join(directory, "ray-data.log") if directory else None


def check_checkpoints_fit(states: list[CheckpointState], info: DatasetInfo, shards_dir: str) -> None:
    """Refuse checkpoints whose input layer does not fit the shards' images, or that are not of one
    run (one model, seed and training data): one table holds the checkpoints of one run."""
    last, model_cfg = states[-1], config_of(states[-1])
    for st in states:
        # Any data the model's input layer fits: a model is encoded on data it never saw (out of
        # distribution) as readily as on its own.
        check_data_compatible(st, info.name, info.image_shape, shards_dir)
        if (config_of(st).model != model_cfg.model or config_of(st).train.seed != model_cfg.train.seed
                or st.manifest_hash != last.manifest_hash):
            raise EncodeError(f"checkpoints {st.path} and {last.path} are of different models, seeds or "
                              "training data; one table holds the checkpoints of one run")


def check_shard_sizes(manifest: Manifest, shards_dir: str, splits: list[str]) -> None:
    """Every shard of `splits` present at the size the manifest says (the actors check each shard's
    sha256 as they read it)."""
    for split in splits:
        for shard in manifest.split(split).shards:
            path = storage.join(shards_dir, shard.path)
            if not storage.exists(path) or storage.size(path) != shard.bytes:
                raise DataError(f"shard {path} is missing or not the size the manifest says ({shard.bytes} "
                                "bytes); prepare the shards again")


def build_lineage(states: list[CheckpointState], model_cfg: Config, ec: EncodeConfig, info: DatasetInfo,
                  digest: str, shards_dir: str, epoch_list: list[int] | None) -> Lineage:
    """What the table records of its making, before the job runs (the rows and the job come after).
    states: the checkpoints encoded, the last epoch's last."""
    state = states[-1]
    return Lineage(
        checkpoint=state.path, checkpoint_epoch=state.epoch, config=model_cfg.to_dict(),
        manifest_hash=digest, shards_dir=shards_dir, splits=list(ec.splits),
        # The data the model was trained on, beside the data encoded (manifest_hash, dataset).
        train_manifest_hash=state.manifest_hash, train_dataset=state.dataset,
        same_data_as_training=state.manifest_hash == digest,
        dataset=info.name, image_shape=list(info.image_shape),
        class_names=list(info.class_names) if info.class_names else None,
        num_samples_mc=ec.num_samples_mc, num_samples_iw=ec.num_samples_iw, seed=ec.seed,
        binarize_seed=model_cfg.train.seed, latent_dim=model_cfg.model.latent_dim,
        latent_groups=list(model_cfg.model.latent_groups) if len(model_cfg.model.latent_groups) > 1 else None,
        # What p(x|z) models: binarised draws or the 8-bit pixels (compare refuses to mix them).
        likelihood=model_cfg.model.likelihood, binarised=get_likelihood(model_cfg.model).binarised,
        noise_scheme=NOISE_SCHEME, schema_version=schema.SCHEMA_VERSION, vaedist_version=__version__,
        epochs=epoch_list,
        checkpoints=[{"epoch": st.epoch, "path": st.path} for st in states] if epoch_list is not None else None)


@dataclass
class EncodeResult:
    path: str
    rows: dict[str, int]
    seconds: float
    lineage: Lineage
    written: list[tuple[float, int]] = field(default_factory=list)
    """(seconds after the job started, rows in finished Parquet files by then), as the files appeared."""
    files_reused: int = 0
    """Files a killed run of the same job had finished, kept after their check."""
    files_encoded: int = 0
    """Files this run encoded (the rest of the plan)."""
    rows_reused: int = 0

    @property
    def rows_per_s(self) -> float:
        """Rows this run encoded per second (a resumed run's kept files are not counted)."""
        return (sum(self.rows.values()) - self.rows_reused) / self.seconds


def encode(cfg: Config, checkpoint: str | None = None, out: str | None = None, epochs: list[int] | None = None,
           all_kept: bool = False, echo: Callable[[str], None] | None = None,
           shards_dir: str | None = None, rows_per_file: int = ROWS_PER_FILE) -> EncodeResult:
    """Encode cfg.encode.splits with a checkpoint into the latent table at `out` (default
    output.latents_dir). With `epochs` (or all_kept), encode those checkpoints of one run into one
    table with an `epoch` column, a row per datapoint per checkpoint.

    shards_dir (default data.shards_dir) may hold other data than the checkpoint was trained on, as
    long as its images have the shape and channels the model takes; the lineage says which data the
    model was trained on and whether it is the data encoded. rows_per_file: the Parquet files' least
    rows (the benchmarks time a short job's progress by smaller files)."""
    import ray

    from vaedist.cluster import check_resources, init_ray
    from vaedist.user_code import model_runtime_env

    out = storage.absolute(out or cfg.output.latents_dir)
    shards_dir = storage.absolute(shards_dir or cfg.data.shards_dir)
    if epochs or all_kept:
        chosen = resolve_epoch_checkpoints(cfg, checkpoint, epochs, all_kept)
    else:
        chosen = [(None, resolve_checkpoint(cfg, checkpoint))]
    states = [load_checkpoint(path) for _, path in chosen]
    model_cfg = config_of(states[-1])
    manifest = read_manifest(shards_dir)
    info = manifest.dataset
    digest = manifest_hash(shards_dir)
    check_checkpoints_fit(states, info, shards_dir)
    check_output_path(out)
    tracking_uri = resolve_uri(cfg)
    if tracking_uri:
        check_uri(tracking_uri, cfg.tracking.experiment)
    ec = cfg.encode
    check_shard_sizes(manifest, shards_dir, ec.splits)
    expected = {split: manifest.split(split).num_samples for split in ec.splits}
    epoch_list = [e for e, _ in chosen] if chosen[0][0] is not None else None
    lineage = build_lineage(states, model_cfg, ec, info, digest, shards_dir, epoch_list)

    job = {"command": " ".join(["vaedist encode" if os.path.basename(sys.argv[0]) == "vaedist" else sys.argv[0],
                                *sys.argv[1:]]),
           "host": socket.gethostname(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "id": uuid.uuid4().hex}  # tells this table from an identical one by another run (vaedist.tables)
    plan = file_plan(manifest, list(ec.splits), rows_per_file)
    copies = len(epoch_list) if epoch_list else 1
    staging = tables.staging_path(out, job_key(lineage, states, cfg, plan))
    try:
        for line in tables.recover(out):  # an interrupted publish's table goes back to `out` first
            (echo or log.info)(line)
    except tables.TableError as e:
        raise EncodeError(str(e)) from None
    todo = reuse_finished(staging, plan, lineage, copies)
    if len(todo) < len(plan):
        (echo or log.info)(f"resuming: {len(plan) - len(todo)} of {len(plan)} files of this job were finished "
                           f"by an earlier run and are kept ({staging})")
    init_ray(cfg.scaling.address)
    check_resources("encoding", [
        ("CPU", ec.concurrency * ec.cpus_per_actor, f"encode.concurrency x encode.cpus_per_actor = "
         f"{ec.concurrency} x {ec.cpus_per_actor:g}", "use fewer actors or CPUs per actor"),
        ("GPU", ec.concurrency if ec.use_gpu else 0, f"encode.use_gpu with encode.concurrency = {ec.concurrency}",
         "set encode.use_gpu=false, or run on a cluster with GPU nodes"),
    ], cfg.scaling.address)
    runtime_env = model_runtime_env(model_cfg.model)  # model.kind=custom: its code, on every actor's node
    memory_bytes = memory_request(actor_memory_bytes(ec, model_cfg.model, info.image_shape, states), ec.concurrency,
                                  cfg.scaling.address)
    start = time.perf_counter()
    total_rows = sum(expected.values()) * copies
    try:
        with RowsDisplay(staging, total_rows, echo=echo) as display, warnings.catch_warnings(), \
                gpu_and_cpu_warning_dropped(), ray_data_reports_to_its_log_only():
            # max_restarts has no named map_batches parameter in Ray 2.60; passing it the old way
            # warns that such arguments go in 2.64.
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            if todo:
                run_job(ray, todo, ec, runtime_env, staging,
                        encoder_kwargs(cfg, [st.path for st in states], shards_dir, info.to_manifest(), lineage,
                                       epoch_list), memory_bytes)
    except Exception as e:
        log.log(logging.INFO if is_verbose() else logging.DEBUG, "the encode job's error, in full: %s: %s",
                type(e).__name__, e)
        failure = root_cause(e)
        if ray_data_log() and not is_verbose():
            failure += f" (Ray's traceback: {ray_data_log()})"
    else:
        failure = None
    if failure is not None:
        # Raised afresh, without the original: its traceback holds Ray Data's operators and through
        # them the encoder actors and their CPUs, for as long as the caller keeps the error (a
        # notebook keeps the last one), so a retry in the same process would wait for CPUs.
        gc.collect()
        kept = sum(1 for name in storage.listdir(staging) if name.endswith(".parquet"))
        raise EncodeError(f"the encode job failed: {failure}. {_left(out)[0].upper()}{_left(out)[1:]}; {kept} of "
                          f"{len(plan)} files are finished in {staging}: the same command again encodes only the rest")
    seconds = time.perf_counter() - start
    rows = verify_table(staging, expected, epoch_list)
    # _lineage.json also says which job wrote the table (the Parquet files' copy does not, so that the
    # same inputs still give byte-identical files): an unfinished table's readers name it.
    lineage = lineage.replace(rows=rows, job=job)
    write_lineage(staging, lineage)
    storage.write_bytes(storage.join(staging, schema.SUCCESS_FILE), b"")
    tables.publish(staging, out)
    tables.drop_unfinished(out)  # other jobs' leftovers: given up on once a table is published
    log.debug("published %s: %s rows in %.1f s", out, rows, seconds)  # the CLI prints the summary
    log_encode(tracking_uri, out, experiment=cfg.tracking.experiment)
    return EncodeResult(path=out, rows=rows, seconds=seconds, lineage=lineage, written=display.history,
                        files_reused=len(plan) - len(todo), files_encoded=len(todo),
                        rows_reused=sum(f["datapoints"] for f in plan if f not in todo) * copies)


def _left(out: str) -> str:
    """What a failed job left at `out`, as found (not as hoped)."""
    if tables.is_complete(out):
        return f"the path {out} still holds the table published before"
    return f"no table is published at {out}"


def run_job(ray: Any, todo: list[dict[str, Any]], ec: Any, runtime_env: dict, staging: str,
            kwargs: dict[str, Any], memory_bytes: int | None = None) -> None:
    """The Ray Data job: a TableFileWriter actor pool over the files still to write, each actor asking
    for memory_bytes of memory (actor_memory_bytes)."""
    (ray.data.from_items(todo, override_num_blocks=len(todo))
        # max_restarts=0: Ray Data hands its actors their constructor through the object store, and
        # Ray 2.60 cannot reliably restart such an actor (ray-project/ray#53727; it logs an ERROR line
        # for each, #57733). A lost actor fails the job instead, which then publishes nothing; a
        # rerun keeps the files finished and encodes the rest.
        .map_batches(TableFileWriter, batch_size=1, compute=ray.data.ActorPoolStrategy(size=ec.concurrency),
                     num_cpus=ec.cpus_per_actor, num_gpus=1 if ec.use_gpu else 0, memory=memory_bytes,
                     max_restarts=0, runtime_env=runtime_env or None, fn_constructor_kwargs={"staging": staging, **kwargs})
        .take_all())
