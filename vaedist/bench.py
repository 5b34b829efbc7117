"""Benchmarks that print ratios against a baseline measured in the same run (machines are noisy).

    vaedist bench train --config configs/mnist.yaml --epochs 3
    vaedist bench encode --config configs/mnist.yaml --checkpoint outputs/runs/vae-mnist
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vaedist import storage
from vaedist.config import Config, config_from_dict
from vaedist.data import load_mnist, read_manifest
from vaedist.engine import make_optimizer, train_epoch
from vaedist.model import VAE


def plain_train_epochs(cfg: Config, images_u8: torch.Tensor, epochs: int, steps: int) -> list[float]:
    """(b): the same engine.train_epoch over a tensor already in memory, no Ray, no shards;
    samples/s of each epoch."""
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    model = VAE(cfg.model)
    optimizer = make_optimizer(model, cfg.train)
    rates = []
    for epoch in range(epochs):
        r = train_epoch(model, optimizer, images_u8, cfg.train, epoch=epoch, rank=0, num_steps=steps,
                        steps_per_epoch=steps, start_step=epoch * steps, device=torch.device("cpu"))
        rates.append(r["count"] / r["seconds"])
    return rates


def _steady(rates: list[float]) -> float:
    """Mean samples/s after the first (warm-up) epoch; equal epochs, so the mean of rates is fair."""
    rest = rates[1:] or rates
    return sum(rest) / len(rest)


def _fmt(rates: list[float]) -> str:
    return ", ".join(f"{r:,.0f}" for r in rates)


def bench_train(cfg: Config, epochs: int, echo: Callable[[str], None] = print) -> dict[str, float]:
    from vaedist.train import train

    cfg = config_from_dict(cfg.to_dict(), [f"train.epochs={epochs}", "scaling.num_workers=1",
                                           "train.num_samples_iw_final=0", "train.kl_warmup_epochs=0"])
    manifest = read_manifest(storage.absolute(cfg.data.shards_dir))
    n = manifest["splits"]["train"]["num_samples"]
    steps = n // cfg.train.batch_size_per_worker
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch)
    images, _, _ = load_mnist("train", cfg.data.resolved_mnist_dir(), cfg.data.download_dir)
    images_u8 = torch.from_numpy(np.ascontiguousarray(images.reshape(len(images), -1)))
    echo(f"model {cfg.model.kind} {cfg.model.hidden_dims} z={cfg.model.latent_dim}, batch {cfg.train.batch_size_per_worker}, "
         f"{steps} steps x {epochs} epochs, {cfg.scaling.cpus_per_worker:g} CPU threads; "
         "samples/s averaged over epochs after the first")
    before = plain_train_epochs(cfg, images_u8, epochs, steps)
    echo(f"(b) plain PyTorch loop, in-memory tensors: {_steady(before):,.0f} samples/s (per epoch: {_fmt(before)})")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        result = train(config_from_dict(cfg.to_dict(), [f"output.storage_path={tmp}", "output.run_name=bench"]))
        wall = time.perf_counter() - start
    ray_rates = [r["samples_per_s"] for r in result.epochs]
    echo(f"(a) Ray Train + WebDataset shards, 1 worker: {_steady(ray_rates):,.0f} samples/s (per epoch: {_fmt(ray_rates)})")
    after = plain_train_epochs(cfg, images_u8, epochs, steps)
    echo(f"(b) plain PyTorch loop, again: {_steady(after):,.0f} samples/s (per epoch: {_fmt(after)})")
    plain = (_steady(before) + _steady(after)) / 2
    ray_sps = _steady(ray_rates)
    end_to_end = epochs * steps * cfg.train.batch_size_per_worker / wall
    echo(f"ratio (a)/(b), training epochs: {ray_sps / plain:.3f}")
    echo(f"end to end incl. Ray start, shard decode, per-epoch eval and checkpoints: {end_to_end:,.0f} samples/s "
         f"({wall:.1f} s wall)")
    return {"ray_samples_per_s": ray_sps, "plain_samples_per_s": plain, "ratio": ray_sps / plain,
            "end_to_end_samples_per_s": end_to_end}


def plain_encode(cfg: Config, checkpoint: str, out_dir: str) -> dict[str, int]:
    """(b): one process, shard by shard, through the job's own LatentEncoder (so only Ray differs),
    with all the job's CPUs as threads, written with pyarrow in files as large as the job's."""
    from vaedist.encode import ROWS_PER_FILE, LatentEncoder, encoder_kwargs

    ec = cfg.encode
    shards_dir = storage.absolute(cfg.data.shards_dir)
    manifest = read_manifest(shards_dir)
    kwargs = encoder_kwargs(cfg, checkpoint, shards_dir, lineage={})
    kwargs.update(use_gpu=False, num_threads=int(ec.cpus_per_actor * ec.concurrency), fail_after_batches=-1)
    encoder = LatentEncoder(**kwargs)
    rows: dict[str, int] = {}
    pending: list[pa.Table] = []

    def flush() -> None:  # files of ROWS_PER_FILE rows, as the job writes
        if pending:
            pq.write_table(pa.concat_tables(pending), f"{out_dir}/part-{len(os.listdir(out_dir)):05d}.parquet")
            pending.clear()

    for split in ec.splits:
        for shard in manifest["splits"][split]["shards"]:
            for table in encoder({"shard": [shard["path"]], "split": [split], "num_samples": [shard["num_samples"]]}):
                pending.append(table)
                rows[split] = rows.get(split, 0) + table.num_rows
                if sum(t.num_rows for t in pending) >= ROWS_PER_FILE:
                    flush()
    flush()
    return rows


def bench_encode(cfg: Config, checkpoint: str, echo: Callable[[str], None] = print,
                 query_repeats: int = 20) -> dict[str, float]:
    from vaedist.encode import encode
    from vaedist.query import connect, loss_by_digit
    from vaedist.train import init_ray

    init_ray(cfg.scaling.address)  # started before timing: both sides are timed from a running process
    ec = cfg.encode
    echo(f"checkpoint {checkpoint}; S={ec.num_samples_mc}, K={ec.num_samples_iw}, batch {ec.batch_size}, "
         f"{ec.concurrency} actor(s) x {ec.cpus_per_actor:g} CPU")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rows = plain_encode(cfg, checkpoint, tmp)
        plain_s = time.perf_counter() - start
        total = sum(rows.values())
        echo(f"(b) plain single-process PyTorch loop + pyarrow: {total / plain_s:,.0f} rows/s ({plain_s:.1f} s)")
        start = time.perf_counter()
        result = encode(cfg, checkpoint=checkpoint, out=f"{tmp}/latents")
        ray_s = time.perf_counter() - start
        echo(f"(a) Ray Data encode job (verify + publish included): {total / ray_s:,.0f} rows/s ({ray_s:.1f} s)")
        echo(f"ratio (a)/(b): {plain_s / ray_s:.3f}")
        con = connect(result.path)
        loss_by_digit(result.path, split="test", con=con)  # warm-up: OS cache, DuckDB metadata
        times = []
        for _ in range(query_repeats):
            t = time.perf_counter()
            loss_by_digit(result.path, split="test", con=con)
            times.append(time.perf_counter() - t)
        query_ms = statistics.median(times) * 1000
        echo(f"loss-by-digit query over {total} rows, warm: median {query_ms:.1f} ms of {query_repeats}")
    return {"ray_rows_per_s": total / ray_s, "plain_rows_per_s": total / plain_s, "ratio": plain_s / ray_s,
            "query_ms": query_ms}
