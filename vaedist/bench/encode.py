"""`vaedist bench encode`: the Ray Data encode job against a plain single-process loop running the
job's own LatentEncoder, then the loss-by-digit query over the published table.

    vaedist bench encode --config configs/mnist.yaml --checkpoint outputs/runs/vae-mnist
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from vaedist import storage
from vaedist.config import Config
from vaedist.data import read_manifest


def plain_encode(cfg: Config, checkpoint: str, out_dir: str, num_threads: int | None = None) -> dict[str, int]:
    """(b): one process, shard by shard, through the job's own LatentEncoder (so only Ray differs),
    on the GPU when the job's actors use one (encode.use_gpu), written with pyarrow in files as large
    as the job's. num_threads: by default all the job's CPUs (cpus_per_actor x concurrency), the fair
    baseline for a benchmark; with an actor's cpus_per_actor the table is bit-identical to the job's
    (the determinism contract: float32 kernels round differently with another thread count)."""
    from vaedist.encode import ROWS_PER_FILE, LatentEncoder, encoder_kwargs, shard_rows

    ec = cfg.encode
    shards_dir = storage.absolute(cfg.data.shards_dir)
    manifest = read_manifest(shards_dir)
    kwargs = encoder_kwargs(cfg, [checkpoint], shards_dir, manifest.dataset.to_manifest(), lineage=None)
    if num_threads is None:
        num_threads = int(ec.cpus_per_actor * ec.concurrency)
    kwargs.update(num_threads=num_threads, fail_after_batches=-1)
    encoder = LatentEncoder(**kwargs)
    rows: dict[str, int] = {}
    pending: list[pa.Table] = []

    def flush() -> None:  # files of ROWS_PER_FILE rows, as the job writes
        if pending:
            pq.write_table(pa.concat_tables(pending), f"{out_dir}/part-{len(os.listdir(out_dir)):05d}.parquet")
            pending.clear()

    for row in shard_rows(manifest, list(ec.splits)):
        for table in encoder({"entry": [row["entry"]], "split": [row["split"]]}):
            pending.append(table)
            rows[row["split"]] = rows.get(row["split"], 0) + table.num_rows
            if sum(t.num_rows for t in pending) >= ROWS_PER_FILE:
                flush()
    flush()
    return rows


def fixed_cost(written: list[tuple[float, int]]) -> tuple[float, float | None]:
    """(fixed seconds, steady rows/s) of a job from (seconds, rows written) as its files appeared: the
    rate between the first file and the last, and the start-up that rate leaves unexplained (the job's
    start to its first row, extrapolated back). None when fewer than two files appeared."""
    if len(written) < 2 or written[-1][0] <= written[0][0]:
        return 0.0, None
    (t0, r0), (t1, r1) = written[0], written[-1]
    rate = (r1 - r0) / (t1 - t0)
    return max(t0 - r0 / rate, 0.0), rate


def shard_rows_of(cfg: Config) -> int:
    """The rows of the shards' first shard: a table file per shard, for timing."""
    return max(1, read_manifest(cfg.data.shards_dir).split(cfg.encode.splits[0]).shards[0].num_samples)


def bench_encode(cfg: Config, checkpoint: str, echo: Callable[[str], None] = print,
                 query_repeats: int = 20) -> dict[str, float]:
    from vaedist.encode import encode
    from vaedist.analyses import connect, loss_by_digit
    from vaedist.cluster import init_ray

    ec = cfg.encode
    echo(f"checkpoint {checkpoint}; S={ec.num_samples_mc}, K={ec.num_samples_iw}, batch {ec.batch_size}, "
         f"{ec.concurrency} actor(s) x {ec.cpus_per_actor:g} CPU")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        rows = plain_encode(cfg, checkpoint, tmp)
        plain_s = time.perf_counter() - start
        total = sum(rows.values())
        echo(f"(b) plain single-process PyTorch loop + pyarrow: {total / plain_s:,.0f} rows/s ({plain_s:.1f} s)")
        # Ray starts after (b), which so runs without Ray's idle processes beside it, and before (a)'s
        # timing: a job is normally submitted to a running cluster.
        init_ray(cfg.scaling.address)
        start = time.perf_counter()
        # Files of a shard's rows (not the default 20,000): points enough to time the job's progress.
        result = encode(cfg, checkpoint=checkpoint, out=f"{tmp}/latents", rows_per_file=shard_rows_of(cfg))
        ray_s = time.perf_counter() - start
        echo(f"(a) Ray Data encode job (verify + publish included): {total / ray_s:,.0f} rows/s ({ray_s:.1f} s)")
        fixed, steady = fixed_cost(result.written)
        if steady:
            echo(f"    of which fixed cost {fixed:.1f} s (job start to its first rows, extrapolated from the files as "
                 f"they appeared) and steady {steady:,.0f} rows/s: steady (a)/(b) {steady * plain_s / total:.3f}")
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
