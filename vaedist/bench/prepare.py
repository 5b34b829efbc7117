"""`vaedist bench prepare`: the prepare job for your own images against a plain loop, in one run.

    vaedist bench prepare --images 20000 --rss 10000,200000 --work /tmp/vaedist-bench-prepare

The images are MNIST's and Fashion-MNIST's (70,000 each; beyond 140,000 they repeat under new
names), written once under --work (never into the repository) as
(1) a folder of PNG files, class subfolders (digits, then clothes as classes 10-19), and
(2) WebDataset shards of the same images as JPEG (quality 95, 1,000 per shard) with a cls label.
Both are read once, untimed, so that both measurements find them in the page cache. For each: (b) a
plain single-process loop (the job's own decode tasks one after another in this
process, then the same shard writer: prepare_external(use_ray=False)), measured before Ray starts,
then (a) the Ray Data job on an embedded Ray of --cpus CPUs (started beforehand and warmed by an
untimed job on 1,000 other files, so Ray's start and its workers' imports are not counted): images/s and the ratio (a)/(b). Then (3) the driver's peak RSS (VmHWM) of the Ray job
on PNG folders of each --rss size, each in a fresh process, with the ratio largest/smallest.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np


def _source_images(count: int, mnist_dir: str | None, fashion_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
    from vaedist.config import load_config
    from vaedist.data import load_idx

    data = load_config(None).data
    mnist_dir = mnist_dir or data.resolved_mnist_dir()
    fashion_dir = fashion_dir or os.environ.get("VAEDIST_FASHION_MNIST_DIR")
    parts = []
    for dataset, where, offset in (("mnist", mnist_dir, 0), ("fashion-mnist", fashion_dir, 10)):
        if where is None:
            continue
        for split in ("train", "test"):
            images, labels, _ = load_idx(dataset, split, where)
            parts.append((images, labels.astype(np.int64) + offset))
    if not parts:
        from vaedist.config import ConfigError

        raise ConfigError("bench prepare makes its images from MNIST's (and Fashion-MNIST's) IDX files and found "
                          "neither: give --mnist-dir or set VAEDIST_MNIST_DIR")
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    reps = -(-count // len(images))
    return np.tile(images, (reps, 1, 1))[:count], np.tile(labels, reps)[:count]


def write_png_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    if (root / "_complete").exists() and int((root / "_complete").read_text()) == len(images):
        return
    for i, (image, label) in enumerate(zip(images, labels)):
        path = root / f"{label:02d}" / f"{i:07d}.png"
        if i == 0 or i % 1000 == 0:
            for c in set(labels.tolist()):
                (root / f"{c:02d}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    (root / "_complete").write_text(str(len(images)))


def write_jpeg_shards(root: Path, images: np.ndarray, labels: np.ndarray, per_shard: int = 1000) -> int:
    from PIL import Image

    count = -(-len(images) // per_shard)
    if (root / "_complete").exists() and int((root / "_complete").read_text()) == len(images):
        return count
    root.mkdir(parents=True, exist_ok=True)
    for s in range(count):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(s * per_shard, min((s + 1) * per_shard, len(images))):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="JPEG", quality=95)
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(labels[i]).encode())):
                    info = tarfile.TarInfo(f"{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "_complete").write_text(str(len(images)))
    return count


def start_ray(cpus: int, attempts: int = 3) -> None:
    """An embedded Ray; on a machine too busy for its raylet to register within Ray's fixed 30 s, again."""
    import ray

    from vaedist.cluster import init_ray

    for attempt in range(attempts):
        try:
            init_ray(None, num_cpus=cpus)
            return
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == attempts - 1:
                raise
            ray.shutdown()


def _timed_prepare(overrides: list[str], out: str, use_ray: bool) -> float:
    from vaedist.config import load_config
    from vaedist.prepare import prepare_external

    cfg = load_config(None, overrides)
    start = time.perf_counter()
    prepare_external(cfg, out, progress=False, use_ray=use_ray)
    return time.perf_counter() - start


_RSS_CHILD = """
import json, resource, sys, time
from vaedist.bench.prepare import start_ray
from vaedist.config import load_config
from vaedist.prepare import prepare_external
start_ray(int(sys.argv[3]))
before = int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])
start = time.perf_counter()
prepare_external(load_config(None, ['data.source=images', 'data.source_path=' + sys.argv[1]]), sys.argv[2],
                 progress=False)
seconds = time.perf_counter() - start
status = open('/proc/self/status').read()
print(json.dumps({'peak_kib': int(status.split('VmHWM:')[1].split()[0]), 'after_ray_start_kib': before,
                  'seconds': seconds}))
import ray; ray.shutdown()
"""


def bench_prepare(images: int = 20000, rss_sizes: tuple[int, ...] = (10000, 200000), cpus: int = 2,
                  work: str = "/tmp/vaedist-bench-prepare", mnist_dir: str | None = None,
                  fashion_dir: str | None = None, echo: Callable[[str], None] = print) -> dict:
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    largest = max([images, *rss_sizes])
    pixels, labels = _source_images(largest, mnist_dir, fashion_dir)
    start = time.perf_counter()
    png = work_dir / f"png-{images}"
    write_png_folder(png, pixels[:images], labels[:images])
    shards = work_dir / f"jpeg-shards-{images}"
    num_shards = write_jpeg_shards(shards, pixels[:images], labels[:images])
    echo(f"inputs: {images:,} PNG files in {png}, the same as JPEG in {num_shards} WebDataset shards in {shards} "
         f"({time.perf_counter() - start:.0f} s to write)")
    # Every input file read once, untimed: (b) runs first and would otherwise pay the disk reads
    # that (a) then finds in the page cache (session 7 measured PNG's loop 2.8x slower so).
    warm_bytes = sum(len(p.read_bytes()) for root in (png, shards) for p in root.rglob("*") if p.is_file())
    echo(f"page cache warmed: {warm_bytes / 2**20:,.0f} MiB of inputs read once before the clocks")
    cases = {"PNG folder": ["data.source=images", f"data.source_path={png}"],
             "JPEG WebDataset shards": ["data.source=webdataset", f"data.source_path={shards}/",
                                        "data.test_fraction=0.1"]}
    results: dict = {"images": images, "cpus": cpus, "cases": {}}
    for name, overrides in cases.items():  # (b) before Ray starts: nothing of Ray idles beside it
        seconds = _timed_prepare(overrides, str(work_dir / "out-loop"), use_ray=False)
        results["cases"][name] = {"loop_images_per_s": images / seconds, "loop_s": seconds}
        echo(f"(b) plain loop, {name}: {images / seconds:,.0f} images/s ({seconds:.1f} s)")
    start_ray(cpus)
    # Untimed: Ray's worker processes start and import the decode code once, as in any long job.
    warm = work_dir / "png-warm"
    write_png_folder(warm, pixels[:1000], labels[:1000])
    _timed_prepare(["data.source=images", f"data.source_path={warm}"], str(work_dir / "out-warm"), use_ray=True)
    for name, overrides in cases.items():
        seconds = _timed_prepare(overrides, str(work_dir / "out-ray"), use_ray=True)
        entry = results["cases"][name]
        entry.update(ray_images_per_s=images / seconds, ray_s=seconds,
                     ratio=(images / seconds) / entry["loop_images_per_s"])
        echo(f"(a) Ray Data job ({cpus} CPUs), {name}: {images / seconds:,.0f} images/s ({seconds:.1f} s), "
             f"ratio (a)/(b) {entry['ratio']:.2f}")
    import ray

    ray.shutdown()
    results["rss"] = {}
    for size in rss_sizes:
        folder = work_dir / f"png-{size}"
        write_png_folder(folder, pixels[:size], labels[:size])
        child = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(folder), str(work_dir / f"out-rss-{size}"),
                                str(cpus)], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"the RSS run on {size} images failed:\n{child.stderr[-2000:]}")
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        results["rss"][size] = measured
        echo(f"(3) driver peak RSS, {size:,} PNG files: {measured['peak_kib'] / 1024:,.0f} MiB "
             f"({measured['after_ray_start_kib'] / 1024:,.0f} MiB after Ray's start; {size / measured['seconds']:,.0f} "
             f"images/s)")
    if len(rss_sizes) > 1:
        small, large = min(rss_sizes), max(rss_sizes)
        ratio = results["rss"][large]["peak_kib"] / results["rss"][small]["peak_kib"]
        results["rss_ratio"] = ratio
        echo(f"peak RSS {large:,} / {small:,} images: {ratio:.3f}")
    return results
