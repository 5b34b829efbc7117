"""Checkpoints: model weights, optimiser state, progress, the resolved config and the shard
manifest's hash, in one file that loads with torch.load(weights_only=True). No Ray.

The file's contents are a CheckpointState (a typed, versioned record; this module is its one reader
and writer): load_checkpoint returns one, and everyone else uses its attributes.

A checkpoint directory holds `checkpoint.pt` and a human-readable `config.yaml`. A run directory
(storage_path/run_name) holds checkpoint directories named `epoch-NNNN` (Ray Train's, the best and
the latest), `kept/epoch-NNNN` (output.keep_epochs, kept for good) and `metrics.jsonl`.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from vaedist import __version__, storage
from vaedist.config import Config, ConfigError, config_from_dict
from vaedist.model import VAE, build_model

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_DIR_RE = re.compile(r"^epoch-(\d{4,})$")
METRICS_FILE = "metrics.jsonl"
KEPT_DIR = "kept"
MNIST_SHAPE = (28, 28, 1)  # what checkpoints from before datasets had shapes were trained on
# 1: the record says its version. Files without one (0) are read alike; a missing "data" entry
# means MNIST (before datasets had names).
CHECKPOINT_VERSION = 1
_REQUIRED = ("model", "config", "epoch", "manifest_hash")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit; the message names the path."""


@dataclass(eq=False)  # tensors have no truth value to compare by
class CheckpointState:
    """What checkpoint.pt holds. `path` is the file it was read from (not stored in it)."""
    model: dict[str, torch.Tensor]
    """The model's state_dict, on the CPU."""
    config: dict[str, Any]
    """The resolved config as a dict (config_of(state) makes it a Config, checked)."""
    epoch: int
    manifest_hash: str
    """sha256 of the training shards' manifest.json."""
    global_step: int = 0
    optimizer: dict | None = None
    scaler: dict | None = None
    """The mixed-precision grad scaler's state (None without fp16)."""
    history: list[dict] = field(default_factory=list)
    """The metrics rows of the epochs so far (metrics.jsonl's)."""
    dataset: str = "mnist"
    image_shape: tuple[int, int, int] = MNIST_SHAPE
    vaedist_version: str = ""
    version: int = CHECKPOINT_VERSION
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The dict torch.save writes (plain containers and tensors: loads with weights_only=True)."""
        return {"version": CHECKPOINT_VERSION,
                "data": {"dataset": self.dataset, "image_shape": list(self.image_shape)},
                "model": self.model, "optimizer": self.optimizer, "scaler": self.scaler, "epoch": self.epoch,
                "global_step": self.global_step, "config": self.config, "manifest_hash": self.manifest_hash,
                "history": self.history, "vaedist_version": self.vaedist_version}

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> "CheckpointState":
        """Any version this vaedist reads; CheckpointError naming `path` for another or a foreign dict."""
        where = path or CHECKPOINT_FILE
        if not isinstance(d, dict):
            raise CheckpointError(f"checkpoint {where} is not a vaedist checkpoint (a {type(d).__name__})")
        version = d.get("version", 0)
        if not isinstance(version, int) or not 0 <= version <= CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint {where} has version {version!r}; this vaedist reads versions 0 to "
                                  f"{CHECKPOINT_VERSION} (written by a newer vaedist?)")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise CheckpointError(f"checkpoint {where} is not a vaedist checkpoint (missing {sorted(missing)})")
        data = d.get("data") or {}
        return cls(model=d["model"], config=d["config"], epoch=int(d["epoch"]), manifest_hash=str(d["manifest_hash"]),
                   global_step=int(d.get("global_step", 0)), optimizer=d.get("optimizer"), scaler=d.get("scaler"),
                   history=list(d.get("history") or []), dataset=str(data.get("dataset", "mnist")),
                   image_shape=tuple(int(x) for x in data.get("image_shape", MNIST_SHAPE)),
                   vaedist_version=str(d.get("vaedist_version", "")), version=version, path=path)


def checkpoint_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def run_dir_of(cfg: Config) -> str:
    """storage_path/run_name, made absolute: where a run's checkpoints and metrics live."""
    return storage.join(storage.absolute(cfg.output.storage_path), cfg.output.run_name)


def run_dir_of_checkpoint(checkpoint: str) -> str | None:
    """The run directory holding a checkpoint (<run_dir>/epoch-NNNN or <run_dir>/kept/epoch-NNNN,
    with or without /checkpoint.pt); None for a checkpoint outside a run directory. Paths and URIs
    alike: both separate with '/'."""
    path = str(checkpoint).rstrip("/")
    if path.endswith("/" + CHECKPOINT_FILE):
        path = path[: -len(CHECKPOINT_FILE) - 1]
    parent, _, name = path.rpartition("/")
    if not (parent and CHECKPOINT_DIR_RE.match(name)):
        return None
    grandparent, _, parent_name = parent.rpartition("/")
    return grandparent if parent_name == KEPT_DIR and grandparent else parent


def save_checkpoint(directory: str, *, model_state: dict, optimizer_state: dict | None, epoch: int,
                    global_step: int, config: Config, manifest_hash: str, history: list[dict],
                    scaler_state: dict | None = None, dataset: str = "mnist",
                    image_shape: tuple[int, int, int] = MNIST_SHAPE) -> str:
    """Write checkpoint.pt (+ config.yaml) into `directory`; returns the file path."""
    import yaml

    state = CheckpointState(model={k: v.detach().cpu() for k, v in model_state.items()}, config=config.to_dict(),
                            epoch=epoch, manifest_hash=manifest_hash, global_step=global_step,
                            optimizer=optimizer_state, scaler=scaler_state, history=history, dataset=dataset,
                            image_shape=tuple(image_shape), vaedist_version=__version__)
    buf = io.BytesIO()
    torch.save(state.to_dict(), buf)
    path = storage.join(directory, CHECKPOINT_FILE)
    storage.write_bytes(path, buf.getvalue())
    storage.write_bytes(storage.join(directory, "config.yaml"),
                        yaml.safe_dump(config.to_dict(), sort_keys=False).encode())
    return path


def resolve_checkpoint_path(path: str) -> str:
    """Accept a checkpoint file, a checkpoint directory, or a run directory (its best checkpoint)."""
    path = str(path)
    if path.endswith(".pt"):
        if not storage.exists(path):
            raise CheckpointError(f"checkpoint {path} does not exist")
        return path
    if not storage.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    direct = storage.join(path, CHECKPOINT_FILE)
    if storage.exists(direct):
        return direct
    best = best_checkpoint_dir(path)
    if best is None:
        raise CheckpointError(f"{path} holds no {CHECKPOINT_FILE} and no epoch-NNNN checkpoint directories")
    return storage.join(best, CHECKPOINT_FILE)


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> CheckpointState:
    """The checkpoint's state (weights_only: no arbitrary code runs on load)."""
    file = resolve_checkpoint_path(path)
    try:
        raw = torch.load(io.BytesIO(storage.read_bytes(file)), map_location=map_location, weights_only=True)
    except Exception as e:  # a torn or foreign file: say which
        raise CheckpointError(f"checkpoint {file} cannot be read: {e}") from None
    return CheckpointState.from_dict(raw, file)


def config_of(state: CheckpointState) -> Config:
    try:
        return config_from_dict(state.config)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {state.path} holds an invalid config: {e}") from None


def check_data_compatible(state: CheckpointState, dataset: str, image_shape: tuple[int, int, int],
                          shards_dir: str) -> None:
    """Refuse a checkpoint trained on images of another shape or channel count than the shards' (its
    input layer would not fit), naming both. Other data of the same shape is fine: a model may encode
    data it was not trained on."""
    if state.image_shape != tuple(image_shape):
        raise CheckpointError(f"checkpoint {state.path} was trained on {state.dataset} images of shape "
                              f"{list(state.image_shape)}, but the shards in {shards_dir} hold {dataset} images "
                              f"of shape {list(image_shape)} (height, width, channels): its input layer takes only "
                              "the first")


def check_model_compatible(state: CheckpointState, cfg: Config) -> None:
    """Refuse a checkpoint whose model shape differs from the config's, naming the fields."""
    saved = config_of(state).model
    diffs = [f"model.{k}: checkpoint {v!r} vs config {getattr(cfg.model, k)!r}"
             for k, v in asdict(saved).items() if getattr(cfg.model, k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {state.path} has a different model shape: " + "; ".join(diffs))


def load_model(path: str, map_location: str | torch.device = "cpu") -> tuple[VAE, Config, CheckpointState]:
    """(model in eval mode, the config it was trained with, the checkpoint's state)."""
    state = load_checkpoint(path, map_location)
    cfg = config_of(state)
    try:
        model = build_model(cfg.model, state.image_shape)
    except ConfigError as e:  # model.kind=custom: its factory must import (and build) here too
        raise CheckpointError(f"checkpoint {state.path}: {e}") from None
    try:
        model.load_state_dict(state.model)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {state.path}: weights do not fit its own config: {e}") from None
    return model.to(map_location).eval(), cfg, state


def checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """(epoch, directory) of the checkpoints under a run directory, oldest first."""
    found = []
    for name in storage.listdir(run_dir):
        m = CHECKPOINT_DIR_RE.match(name)
        if m and storage.exists(storage.join(run_dir, name, CHECKPOINT_FILE)):
            found.append((int(m.group(1)), storage.join(run_dir, name)))
    return sorted(found)


def kept_checkpoint_dirs(run_dir: str) -> list[tuple[int, str]]:
    """(epoch, directory) of the checkpoints kept for good (output.keep_epochs), oldest first."""
    return checkpoint_dirs(storage.join(run_dir, KEPT_DIR))


def checkpoint_for_epoch(run_dir: str, epoch: int) -> str:
    """The directory of epoch `epoch`'s checkpoint (kept for good, or still among Ray's)."""
    found = dict(checkpoint_dirs(run_dir)) | dict(kept_checkpoint_dirs(run_dir))
    if epoch not in found:
        raise CheckpointError(f"run {run_dir} has no checkpoint of epoch {epoch}; it has epochs "
                              f"{sorted(found) or 'none'} (keep more with output.keep_epochs)")
    return found[epoch]


def latest_checkpoint_dir(run_dir: str) -> str | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1][1] if dirs else None


def newest_readable_checkpoint(run_dir: str, after_epoch: int = -1,
                               map_location: str | torch.device = "cpu") -> CheckpointState | None:
    """The state of the newest checkpoint after `after_epoch` that loads; torn ones (a failure during
    the upload) are passed over."""
    for epoch, directory in reversed(checkpoint_dirs(run_dir)):
        if epoch <= after_epoch:
            break
        try:
            return load_checkpoint(directory, map_location)
        except CheckpointError:
            continue
    return None


def best_checkpoint_dir(run_dir: str) -> str | None:
    """The kept checkpoint with the lowest test loss, by the run's metrics.jsonl."""
    dirs = dict(checkpoint_dirs(run_dir))
    if not dirs:
        return None
    scores = {row["epoch"]: row["test_loss"] for row in read_metrics(run_dir)
              if row.get("kind") == "epoch" and row["epoch"] in dirs and row.get("test_loss") is not None}
    if not scores:
        return dirs[max(dirs)]
    return dirs[min(scores, key=lambda e: (scores[e], -e))]


def read_metrics(run_dir: str) -> list[dict]:
    """The run's metrics.jsonl rows (one per epoch, plus a final row), without Ray."""
    path = storage.join(run_dir, METRICS_FILE)
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


def write_metrics(run_dir: str, rows: list[dict]) -> None:
    """Rewrite metrics.jsonl whole (object stores cannot append; the file is small)."""
    text = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
    storage.write_bytes(storage.join(run_dir, METRICS_FILE), text.encode())
