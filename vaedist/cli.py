"""The `vaedist` command: a thin click group; each command parses arguments and calls one function.

    vaedist run --mnist-dir ../shared/data/mnist          # the whole pipeline on an embedded Ray
    vaedist data prepare --mnist-dir ../shared/data/mnist
    vaedist train --config configs/debug.yaml --set train.lr=3e-4
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

from vaedist.config import MNIST_DIR_ENV, Config, ConfigError, load_config

EXAMPLES = """
\b
Examples:
  vaedist run --mnist-dir ../shared/data/mnist      # prepare -> train -> encode -> summary -> report
  vaedist data prepare --config configs/debug.yaml
  vaedist data verify
  vaedist train --config configs/debug.yaml --set scaling.num_workers=2
  vaedist encode --config configs/debug.yaml
  vaedist query "SELECT label, avg(loss) FROM latents GROUP BY label"
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
        from vaedist.checkpoint import CheckpointError
        from vaedist.data import DataError
        from vaedist.encode import EncodeError
        from vaedist.query import QueryError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, CheckpointError, EncodeError, QueryError, FileNotFoundError,
                FileExistsError) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


@click.group(epilog=EXAMPLES)
@click.version_option(package_name="vaedist")
def cli() -> None:
    """vaedist: distributed VAE training and evaluation on Ray (MNIST -> WebDataset -> Ray Train ->
    Parquet latent tables)."""


# --- the main job -----------------------------------------------------------------------------

@cli.command()
@config_options
@address_option
@guarded
def run(config_path, overrides, mnist_dir, address) -> None:
    """The whole pipeline: shards -> train -> encode -> loss-by-digit summary -> report.

    vaedist run --config configs/quickstart.yaml --mnist-dir ../shared/data/mnist
    """
    from vaedist.pipeline import run_pipeline

    cfg = resolve_config(config_path, overrides, mnist_dir, address)
    run_pipeline(cfg, echo=click.echo)


# --- data -------------------------------------------------------------------------------------

@cli.group()
def data() -> None:
    """Write and check the WebDataset shards."""


@data.command("prepare")
@config_options
@click.option("--out", help="Shards directory (default: data.shards_dir).")
@guarded
def data_prepare(config_path, overrides, mnist_dir, out) -> None:
    """Write MNIST train/test as WebDataset tar shards plus manifest.json.

    vaedist data prepare --mnist-dir ../shared/data/mnist --out outputs/shards
    """
    from vaedist.data import prepare_shards

    cfg = resolve_config(config_path, overrides, mnist_dir)
    out = out or cfg.data.shards_dir
    manifest = prepare_shards(out, mnist_dir=cfg.data.resolved_mnist_dir(), download_dir=cfg.data.download_dir,
                              samples_per_shard=cfg.data.samples_per_shard)
    for split, entry in manifest["splits"].items():
        click.echo(f"{split}: {entry['num_samples']} datapoints in {len(entry['shards'])} shards")
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

def print_epoch_table(rows: list[dict]) -> None:
    from vaedist.checkpoint import format_loss

    for r in rows:
        if r.get("kind") == "epoch":
            click.echo(f"epoch {r['epoch']:3d}  train l_i {r['train_loss']:8.3f} (recon {r['train_recon_nll']:7.3f} "
                       f"kl {r['train_kl']:6.3f})  test l_i {format_loss(r['test_loss'])}  {r['samples_per_s']:8.0f} samples/s")
        elif r.get("kind") == "final":
            click.echo(f"final  test NLL (IW, K={r['num_samples_iw']}) {r['test_nll_iw']:.3f} nats   "
                       f"test negative ELBO {r['test_loss']:.3f} nats")


@cli.command()
@config_options
@address_option
@guarded
def train(config_path, overrides, mnist_dir, address) -> None:
    """Train (or resume) a VAE with Ray Train over the shards.

    vaedist train --config configs/debug.yaml --set scaling.num_workers=2
    """
    from vaedist.train import train as run_training

    cfg = resolve_config(config_path, overrides, mnist_dir, address)
    result = run_training(cfg)
    print_epoch_table(result.metrics)
    click.echo(f"run: {result.run_dir}\nbest checkpoint: {result.best_checkpoint}")


# --- encode -----------------------------------------------------------------------------------

@cli.command()
@config_options
@click.option("--checkpoint", help="Checkpoint dir/file or run dir (default: encode.checkpoint, else the "
              "best checkpoint of output.run_name).")
@click.option("--out", help="Where to publish the latent table (default: output.latents_dir).")
@address_option
@guarded
def encode(config_path, overrides, mnist_dir, checkpoint, out, address) -> None:
    """Encode every datapoint into a Parquet latent table with Ray Data.

    vaedist encode --config configs/debug.yaml --out outputs/latents-debug
    """
    from vaedist.encode import encode as run_encode

    cfg = resolve_config(config_path, overrides, mnist_dir, address)
    result = run_encode(cfg, checkpoint=checkpoint, out=out)
    rows = ", ".join(f"{split} {n}" for split, n in result.rows.items())
    click.echo(f"published {result.path}: {rows} rows ({result.rows_per_s:,.0f} rows/s)")


# --- query and report -----------------------------------------------------------------------------

ANALYSES = ("loss-by-digit", "worst", "gaps", "neighbours")


@cli.command()
@config_options
@click.argument("what")
@click.option("--latents", help="The latent table (default: output.latents_dir).")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
@click.option("--split", type=click.Choice(["train", "test", "all"]), default=None,
              help="Restrict an analysis to one split (loss-by-digit defaults to test).")
@click.option("--k", "k", default=10, show_default=True, help="Rows for worst / gaps / neighbours.")
@click.option("--key", help="The datapoint for neighbours, e.g. test-00042.")
@click.option("--space", type=click.Choice(["mu", "z"]), default="mu", show_default=True)
@guarded
def query(config_path, overrides, mnist_dir, what, latents, fmt, split, k, key, space) -> None:
    """Query a latent table with SQL over the view `latents`, or run a ready-made analysis
    (loss-by-digit, worst, gaps, neighbours).

    \b
    vaedist query "SELECT label, avg(loss) FROM latents GROUP BY label ORDER BY label"
    vaedist query loss-by-digit --split test --format csv
    vaedist query worst --k 5
    vaedist query gaps --k 5
    vaedist query neighbours --key test-00042 --k 5
    """
    from vaedist import query as q

    path = latents or resolve_config(config_path, overrides, mnist_dir).output.latents_dir
    which = None if split == "all" else split
    if what == "loss-by-digit":
        table = q.loss_by_digit(path, split="test" if split is None else which)
    elif what == "worst":
        table = q.worst_explained(path, k=k, split=which)
    elif what == "gaps":
        table = q.largest_gaps(path, k=k, split=which)
    elif what == "neighbours":
        if not key:
            raise click.UsageError("neighbours needs --key, e.g. --key test-00042")
        table = q.neighbours(path, key, k=k, space=space)
    else:
        table = q.run_sql(path, what)
    click.echo(q.format_table(table, fmt), nl=False)


@cli.command()
@config_options
@click.option("--latents", help="The latent table (default: output.latents_dir).")
@click.option("--out", help="Output directory (default: output.report_dir).")
@click.option("--checkpoint", help="Checkpoint for reconstructions and samples (default: the table's lineage).")
@guarded
def report(config_path, overrides, mnist_dir, latents, out, checkpoint) -> None:
    """Write figures and index.html: reconstructions, prior samples, the latent space, l_i per digit,
    the highest-loss digits.

    vaedist report --latents outputs/latents-debug --out outputs/report-debug
    """
    from vaedist.report import write_report

    cfg = resolve_config(config_path, overrides, mnist_dir)
    index = write_report(latents or cfg.output.latents_dir, out or cfg.output.report_dir, checkpoint=checkpoint)
    click.echo(f"wrote {index}")


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
