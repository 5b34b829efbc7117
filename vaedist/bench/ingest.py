"""`vaedist bench ingest`: how training gets its images, measured in one run.

    vaedist bench ingest --config configs/mnist.yaml [--large-shards outputs/shards-mnist8m]

(1) readers: the training shards streamed through Ray Data three ways, rows/s once its workers are
    up: ray.data.read_webdataset with its default decoders; read_webdataset(decoder=None) + np.load
    per row; vaedist's stream_dataset (shard paths -> the project's vectorised decoder).
(2) training: one worker, `memory` vs `stream` ingest, samples/s of the epochs after the first, and
    where the CPU went during the stream run (the training worker, Ray Data's split coordinator and
    decode tasks, the rest of Ray), sampled from /proc.
(3) with --large-shards: the training worker's peak RSS in both modes on the default shards and on a
    larger set (mnist8m): `stream` stays flat, `memory` grows with the data.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from vaedist import storage
from vaedist.config import Config, config_from_dict
from vaedist.data import read_manifest

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------
# Where the CPU goes, and the training worker's memory, from /proc.

def _category(title: str) -> str | None:
    """Which side a process is on, by its title; None for processes that are not Ray's."""
    if "RayTrainWorker" in title:
        return "training worker"
    if any(name in title for name in ("SplitCoordinator", "decode_shards", "MapBatches", "ReadWebDataset")):
        return "Ray Data"
    if "ray::" in title or "raylet" in title or "gcs_server" in title or "/ray/" in title:
        return "other Ray"
    return None


class ProcSampler:
    """Every `interval` s: CPU seconds per category of process (by the title Ray gives each), and the
    peak resident memory (VmHWM) of the training worker."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.cpu: dict[str, float] = {}
        self.worker_peak_rss = 0
        self._last: dict[int, float] = {}
        self._role: dict[int, str] = {}  # a worker that ran Ray Data's tasks keeps its role when idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = 0.0

    def __enter__(self) -> "ProcSampler":
        self.started = time.perf_counter()
        self._sample(baseline=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self.started

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self, baseline: bool = False) -> None:
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            pid = int(entry)
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
                status = Path(f"/proc/{pid}/status").read_text() if "RayTrainWorker" in title else ""
            except (OSError, IndexError, ValueError):
                continue
            category = _category(title)
            if category is None:
                continue
            if category != "other Ray" or pid not in self._role:
                self._role[pid] = category
            delta = 0.0 if baseline else cpu - self._last.get(pid, 0.0)  # a new process: all its CPU
            self._last[pid] = cpu
            self.cpu[self._role[pid]] = self.cpu.get(self._role[pid], 0.0) + max(delta, 0.0)
            for line in status.splitlines():
                if line.startswith("VmHWM:"):
                    self.worker_peak_rss = max(self.worker_peak_rss, int(line.split()[1]) * 1024)

    def cores(self, category: str) -> float:
        return self.cpu.get(category, 0.0) / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------
# (1) Readers.

def _count_rows(ds) -> int:
    return sum(len(batch["__key__"] if "__key__" in batch else batch["index"])
               for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"))


def bench_readers(shards_dir: str, echo: Callable[[str], None] = print, repeats: int = 2) -> dict[str, float]:
    import ray

    from vaedist.ingest import stream_dataset

    manifest = read_manifest(shards_dir)
    shards = manifest.split("train").shards
    paths = [storage.join(shards_dir, s.path) for s in shards]
    info = manifest.dataset

    def np_load(batch):
        import io

        return {"index": batch["__key__"], "image": np.stack([np.load(io.BytesIO(b)).reshape(-1) for b in batch["npy"]])}

    readers = {
        "ray.data.read_webdataset (default decoders)": lambda: ray.data.read_webdataset(paths),
        "ray.data.read_webdataset(decoder=None) + np.load": lambda: ray.data.read_webdataset(
            paths, decoder=None).map_batches(np_load, batch_size=1024),
        "vaedist stream_dataset (from_items + fast decoder)": lambda: stream_dataset(shards_dir, shards, info, seed=0),
    }
    rates = {}
    for name, make in readers.items():
        _count_rows(make())  # warm-up: Ray Data's workers start and import once
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            rows = _count_rows(make())
            times.append(time.perf_counter() - start)
        rates[name] = rows / min(times)
        echo(f"  {name}: {rates[name]:,.0f} rows/s ({rows:,} rows, best of {repeats})")
    return rates


# ---------------------------------------------------------------------------------------------
# (2) and (3) Training with each ingest.

def _train_run(cfg: Config, ingest: str, shards_dir: str, epochs: int, max_steps: int = 0) -> tuple[list[dict], ProcSampler]:
    from vaedist.train import train

    dataset = read_manifest(shards_dir).dataset.name  # the large set is another dataset (mnist8m)
    with tempfile.TemporaryDirectory() as tmp:
        run_cfg = config_from_dict(cfg.to_dict(), [
            f"data.ingest={ingest}", f"data.shards_dir={shards_dir}", f"data.dataset={dataset}", f"train.epochs={epochs}",
            f"train.max_steps_per_epoch={max_steps}", "train.num_samples_iw_final=0", "train.kl_warmup_epochs=0",
            "scaling.num_workers=1", f"output.storage_path={tmp}", "output.run_name=bench-ingest",
            "data.max_train_shards=0", "data.max_test_shards=1"])
        with ProcSampler() as sampler:
            result = train(run_cfg, echo=lambda line: None)
    return result.epochs, sampler


def _steady(rows: list[dict]) -> float:
    rest = rows[1:] or rows
    return statistics.mean(r["samples_per_s"] for r in rest)


def bench_ingest(cfg: Config, epochs: int = 3, large_shards: str | None = None, large_steps: int = 100,
                 readers: bool = True, echo: Callable[[str], None] = print) -> dict[str, float]:
    import ray

    from vaedist.cluster import init_ray, is_embedded

    shards_dir = storage.absolute(cfg.data.shards_dir)
    out: dict[str, float] = {}
    init_ray(cfg.scaling.address)
    if readers:
        echo(f"(1) streaming the training shards of {shards_dir} through Ray Data:")
        out.update({f"reader {k}": v for k, v in bench_readers(shards_dir, echo).items()})
    echo(f"(2) training, 1 worker x {cfg.scaling.cpus_per_worker:g} CPUs, {epochs} epochs, samples/s after the first:")
    runs = {}
    for ingest in ("memory", "stream"):
        if is_embedded(cfg.scaling.address):  # each run starts from a fresh Ray, as a user's would
            ray.shutdown()
        rows, sampler = _train_run(cfg, ingest, shards_dir, epochs)
        runs[ingest] = (rows, sampler)
        cpu = ", ".join(f"{k} {sampler.cores(k):.2f}" for k in ("training worker", "Ray Data", "other Ray"))
        per_epoch = ", ".join(f"{r['samples_per_s']:,.0f}" for r in rows)
        echo(f"  {ingest}: {_steady(rows):,.0f} samples/s (per epoch: {per_epoch}); cores busy over the run: {cpu}")
    ratio = _steady(runs["stream"][0]) / _steady(runs["memory"][0])
    echo(f"  ratio stream/memory: {ratio:.3f}; Ray Data used {runs['stream'][1].cores('Ray Data'):.2f} of a core "
         f"while streaming")
    out.update(stream_samples_per_s=_steady(runs["stream"][0]), memory_samples_per_s=_steady(runs["memory"][0]),
               ratio=ratio, ray_data_cores=runs["stream"][1].cores("Ray Data"))
    if large_shards:
        large_shards = storage.absolute(large_shards)
        n_large = read_manifest(large_shards).split("train").num_samples
        n_small = read_manifest(shards_dir).split("train").num_samples
        echo(f"(3) the training worker's peak RSS, {large_steps} steps of one epoch:")
        for ingest in ("memory", "stream"):
            peaks = []
            for label, path in ((f"{n_small:,} images", shards_dir), (f"{n_large:,} images", large_shards)):
                if is_embedded(cfg.scaling.address):
                    ray.shutdown()
                _, sampler = _train_run(cfg, ingest, path, 1, large_steps)
                peaks.append(sampler.worker_peak_rss)
                echo(f"  {ingest}, {label}: {sampler.worker_peak_rss / 2**20:,.0f} MiB")
            growth = peaks[1] / max(peaks[0], 1)
            echo(f"  {ingest}: peak on the large set / on the small one = {growth:.3f}")
            out[f"{ingest}_rss_growth"] = growth
    if is_embedded(cfg.scaling.address):
        ray.shutdown()
    return out
