"""The Python API: a trained model on images, a latent table with its lineage, and the pipeline's
steps, from a notebook or a script. Everything here calls the code the `vaedist` command runs.

    import vaedist
    model = vaedist.load_model("outputs/runs/debug")                 # a run's best checkpoint
    data = vaedist.read_images("outputs/shards", split="test")
    mu, logvar = model.encode(data.images[:8], indices=data.indices[:8])
    table = vaedist.open_table("outputs/latents-debug")
    table.relation().filter("split = 'test'").aggregate("label, avg(loss)").df()

    from vaedist import api                                           # the steps, with a config object
    cfg = vaedist.load_config("configs/debug.yaml", ["train.epochs=1"])
    api.prepare(cfg); result = api.train(cfg); api.encode(cfg, checkpoint=result.best_checkpoint)

Numbers agree with the latent table: a model's `loss` and `log_px` go through the same evaluation as
the encode job (vaedist.evaluate), with the input the likelihood makes of the stored 8-bit pixels
(Bernoulli: the fixed binarisation keyed by (train.seed, split, index)) and noise keyed by
(encode seed, split, index). Pass a datapoint's split and index to get its table row's numbers.
No Ray is imported until a step or `Table.to_ray` needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from vaedist.config import Config, load_config
from vaedist.lineage import Lineage

if TYPE_CHECKING:  # imported on use: `import vaedist` stays cheap
    from vaedist.checkpoint import CheckpointState
    import duckdb
    import pandas
    import pyarrow as pa
    import torch

    from vaedist.losses import LossParts
    from vaedist.model import VAE

__all__ = ["Images", "Model", "Table", "encode", "load_model", "open_table", "prepare", "read_images", "sweep",
           "train"]


# ---------------------------------------------------------------------------------------------
# A trained model.

def _device(device: str | Any) -> "torch.device":
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_count(value: Any, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer ({what}), got {value!r}")


class Model:
    """A trained VAE on one device, loaded by `load_model`.

    Images go in as stored in the shards: uint8 [B, H, W, C], [B, H, W] (one channel) or [B, H*W*C],
    NumPy or torch. The model sees what its likelihood makes of them (`inputs`); a float tensor
    [B, H*W*C] is taken as already made. Results are torch tensors on the model's device.

    Attributes: `vae` (the torch module, eval mode), `config` (the config it was trained with),
    `checkpoint` (the file), `epoch`, `image_shape` (H, W, C), `latent_dim`, `device`.

    Example:
        >>> model = vaedist.load_model("outputs/runs/debug", device="cpu")
        >>> model.image_shape, model.latent_dim
        ((28, 28, 1), 8)
    """

    def __init__(self, vae: "VAE", config: Config, state: "CheckpointState", device: "torch.device"):
        self.vae, self.config, self.device = vae, config, device
        self.checkpoint: str = state.path
        self.epoch: int = state.epoch
        self.image_shape: tuple[int, int, int] = vae.image_shape
        self.latent_dim: int = vae.latent_dim

    def __repr__(self) -> str:
        return (f"Model({self.checkpoint!r}, epoch={self.epoch}, {self.config.model.kind} "
                f"{self.config.model.likelihood}, latent_dim={self.latent_dim}, image_shape={self.image_shape}, "
                f"device={str(self.device)!r})")

    def _indices(self, count: int, indices: Sequence[int] | np.ndarray | None) -> np.ndarray:
        if indices is None:
            return np.arange(count, dtype=np.int64)
        index = np.asarray(indices.cpu() if hasattr(indices, "cpu") else indices)
        if index.shape != (count,) or not np.issubdtype(index.dtype, np.integer) or (index < 0).any():
            raise ValueError(f"indices must be {count} non-negative integers (one per image), "
                             f"got {index.dtype} {list(index.shape)}")
        return index.astype(np.int64)

    def inputs(self, images: Any, indices: Sequence[int] | np.ndarray | None = None,
               split: str = "test") -> "torch.Tensor":
        """What the model sees for these images: its likelihood's evaluation input, float [B, H*W*C].

        For Bernoulli models that is the fixed binarisation of datapoint (split, index) with the
        checkpoint's train.seed, as in training's evaluation and the encode job; the 8-bit
        likelihoods rescale (or dequantise, keyed the same way) the pixels. indices default to
        0..B-1; give a datapoint's own index to reproduce its table row.

        Example:
            >>> x = model.inputs(data.images[:4], indices=data.indices[:4], split="test")
            >>> x.shape
            torch.Size([4, 784])
        """
        import torch

        num_pixels = int(np.prod(self.image_shape))
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.dim() != 2 or images.shape[1] != num_pixels:
                raise ValueError(f"a float input must be the model's input [B, {num_pixels}] (what Model.inputs "
                                 f"returns), got {list(images.shape)}")
            return images.to(self.device, torch.float32)
        array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.dtype != np.uint8:
            raise ValueError(f"images must be uint8 pixels as stored in the shards (or a float tensor from "
                             f"Model.inputs), got {array.dtype}")
        if array.ndim < 2 or int(np.prod(array.shape[1:])) != num_pixels:
            raise ValueError(f"images must be [B, {', '.join(map(str, self.image_shape))}] (height, width, "
                             f"channels) or [B, {num_pixels}] for this model, got {list(array.shape)}")
        array = np.ascontiguousarray(array.reshape(len(array), num_pixels))
        index = self._indices(len(array), indices)
        return self.vae.likelihood.eval_input(array, index, split, self.config.train.seed, self.device)

    def encode(self, images: Any, indices: Sequence[int] | np.ndarray | None = None,
               split: str = "test") -> tuple["torch.Tensor", "torch.Tensor"]:
        """The posterior q(z|x) of each image: (mu, logvar), each [B, latent_dim].

        Example:
            >>> mu, logvar = model.encode(data.images[:8], indices=data.indices[:8])
            >>> mu.shape
            torch.Size([8, 8])
        """
        import torch

        with torch.no_grad():
            return self.vae.encode(self.inputs(images, indices, split))

    def decode(self, z: Any, params: bool = False) -> "torch.Tensor":
        """The mean of p(x|z) for latent codes z [B, latent_dim], as images [B, H, W, C] in [0, 1].

        Bernoulli's mean is the pixel probabilities. params=True gives the likelihood's raw
        parameters [B, F] instead.

        Example:
            >>> images = model.decode(mu)          # reconstructions from the posterior means
            >>> images.shape
            torch.Size([8, 28, 28, 1])
        """
        import torch

        z = torch.as_tensor(z, dtype=torch.float32, device=self.device)
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be [B, {self.latent_dim}] (latent_dim {self.latent_dim}), got {list(z.shape)}")
        with torch.no_grad():
            out = self.vae.decode(z)
            return out if params else self.vae.likelihood.mean(out).reshape(len(z), *self.image_shape)

    def sample(self, n: int, seed: int = 0, mean: bool = False) -> "torch.Tensor":
        """Generate n new images [n, H, W, C] in [0, 1]: z ~ N(0, I), then x ~ p(x|z).

        mean=True gives the mean of p(x|z) instead of a draw. The same seed gives the same images
        on the same device.

        Example:
            >>> model.sample(16, seed=0, mean=True).shape
            torch.Size([16, 28, 28, 1])
        """
        import torch

        _check_count(n, "n", "images")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.vae.sample(n, generator, mean=mean).reshape(n, *self.image_shape)

    def _evaluate(self, images: Any, indices, split: str, seed: int | None, num_samples_mc: int,
                  num_samples_iw: int) -> dict[str, "torch.Tensor"]:
        from vaedist.evaluate import evaluate_batch

        x = self.inputs(images, indices, split)
        index = self._indices(len(x), indices)
        seed = self.config.encode.seed if seed is None else seed
        return evaluate_batch(self.vae, x, index, split, seed, num_samples_mc, num_samples_iw,
                              self.config.encode.iw_chunk_size)

    def loss(self, images: Any, indices: Sequence[int] | np.ndarray | None = None, split: str = "test",
             num_samples: int | None = None, seed: int | None = None) -> "LossParts":
        """Each image's l_i = recon_nll + kl (the negative ELBO) in nats, with its parts, float64 [B].

        The reconstruction term averages num_samples draws of z (default: the checkpoint's
        encode.num_samples_mc), keyed by (seed, split, index) (default seed: its encode.seed):
        with a table's num_samples_mc and seed (its lineage), a datapoint's l_i is its row's.

        Example:
            >>> parts = model.loss(data.images[:8], indices=data.indices[:8], split="test")
            >>> parts.loss.shape, bool((parts.loss == parts.recon_nll + parts.kl).all())
            (torch.Size([8]), True)
        """
        from vaedist.losses import LossParts

        num_samples = self.config.encode.num_samples_mc if num_samples is None else num_samples
        _check_count(num_samples, "num_samples", "S samples of z")
        rows = self._evaluate(images, indices, split, seed, num_samples, 0)
        return LossParts(loss=rows["loss"], recon_nll=rows["recon_nll"], kl=rows["kl"])

    def log_px(self, images: Any, num_samples: int = 1000, indices: Sequence[int] | np.ndarray | None = None,
               split: str = "test", seed: int | None = None) -> "torch.Tensor":
        """Each image's importance-weighted estimate of log p(x) in nats, float64 [B].

        K = num_samples importance samples (Burda et al. 2016): a lower bound on log p(x) that
        tightens as K grows, >= -l_i on average.

        Noise is keyed as the encode job keys it, so with a table's num_samples_iw and seed a
        datapoint's estimate is its row's log_px.

        Example:
            >>> model.log_px(data.images[:8], num_samples=100, indices=data.indices[:8]).shape
            torch.Size([8])
        """
        _check_count(num_samples, "num_samples", "K importance samples")
        return self._evaluate(images, indices, split, seed, 1, num_samples)["log_px"]


def load_model(path: str, device: str = "cpu") -> Model:
    """Load a trained model from a run, a checkpoint directory or a checkpoint file.

    path: a run directory (its best checkpoint), a checkpoint directory or a checkpoint.pt file,
    local or s3://...; device: "cpu", "cuda", "cuda:1" or "auto" (a GPU where there is one).
    Raises CheckpointError naming the path when it holds no readable checkpoint.

    Example:
        >>> model = vaedist.load_model("outputs/runs/debug", device="auto")
        >>> model.epoch
        2
    """
    from vaedist.checkpoint import load_model as load

    target = _device(device)
    vae, config, state = load(path, map_location=target)
    return Model(vae, config, state, target)


@dataclass(frozen=True)
class Images:
    """A split's datapoints as the shards store them, from `read_images`.

    indices int64 [N] (the datapoint's index in its split, part of its key), images uint8
    [N, H, W, C], labels int64 [N].

    Example:
        >>> data = vaedist.read_images("outputs/shards", split="test")
        >>> model.loss(data.images[:4], indices=data.indices[:4], split="test").loss
    """
    indices: np.ndarray
    images: np.ndarray
    labels: np.ndarray


def read_images(shards_dir: str, split: str = "test", max_shards: int = 0) -> Images:
    """Read one split of a shards directory (`vaedist data prepare`'s output) into memory.

    max_shards > 0 reads only the first shards.

    Example:
        >>> data = vaedist.read_images("outputs/shards", split="test", max_shards=1)
        >>> data.images.shape, data.images.dtype
        ((2500, 28, 28, 1), dtype('uint8'))
    """
    from vaedist.data import load_split_arrays, read_manifest, shard_paths

    manifest = read_manifest(shards_dir)
    info = manifest.dataset
    indices, images, labels = load_split_arrays(shard_paths(shards_dir, split, max_shards, manifest), info=info)
    return Images(indices, images.reshape(len(images), *info.image_shape), labels)


# ---------------------------------------------------------------------------------------------
# A latent table.

class Table:
    """A published latent table (`vaedist encode`'s output), opened by `open_table`.

    A row per datapoint (per checkpoint, for a table with an epoch column), read with DuckDB,
    pandas, Arrow or Ray Data; `lineage` says what it was encoded from.

    Example:
        >>> table = vaedist.open_table("outputs/latents-debug")
        >>> table.lineage.checkpoint_epoch, table.num_rows
        (2, 7500)
    """

    def __init__(self, path: str):
        from vaedist.analyses import core

        self.path = str(path)
        core.table_files(self.path)  # refuses what is not a published table, saying why
        self._con: "duckdb.DuckDBPyConnection | None" = None

    def __repr__(self) -> str:
        return f"Table({self.path!r})"

    def _connection(self) -> "duckdb.DuckDBPyConnection":
        from vaedist.analyses import core

        if self._con is None:
            self._con = core.connect(self.path)
        return self._con

    @property
    def lineage(self) -> "Lineage":
        """What the table was encoded from: checkpoint, shards, seeds, estimators, the config.

        Example:
            >>> table.lineage.num_samples_mc, table.lineage.seed
            (4, 0)
        """
        from vaedist.analyses import core

        return core.read_lineage(self.path)

    @property
    def num_rows(self) -> int:
        """The number of rows (datapoints, times checkpoints for a table with an epoch column).

        Example:
            >>> table.num_rows
            7500
        """
        return self._connection().sql("SELECT count(*) FROM latents").fetchall()[0][0]

    def relation(self) -> "duckdb.DuckDBPyRelation":
        """The table as a DuckDB relation, lazily evaluated: filter, aggregate, join, then fetch.

        Example:
            >>> table.relation().filter("split = 'test'").aggregate("label, avg(loss) AS loss").order("label").df()
        """
        return self._connection().sql("SELECT * FROM latents")

    def sql(self, query: str, **params: Any) -> "pa.Table":
        """The result of SQL over the view `latents` as an Arrow table; params fill `$name` placeholders.

        Example:
            >>> table.sql("SELECT count(*) AS n FROM latents WHERE label = $label", label=3)
        """
        from vaedist.analyses import core

        return core.run_sql(self.path, query, params=params or None, con=self._connection())

    def analysis(self, name: str, **arguments: Any) -> "pa.Table":
        """Run a ready-made analysis by its name (`vaedist.analyses.ANALYSES`) on this table.

        Example:
            >>> table.analysis("loss-by-digit", split="test").to_pandas()
            >>> table.analysis("worst", k=5)
        """
        from vaedist.analyses import get_analysis

        return get_analysis(name).function(self.path, **arguments)

    def to_pandas(self) -> "pandas.DataFrame":
        """The whole table as a pandas DataFrame (vectors as arrays in their cells).

        Example:
            >>> df = table.to_pandas()
            >>> df.groupby("label").loss.mean()
        """
        return self.relation().df()

    def to_arrow(self) -> "pa.Table":
        """The whole table as an Arrow table.

        Example:
            >>> table.to_arrow().schema.field("mu").type
            FixedSizeListType(fixed_size_list<item: float>[8])
        """
        return self.relation().to_arrow_table()

    def to_ray(self) -> Any:
        """The table as a Ray Dataset over its Parquet files, for work on the whole table in parallel.

        It joins the Ray cluster RAY_ADDRESS names, or starts a local one.

        Example:
            >>> from ray.data.expressions import col
            >>> ds = table.to_ray()
            >>> ds.filter(expr=col("split") == "test").count()
        """
        import ray.data

        from vaedist.analyses import core

        fs, files = core.table_files(self.path)
        return ray.data.read_parquet(files, filesystem=fs)


def open_table(path: str) -> Table:
    """Open a published latent table (a directory, local or s3://..., with `_SUCCESS`).

    Raises QueryError saying why when the path is not a published table (missing, unfinished).

    Example:
        >>> table = vaedist.open_table("outputs/latents-debug")
        >>> table.to_pandas().head()
    """
    return Table(path)


# ---------------------------------------------------------------------------------------------
# The pipeline's steps, with a config object (vaedist.load_config or vaedist.Config).

def _config(config: Config | str) -> Config:
    return config if isinstance(config, Config) else load_config(config)


def prepare(config: Config | str, out: str | None = None) -> dict[str, Any]:
    """Write the config's dataset as WebDataset shards, as `vaedist data prepare` does.

    out: the shards directory (default data.shards_dir). Returns the manifest.

    Example:
        >>> cfg = vaedist.load_config("configs/debug.yaml", ["data.shards_dir=outputs/shards"])
        >>> manifest = api.prepare(cfg)
    """
    from vaedist.pipeline import prepare_from_config

    return prepare_from_config(_config(config), out, progress=False)


def train(config: Config | str, echo: Callable[[str], None] | None = None) -> Any:
    """Train (or resume) the run output.run_name with Ray Train, as `vaedist train` does.

    Returns a TrainResult (run_dir, best_checkpoint, latest_checkpoint, metrics); echo prints a
    line per epoch.

    Example:
        >>> result = api.train(vaedist.load_config("configs/debug.yaml"), echo=print)
        >>> model = vaedist.load_model(result.best_checkpoint)
    """
    from vaedist.train import train as run

    return run(_config(config), echo=echo)


def encode(config: Config | str, checkpoint: str | None = None, out: str | None = None,
           epochs: list[int] | None = None, shards_dir: str | None = None,
           echo: Callable[[str], None] | None = None) -> Table:
    """Encode the shards into a latent table with Ray Data, as `vaedist encode` does, and open it.

    checkpoint: a run or checkpoint (default encode.checkpoint, else output.run_name's best); out:
    default output.latents_dir; epochs: several kept epochs of one run into one table;
    shards_dir: other data of the same image shape (default data.shards_dir).

    Example:
        >>> table = api.encode(cfg, checkpoint=result.best_checkpoint, out="outputs/latents-debug")
    """
    from vaedist.encode import encode as run

    result = run(_config(config), checkpoint=checkpoint, out=out, epochs=epochs, shards_dir=shards_dir, echo=echo)
    return open_table(result.path)


def sweep(config: Config | str, grid: Sequence[str] = (), sample: Sequence[str] = (),
          echo: Callable[[str], None] | None = None, **sweep_fields: Any) -> Any:
    """Run (or resume) a sweep through Ray Tune, as `vaedist sweep` does.

    Grid axes "key=v1,v2" and sampled keys "key=dist" add to the config's sweep section, as do sweep
    fields (num_samples, name, scheduler, max_concurrent_trials). Returns the SweepResult (its
    table: sweep.parquet).

    Example:
        >>> result = api.sweep(cfg, grid=["train.lr=1e-3,3e-4"], name="lr")
        >>> result.dir
    """
    from vaedist.sweep import with_cli
    from vaedist.sweep.tune import run_sweep

    return run_sweep(with_cli(_config(config), grid=list(grid), sample=list(sample), **sweep_fields), echo=echo)
