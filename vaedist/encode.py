"""Ray Data batch job: encode every datapoint with a checkpoint into a Parquet latent table.

    vaedist encode --config configs/debug.yaml [--checkpoint outputs/runs/debug] [--out outputs/latents]
    ray job submit --working-dir . -- python jobs/encode.py --config configs/debug.yaml

shards (one row each) -> map_batches(LatentEncoder actors: read a shard, encode it batch by batch)
-> write_parquet into a hidden staging directory -> verify one row per datapoint -> lineage +
_SUCCESS -> publish by rename.
A crash at any point leaves the published path as it was; a rerun starts a fresh staging directory.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from vaedist import __version__, schema, storage
from vaedist.checkpoint import CheckpointError, best_checkpoint_dir, config_of, load_checkpoint, load_model
from vaedist.config import Config
from vaedist.data import fixed_binarize, key_for, load_split_arrays, manifest_hash, read_manifest, verify_shards
from vaedist.evaluate import evaluate_batch

log = logging.getLogger("vaedist.encode")
FAIL_ENV = "VAEDIST_ENCODE_FAIL_AFTER_BATCHES"
ROWS_PER_FILE = 20_000  # ~13 MB files for 50 latents: a handful of files, not thousands


class EncodeError(ValueError):
    """The encode job cannot run or its output does not verify; the message names the path."""


# ---------------------------------------------------------------------------------------------
# What the Ray Data actors run.

def read_shard(shards_dir: str, rel: str, split: str, count: int) -> dict[str, np.ndarray]:
    """One shard -> one row per datapoint (decoded by the verified fast reader)."""
    indices, images, labels = load_split_arrays([storage.join(shards_dir, rel)], [count])
    return {"key": np.array([key_for(split, int(i)) for i in indices], dtype=object),
            "split": np.full(len(indices), split, dtype=object), "index": indices, "label": labels,
            "shard": np.full(len(indices), rel, dtype=object), "image": images}


class LatentEncoder:
    """Loads the checkpoint once per actor. Called with a batch of shard rows (shard, split,
    num_samples), it reads each shard and yields latent-table rows, `batch_size` datapoints at a time.

    Reading inside the actor, rather than in a task stage before it, is deliberate: a separate
    stage needs its own worker processes, each importing torch, and on a small machine starting
    those cost more than the whole encode (measured: 12 extra processes, ~35 s on 2 cores)."""

    def __init__(self, checkpoint: str, shards_dir: str, batch_size: int, num_samples_mc: int, num_samples_iw: int,
                 iw_chunk_size: int, seed: int, use_gpu: bool, num_threads: int, lineage: dict[str, Any],
                 fail_after_batches: int = -1):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, num_threads))
        self.model, cfg, _ = load_model(checkpoint, map_location=self.device)
        self.binarize_seed = cfg.train.seed  # the training run's evaluation binarisation
        self.shards_dir, self.batch_size = shards_dir, batch_size
        self.num_samples_mc, self.num_samples_iw, self.iw_chunk_size = num_samples_mc, num_samples_iw, iw_chunk_size
        self.seed, self.lineage, self.fail_after_batches, self.batches = seed, lineage, fail_after_batches, 0

    def __call__(self, shards: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for rel, split, count in zip(shards["shard"], shards["split"], shards["num_samples"]):
            rows = read_shard(self.shards_dir, str(rel), str(split), int(count))
            for start in range(0, len(rows["key"]), self.batch_size):
                yield self.encode_rows({name: value[start:start + self.batch_size] for name, value in rows.items()})

    def encode_rows(self, rows: dict[str, np.ndarray]) -> pa.Table:
        """Decoded datapoints of one split (read_shard's columns) -> latent-table rows."""
        if 0 <= self.fail_after_batches <= self.batches:
            raise RuntimeError(f"injected fault after {self.batches} batches ({FAIL_ENV})")
        self.batches += 1
        split = str(rows["split"][0])
        x = fixed_binarize(rows["image"], rows["index"], split, self.binarize_seed).to(self.device)
        out = evaluate_batch(self.model, x, rows["index"], split, self.seed, self.num_samples_mc,
                             self.num_samples_iw, self.iw_chunk_size)
        columns = {name: value.cpu().numpy() for name, value in out.items()}
        columns.update({name: rows[name] for name in ("key", "split", "index", "label", "shard")})
        return schema.to_table(columns, self.model.latent_dim, self.lineage)


# ---------------------------------------------------------------------------------------------
# Checks before any work, verification and publication after.

def resolve_checkpoint(cfg: Config, checkpoint: str | None) -> str:
    """--checkpoint, else encode.checkpoint, else the best checkpoint of output.run_name."""
    from vaedist.train import run_dir_of

    chosen = checkpoint or cfg.encode.checkpoint
    if chosen:
        return storage.absolute(chosen)
    best = best_checkpoint_dir(run_dir_of(cfg))
    if best is None:
        raise CheckpointError(f"no checkpoint given and run {run_dir_of(cfg)} has none; train first or pass --checkpoint")
    return best


def check_output_path(out: str) -> None:
    """The published path may be absent, empty, or an earlier vaedist table; nothing else is overwritten."""
    if not storage.exists(out):
        return
    if not storage.is_dir(out):
        raise EncodeError(f"output path {out} is a file, not a latent table directory; choose another --out")
    entries = storage.listdir(out)
    if entries and schema.LINEAGE_FILE not in entries:
        raise EncodeError(f"output path {out} holds something else ({', '.join(entries[:5])}); "
                          "refusing to replace it; choose another --out or remove it")


def _staging_prefix(out: str) -> tuple[str, str]:
    out = out.rstrip("/")
    parent, name = out.rsplit("/", 1) if "/" in out else (".", out)
    return parent, f".{name}.staging-"


def verify_table(path: str, expected: dict[str, int]) -> dict[str, int]:
    """Exactly one row per datapoint: row counts per split equal the manifest's, keys unique."""
    import pyarrow.dataset as pads  # driver only: keeps the encoder actors' start-up lighter

    fs, p = storage.resolve(path)
    files = [storage.join(path, f) for f in storage.listdir(path) if f.endswith(".parquet")]
    if not files:
        raise EncodeError(f"{path}: the encode job wrote no Parquet files")
    dataset = pads.dataset([storage.resolve(f)[1] for f in files], filesystem=fs, format="parquet")
    table = dataset.to_table(columns=["key", "split"])
    counts = {s: int(n) for s, n in zip(*np.unique(table["split"].to_numpy(zero_copy_only=False), return_counts=True))}
    if counts != expected:
        raise EncodeError(f"{path}: rows per split {counts} differ from the manifest's {expected}")
    if len(set(table["key"].to_pylist())) != table.num_rows:
        raise EncodeError(f"{path}: duplicate keys in the latent table")
    return counts


def publish(staging: str, out: str) -> None:
    """Make the verified staging directory the published table. Locally: rename (atomic), with the
    previous table moved aside first. Object stores have no rename: copy, with _SUCCESS written last
    (readers require it)."""
    if not storage.is_uri(out):
        old = None
        if storage.exists(out):
            parent, prefix = _staging_prefix(out)
            old = storage.join(parent, prefix.replace("staging", "old") + uuid.uuid4().hex[:8])
            storage.move(out, old)
        storage.move(staging, out)
        if old:
            storage.rmtree(old)
        return
    storage.rmtree(out)
    names = storage.listdir(staging)
    for name in [n for n in names if n != schema.SUCCESS_FILE] + [schema.SUCCESS_FILE]:
        storage.write_bytes(storage.join(out, name), storage.read_bytes(storage.join(staging, name)))
    storage.rmtree(staging)


def encoder_kwargs(cfg: Config, checkpoint: str, shards_dir: str, lineage: dict[str, Any]) -> dict[str, Any]:
    """LatentEncoder's arguments from cfg.encode (shared by the job and the benchmark's plain loop)."""
    ec = cfg.encode
    return {"checkpoint": checkpoint, "shards_dir": shards_dir, "batch_size": ec.batch_size,
            "num_samples_mc": ec.num_samples_mc, "num_samples_iw": ec.num_samples_iw,
            "iw_chunk_size": ec.iw_chunk_size, "seed": ec.seed, "use_gpu": ec.use_gpu,
            "num_threads": int(ec.cpus_per_actor), "lineage": lineage,
            "fail_after_batches": int(os.environ.get(FAIL_ENV, -1))}


@dataclass
class EncodeResult:
    path: str
    rows: dict[str, int]
    seconds: float
    lineage: dict[str, Any]

    @property
    def rows_per_s(self) -> float:
        return sum(self.rows.values()) / self.seconds


def encode(cfg: Config, checkpoint: str | None = None, out: str | None = None) -> EncodeResult:
    """Encode cfg.encode.splits with a checkpoint into the latent table at `out` (default output.latents_dir)."""
    import ray

    from vaedist.train import init_ray

    out = storage.absolute(out or cfg.output.latents_dir)
    shards_dir = storage.absolute(cfg.data.shards_dir)
    ckpt = resolve_checkpoint(cfg, checkpoint)
    state = load_checkpoint(ckpt)
    model_cfg = config_of(state)
    manifest = read_manifest(shards_dir)
    digest = manifest_hash(shards_dir)
    if state["manifest_hash"] != digest:
        raise EncodeError(f"shards in {shards_dir} (manifest {digest[:12]}) do not match the checkpoint "
                          f"{state['path']} (trained on manifest {state['manifest_hash'][:12]})")
    check_output_path(out)
    verify_shards(shards_dir)
    ec = cfg.encode
    shards = [{"shard": s["path"], "split": split, "num_samples": s["num_samples"]}
              for split in ec.splits for s in manifest["splits"][split]["shards"]]
    expected = {split: manifest["splits"][split]["num_samples"] for split in ec.splits}
    lineage = {
        "checkpoint": state["path"], "checkpoint_epoch": state["epoch"], "config": model_cfg.to_dict(),
        "manifest_hash": digest, "shards_dir": shards_dir, "splits": list(ec.splits),
        "num_samples_mc": ec.num_samples_mc, "num_samples_iw": ec.num_samples_iw, "seed": ec.seed,
        "binarize_seed": model_cfg.train.seed, "latent_dim": model_cfg.model.latent_dim,
        "schema_version": schema.SCHEMA_VERSION, "vaedist_version": __version__,
    }

    init_ray(cfg.scaling.address)
    parent, prefix = _staging_prefix(out)
    for stale in storage.listdir(parent):  # leftovers of a killed run: never published, safe to drop
        if stale.startswith(prefix) or stale.startswith(prefix.replace("staging", "old")):
            storage.rmtree(storage.join(parent, stale))
    staging = storage.join(parent, prefix + uuid.uuid4().hex[:8])
    start = time.perf_counter()
    try:
        (ray.data.from_items(shards, override_num_blocks=len(shards))
            .map_batches(LatentEncoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=ec.concurrency),
                         num_cpus=ec.cpus_per_actor, num_gpus=1 if ec.use_gpu else 0,
                         fn_constructor_kwargs=encoder_kwargs(cfg, state["path"], shards_dir, lineage))
            # The write tasks only move bytes; without a CPU of their own they write files as the
            # actors produce rows, instead of queueing behind the actors until the end.
            .write_parquet(staging, min_rows_per_file=ROWS_PER_FILE, ray_remote_args={"num_cpus": 0}))
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
    else:
        failure = None
    if failure is not None:
        # Raised afresh, without the original: its traceback holds Ray Data's operators and through
        # them the encoder actors and their CPUs, for as long as the caller keeps the error (a
        # notebook keeps the last one), so a retry in the same process would wait for CPUs.
        gc.collect()
        raise EncodeError(f"the encode job failed; {out} was left as it was. {failure}")
    seconds = time.perf_counter() - start
    rows = verify_table(staging, expected)
    lineage["rows"] = rows
    storage.write_bytes(storage.join(staging, schema.LINEAGE_FILE), (json.dumps(lineage, indent=2, sort_keys=True) + "\n").encode())
    storage.write_bytes(storage.join(staging, schema.SUCCESS_FILE), b"")
    publish(staging, out)
    log.info("published %s: %s rows in %.1f s", out, rows, seconds)
    return EncodeResult(path=out, rows=rows, seconds=seconds, lineage=lineage)
