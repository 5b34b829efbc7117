"""The `vaedist` command: a thin click group; each command parses arguments and calls one function.

    vaedist run --mnist-dir /data/mnist          # the whole pipeline on an embedded Ray
    vaedist data prepare --mnist-dir /data/mnist
    vaedist train --config configs/debug.yaml --set train.lr=3e-4
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from vaedist.config import MNIST_DIR_ENV, Config, ConfigError, load_config
from vaedist.registry import DATA_SOURCES

EXAMPLES = """
\b
Examples:
  vaedist run --mnist-dir /data/mnist      # prepare -> train -> encode -> summary -> report
  vaedist data prepare --config configs/debug.yaml
  vaedist data verify
  vaedist train --config configs/debug.yaml --set scaling.num_workers=2
  vaedist encode --config configs/debug.yaml
  vaedist query loss-by-digit --split test
  vaedist query sql "SELECT label, avg(loss) FROM latents GROUP BY label"
  vaedist config show --config configs/mnist.yaml
"""


def config_options(fn: Callable) -> Callable:
    """--config / --set / --mnist-dir, also readable from VAEDIST_CONFIG / VAEDIST_SET / VAEDIST_MNIST_DIR."""
    fn = click.option("--mnist-dir", envvar=MNIST_DIR_ENV, type=click.Path(file_okay=False),
                      help=f"Local directory of MNIST IDX files (gz or raw) [env {MNIST_DIR_ENV}]; "
                           "without it torchvision downloads MNIST.")(fn)
    fn = click.option("--set", "overrides", multiple=True, envvar="VAEDIST_SET", metavar="KEY=VALUE",
                      help="Override a config value, e.g. --set train.lr=3e-4 (repeatable) "
                           "[env VAEDIST_SET, whitespace-separated].")(fn)
    fn = click.option("--config", "config_path", envvar="VAEDIST_CONFIG", type=click.Path(dir_okay=False),
                      help="YAML config (see configs/) [env VAEDIST_CONFIG]; default: built-in defaults.")(fn)
    return fn


address_option = click.option("--address", envvar="RAY_ADDRESS",
                              help="Ray cluster to join [env RAY_ADDRESS]; default: an embedded local Ray.")
verbose_option = click.option("--verbose", "-v", is_flag=True, envvar="VAEDIST_VERBOSE",
                              help="Also show Ray's own log lines, its workers' output and Ray Data's progress "
                                   "(Ray's log files always keep them) [env VAEDIST_VERBOSE=1].")


def resolve_config(config_path: str | None, overrides: tuple[str, ...], mnist_dir: str | None = None,
                   address: str | None = None) -> Config:
    """Defaults < YAML < --set, then the dedicated options (--mnist-dir, --address) on top."""
    items = list(overrides)
    if mnist_dir:
        items.append(f"data.mnist_dir={mnist_dir}")
    if address:
        items.append(f"scaling.address={address}")
    try:
        return load_config(config_path, items)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our own input errors (bad data, config, checkpoint) into one clean line and exit code 1."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as e:
            if e.name in OPTIONAL_PACKAGES:
                raise click.ClickException(f"this command needs {e.name}, which is not installed here: "
                                           f"{OPTIONAL_PACKAGES[e.name]}") from None
            raise
        except Exception as e:
            if isinstance(e, input_errors()):
                raise click.ClickException(str(e)) from None
            raise
    return wrapper


# Imported only by the commands that use them (a GPU machine without a package index has neither):
# DuckDB by queries, reports and `run`'s summary; MLflow when tracking is on.
OPTIONAL_PACKAGES = {"duckdb": "pip install 'duckdb>=1.0' (queries, reports and `vaedist run` use it)",
                     "mlflow": "pip install 'vaedist[mlflow]', or set tracking.enabled=false"}


def input_errors() -> tuple[type[Exception], ...]:
    """Our own input errors, imported once one is raised. QueryError only where vaedist.analyses was
    imported (only a query can raise it): importing it here would import DuckDB for every command."""
    from vaedist.checkpoint import CheckpointError
    from vaedist.data import DataError
    from vaedist.encode import EncodeError
    from vaedist.errors import ToldError  # a failed training run's TrainingError
    from vaedist.storage import StorageError
    from vaedist.tracking import TrackingError

    query = sys.modules.get("vaedist.analyses.core")
    return (ConfigError, DataError, CheckpointError, EncodeError, StorageError, TrackingError, ToldError,
            FileNotFoundError, FileExistsError, *((query.QueryError,) if query else ()))


@click.group(epilog=EXAMPLES)
@click.version_option(package_name="vaedist")
def cli() -> None:
    """vaedist: distributed VAE training and evaluation on Ray (MNIST -> WebDataset -> Ray Train ->
    Parquet latent tables)."""


# --- the main job -----------------------------------------------------------------------------

@cli.command()
@config_options
@address_option
@verbose_option
@guarded
def run(config_path, overrides, mnist_dir, address, verbose) -> None:
    """The whole pipeline: shards -> train -> encode -> loss-by-digit summary -> report.

    vaedist run --config configs/quickstart.yaml --mnist-dir /data/mnist
    """
    from vaedist.console import set_verbose
    from vaedist.pipeline import run_pipeline

    set_verbose(verbose)
    cfg = resolve_config(config_path, overrides, mnist_dir, address)
    run_pipeline(cfg, echo=click.echo)


# --- data -------------------------------------------------------------------------------------

@cli.group()
def data() -> None:
    """Write and check the WebDataset shards."""


@data.command("prepare")
@config_options
@click.option("--out", help="Shards directory (default: data.shards_dir).")
@click.option("--source", type=click.Choice(DATA_SOURCES),
              help="What to read (data.source): builtin (data.dataset), or your own images, shards or arrays.")
@click.option("--path", "source_path", help="The folder, shard pattern or array file (data.source_path).")
@click.option("--image-size", nargs=2, type=int, metavar="H W", help="Make every image H x W (data.image_size).")
@click.option("--channels", type=click.Choice(["1", "3"]), help="Make every image grey or RGB (data.channels).")
@click.option("--skip-bad-images", is_flag=True, default=None,
              help="Skip files that cannot be decoded, listing them (data.skip_bad_images).")
@click.option("--address", envvar="RAY_ADDRESS",
              help="Ray cluster for the prepare job of your own images [env RAY_ADDRESS]; default: embedded.")
@verbose_option
@guarded
def data_prepare(config_path, overrides, mnist_dir, out, source, source_path, image_size, channels,
                 skip_bad_images, address, verbose) -> None:
    """Write a dataset's train/test splits as WebDataset tar shards plus manifest.json: a built-in
    (data.dataset: mnist, fashion-mnist, mnist8m), or your own images through a Ray Data job
    (data.source: images, webdataset, arrays).

    \b
    vaedist data prepare --mnist-dir /data/mnist --out outputs/shards
    vaedist data prepare --config configs/fashion-mnist.yaml
    vaedist data prepare --set data.dataset=mnist8m --set data.mnist8m_variants=20 --out outputs/shards-1m
    vaedist data prepare --source images --path /data/cats --image-size 32 32 --channels 3 --out outputs/shards-cats
    vaedist data prepare --source webdataset --path 's3://bucket/shards-{000000..000099}.tar' --image-size 64 64
    vaedist data prepare --source arrays --path /data/digits.npz --out outputs/shards-digits
    """
    from vaedist.console import set_verbose
    from vaedist.pipeline import prepare_from_config

    set_verbose(verbose)
    items = list(overrides)
    for key, value in (("source", source), ("source_path", source_path), ("channels", channels and int(channels)),
                       ("image_size", list(image_size) if image_size else None), ("skip_bad_images", skip_bad_images)):
        if value is not None:  # JSON is YAML: a path such as {a,b}.tar stays a string
            items.append(f"data.{key}={json.dumps(value)}")
    cfg = resolve_config(config_path, tuple(items), mnist_dir, address)
    out = out or cfg.data.shards_dir
    manifest = prepare_from_config(cfg, out)
    for split, entry in manifest.splits.items():
        click.echo(f"{split}: {entry.num_samples} datapoints in {len(entry.shards)} shards")
    source_entry = manifest.source
    if source_entry.get("num_skipped"):
        listed = source_entry["skipped"]
        click.echo(f"skipped {source_entry['num_skipped']} file(s) that could not be decoded "
                   f"(data.skip_bad_images; listed in the manifest):")
        for item in listed:
            click.echo(f"  {item['error']}")
        if len(listed) < source_entry["num_skipped"]:
            click.echo(f"  ... and {source_entry['num_skipped'] - len(listed)} more")
    if "transform" in source_entry:
        shape = "x".join(map(str, manifest.dataset.image_shape))
        click.echo(f"{manifest.dataset.name}: images {shape} (H x W x C), "
                   f"{manifest.dataset.num_classes or 'no'} classes")
    click.echo(f"wrote {out}/manifest.json")


@data.command("verify")
@config_options
@click.option("--shards", help="Shards directory (default: data.shards_dir).")
@guarded
def data_verify(config_path, overrides, mnist_dir, shards) -> None:
    """Check every shard against the manifest (presence, size, sha256, decodable samples).

    vaedist data verify --shards outputs/shards
    """
    from vaedist.data import verify_shards

    cfg = resolve_config(config_path, overrides, mnist_dir)
    shards = shards or cfg.data.shards_dir
    summary = verify_shards(shards, progress=True)
    for split, entry in summary.items():
        click.echo(f"{split}: {entry['shards']} shards, {entry['samples']} datapoints OK")
    click.echo(f"{shards}: verified")


# --- train ------------------------------------------------------------------------------------

@cli.command()
@config_options
@address_option
@verbose_option
@guarded
def train(config_path, overrides, mnist_dir, address, verbose) -> None:
    """Train (or resume) a VAE with Ray Train over the shards; a line per epoch as it ends.

    vaedist train --config configs/debug.yaml --set scaling.num_workers=2
    """
    from vaedist.console import set_verbose
    from vaedist.train import train as run_training

    set_verbose(verbose)
    cfg = resolve_config(config_path, overrides, mnist_dir, address)
    result = run_training(cfg, echo=click.echo)
    click.echo(f"run: {result.run_dir}\nbest checkpoint: {result.best_checkpoint}")


@cli.command()
@config_options
@click.option("--grid", multiple=True, metavar="KEY=V1,V2",
              help="A grid axis, e.g. --grid train.lr=1e-3,3e-4 (repeatable; added to sweep.grid, replacing an "
                   "axis of the same key).")
@click.option("--sample", multiple=True, metavar="KEY=DIST",
              help="A sampled key: loguniform(a,b), uniform(a,b), randint(a,b) or choice(v1,v2,...) "
                   "(repeatable; added to sweep.sample).")
@click.option("--num-samples", type=int, help="Draws of the sampled keys (sweep.num_samples).")
@click.option("--name", help="The sweep's name, its directory under output.storage_path (sweep.name).")
@click.option("--scheduler", type=click.Choice(["none", "asha"]), help="asha: stop trials behind on the test loss "
                                                                       "early (sweep.scheduler).")
@click.option("--max-concurrent", type=int, help="Trials at once (sweep.max_concurrent_trials; 0: as many as fit).")
@address_option
@verbose_option
@guarded
def sweep(config_path, overrides, mnist_dir, grid, sample, num_samples, name, scheduler, max_concurrent, address,
          verbose) -> None:
    """Train one run per trial of a grid (and sampled keys) through Ray Tune; rerun to resume.

    \b
    vaedist sweep --config configs/debug.yaml --grid train.lr=1e-3,3e-4 --grid model.latent_dim=8,16
    vaedist sweep --config configs/debug.yaml --sample train.lr="loguniform(1e-4,3e-3)" --num-samples 4
    vaedist sweep --config configs/sweep-mnist.yaml        # the grid in the config's sweep section
    """
    from vaedist.console import set_verbose
    from vaedist.sweep import with_cli
    from vaedist.sweep.tune import run_sweep

    set_verbose(verbose)
    cfg = with_cli(resolve_config(config_path, overrides, mnist_dir, address), grid=list(grid), sample=list(sample),
                   num_samples=num_samples, name=name, scheduler=scheduler, max_concurrent_trials=max_concurrent)
    result = run_sweep(cfg, echo=click.echo)
    counts = ", ".join(f"{result.count(s)} {s}" for s in ("finished", "stopped", "error") if result.count(s))
    click.echo(f"sweep: {result.dir}: {counts}; table {result.dir}/sweep.parquet ({result.seconds:.0f} s)")
    if result.count("error"):
        raise click.ClickException(f"{result.count('error')} trial(s) failed (column error of sweep.parquet); "
                                   "rerun the same command to run them again")


# --- encode -----------------------------------------------------------------------------------

@cli.command()
@config_options
@click.option("--checkpoint", help="Checkpoint dir/file or run dir (default: encode.checkpoint, else the "
              "best checkpoint of output.run_name).")
@click.option("--out", help="Where to publish the latent table (default: output.latents_dir).")
@click.option("--shards", help="Shards to encode (default: data.shards_dir): any data whose images have the shape "
                               "and channels the checkpoint was trained on, not only its training data.")
@click.option("--epochs", help="Encode these kept epochs of the run into one table with an epoch column, "
              "e.g. --epochs 0,4,19 (the run: --checkpoint's run directory, else output.run_name's).")
@click.option("--all-kept", is_flag=True, help="Encode every checkpoint the run kept for good (output.keep_epochs).")
@click.option("--sweep", "sweep_name", help="A sweep (name or directory): encode the test split of its --best K "
                                            "trials, a table per trial under --out (default output.latents_dir-SWEEP).")
@click.option("--best", type=int, default=1, show_default=True, help="With --sweep: how many of the best trials.")
@address_option
@verbose_option
@guarded
def encode(config_path, overrides, mnist_dir, checkpoint, out, shards, epochs, all_kept, sweep_name, best, address,
           verbose) -> None:
    """Encode every datapoint into a Parquet latent table with Ray Data.

    \b
    vaedist encode --config configs/debug.yaml --out outputs/latents-debug
    vaedist encode --config configs/debug.yaml --epochs 0,1 --out outputs/latents-dynamics
    vaedist encode --config configs/fashion-mnist.yaml --shards outputs/shards --out outputs/latents-mnist-by-fashion
    vaedist encode --config configs/debug.yaml --sweep debug-sweep --best 2
    """
    from vaedist.console import set_verbose
    from vaedist.encode import encode as run_encode

    set_verbose(verbose)
    cfg = resolve_config(config_path, overrides, mnist_dir, address)
    if sweep_name:
        from vaedist.sweep import resolve_sweep_dir
        from vaedist.sweep.tune import encode_best

        if checkpoint or epochs or all_kept or shards:
            raise click.UsageError("--sweep encodes its best trials' checkpoints on their own data; leave out "
                                   "--checkpoint, --epochs, --all-kept and --shards")
        for row, result in encode_best(cfg, resolve_sweep_dir(cfg, sweep_name), best, out=out, echo=click.echo):
            click.echo(f"{row['name']} (test l_i {row['test_loss']:.3f}): published {result.path}")
        return
    epoch_list = None
    if epochs:
        try:
            epoch_list = [int(e) for e in epochs.split(",") if e.strip()]
        except ValueError:
            raise click.BadParameter(f"{epochs!r}: expected epochs separated by commas, e.g. 0,4,19",
                                     param_hint="--epochs") from None
    if epoch_list and all_kept:
        raise click.UsageError("give --epochs or --all-kept, not both")
    result = run_encode(cfg, checkpoint=checkpoint, out=out, epochs=epoch_list, all_kept=all_kept, echo=click.echo,
                        shards_dir=shards)
    rows = ", ".join(f"{split} {n}" for split, n in result.rows.items())
    click.echo(f"published {result.path}: {rows} rows ({result.rows_per_s:,.0f} rows/s)")


# --- query and report -----------------------------------------------------------------------------

@cli.command()
@config_options
@click.argument("what")
@click.argument("sql_text", metavar="[SQL]", required=False)
@click.option("--latents", help="The latent table (default: output.latents_dir); table A of compare.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--split", type=click.Choice(["train", "test", "all"]), default=None,
              help="Restrict an analysis to one split (loss-by-digit, gap-by-digit, compare, digit-curves, "
                   "kl-by-group-and-class and kl-by-group-over-epochs default to test, the others to all).")
@click.option("--k", "k", default=10, show_default=True,
              help="Rows for worst / gaps / neighbours / outliers / curves / learned-late / forgotten; "
                   "compare-top shows k of each.")
@click.option("--key", multiple=True, help="The datapoint for neighbours, e.g. test-00042; curves: repeatable.")
@click.option("--space", type=click.Choice(["mu", "z"]), default="mu", show_default=True)
@click.option("--threshold", default=0.01, show_default=True,
              help="active-units, active-units-by-group: a dimension is active when the variance of mu_d over "
                   "datapoints exceeds it.")
@click.option("--against", help="compare / compare-top: table B; delta = l_i(A) - l_i(B), negative where A "
                                "(--latents) explains the datapoint better. ood: the OUT table (--latents is IN).")
@click.option("--epoch", type=int, help="The checkpoint of a table with an epoch column (compare: of both "
                                        "tables unless --against-epoch).")
@click.option("--against-epoch", type=int, help="compare / compare-top: the checkpoint of table B.")
@click.option("--within", default=1.0, show_default=True, help="learned-late: nats from the final l_i.")
@click.option("--after", type=int, help="learned-late: first within --within only after this epoch "
                                        "(default: the first kept epoch).")
@click.option("--by", default=2.0, show_default=True, help="forgotten: rise of l_i in nats.")
@click.option("--from-epoch", type=int, help="forgotten: between these two epochs instead of consecutive ones.")
@click.option("--to-epoch", type=int, help="forgotten: see --from-epoch.")
@click.option("--sweep", "sweep_name", help="Query a sweep's sweep.parquet instead: SQL over the view "
                                            "`sweep` (a row per trial); a sweep name or directory.")
@guarded
def query(config_path, overrides, mnist_dir, what, sql_text, latents, fmt, split, k, key, space, threshold, against,
          epoch, against_epoch, within, after, by, from_epoch, to_epoch, sweep_name) -> None:
    """Run a ready-made analysis of a latent table by name, or SQL over the view `latents`
    (`vaedist query sql "SELECT ..."`). The analyses: loss-by-digit, worst, gaps, neighbours;
    active-units, kl-per-dim, totals, gap-by-digit, outliers; compare, compare-top of two tables;
    ood of one checkpoint's tables of two data; curves, digit-curves, learned-late, forgotten over a
    table of several checkpoints, one with an epoch column; kl-by-group, kl-by-group-and-class,
    active-units-by-group, kl-by-group-over-epochs of a model of several latent groups. An unknown
    name is an error listing them.

    \b
    vaedist query sql "SELECT label, avg(loss) FROM latents GROUP BY label ORDER BY label"
    vaedist query loss-by-digit --split test --format csv
    vaedist query worst --k 5
    vaedist query gaps --k 5
    vaedist query neighbours --key test-00042 --k 5
    vaedist query loss-by-digit --epoch 19 --latents outputs/latents-epochs
    vaedist query active-units --threshold 0.01
    vaedist query totals --split test
    vaedist query outliers --k 10
    vaedist query compare --latents outputs/latents-a --against outputs/latents-b
    vaedist query compare-top --latents outputs/run-epochs --epoch 50 --against outputs/run-epochs --against-epoch 5
    vaedist query ood --latents outputs/latents-fashion-mnist --against outputs/latents-mnist-by-fashion
    vaedist query curves --key test-00042 --key test-00043 --latents outputs/latents-epochs
    vaedist query learned-late --within 1.0 --after 5 --latents outputs/latents-epochs
    vaedist query forgotten --by 2.0 --latents outputs/latents-epochs
    vaedist query kl-by-group --split test --latents outputs/latents-hier-mnist
    vaedist query kl-by-group-and-class --latents outputs/latents-hier-mnist
    vaedist query active-units-by-group --threshold 0.01 --latents outputs/latents-hier-mnist
    vaedist query kl-by-group-over-epochs --latents outputs/latents-hier-epochs
    vaedist query --sweep debug-sweep sql "SELECT name, test_loss FROM sweep ORDER BY test_loss"
    """
    from vaedist import analyses

    # SQL: `sql "SELECT ..."`, or (as before the `sql` word existed) a statement in place of a name.
    if what == "sql":
        if not sql_text:
            raise click.UsageError('sql needs the query, e.g. vaedist query sql "SELECT count(*) FROM latents"')
        sql = sql_text
    elif sql_text is not None:
        raise click.UsageError(f"unexpected argument {sql_text!r}: SQL goes after the word sql "
                               f'(vaedist query sql "SELECT ...")')
    else:
        sql = what if any(c.isspace() for c in what) else None
    if sweep_name:
        from vaedist.sweep import query_sweep, resolve_sweep_dir

        cfg = resolve_config(config_path, overrides, mnist_dir)
        click.echo(analyses.format_table(query_sweep(resolve_sweep_dir(cfg, sweep_name), sql or what), fmt), nl=False)
        return

    analysis = None if sql is not None else analyses.get_analysis(what)
    path = latents or resolve_config(config_path, overrides, mnist_dir).output.latents_dir
    if sql is not None:
        click.echo(analyses.format_table(analyses.run_sql(path, sql), fmt), nl=False)
        return
    if analysis.takes_against and not against:
        raise click.UsageError(f"{what} needs --against, the table to compare --latents with" if what != "ood" else
                               "ood needs --against, the table of data the model was not trained on (OUT); "
                               "--latents is its own kind of data (IN)")
    if what == "neighbours" and len(key) != 1:
        raise click.UsageError("neighbours needs --key, e.g. --key test-00042 (one key)")
    options = dict(k=k, space=space, threshold=threshold, epoch=epoch, against_epoch=against_epoch, within=within,
                   after=after, by=by, from_epoch=from_epoch, to_epoch=to_epoch, keys=list(key) or None,
                   key=key[0] if key else None)
    if split is not None:  # absent: the analysis's own default
        options["split"] = None if split == "all" else split
    table = analysis.run(path, against, **options)
    click.echo(analyses.format_table(table, fmt), nl=False)
    if what == "active-units" and fmt == "table":
        click.echo(f"{sum(table.column('active').to_pylist())} of {table.num_rows} dimensions active "
                   f"(variance of mu_d over datapoints > {threshold:g})")


@cli.command()
@config_options
@click.option("--latents", help="The latent table (default: output.latents_dir); table A of a comparison.")
@click.option("--out", help="Output directory (default: output.report_dir).")
@click.option("--checkpoint", help="Checkpoint for reconstructions and samples (default: the table's lineage).")
@click.option("--against", help="Write comparison.html instead: table B, compared datapoint by datapoint with "
                                "--latents (Δl_i = l_i(A) - l_i(B)); or, for a table of the same checkpoint on "
                                "other data, ood.html (--latents IN, --against OUT).")
@click.option("--epoch", type=int, help="The checkpoint of a table with an epoch column (default: its last); "
                                        "with --against, of both tables unless --against-epoch.")
@click.option("--against-epoch", type=int, help="With --against: the checkpoint of table B.")
@click.option("--sweep", "sweep_name", help="Write sweep.html instead: a sweep's test loss against each swept value, "
                                            "its curves and best trials (a sweep name or directory).")
@guarded
def report(config_path, overrides, mnist_dir, latents, out, checkpoint, against, epoch, against_epoch,
           sweep_name) -> None:
    """Write figures and index.html: reconstructions, prior samples, the latent space, l_i per class,
    the highest-loss images, diagnostics, training curves; and dynamics.html for a table of several
    checkpoints. With --against, a page of two tables instead: comparison.html for the same datapoints
    (two models), ood.html for one checkpoint's encodings of two different data.

    \b
    vaedist report --latents outputs/latents-debug --out outputs/report-debug
    vaedist report --latents outputs/latents-epochs --epoch 5
    vaedist report --latents outputs/latents-a --against outputs/latents-b --out outputs/compare
    vaedist report --latents outputs/latents-fashion-mnist --against outputs/latents-mnist-by-fashion --out outputs/ood
    vaedist report --sweep debug-sweep --out outputs/report-sweep
    """
    from vaedist.analyses import pair_kind
    from vaedist.report import write_comparison, write_ood, write_report

    cfg = resolve_config(config_path, overrides, mnist_dir)
    if sweep_name:
        from vaedist.report.sweep import write_sweep_report
        from vaedist.sweep import resolve_sweep_dir

        if latents or checkpoint or against or epoch is not None or against_epoch is not None:
            raise click.UsageError("--sweep writes the sweep's page alone; leave out --latents, --checkpoint, "
                                   "--against and the epochs")
        sweep_dir = resolve_sweep_dir(cfg, sweep_name)
        out = out or f"{cfg.output.report_dir}-{sweep_dir.rstrip('/').rpartition('/')[2]}"
        click.echo(f"wrote {write_sweep_report(sweep_dir, out)}")
        return
    path, out = latents or cfg.output.latents_dir, out or cfg.output.report_dir
    if against:
        if checkpoint:
            raise click.UsageError("--checkpoint is for the report of one table; leave it out with --against")
        if pair_kind(path, against) == "ood":
            if epoch is not None or against_epoch is not None:
                raise click.UsageError("--epoch and --against-epoch are for a comparison; an out-of-distribution "
                                       "page takes tables of one checkpoint")
            page = write_ood(path, against, out)
        else:
            page = write_comparison(path, against, out, epoch=epoch, against_epoch=against_epoch)
    else:
        if against_epoch is not None:
            raise click.UsageError("--against-epoch needs --against, the table to compare --latents with")
        page = write_report(path, out, checkpoint=checkpoint, epoch=epoch)
    click.echo(f"wrote {page}")


# --- benchmarks ---------------------------------------------------------------------------------

@cli.group()
def bench() -> None:
    """Benchmarks that print ratios against a baseline measured in the same run."""


@bench.command("train")
@config_options
@click.option("--epochs", default=3, show_default=True, help="Epochs for each side.")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Ray runs, each between two plain runs; the ratio is the median.")
@guarded
def bench_train(config_path, overrides, mnist_dir, epochs, repeats) -> None:
    """Ray Train + shards (1 worker) vs a plain PyTorch loop over in-memory tensors: samples/s and ratio.

    vaedist bench train --config configs/mnist.yaml --epochs 4 --repeats 3
    """
    from vaedist.bench.train import bench_train as run

    run(resolve_config(config_path or "configs/mnist.yaml", overrides, mnist_dir), epochs, repeats=repeats,
        echo=click.echo)


@bench.command("kernels")
@config_options
@click.option("--epochs", default=3, show_default=True, help="Epochs per variant.")
@click.option("--rounds", default=2, show_default=True, type=click.IntRange(min=1), help="Interleaved rounds.")
@guarded
def bench_kernels(config_path, overrides, mnist_dir, epochs, rounds) -> None:
    """The plain training loop with foreach vs fused Adam, and with torch.compile: samples/s and ratios.

    vaedist bench kernels --config configs/mnist.yaml --epochs 3 --rounds 2
    """
    from vaedist.bench.train import bench_kernels as run

    run(resolve_config(config_path or "configs/mnist.yaml", overrides, mnist_dir), epochs=epochs, rounds=rounds,
        echo=click.echo)


@bench.command("ingest")
@config_options
@click.option("--epochs", default=3, show_default=True, help="Epochs of each training run.")
@click.option("--large-shards", help="A larger shard set (e.g. mnist8m) for the peak-memory comparison.")
@click.option("--large-steps", default=100, show_default=True, help="Steps of the peak-memory runs.")
@click.option("--no-readers", is_flag=True, help="Skip the reader comparison.")
@guarded
def bench_ingest(config_path, overrides, mnist_dir, epochs, large_shards, large_steps, no_readers) -> None:
    """Ray Data readers' rows/s; training with `memory` vs `stream` ingest (samples/s, where the CPU
    goes); the training worker's peak memory on a small and a large shard set.

    vaedist bench ingest --config configs/mnist.yaml --large-shards outputs/shards-mnist8m
    """
    from vaedist.bench.ingest import bench_ingest as run

    cfg = resolve_config(config_path or "configs/mnist.yaml", overrides, mnist_dir)
    run(cfg, epochs=epochs, large_shards=large_shards, large_steps=large_steps, readers=not no_readers,
        echo=click.echo)


@bench.command("encode")
@config_options
@click.option("--checkpoint", help="Checkpoint to encode with (default: best of output.run_name).")
@guarded
def bench_encode(config_path, overrides, mnist_dir, checkpoint) -> None:
    """Ray Data encode job vs a plain single-process loop over all 70,000 datapoints, and the loss-by-digit query.

    vaedist bench encode --config configs/mnist.yaml
    """
    from vaedist.bench.encode import bench_encode as run
    from vaedist.encode import resolve_checkpoint

    cfg = resolve_config(config_path or "configs/mnist.yaml", overrides, mnist_dir)
    run(cfg, resolve_checkpoint(cfg, checkpoint), echo=click.echo)


@bench.command("resume")
@config_options
@click.option("--work", default="/tmp/vaedist-bench-resume", show_default=True,
              help="Where the shards, checkpoint, tables, logs and results.json go; inputs found there are reused.")
@click.option("--shards", help="Shards to encode instead of mnist8m's, prepared under --work.")
@click.option("--variants", default=20, show_default=True, type=click.IntRange(min=1),
              help="data.mnist8m_variants of the shards prepared: 60,000 datapoints each, + 10,000 test.")
@click.option("--checkpoint", help="Checkpoint to encode with (default: a one-epoch run of --config, trained under --work).")
@click.option("--kill-at", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="The share of the table's files finished when the second encode is killed.")
@guarded
def bench_resume(config_path, overrides, mnist_dir, work, shards, variants, checkpoint, kill_at) -> None:
    """An encode run whole (a), the same one killed with its Ray when --kill-at of its files are
    finished (b), and (b) again (c), each `vaedist encode` in a process of its own: (c)'s time and rows
    against (a)'s, what (c)'s time is made of, and (c)'s table byte for byte (a)'s.

    vaedist bench resume --config configs/debug.yaml --work /tmp/vaedist-bench-resume --kill-at 0.5
    """
    from vaedist.bench.resume import bench_resume as run

    run(config_path or "configs/debug.yaml", list(overrides), work, shards=shards, checkpoint=checkpoint,
        variants=variants, kill_at=kill_at, mnist_dir=mnist_dir, echo=click.echo)


@bench.command("prepare")
@click.option("--images", default=20000, show_default=True, type=click.IntRange(min=100),
              help="Images in the PNG folder and the JPEG shards timed.")
@click.option("--rss", default="10000,200000", show_default=True, help="Folder sizes for the driver's peak RSS.")
@click.option("--cpus", default=2, show_default=True, type=click.IntRange(min=1), help="CPUs of the embedded Ray.")
@click.option("--work", default="/tmp/vaedist-bench-prepare", show_default=True,
              help="Where the generated images and shards go (not the repository).")
@click.option("--mnist-dir", envvar="VAEDIST_MNIST_DIR", help="MNIST IDX files [env VAEDIST_MNIST_DIR].")
@click.option("--fashion-mnist-dir", envvar="VAEDIST_FASHION_MNIST_DIR",
              help="Fashion-MNIST IDX files [env VAEDIST_FASHION_MNIST_DIR].")
@guarded
def bench_prepare(images, rss, cpus, work, mnist_dir, fashion_mnist_dir) -> None:
    """Prepare of a PNG folder and of JPEG WebDataset shards: the Ray Data job vs a plain loop, and
    the driver's peak RSS as the folder grows.

    vaedist bench prepare --images 20000 --rss 10000,200000
    """
    from vaedist.bench.prepare import bench_prepare as run

    sizes = tuple(int(n) for n in rss.split(",") if n.strip())
    run(images, sizes, cpus=cpus, work=work, mnist_dir=mnist_dir, fashion_dir=fashion_mnist_dir, echo=click.echo)


@bench.command("analyses")
@config_options
@click.option("--latents", help="The latent table (default: output.latents_dir).")
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(min=1), help="Warm runs per analysis.")
@guarded
def bench_analyses(config_path, overrides, mnist_dir, latents, repeats) -> None:
    """Each ready-made analysis, warm, median ms and ratio to loss-by-digit on the same table (target ≤ 100 ms).

    vaedist bench analyses --latents outputs/latents --repeats 20
    """
    from vaedist.bench.analyses import bench_analyses as run

    run(latents or resolve_config(config_path, overrides, mnist_dir).output.latents_dir, repeats=repeats,
        echo=click.echo)


@bench.command("objectives")
@config_options
@click.option("--k", "ks", default="1,5,50", show_default=True, help="IWAE sample counts, comma-separated.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1), help="Timed steps per variant per round.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1), help="Interleaved rounds.")
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--quality", "quality_epochs", default=0, show_default=True, type=click.IntRange(min=0),
              help="Instead: train each of --runs this many epochs (plain loop, CPU) and compare test NLL, -ELBO, active units (per group, with the KL's share, for a model of several latent groups).")
@click.option("--runs", default="elbo,iwae5,beta0.5,beta2", show_default=True,
              help="--quality: which of elbo, iwae5, iwae50, beta0.5, beta2.")
@click.option("--nll-rows", default=1000, show_default=True, type=click.IntRange(min=1), help="--quality: test images for the NLL.")
@click.option("--nll-samples", default=1000, show_default=True, type=click.IntRange(min=1), help="--quality: K of the NLL.")
@click.option("--save", "save_dir", default=None,
              help="--quality: write each trained model as a checkpoint in SAVE/<run>, for vaedist encode --checkpoint.")
@guarded
def bench_objectives(config_path, overrides, mnist_dir, ks, steps, rounds, device, quality_epochs, runs, nll_rows,
                     nll_samples, save_dir) -> None:
    """A training step under the iwae objective (k samples) vs the elbo's: time and memory, with ratios.
    With --quality, the objectives trained alike and compared on the test split instead.

    vaedist bench objectives --config configs/mnist.yaml --steps 10 --rounds 3
    """
    from vaedist.bench.objectives import QUALITY_RUNS, bench_objectives as run, bench_quality

    if quality_epochs:
        names = runs.split(",")
        unknown = [n for n in names if n not in QUALITY_RUNS]
        if unknown:
            raise click.BadParameter(f"unknown {unknown}; choose from {', '.join(QUALITY_RUNS)}", param_hint="--runs")
        bench_quality(resolve_config(config_path or "configs/mnist.yaml", overrides, mnist_dir), names,
                      quality_epochs, nll_rows=nll_rows, nll_samples=nll_samples, echo=click.echo, save_dir=save_dir)
        return
    try:
        k_values = tuple(int(k) for k in ks.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {ks!r}", param_hint="--k") from None
    if any(k < 1 for k in k_values):
        raise click.BadParameter(f"every k must be >= 1, got {ks!r}", param_hint="--k")
    run(resolve_config(config_path or "configs/mnist.yaml", overrides, mnist_dir), ks=k_values, steps=steps,
        rounds=rounds, device=device, echo=click.echo)


@bench.command("models")
@config_options
@click.option("--epochs", default=3, show_default=True, help="Epochs for each side, per image shape.")
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1), help="Steps per epoch.")
@click.option("--shape", "shapes", multiple=True, type=click.Choice(["28x28x1", "32x32x3"]),
              help="Only these image shapes (repeatable; default both).")
@guarded
def bench_models(config_path, overrides, mnist_dir, epochs, steps, shapes) -> None:
    """The conv family on 28x28x1 and 32x32x3 images: Ray Train vs the plain loop, samples/s and ratio.

    vaedist bench models --config configs/conv.yaml --epochs 3 --steps 30
    """
    from vaedist.bench.models import SHAPES, bench_models as run

    run(resolve_config(config_path or "configs/conv.yaml", overrides, mnist_dir), epochs=epochs, steps=steps,
        shapes=tuple(shapes) or SHAPES, echo=click.echo)


@bench.command("hierarchy")
@config_options
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1), help="Steps per epoch.")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1),
              help="Epochs per variant and round (the first warms up).")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1), help="Interleaved rounds.")
@click.option("--baseline", type=click.Path(dir_okay=False, exists=True),
              help="The one-layer model's config (default: configs/burda-1layer-mnist.yaml for MLP stages, "
                   "configs/conv.yaml for conv stages).")
@guarded
def bench_hierarchy(config_path, overrides, mnist_dir, steps, epochs, rounds, baseline) -> None:
    """A hierarchical model (the config's; default Burda et al.'s two stochastic layers) vs a one-layer
    model: ms per training step with the ELBO and with IWAE k = 5, and the ratio.

    vaedist bench hierarchy --config configs/hier-mnist.yaml --steps 50 --rounds 3

    vaedist bench hierarchy --config configs/hier-conv.yaml --set model.likelihood=discretized-logistic
    """
    from vaedist.bench.hierarchy import bench_hierarchy as run

    run(resolve_config(config_path or "configs/hier-mnist.yaml", overrides, mnist_dir), steps=steps, rounds=rounds,
        epochs=epochs, baseline=baseline, echo=click.echo)


@bench.command("sweep")
@config_options
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1),
              help="Training steps per epoch of each run (train.max_steps_per_epoch).")
@guarded
def bench_sweep(config_path, overrides, mnist_dir, steps) -> None:
    """4 debug-sized trials through `vaedist sweep` (1 and 2 at a time) vs the same 4 runs of `vaedist train`
    one after another: wall times, the speed-up and what Tune adds per trial.

    vaedist bench sweep --config configs/debug.yaml --set scaling.cpus_per_worker=1 --steps 20
    """
    from vaedist.bench.sweep import bench_sweep as run

    run(resolve_config(config_path or "configs/debug.yaml", overrides, mnist_dir), steps, echo=click.echo)


@bench.command("gpu")
@click.option("--out", required=True, help="Directory for results.json, results.md and gpu-tests.log.")
@click.option("--budget-s", default=480.0, show_default=True, type=float,
              help="Wall-clock budget for every part together; a part whose share is spent is skipped, with a line.")
@click.option("--mnist-dir", envvar=MNIST_DIR_ENV, type=click.Path(file_okay=False),
              help=f"MNIST IDX files [env {MNIST_DIR_ENV}; default ../shared/data/mnist].")
@click.option("--parts", help="Only these parts, comma-separated (shards, facts, batch_sweep, quality, encode, "
                              "gpu_tests, train, cpu_scaling); default all.")
@click.option("--work-dir", help="Scratch directory for shards, runs and tables (default: a temporary one, removed).")
@guarded
def bench_gpu(out, budget_s, mnist_dir, parts, work_dir) -> None:
    """Every GPU figure in one go under one budget (CPU mode at tiny sizes where there is no CUDA):
    a batch-size sweep of the eager step against the CUDA graph, the default quality run timed with
    its test NLL, encode on the GPU, the GPU test tier, Ray Train vs the plain loop (bf16, fp32), CPU
    scaling of training and encode, and the device's facts.

    vaedist bench gpu --out outputs/bench-gpu --budget-s 480 --mnist-dir .whl/mnist
    """
    from vaedist.bench.gpu import bench_gpu as run

    run(out, budget_s=budget_s, mnist_dir=mnist_dir, work_dir=work_dir, echo=lambda line: click.echo(line),
        parts=[p.strip() for p in parts.split(",") if p.strip()] if parts else None)


# --- config -----------------------------------------------------------------------------------

@cli.group("config")
def config_group() -> None:
    """Inspect configuration."""


@config_group.command("show")
@config_options
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml", show_default=True)
def config_show(config_path, overrides, mnist_dir, fmt) -> None:
    """Print the resolved config (defaults < YAML < --set).

    vaedist config show --config configs/debug.yaml --set train.epochs=3
    """
    cfg = resolve_config(config_path, overrides, mnist_dir)
    if fmt == "json":
        click.echo(json.dumps(cfg.to_dict(), indent=2))
    else:
        import yaml

        click.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False), nl=False)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="vaedist")


if __name__ == "__main__":
    main(sys.argv[1:])
