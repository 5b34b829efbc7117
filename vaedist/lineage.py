"""A latent table's lineage as a typed record: what encoded it (checkpoint, config, seeds, estimator),
from which data, and (in `_lineage.json` only) which job wrote it and how many rows. The one module
that reads and writes it; everyone else uses the attributes.

    lineage = read_lineage("outputs/latents")
    lineage.checkpoint, lineage.manifest_hash, lineage.class_names

It is stored twice: `<table>/_lineage.json` and, without `rows` and `job` (so the same inputs give
byte-identical files), in every Parquet file's schema metadata (schema.METADATA_KEY). Tables written
before the record had a version (0) read alike: a field they lack is None, except `binarised`, True
(every such table modelled binarised draws).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from vaedist import storage

LINEAGE_FILE = "_lineage.json"
# 1: the record says its version.
LINEAGE_VERSION = 1
_ABSENT_UNLESS_SET = ("epochs", "checkpoints", "rows", "job", "latent_groups")  # written only when they say something


class LineageError(ValueError):
    """A lineage that cannot be read; the message names the file."""


@dataclass(frozen=True)
class Lineage:
    checkpoint: str | None = None
    """The checkpoint that encoded the table (of several: the last epoch's)."""
    checkpoint_epoch: int | None = None
    config: dict[str, Any] | None = None
    """The checkpoint's resolved config, as a dict."""
    manifest_hash: str | None = None
    """sha256 of the encoded shards' manifest.json."""
    shards_dir: str | None = None
    splits: list[str] | None = None
    train_manifest_hash: str | None = None
    """The manifest the model was trained on (beside the encoded one)."""
    train_dataset: str | None = None
    same_data_as_training: bool | None = None
    dataset: str | None = None
    image_shape: list[int] | None = None
    """(height, width, channels) of the encoded images."""
    class_names: list[str] | None = None
    """Index = label; None where the dataset names no classes."""
    num_samples_mc: int | None = None
    num_samples_iw: int | None = None
    seed: int | None = None
    """encode.seed: the keyed noise of z and the importance samples."""
    binarize_seed: int | None = None
    latent_dim: int | None = None
    latent_groups: list[int] | None = None
    """The sizes of the model's latent groups, z_1 (next to x) first, summing to latent_dim; only for
    a model of several groups (its table has kl_groups, and mu/logvar/z hold every group's)."""
    likelihood: str | None = None
    binarised: bool = True
    """Whether p(x|z) modelled binarised draws (compare refuses to mix them with 8-bit pixels)."""
    noise_scheme: str | None = None
    schema_version: int | None = None
    vaedist_version: str | None = None
    epochs: list[int] | None = None
    """A table of several checkpoints of one run: their epochs."""
    checkpoints: list[dict[str, Any]] | None = None
    """... and their paths: [{"epoch", "path"}]."""
    rows: dict[str, int] | None = None
    """Rows per split (per checkpoint), as verified before publishing; _lineage.json only."""
    job: dict[str, Any] | None = None
    """The job that wrote the table: {"command", "host", "started"}; _lineage.json only."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys this vaedist does not know, kept as they were."""
    version: int = field(default=LINEAGE_VERSION, compare=False)
    """The version read (to_dict writes the current one)."""

    def checkpoint_of_epoch(self, epoch: int) -> str | None:
        """The path of the checkpoint that encoded `epoch`, where the lineage lists it."""
        for entry in self.checkpoints or []:
            if isinstance(entry, dict) and entry.get("epoch") == epoch and entry.get("path"):
                return str(entry["path"])
        return None

    def replace(self, **changes: Any) -> "Lineage":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"version": LINEAGE_VERSION}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "version"):
                continue
            value = getattr(self, f.name)
            if value is None and f.name in _ABSENT_UNLESS_SET:
                continue
            d[f.name] = value
        return {**self.extra, **d}

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> "Lineage":
        """Any version this vaedist reads; LineageError naming `path` for another or a malformed one."""
        where = path or LINEAGE_FILE
        if not isinstance(d, dict):
            raise LineageError(f"{where}: a lineage is a JSON object, got {type(d).__name__}")
        version = d.get("version", 0)
        if not isinstance(version, int) or not 0 <= version <= LINEAGE_VERSION:
            raise LineageError(f"{where}: lineage version {version!r}; this vaedist reads versions 0 to "
                               f"{LINEAGE_VERSION} (written by a newer vaedist?)")
        names = d.get("class_names")
        if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise LineageError(f"{where}: class_names must be a list of strings (index = label), got {names!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra", "version"}
        values = {k: v for k, v in d.items() if k in known}
        if values.get("binarised") is None:
            values.pop("binarised", None)
        return cls(**values, extra={k: v for k, v in d.items() if k not in known and k != "version"},
                   version=version)


def lineage_path(latents_dir: str) -> str:
    return storage.join(str(latents_dir), LINEAGE_FILE)


def read_lineage(latents_dir: str) -> Lineage:
    """A table's `_lineage.json`; LineageError naming the file when it is missing or unreadable."""
    path = lineage_path(latents_dir)
    if not storage.exists(path):
        raise LineageError(f"{path} not found: {latents_dir} is not a published vaedist latent table")
    return Lineage.from_dict(storage.read_json_object(path, LineageError), path)


def write_lineage(directory: str, lineage: Lineage) -> None:
    storage.write_bytes(lineage_path(directory), lineage.to_json_bytes())


def lineage_from_metadata(raw: bytes | None) -> Lineage | None:
    """The copy in a Parquet file's schema metadata (schema.METADATA_KEY), if it has one."""
    return Lineage.from_dict(json.loads(raw), "Parquet schema metadata") if raw else None
