"""`vaedist data prepare` for your own images: a Ray Data job from a folder, WebDataset shards or
arrays to vaedist's shards (the built-in datasets keep their own single-process path, data.shards).

    vaedist data prepare --source images --path /data/cats --image-size 32 32 --channels 3 --out outputs/shards-cats
    manifest = prepare_external(cfg, "outputs/shards-cats")

The driver lists the items and cuts them into tasks (data.external: sorted files, shard URLs, array
rows; errors such as an empty folder come here, before any work); Ray Data decodes and transforms
the tasks in parallel over the cluster's CPUs (from_items of the tasks, then map_batches, one task
per call) and hands the batches back in task order (preserve_order), block by block; the driver
writes them with the same shard writer as the built-ins (data.external.writer), a shard at a time.
Rows are numbered in that order, so the bytes are the same on any number of workers. The driver
never holds more than a shard per split and a block or two in flight: its memory does not grow
with the number of images (README, Performance).
"""

from __future__ import annotations

import gc
import json
import logging
from typing import Callable

import numpy as np

from vaedist.config import Config
from vaedist.console import LineProgress
from vaedist.data.common import DataError
from vaedist.data.external import ImageTransform, open_source
from vaedist.data.external.writer import ShardAssembler

_RUNNERS = {"images": ("vaedist.data.external.folder", "ImageFolderSource"),
            "webdataset": ("vaedist.data.external.webdataset", "WebDatasetSource"),
            "arrays": ("vaedist.data.external.arrays", "ArraySource")}


def _run_task(kind: str):
    import importlib

    module, name = _RUNNERS[kind]
    return getattr(importlib.import_module(module), name).run_task


def _decode_batch(batch: dict[str, np.ndarray], kind: str, transform: ImageTransform,
                  skip_bad: bool) -> dict[str, np.ndarray]:
    """map_batches: one task (batch_size=1) -> its decoded rows."""
    (task,) = batch["task"]
    return _run_task(kind)(json.loads(task), transform, skip_bad)


def _data_error(error: BaseException) -> DataError | None:
    """The DataError a decode task raised, out of Ray's wrappers (RayTaskError, UserCodeException)."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, DataError):
            cause = getattr(e, "cause", None)  # RayTaskError(DataError) is both; its .cause has the message
            return cause if isinstance(cause, DataError) else DataError(str(e).strip().splitlines()[-1])
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def prepare_external(cfg: Config, out: str | None = None, progress: bool = True, use_ray: bool = True,
                     echo: Callable[[str], None] | None = None) -> dict:
    """Write cfg.data.source's images (images, webdataset, arrays) as shards + manifest into `out`
    (default data.shards_dir); returns the manifest. use_ray=False runs the same tasks in a plain loop
    in this process (the benchmark's baseline)."""
    from vaedist import storage

    d = cfg.data
    out = storage.absolute(out or d.shards_dir)
    source = open_source(d)
    transform = ImageTransform.from_config(d)
    plan = source.plan()
    if echo:
        what = f"{plan.num_items:,} images" if plan.num_items is not None else f"{len(plan.tasks):,} shards"
        echo(f"{plan.kind} {plan.location}: {what} in {len(plan.tasks):,} tasks")
    writer = ShardAssembler(out, d.samples_per_shard)
    total = plan.num_items if plan.num_items is not None else len(plan.tasks)
    try:
        with LineProgress(total, f"prepare {plan.name}", plan.progress_unit, progress) as bar:
            for batch in (_ray_batches(cfg, plan) if use_ray else _local_batches(plan, transform, d.skip_bad_images)):
                rows = writer.add(batch)
                bar.update(rows if plan.num_items is not None else 1)
        manifest = writer.finish(plan, transform)
    except BaseException:
        writer.abandon()
        raise
    return manifest


def _local_batches(plan, transform: ImageTransform, skip_bad: bool):
    run = _run_task(plan.kind)
    for task in plan.tasks:
        yield run(task, transform, skip_bad)


def _ray_batches(cfg: Config, plan):
    import ray
    from ray.data import DataContext

    from vaedist.cluster import init_ray
    from vaedist.console import is_verbose

    init_ray(cfg.scaling.address)
    ctx = DataContext.get_current()
    kept = ctx.execution_options.preserve_order, ctx.raise_original_map_exception
    ctx.execution_options.preserve_order = True  # blocks come back in task order: the rows' order
    ctx.raise_original_map_exception = True  # a task's DataError reaches us as one, with its message
    # Ray Data logs a failed task's traceback as ERROR lines; the DataError below says it in one.
    data_log = logging.getLogger("ray.data")
    kept_level = data_log.level
    if not is_verbose():
        data_log.setLevel(logging.CRITICAL)
    try:
        ds = (ray.data.from_items([{"task": json.dumps(t, separators=(",", ":"))} for t in plan.tasks],
                                  override_num_blocks=len(plan.tasks))
              .map_batches(_decode_batch, batch_size=1, num_cpus=1,
                           fn_kwargs={"kind": plan.kind, "transform": ImageTransform.from_config(cfg.data),
                                      "skip_bad": cfg.data.skip_bad_images}))
        message = None
        try:
            yield from ds.iter_batches(batch_size=None, batch_format="numpy")
        except Exception as e:
            found = _data_error(e)
            if found is None:
                raise
            message = str(found).splitlines()[0]  # Ray appends its retry advice, which is not ours
        if message is not None:
            # Raised afresh: the original's traceback holds Ray Data's operators (and their workers).
            gc.collect()
            raise DataError(message)
    finally:
        ctx.execution_options.preserve_order, ctx.raise_original_map_exception = kept
        data_log.setLevel(kept_level)
