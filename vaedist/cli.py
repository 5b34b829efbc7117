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


def resolve_config(config_path: str | None, overrides: tuple[str, ...], mnist_dir: str | None = None,
                   extra: list[str] | None = None) -> Config:
    items = list(overrides) + list(extra or [])
    if mnist_dir:
        items.append(f"data.mnist_dir={mnist_dir}")
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

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError) as e:
            raise click.ClickException(str(e)) from None
    return wrapper


@click.group(epilog=EXAMPLES)
@click.version_option(package_name="vaedist")
def cli() -> None:
    """vaedist: distributed VAE training and evaluation on Ray (MNIST -> WebDataset -> Ray Train ->
    Parquet latent tables)."""


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
    for r in rows:
        if r.get("kind") == "epoch":
            click.echo(f"epoch {r['epoch']:3d}  train l_i {r['train_loss']:8.3f} (recon {r['train_recon_nll']:7.3f} "
                       f"kl {r['train_kl']:6.3f})  test l_i {r['test_loss']:8.3f}  {r['samples_per_s']:8.0f} samples/s")
        elif r.get("kind") == "final":
            click.echo(f"final  test NLL (IW, K={r['num_samples_iw']}) {r['test_nll_iw']:.3f} nats   "
                       f"test negative ELBO {r['test_loss']:.3f} nats")


@cli.command()
@config_options
@click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join [env RAY_ADDRESS]; "
              "default: an embedded local Ray.")
@guarded
def train(config_path, overrides, mnist_dir, address) -> None:
    """Train (or resume) a VAE with Ray Train over the shards.

    vaedist train --config configs/debug.yaml --set scaling.num_workers=2
    """
    from vaedist.train import train as run_training

    cfg = resolve_config(config_path, overrides, mnist_dir, [f"scaling.address={address}"] if address else None)
    result = run_training(cfg)
    print_epoch_table(result.metrics)
    click.echo(f"run: {result.run_dir}\nbest checkpoint: {result.best_checkpoint}")


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
