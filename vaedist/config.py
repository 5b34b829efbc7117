"""Configuration: one dataclass per part, loaded from YAML with dotted overrides.

    cfg = load_config("configs/debug.yaml", ["train.lr=3e-4", "scaling.num_workers=2"])

Every field carries a docstring (the string literal below it) and is checked: an unknown key, a
value of the wrong type or an out-of-range value raises ConfigError naming the key and what is
allowed, before any cluster work starts. Standard library and PyYAML only.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from vaedist.registry import BINARISED_LIKELIHOODS, DATA_SOURCES, LIKELIHOODS, OBJECTIVES

MNIST_DIR_ENV = "VAEDIST_MNIST_DIR"
FASHION_MNIST_DIR_ENV = "VAEDIST_FASHION_MNIST_DIR"
# The environment variable naming each built-in dataset's local source directory (mnist8m deforms MNIST).
DATASET_DIR_ENV = {"mnist": MNIST_DIR_ENV, "fashion-mnist": FASHION_MNIST_DIR_ENV, "mnist8m": MNIST_DIR_ENV}


class ConfigError(ValueError):
    """A configuration key, type or value is not allowed; the message names the key."""


def _or_list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class DataConfig:
    dataset: Literal["mnist", "fashion-mnist", "mnist8m"] = "mnist"
    """The dataset `vaedist data prepare` writes and training expects in the shards' manifest:
    mnist; fashion-mnist (the same IDX layout, 10 clothing classes); mnist8m (each MNIST training
    image and mnist8m_variants - 1 deterministic elastic/affine deformations of it, after Loosli,
    Canu & Bottou 2007; MNIST's own test set)."""
    shards_dir: str = "outputs/shards"
    """Where the WebDataset shards and manifest.json live: a local path or a URI (s3://...)."""
    mnist_dir: str | None = None
    """Local directory of the MNIST IDX files (gzip or raw), for mnist and mnist8m. None: use
    $VAEDIST_MNIST_DIR if set, else download with torchvision into download_dir."""
    fashion_mnist_dir: str | None = None
    """Local directory of the Fashion-MNIST IDX files. None: $VAEDIST_FASHION_MNIST_DIR if set,
    else download with torchvision into download_dir."""
    download_dir: str = "outputs/download"
    """Where torchvision downloads a dataset when no local directory is given."""
    mnist8m_variants: int = 20
    """mnist8m: images made from each MNIST training image, the original included (20: 1.2M
    training images, ~0.9 GB of pixels; 135: 8.1M as Loosli et al.)."""
    samples_per_shard: int = 2500
    """Datapoints per tar shard when preparing (MNIST: 24 train shards, 4 test)."""
    max_train_shards: int = 0
    """Train on only the first N training shards (0: all). For debug runs."""
    max_test_shards: int = 0
    """Evaluate on only the first N test shards (0: all). For debug runs."""
    ingest: Literal["memory", "stream", "auto"] = "auto"
    """How training workers get their images. memory: each decodes its share of the shards once and
    keeps it (fastest; MNIST's share is 47 MB). stream: Ray Data reads and decodes the shards
    every epoch and feeds each worker an equal share through a local shuffle buffer, so a worker's
    memory is bounded by the buffer and the object store, not by the dataset. auto: memory when a
    worker's share fits memory_budget_mb, else stream."""
    memory_budget_mb: int = 2048
    """ingest auto: the most a worker's share of the training images may take in memory."""
    shuffle_buffer_rows: int = 4096
    """ingest stream: rows in each worker's local shuffle buffer (it also shuffles the shards' order
    every epoch)."""
    source: Literal[DATA_SOURCES] = "builtin"
    """What `vaedist data prepare` reads. builtin: data.dataset. images: a folder of image files
    (source_path; labels from first-level subfolders, a top-level train/ + test/ as the split).
    webdataset: existing tar shards (source_path, or train_pattern + test_pattern; local, s3://,
    brace patterns). arrays: .npy/.npz files of uint8 images [N, H, W(, C)] (source_path)."""
    source_path: str | None = None
    """images: the folder; webdataset: a shard pattern (split by hash); arrays: a .npy/.npz file or
    a folder of them (split by hash, or an .npz's x_train/x_test arrays)."""
    train_pattern: str | None = None
    """webdataset, arrays: the training split's shards or files (with test_pattern, instead of
    source_path and the hash split)."""
    test_pattern: str | None = None
    """webdataset, arrays: the test split's shards or files (see train_pattern)."""
    image_key: str | None = None
    """webdataset: the image entry's extension (None: the first of jpg, jpeg, png, webp, npy present);
    arrays: the .npz member holding the images (None: images, else x)."""
    label_key: str | None = None
    """webdataset: cls, or json:FIELD for an integer field of the json entry (None: cls when present,
    else unlabelled); arrays: the .npz member holding the labels (None: labels, else y, else
    unlabelled). Unlabelled datapoints get label -1."""
    image_size: list[int] | None = None
    """images, webdataset, arrays: [height, width] every image is made (resize so it covers that
    size, bilinear, then centre crop). None: the images' own size, which must then be the same for
    all."""
    channels: int | None = None
    """images, webdataset, arrays: 1 (grey) or 3 (RGB) channels every image is converted to. None:
    the images' own (grey modes 1; colour, palette and alpha modes 3), the same for all."""
    background: str = "white"
    """Colour that transparent pixels are composited on: white, black or #rrggbb."""
    test_fraction: float = 0.1
    """Where no split is given: the fraction of datapoints in the test split, chosen by a hash of
    each one's relative path (or shard name and key, or array file and row), so adding data never
    moves existing datapoints between splits."""
    skip_bad_images: bool = False
    """A file that cannot be decoded is an error naming it; true skips such files instead (each
    listed in the manifest and in prepare's output)."""
    binarize: bool | None = None
    """Whether the model sees binarised pixels. null: as model.likelihood does (bernoulli binarises;
    the discretized-logistic likelihoods and gaussian model the 8-bit levels); true or false states
    it, and a model.likelihood that does the other is an error naming both keys."""

    def __post_init__(self) -> None:
        _check(self.samples_per_shard > 0, "data.samples_per_shard", f"must be > 0, got {self.samples_per_shard}")
        _check(self.max_train_shards >= 0, "data.max_train_shards", f"must be >= 0 (0 = all), got {self.max_train_shards}")
        _check(self.max_test_shards >= 0, "data.max_test_shards", f"must be >= 0 (0 = all), got {self.max_test_shards}")
        _check(bool(self.shards_dir), "data.shards_dir", "must not be empty")
        _check(self.mnist8m_variants > 0, "data.mnist8m_variants", f"must be > 0, got {self.mnist8m_variants}")
        _check(self.memory_budget_mb > 0, "data.memory_budget_mb", f"must be > 0, got {self.memory_budget_mb}")
        _check(self.shuffle_buffer_rows >= 0, "data.shuffle_buffer_rows",
               f"must be >= 0 (0 = no buffer), got {self.shuffle_buffer_rows}")
        if self.image_size is not None:
            _check(len(self.image_size) == 2 and min(self.image_size) > 0, "data.image_size",
                   f"must be [height, width] > 0, got {self.image_size}")
        _check(self.channels in (None, 1, 3), "data.channels", f"must be 1, 3 or null, got {self.channels}")
        _check(self.background in ("white", "black") or (len(self.background) == 7 and self.background[0] == "#"
               and all(c in "0123456789abcdefABCDEF" for c in self.background[1:])), "data.background",
               f"must be white, black or #rrggbb, got {self.background!r}")
        _check(0 < self.test_fraction < 1, "data.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        if self.source != "builtin":
            patterns = (self.train_pattern is not None, self.test_pattern is not None)
            _check(patterns[0] == patterns[1], "data.train_pattern",
                   "data.train_pattern and data.test_pattern go together (or neither, with data.source_path)")
            _check(self.source != "images" or not any(patterns), "data.train_pattern",
                   "is for webdataset and arrays; an images folder is split by its train/ and test/ subfolders")
            _check((self.source_path is not None) != all(patterns), "data.source_path",
                   f"data.source={self.source} needs data.source_path"
                   + (" or data.train_pattern + data.test_pattern (not both)" if self.source != "images" else ""))

    def resolved_mnist_dir(self) -> str | None:
        """The local MNIST IDX directory in force: the config's, else the environment's, else None."""
        return self.mnist_dir or os.environ.get(MNIST_DIR_ENV) or None

    def resolved_source_dir(self) -> str | None:
        """The local source directory of data.dataset: its config key, else its environment variable."""
        if self.dataset == "fashion-mnist":
            return self.fashion_mnist_dir or os.environ.get(FASHION_MNIST_DIR_ENV) or None
        return self.resolved_mnist_dir()


@dataclass
class ModelConfig:
    kind: Literal["mlp", "conv", "hierarchical", "custom"] = "mlp"
    """Encoder/decoder family: mlp; conv (stride-2 stages, any image size they divide); hierarchical
    (several groups of latents, MLP stages between them: vaedist/hierarchical.py); custom (the
    nn.Module that model.factory returns, see vaedist/custom_model.py)."""
    latent_dim: int = 32
    """Dimension of z, the bottleneck (hierarchical: of all groups together, sum(latent_groups))."""
    hidden_dims: list[int] = field(default_factory=lambda: [512, 256])
    """MLP: widths of the encoder's hidden layers; the decoder mirrors them.
    conv: channels of each stride-2 stage, one entry per stage (its length is the depth: height and
    width must be divisible by 2^len); the decoder mirrors them. hierarchical: the widths of the
    deterministic layers below every group, unless group_hidden_dims gives each its own. custom: unused."""
    latent_groups: list[int] = field(default_factory=list)
    """hierarchical (and required there): the sizes of the latent groups, bottom first: z_1 (next to
    x) first, the top group z_L last, e.g. [100, 50] for Burda et al.'s two stochastic layers. Their
    sum must equal latent_dim."""
    group_hidden_dims: list[list[int]] = field(default_factory=list)
    """hierarchical: the widths of the deterministic layers below each group, one list per group in
    latent_groups' order: entry l lies between z_l and the level below it (x for z_1); the
    generative path mirrors each (Burda et al.: [[200, 200], [100, 100]] with activation tanh).
    Empty: hidden_dims for every group."""
    group_stage: Literal["mlp", "conv"] = "mlp"
    """hierarchical: the deterministic stages between the groups. mlp: Linear layers of those widths.
    conv (top-down only): per group, one 4x4 stride-2 convolution per entry of its widths (the entry
    is its channels), each followed by res_blocks_per_stage residual blocks and model.norm: residual
    cells at a resolution per stage, halving it each time (height and width must be divisible by 2^
    the number of entries over all groups); the generative path mirrors them with transposed
    convolutions, and each group is a vector read from, and written into, its stage's feature map."""
    hierarchy: Literal["top-down", "bottom-up"] = "top-down"
    """hierarchical: how q conditions each group. top-down: q(z_l | z_>l, x) from a deterministic
    bottom-up pass over x merged with the generative path's state at level l (Ladder VAE, NVAE);
    bottom-up: q(z_1|x) q(z_2|z_1) ... (Burda et al. 2016's IWAE architecture)."""
    res_blocks_per_stage: int = 0
    """conv: residual blocks (two 3x3 convolutions, pre-activation) after each encoder stage and
    before each decoder stage, at that stage's resolution and channels."""
    norm: Literal["none", "batch", "group", "layer"] = "none"
    """conv: normalisation after each hidden convolution and inside the residual blocks. group
    (gcd(channels, 32) groups) and layer (one group) treat each datapoint alone; batch couples the
    datapoints of a training batch (evaluation uses the running statistics, so per-datapoint values
    stay exact there; across DDP ranks each rank normalises with its own batch)."""
    factory: str | None = None
    """custom: "package.module:function" returning the model (vaedist/custom_model.py documents the
    protocol). Imported with the current directory first on sys.path; its top-level package is
    shipped to every Ray worker unless it is installed."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """custom: keyword arguments for model.factory (plain YAML values; saved in every checkpoint)."""
    activation: Literal["relu", "elu", "gelu", "softplus", "tanh"] = "elu"
    """Non-linearity between hidden layers."""
    likelihood: Literal[LIKELIHOODS] = "bernoulli"
    """The decoder's distribution p(x|z) (vaedist/likelihoods.py): bernoulli on binarised pixels
    (grey level / 255 as the probability of a 1); discretized-logistic (256 bins per sub-pixel) or
    discretized-logistic-mixture (PixelCNN++'s) on the 8-bit pixels; gaussian with a learned scale
    on pixels dequantised with uniform noise (a lower bound on a discrete likelihood)."""
    mixture_components: int = 10
    """discretized-logistic-mixture: K, logistic components per pixel."""
    gaussian_scale: Literal["per-subpixel", "per-image"] = "per-subpixel"
    """gaussian: one learned sigma per sub-pixel, or one per image (the mean of the decoder's
    log-scale outputs)."""

    def __post_init__(self) -> None:
        _check(self.latent_dim > 0, "model.latent_dim", f"must be > 0, got {self.latent_dim}")
        _check(len(self.hidden_dims) > 0, "model.hidden_dims", "must list at least one width")
        for i, width in enumerate(self.hidden_dims):
            _check(width > 0, f"model.hidden_dims[{i}]", f"must be > 0, got {width}")
        _check(self.mixture_components > 0, "model.mixture_components", f"must be > 0, got {self.mixture_components}")
        _check(self.res_blocks_per_stage >= 0, "model.res_blocks_per_stage",
               f"must be >= 0, got {self.res_blocks_per_stage}")
        # Settings another kind would silently ignore are errors, naming the kind that uses them.
        convolutional = self.kind == "conv" or (self.kind == "hierarchical" and self.group_stage == "conv")
        for name, default in (("res_blocks_per_stage", 0), ("norm", "none")):
            _check(convolutional or getattr(self, name) == default, f"model.{name}",
                   f"only model.kind=conv and model.group_stage=conv use it (kind is {self.kind}); leave it unset")
        for name, default in (("latent_groups", []), ("group_hidden_dims", []), ("hierarchy", "top-down"),
                              ("group_stage", "mlp")):
            _check(self.kind == "hierarchical" or getattr(self, name) == default, f"model.{name}",
                   f"only model.kind=hierarchical uses it (kind is {self.kind}); leave it unset")
        if self.kind == "hierarchical":
            self._check_hierarchical()
        for name, default in (("factory", None), ("kwargs", {})):
            _check(self.kind == "custom" or getattr(self, name) == default, f"model.{name}",
                   f"only model.kind=custom uses it (kind is {self.kind}); set model.kind=custom or leave it unset")
        if self.kind == "custom":
            _check(self.factory is not None, "model.factory",
                   'model.kind=custom needs it: "package.module:function", e.g. --set model.factory=toyvae.model:build')
            module, _, function = self.factory.partition(":")
            _check(all(part.isidentifier() for part in module.split(".")) and function.isidentifier(),
                   "model.factory", f'must be "package.module:function" (Python names), got {self.factory!r}')

    def _check_hierarchical(self) -> None:
        groups = self.latent_groups
        _check(len(groups) > 0, "model.latent_groups",
               "model.kind=hierarchical needs the group sizes, bottom first, e.g. --set 'model.latent_groups=[100, 50]'")
        for i, size in enumerate(groups):
            _check(size > 0, f"model.latent_groups[{i}]", f"must be > 0, got {size}")
        _check(sum(groups) == self.latent_dim, "model.latent_dim",
               f"must equal the sum of model.latent_groups {groups} = {sum(groups)} (the dimension of all groups "
               f"together), got {self.latent_dim}; set model.latent_dim={sum(groups)}")
        _check(self.group_stage == "mlp" or self.hierarchy == "top-down", "model.group_stage",
               "conv stages need model.hierarchy=top-down (bottom-up reads each group from the group below, a vector)")
        if self.group_hidden_dims:
            _check(len(self.group_hidden_dims) == len(groups), "model.group_hidden_dims",
                   f"needs one list of widths per latent group ({len(groups)}: model.latent_groups {groups}), "
                   f"got {len(self.group_hidden_dims)}")
            _check(self.hidden_dims == ModelConfig.__dataclass_fields__["hidden_dims"].default_factory(),
                   "model.hidden_dims", "model.group_hidden_dims gives every group's widths; leave hidden_dims unset")
            for i, widths in enumerate(self.group_hidden_dims):
                _check(len(widths) > 0 and min(widths) > 0, f"model.group_hidden_dims[{i}]",
                       f"must list at least one width, each > 0, got {widths}")

    def stage_widths(self) -> list[list[int]]:
        """hierarchical: the deterministic widths below each latent group, bottom first."""
        return [list(w) for w in self.group_hidden_dims] or [list(self.hidden_dims) for _ in self.latent_groups]


@dataclass
class TrainConfig:
    epochs: int = 100
    """Passes over the training shards."""
    batch_size_per_worker: int = 128
    """Minibatch per data-parallel worker; the global batch is this times scaling.num_workers."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """Optimiser."""
    optimizer_kernel: Literal["auto", "fused", "foreach"] = "auto"
    """Adam's implementation: fused (one kernel for all parameters), foreach (a few batched kernels
    per step), or auto: fused on CUDA, foreach on CPU (fused measured no faster there)."""
    compile: bool = False
    """torch.compile the model before training (off: measured no faster for these models, and the
    first epoch pays the compilation; see the Performance page)."""
    step_mode: Literal["auto", "eager", "compile", "cuda_graph"] = "auto"
    """How the training step runs (vaedist/step.py builds each from the same engine code). eager: one
    kernel launch per operation, as written. cuda_graph: the whole step (forward, loss, backward,
    optimiser) captured once as a CUDA graph and replayed, with the learning-rate and KL schedules,
    the binarisation and the noise inside it, every batch padded to batch_size_per_worker (the last,
    partial one masked by zero weights); CUDA only. compile: the forward and loss through
    torch.compile on padded batches of the same static shape. auto: cuda_graph on CUDA where it
    applies (one worker, so no DDP; not with fp16, batch norm or train.compile; a model whose capture
    fails falls back to eager with a warning), eager elsewhere."""
    progress_every_steps: int = 0
    """Log the running training loss every N optimiser steps (0: once per epoch). Each log reads
    the sums back from the device, a host sync."""
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """Learning-rate schedule over the run (per step); cosine decays to lr_min_ratio * lr."""
    lr_min_ratio: float = 0.05
    """Final learning rate as a fraction of lr, for the cosine schedule."""
    warmup_epochs: float = 0.0
    """Linear learning-rate warm-up, in epochs (may be fractional)."""
    kl_warmup_epochs: float = 0.0
    """Anneal the KL weight from 0 to 1 over this many epochs (0: the plain ELBO throughout).
    Reported losses are always the unweighted negative ELBO."""
    num_samples_mc: int = 1
    """S, Monte Carlo samples of z per datapoint in the training loss (elbo, beta, free-bits; iwae
    draws iwae_samples instead, and this must stay 1)."""
    objective: Literal[tuple(OBJECTIVES)] = "elbo"
    """What training minimises (vaedist/objectives.py). elbo: the mean negative ELBO; beta: β·KL
    (Higgins et al. 2017); iwae: the importance-weighted bound with iwae_samples samples (Burda et
    al. 2016); free-bits: each latent dimension's batch-averaged KL floored at free_bits nats
    (Kingma et al. 2016). kl_warmup_epochs applies to each. Every epoch still reports the plain
    negative ELBO and its parts; the objective's own value is train_objective."""
    beta: float | None = None
    """objective=beta only (and required there): the KL's weight β; > 1 presses the code towards the
    prior, < 1 favours reconstruction. The KL warm-up multiplies it (weight = warm-up factor x β)."""
    iwae_samples: int | None = None
    """objective=iwae only (and required there): k, importance samples per datapoint, in place of
    num_samples_mc. Time and memory per step grow linearly with k: the decoder runs on
    batch_size_per_worker x k samples (the Performance page: `vaedist bench objectives`)."""
    free_bits: float | None = None
    """objective=free-bits only (and required there): λ, the nats of KL each latent dimension gets
    free, floored on the minibatch average of that dimension's KL (0: the ELBO)."""
    free_bits_per: Literal["dimension", "group"] = "dimension"
    """objective=free-bits: what each floor of λ nats applies to: every latent dimension, or every
    latent group's KL as a whole (model.latent_groups; a one-group model: its whole KL), as the Ladder
    VAE and NVAE apply it."""
    grad_clip_norm: float = 0.0
    """Clip the global gradient norm to this (0: no clipping)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast on GPU (fp16 adds a gradient scaler). Ignored on CPU."""
    max_steps_per_epoch: int = 0
    """Cap the optimiser steps per epoch (0: the whole training split). For CI and benchmarks."""
    eval_every_epochs: int = 1
    """Evaluate the test split every N epochs (and always after the last). The epochs in between
    report no test loss: their checkpoints rank last among the best-k, kept only while latest."""
    num_samples_iw_final: int = 0
    """K, importance samples for the test-set log p(x) estimate after training (0: skip)."""
    seed: int = 0
    """Seeds initialisation, shuffling and the per-epoch binarisation."""
    fail_at_epoch: int = -1
    """Fault injection for tests: rank 0 raises once when it starts this epoch (-1: never).
    The env var VAEDIST_FAIL_AT_EPOCH overrides it."""

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", f"must be > 0, got {self.epochs}")
        _check(self.batch_size_per_worker > 0, "train.batch_size_per_worker",
               f"must be > 0, got {self.batch_size_per_worker}")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(0 <= self.lr_min_ratio <= 1, "train.lr_min_ratio", f"must be in [0, 1], got {self.lr_min_ratio}")
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(self.kl_warmup_epochs >= 0, "train.kl_warmup_epochs", f"must be >= 0, got {self.kl_warmup_epochs}")
        _check(self.num_samples_mc > 0, "train.num_samples_mc", f"must be > 0, got {self.num_samples_mc}")
        _check(self.grad_clip_norm >= 0, "train.grad_clip_norm", f"must be >= 0, got {self.grad_clip_norm}")
        _check(self.progress_every_steps >= 0, "train.progress_every_steps",
               f"must be >= 0 (0 = once per epoch), got {self.progress_every_steps}")
        _check(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch",
               f"must be >= 0 (0 = no cap), got {self.max_steps_per_epoch}")
        _check(self.eval_every_epochs > 0, "train.eval_every_epochs", f"must be > 0, got {self.eval_every_epochs}")
        _check(self.num_samples_iw_final >= 0, "train.num_samples_iw_final",
               f"must be >= 0 (0 = skip), got {self.num_samples_iw_final}")
        _check(self.step_mode != "cuda_graph" or self.mixed_precision != "fp16", "train.step_mode",
               "cuda_graph cannot hold fp16's gradient scaler (its inf check reads the device every step); "
               "use train.mixed_precision=bf16 or no, or train.step_mode=eager")
        _check(self.step_mode != "cuda_graph" or not self.compile, "train.step_mode",
               "cuda_graph captures the step itself; set train.compile=false (or train.step_mode=compile)")
        self._check_objective()

    def _check_objective(self) -> None:
        """Each objective's own setting is required by it and refused by the others, so a setting
        that would be silently ignored (train.beta=4 under the elbo objective) is an error."""
        examples = {"beta": "4", "iwae_samples": "5", "free_bits": "0.5"}
        for objective, name in OBJECTIVES.items():
            if name is None:
                continue
            value = getattr(self, name)
            if self.objective == objective:
                _check(value is not None, f"train.{name}",
                       f"train.objective={objective} needs it, e.g. --set train.{name}={examples[name]}")
            else:
                _check(value is None, f"train.{name}",
                       f"is {value!r} but only train.objective={objective} uses it (objective is "
                       f"{self.objective}); set train.objective={objective} or leave train.{name} unset")
        if self.beta is not None:
            _check(self.beta > 0, "train.beta", f"must be > 0, got {self.beta}")
        if self.iwae_samples is not None:
            _check(self.iwae_samples >= 1, "train.iwae_samples", f"must be >= 1, got {self.iwae_samples}")
        if self.free_bits is not None:
            _check(self.free_bits >= 0, "train.free_bits", f"must be >= 0, got {self.free_bits}")
        _check(self.objective == "free-bits" or self.free_bits_per == "dimension", "train.free_bits_per",
               f"only train.objective=free-bits uses it (objective is {self.objective}); leave it unset")
        _check(self.objective != "iwae" or self.num_samples_mc == 1, "train.num_samples_mc",
               f"is {self.num_samples_mc}, but train.objective=iwae draws train.iwae_samples samples per "
               "datapoint instead; leave train.num_samples_mc at 1 and set train.iwae_samples")


@dataclass
class ScalingConfig:
    num_workers: int = 1
    """Data-parallel training workers (Ray Train)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL between them."""
    cpus_per_worker: float = 2.0
    """CPUs reserved per worker; also the worker's torch thread count."""
    address: str | None = None
    """Ray cluster to join ("auto", "ray://host:10001", ...). None: $RAY_ADDRESS, else an
    embedded local Ray."""

    def __post_init__(self) -> None:
        _check(self.num_workers > 0, "scaling.num_workers", f"must be > 0, got {self.num_workers}")
        _check(self.cpus_per_worker > 0, "scaling.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")


@dataclass
class EncodeConfig:
    checkpoint: str | None = None
    """Checkpoint to encode with: a checkpoint directory, or a run directory (its best checkpoint).
    None: the best checkpoint of output.run_name."""
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    """Which splits to encode."""
    batch_size: int = 128
    """Datapoints per forward pass in an encoder actor (S samples each: 128 keeps the decoder's
    activations in cache, measured ~20% faster than 512 on CPU)."""
    num_samples_mc: int = 16
    """S, Monte Carlo samples of z for each row's recon_nll."""
    num_samples_iw: int = 0
    """K, importance samples for each row's log_px and gap (0: omit those columns' values)."""
    iw_chunk_size: int = 100
    """Importance samples evaluated at once (bounds memory)."""
    concurrency: int = 2
    """Encoder actors (each loads the checkpoint once)."""
    cpus_per_actor: float = 1.0
    """CPUs per encoder actor."""
    use_gpu: bool = False
    """One GPU per encoder actor."""
    seed: int = 0
    """Base of the per-key seeds for z samples."""
    kl_per_dim: bool = False
    """Add the kl_dims column: each latent dimension's KL term per datapoint (float32[latent_dim]);
    with several latent groups each group's dimensions sum to its kl_groups entry."""

    def __post_init__(self) -> None:
        for i, split in enumerate(self.splits):
            _check(split in ("train", "test"), f"encode.splits[{i}]", f"must be 'train' or 'test', got {split!r}")
        _check(len(self.splits) > 0, "encode.splits", "must name at least one split")
        _check(len(set(self.splits)) == len(self.splits), "encode.splits", f"has duplicates: {self.splits}")
        _check(self.batch_size > 0, "encode.batch_size", f"must be > 0, got {self.batch_size}")
        _check(self.num_samples_mc > 0, "encode.num_samples_mc", f"must be > 0, got {self.num_samples_mc}")
        _check(self.num_samples_iw >= 0, "encode.num_samples_iw", f"must be >= 0 (0 = skip), got {self.num_samples_iw}")
        _check(self.iw_chunk_size > 0, "encode.iw_chunk_size", f"must be > 0, got {self.iw_chunk_size}")
        _check(self.concurrency > 0, "encode.concurrency", f"must be > 0, got {self.concurrency}")
        _check(self.cpus_per_actor > 0, "encode.cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")


@dataclass
class OutputConfig:
    storage_path: str = "outputs/runs"
    """Ray Train storage: run directories with checkpoints and metrics (local path or URI; shared
    by all nodes of a cluster)."""
    run_name: str = "vae-mnist"
    """Run directory name under storage_path; rerunning a name resumes it."""
    checkpoints_to_keep: int = 2
    """Best checkpoints kept by test loss (the latest is always kept too)."""
    checkpoint_every_epochs: int = 1
    """Checkpoint (and rewrite metrics.jsonl) every N epochs and after the last. On a GPU an epoch
    of MNIST is well under a second, and a synchronous checkpoint every epoch would dominate it;
    a failure then retrains at most N - 1 epochs."""
    keep_epochs: list[int] = field(default_factory=list)
    """Epochs whose checkpoints are kept for good, besides the best and the latest (for training
    dynamics: `vaedist encode --epochs 1,5,20` encodes several into one table). They are always
    checkpointed, whatever checkpoint_every_epochs says."""
    keep_every_epochs: int = 0
    """Also keep every N-th epoch's checkpoint for good (0: none)."""
    max_failures: int = 2
    """Restarts from the last checkpoint after a worker dies."""
    latents_dir: str = "outputs/latents"
    """Where the encode job publishes the Parquet latent table."""
    report_dir: str = "outputs/report"
    """Where `vaedist report` writes its figures and index.html."""

    def __post_init__(self) -> None:
        _check(bool(self.run_name) and "/" not in self.run_name, "output.run_name",
               f"must be a non-empty name without '/', got {self.run_name!r}")
        _check(self.checkpoints_to_keep > 0, "output.checkpoints_to_keep", f"must be > 0, got {self.checkpoints_to_keep}")
        _check(self.checkpoint_every_epochs > 0, "output.checkpoint_every_epochs",
               f"must be > 0, got {self.checkpoint_every_epochs}")
        for i, epoch in enumerate(self.keep_epochs):
            _check(epoch >= 0, f"output.keep_epochs[{i}]", f"must be an epoch >= 0, got {epoch}")
        _check(len(set(self.keep_epochs)) == len(self.keep_epochs), "output.keep_epochs",
               f"has duplicates: {self.keep_epochs}")
        _check(self.keep_every_epochs >= 0, "output.keep_every_epochs", f"must be >= 0 (0 = none), got {self.keep_every_epochs}")
        _check(self.max_failures >= -1, "output.max_failures", f"must be >= 0, or -1 for unlimited, got {self.max_failures}")


@dataclass
class TrackingConfig:
    enabled: bool | None = None
    """MLflow tracking: null (default) tracks when a URI is given (mlflow_uri or
    $MLFLOW_TRACKING_URI); true tracks, into the default store when no URI is given; false never
    tracks, even with $MLFLOW_TRACKING_URI set."""
    mlflow_uri: str | None = None
    """MLflow tracking URI (http://host:5000, sqlite:////abs/path/mlflow.db, databricks, ...). None:
    $MLFLOW_TRACKING_URI on the driver if set, else (with enabled: true) the SQLite store
    storage_path/mlflow.db, which `mlflow ui --backend-store-uri sqlite:///<that path>` opens."""
    experiment: str = "vaedist"
    """MLflow experiment the runs are recorded in (created when missing)."""

    def __post_init__(self) -> None:
        if self.mlflow_uri is not None:
            # A bare path would select MLflow's file store, which MLflow 3 refuses by default.
            _check("://" in self.mlflow_uri or self.mlflow_uri.startswith("databricks"), "tracking.mlflow_uri",
                   f"must be a tracking URI such as http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db, "
                   f"got {self.mlflow_uri!r}")
        _check(bool(self.experiment.strip()), "tracking.experiment", "must not be empty")


@dataclass
class SweepConfig:
    """`vaedist sweep` (vaedist/sweep): many training runs of this config, one per trial."""
    name: str | None = None
    """The sweep's directory under output.storage_path (its trials' run directories, sweep.json,
    sweep.parquet). None: output.run_name + '-sweep'. Rerunning a name resumes that sweep."""
    grid: list[str] = field(default_factory=list)
    """Grid axes, each 'section.key=v1,v2,...' (a list value in brackets: model.hidden_dims=[64],[128,64]);
    the trials are their cartesian product. `--grid` adds axes (and replaces one of the same key)."""
    sample: list[str] = field(default_factory=list)
    """Sampled keys, each 'section.key=loguniform(a,b)', 'uniform(a,b)', 'randint(a,b)' (a <= n < b)
    or 'choice(v1,v2,...)'; drawn num_samples times with `seed`, each draw with every grid point."""
    num_samples: int = 1
    """Draws of the sampled keys."""
    seed: int = 0
    """Seed of the draws: the same seed gives the same trials."""
    scheduler: Literal["none", "asha"] = "none"
    """asha: Ray Tune's asynchronous successive halving on each trial's test loss, stopping trials
    that are behind at epochs grace_epochs x reduction_factor^k (needs train.eval_every_epochs=1 to
    see every rung). none: every trial runs all its epochs."""
    asha_grace_epochs: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    asha_reduction_factor: int = 2
    """ASHA: the fraction 1/reduction_factor of trials at a rung goes on to the next."""
    max_concurrent_trials: int = 0
    """Trials running at once. 0: as many as the cluster's CPUs (and GPUs) hold at the largest
    trial's scaling.num_workers x scaling.cpus_per_worker."""
    max_trial_failures: int = 1
    """Times Ray Tune restarts a trial whose driver died (a worker failure inside a trial is
    output.max_failures' business); a trial that fails more is recorded as an error and the sweep goes on."""

    def __post_init__(self) -> None:
        if self.name is not None:
            _check(bool(self.name) and "/" not in self.name and not self.name.startswith("."), "sweep.name",
                   f"must be a non-empty name without '/' or a leading '.', got {self.name!r}")
        for i, axis in enumerate(self.grid):
            _check("=" in axis and bool(axis.split("=", 1)[0].strip()), f"sweep.grid[{i}]",
                   f"must be 'section.key=v1,v2,...', got {axis!r}")
        for i, item in enumerate(self.sample):
            _check("=" in item and bool(item.split("=", 1)[0].strip()), f"sweep.sample[{i}]",
                   f"must be 'section.key=loguniform(a,b)' (or uniform, randint, choice), got {item!r}")
        _check(self.num_samples > 0, "sweep.num_samples", f"must be > 0, got {self.num_samples}")
        _check(self.asha_grace_epochs > 0, "sweep.asha_grace_epochs", f"must be > 0, got {self.asha_grace_epochs}")
        _check(self.asha_reduction_factor >= 2, "sweep.asha_reduction_factor",
               f"must be >= 2, got {self.asha_reduction_factor}")
        _check(self.max_concurrent_trials >= 0, "sweep.max_concurrent_trials",
               f"must be >= 0 (0 = as many as the cluster holds), got {self.max_concurrent_trials}")
        _check(self.max_trial_failures >= 0, "sweep.max_trial_failures", f"must be >= 0, got {self.max_trial_failures}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self) -> None:
        if self.train.step_mode == "cuda_graph":
            _check(self.model.norm != "batch", "train.step_mode",
                   "cuda_graph pads the last partial batch to the static batch size, which would change batch "
                   "norm's statistics; use model.norm=group or layer, or train.step_mode=eager")
        binarises = self.model.likelihood in BINARISED_LIKELIHOODS
        if self.data.binarize is not None and self.data.binarize != binarises:
            levels = [n for n in LIKELIHOODS if n not in BINARISED_LIKELIHOODS]
            binarised = [n for n in LIKELIHOODS if n in BINARISED_LIKELIHOODS]
            raise ConfigError(
                f"data.binarize={str(self.data.binarize).lower()} does not fit model.likelihood={self.model.likelihood}: "
                + (f"{self.model.likelihood} models binarised pixels; for the 8-bit levels choose model.likelihood="
                   + _or_list(levels)
                   if binarises else f"{self.model.likelihood} models the 8-bit levels; for binarised pixels choose "
                   "model.likelihood=" + _or_list(binarised))
                + " (or leave data.binarize unset)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML (.yaml/.yml) or JSON (anything else)."""
        import yaml  # lazily: model.py imports this module and must stay free of YAML

        path = Path(path)
        text = (yaml.safe_dump(self.to_dict(), sort_keys=False) if path.suffix in (".yaml", ".yml")
                else json.dumps(self.to_dict(), indent=2))
        path.write_text(text)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with type checks that name the key.

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[0])} to {_type_name(get_args(tp)[1])}"
    if tp is Any:
        return "plain data (numbers, strings, booleans, null, lists, mappings)"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats."""
    origin = get_origin(tp)
    if origin is Literal:
        _check(value in get_args(tp), key, f"must be {_type_name(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        _check(isinstance(value, list), key, f"must be {_type_name(tp)}, got {value!r}")
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"must be {_type_name(tp)}, got {value!r}")
        key_tp, value_tp = get_args(tp)
        return {_coerce(k, key_tp, f"{key} (a key)"): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        # Only what YAML, JSON and torch.load(weights_only=True) all round-trip: the value is saved
        # in every checkpoint's config.
        if isinstance(value, dict):
            return {_coerce(k, str, f"{key} (a key)"): _coerce(v, Any, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [_coerce(v, Any, f"{key}[{i}]") for i, v in enumerate(value)]
        _check(value is None or isinstance(value, (bool, int, float, str)), key,
               f"must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    if tp is type(None):
        _check(value is None, key, f"must be null, got {value!r}")
        return None
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise ConfigError(f"{key}: unknown key; allowed: {', '.join(fields)}")
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _check(isinstance(value, dict), key, f"must be a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    import yaml
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.lr=3e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from None
    # YAML reads "3e-4" as a string (it wants "3.0e-4"); accept Python numeric literals too.
    if isinstance(value, str):
        try:
            literal = ast.literal_eval(raw.strip())
            if isinstance(literal, (int, float)):
                value = literal
        except (ValueError, SyntaxError):
            pass
    return key.split("."), value


def _merge_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _fix_floats(tree: Any) -> Any:
    """YAML 1.1 reads 1e-3 (no dot) as a string; turn numeric-looking strings back into numbers."""
    if isinstance(tree, dict):
        return {k: _fix_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_fix_floats(v) for v in tree]
    if isinstance(tree, str):
        try:
            literal = ast.literal_eval(tree)
            if isinstance(literal, float):
                return literal
        except (ValueError, SyntaxError):
            pass
    return tree


def config_from_dict(values: dict[str, Any] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    tree = _fix_floats(dict(values or {}))
    for item in overrides:
        path, value = _parse_override(item)
        _merge_override(tree, path, value)
    return _build(Config, tree, "")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (None: all defaults) and apply `section.key=value` overrides."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    try:
        return config_from_dict(values, overrides)
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), for help text and docs."""
    source = inspect.getsource(cls)
    tree = ast.parse(source)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
