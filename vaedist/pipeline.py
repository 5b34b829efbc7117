"""The main job, end to end: shards -> Ray Train -> Ray Data encode -> loss-by-digit summary -> report.

    vaedist run --config configs/quickstart.yaml --mnist-dir ../shared/data/mnist
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/debug.yaml
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vaedist import storage
from vaedist.config import Config
from vaedist.data import DataError, prepare_shards, verify_shards


@dataclass
class PipelineResult:
    shards_dir: str
    run_dir: str
    checkpoint: str
    latents_dir: str
    report: str
    summary: str


def prepare_from_config(cfg: Config, out: str | None = None, progress: bool = True) -> dict:
    """`vaedist data prepare`: write cfg.data.dataset's shards (to `out`, default data.shards_dir), or
    for data.source images / webdataset / arrays, run the Ray Data prepare job (vaedist.prepare)."""
    d = cfg.data
    if d.source != "builtin":
        from vaedist.prepare import prepare_external

        return prepare_external(cfg, out, progress=progress)
    return prepare_shards(out or d.shards_dir, d.dataset, source_dir=d.resolved_source_dir(),
                          download_dir=d.download_dir, samples_per_shard=d.samples_per_shard,
                          variants=d.mnist8m_variants, progress=progress)


def ensure_shards(cfg: Config, echo: Callable[[str], None]) -> str:
    """Reuse shards that verify against their manifest; otherwise (re)write them."""
    shards_dir = storage.absolute(cfg.data.shards_dir)
    if storage.exists(storage.join(shards_dir, "manifest.json")):
        try:
            verify_shards(shards_dir)
            echo(f"[1/5] shards: {shards_dir} verified, reusing them")
            return shards_dir
        except DataError as e:
            echo(f"[1/5] shards: {e}; writing them again")
    what = cfg.data.dataset if cfg.data.source == "builtin" else f"{cfg.data.source} {cfg.data.source_path}"
    echo(f"[1/5] shards: writing {what} to {shards_dir}")
    prepare_from_config(cfg, shards_dir)
    return shards_dir


def run_pipeline(cfg: Config, echo: Callable[[str], None] = print) -> PipelineResult:
    from vaedist.encode import encode
    from vaedist.analyses import format_table, loss_by_digit
    from vaedist.report import write_report
    from vaedist.tracking import check_uri, log_encode, resolve_uri
    from vaedist.train import train

    tracking_uri = resolve_uri(cfg)
    if tracking_uri:  # before the shards, which can take longer than the training
        check_uri(tracking_uri, cfg.tracking.experiment)
    shards_dir = ensure_shards(cfg, echo)
    echo(f"[2/5] train: run {cfg.output.run_name}, {cfg.train.epochs} epochs, {cfg.scaling.num_workers} worker(s)")
    trained = train(cfg, echo=lambda line: echo("      " + line))
    checkpoint = trained.best_checkpoint
    echo(f"[3/5] encode: {checkpoint} -> {cfg.output.latents_dir}")
    encoded = encode(cfg, checkpoint=checkpoint, echo=lambda line: echo("      " + line))
    echo(f"      {sum(encoded.rows.values())} rows in {encoded.seconds:.1f} s ({encoded.rows_per_s:,.0f} rows/s)")
    summary = format_table(loss_by_digit(encoded.path, split="test"), "table")
    echo("[4/5] test-set loss by digit (nats):\n" + summary)
    report = write_report(encoded.path, storage.absolute(cfg.output.report_dir), checkpoint=checkpoint,
                          shards_dir=shards_dir)
    echo(f"[5/5] report: {report}")
    log_encode(tracking_uri, encoded.path, experiment=cfg.tracking.experiment, report_dir=report)
    return PipelineResult(shards_dir, trained.run_dir, checkpoint, encoded.path, report, summary)
