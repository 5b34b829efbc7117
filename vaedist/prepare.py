"""`vaedist data prepare` for your own images: a Ray Data job from a folder, WebDataset shards or
arrays to vaedist's shards (the built-in datasets keep their own single-process path, data.shards).

    vaedist data prepare --source images --path /data/cats --image-size 32 32 --channels 3 --out outputs/shards-cats
    manifest = prepare_external(cfg, "outputs/shards-cats")

The driver lists the items and cuts them into tasks (data.external: sorted files, shard URLs, array
rows; errors such as an empty folder come here, before any work); Ray Data decodes and transforms
the tasks in parallel over the cluster's CPUs (from_items of runs of consecutive tasks, then
map_batches, one run per call, blocks of about a MiB: see task_groups) and hands the batches back in
task order (preserve_order), block by block; the driver writes them with the same shard writer as
the built-ins (data.external.writer), a shard at a time. Rows are numbered in that order, so the bytes are the same on any number of workers. The driver
never holds more than the plan (the file list), a shard per split and a block or two in flight: its
memory grows only by the plan with the number of images (docs: performance).
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
from vaedist.data.external import ImageTransform, concat_batches, open_source
from vaedist.data.external.transform import bomb_guard
from vaedist.data.external.writer import ShardAssembler
from vaedist.registry import source_class

def _run_task(kind: str):
    return source_class(kind).run_task


# A Ray Data task and each block it outputs cost the driver and the cluster ~10-30 ms however small
# (scheduling, moving and converting the block); with the source's tasks of ~0.1 s each that took a
# third of the machine (docs: performance). So each Ray Data task runs a run of consecutive source
# tasks (at most GROUP_MAX, and few enough that every CPU still gets GROUP_SPREAD runs to balance the
# load), and outputs their rows as blocks of BLOCK_BYTES of images or more (the last one less),
# concatenated here rather than by Ray Data's block shaping, so that images of two shapes stop the
# job with a DataError naming two of them instead of becoming a ragged tensor column.
GROUP_MAX = 8
GROUP_SPREAD = 4
BLOCK_BYTES = 1 << 20
# Ray Data's operator resource reservation budgets each operator's CPUs from its view of the cluster,
# which it first gets ~1 s into a job (one task runs alone meanwhile), and sees a finished task's CPU
# free only a scheduling round (0.1 s) or two later: ~0.15 s idle per task per CPU, a sixth of this job
# on 2 CPUs. It exists to share the cluster between a pipeline's operators, and this job has one. So
# it is off here; the job keeps QUEUED_PER_CPU tasks per CPU submitted instead (Ray starts the next
# the moment a CPU frees), and the driver prefetches PREFETCH_PER_TASK blocks per task in flight:
# Ray Data's downstream-capacity backpressure, which still bounds the blocks waiting for the driver,
# allows twice what the driver prefetches, and blocks that preserve_order holds back behind a slower
# task would otherwise stop new tasks (docs: performance).
QUEUED_PER_CPU = 2
PREFETCH_PER_TASK = 2


def task_groups(tasks: list[dict], cpus: int) -> list[list[dict]]:
    """The source's tasks, in order, cut into runs of consecutive tasks (one Ray Data task each)."""
    size = max(1, min(GROUP_MAX, len(tasks) // max(1, GROUP_SPREAD * cpus)))
    return [tasks[i:i + size] for i in range(0, len(tasks), size)]


def _decode_group(batch: dict[str, np.ndarray], kind: str, transform: ImageTransform, skip_bad: bool):
    """map_batches: one group of source tasks (batch_size=1) -> their decoded rows, in batches of at
    least BLOCK_BYTES of images (Ray Data's target block size for this job, so it keeps them whole)."""
    (group,) = batch["tasks"]
    run = _run_task(kind)
    pending, pending_bytes = [], 0
    for task in json.loads(group):
        with bomb_guard():  # once per task, not per image; not held across the yields
            pending.append(run(task, transform, skip_bad))
        pending_bytes += pending[-1]["image"].nbytes
        if pending_bytes >= BLOCK_BYTES:
            yield concat_batches(pending)
            pending, pending_bytes = [], 0
    if pending:
        yield concat_batches(pending)


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
        with bomb_guard():
            batch = run(task, transform, skip_bad)
        yield batch


def _ray_batches(cfg: Config, plan):
    import ray
    from ray.data import DataContext

    from vaedist.cluster import init_ray
    from vaedist.console import is_verbose

    init_ray(cfg.scaling.address)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    groups = task_groups(plan.tasks, cpus)
    in_flight = max(1, min(QUEUED_PER_CPU * cpus, len(groups)))  # Ray Data warns of a cap above the tasks
    ctx = DataContext.get_current()
    kept = (ctx.execution_options.preserve_order, ctx.raise_original_map_exception, ctx.target_max_block_size,
            ctx.op_resource_reservation_enabled)
    ctx.target_max_block_size = BLOCK_BYTES
    ctx.op_resource_reservation_enabled = False
    ctx.execution_options.preserve_order = True  # blocks come back in task order: the rows' order
    ctx.raise_original_map_exception = True  # a task's DataError reaches us as one, with its message
    # Ray Data logs a failed task's traceback as ERROR lines; the DataError below says it in one.
    data_log = logging.getLogger("ray.data")
    kept_level = data_log.level
    if not is_verbose():
        data_log.setLevel(logging.CRITICAL)
    try:
        ds = (ray.data.from_items([{"tasks": json.dumps(g, separators=(",", ":"))} for g in groups],
                                  override_num_blocks=len(groups))
              .map_batches(_decode_group, batch_size=1, num_cpus=1,
                           compute=ray.data.TaskPoolStrategy(size=in_flight),
                           fn_kwargs={"kind": plan.kind, "transform": ImageTransform.from_config(cfg.data),
                                      "skip_bad": cfg.data.skip_bad_images}))
        message = None
        try:
            yield from ds.iter_batches(batch_size=None, batch_format="numpy",
                                       prefetch_batches=PREFETCH_PER_TASK * in_flight)
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
        (ctx.execution_options.preserve_order, ctx.raise_original_map_exception, ctx.target_max_block_size,
         ctx.op_resource_reservation_enabled) = kept
        data_log.setLevel(kept_level)
