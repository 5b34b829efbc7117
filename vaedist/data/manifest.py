"""The shard manifest, <shards_dir>/manifest.json, as a typed record: the one module that reads and
writes it. Everyone else uses the attributes.

    manifest = read_manifest("outputs/shards")
    manifest.dataset.image_shape                  # (28, 28, 1)
    manifest.split("train").num_samples           # DataError naming the file for a split it lacks
    [s.path for s in manifest.split("test").shards]

On disk (format 2): {"format_version", "dataset": {name, image_shape, dtype, num_classes,
class_names}, "members", "samples_per_shard", "source": {"kind", ...}, "splits": {split:
{"num_samples", "shards": [{path, first_index, num_samples, bytes, sha256}], "sources"?: {path,
bytes, sha256}}}}, with sorted keys and no timestamps, so its sha256 (manifest_hash) names the data.
Format 1 (MNIST only, before datasets had names: image_shape and image_dtype at the top) still reads,
as MNIST.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from vaedist import storage
from vaedist.data.common import FORMAT_VERSION, MNIST, DataError, DatasetInfo, _check_split

MANIFEST_NAME = "manifest.json"
MEMBERS = {"image": "npy", "label": "cls"}  # the shard members' extensions (the layout in shards.py)
READABLE_VERSIONS = (1, FORMAT_VERSION)


@dataclass(frozen=True)
class ShardEntry:
    """One shard: its path relative to the shards directory ('/'-separated), the index of its first
    datapoint, how many it holds, and its size and sha256 (checked on every read)."""
    path: str
    first_index: int
    num_samples: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "first_index": self.first_index, "num_samples": self.num_samples,
                "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardEntry":
        missing = [f for f in ("path", "num_samples", "first_index", "bytes", "sha256") if f not in d]
        if missing:
            raise ValueError(f"a shard without {', '.join(missing)}")
        return cls(path=str(d["path"]), first_index=int(d["first_index"]), num_samples=int(d["num_samples"]),
                   bytes=int(d["bytes"]), sha256=str(d["sha256"]))


@dataclass(frozen=True)
class FileEntry:
    """A file beside a split's shards (its sources.parquet), checked by size and sha256."""
    path: str
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FileEntry":
        return cls(path=str(d["path"]), bytes=int(d["bytes"]), sha256=str(d["sha256"]))


@dataclass(frozen=True)
class SplitEntry:
    """A split: its datapoint count, its shards in index order, and (external sources only) the file
    naming where each datapoint came from."""
    num_samples: int
    shards: tuple[ShardEntry, ...]
    sources: FileEntry | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"num_samples": self.num_samples, "shards": [s.to_dict() for s in self.shards]}
        if self.sources is not None:
            d["sources"] = self.sources.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SplitEntry":
        sources = d.get("sources")
        return cls(num_samples=int(d["num_samples"]), shards=tuple(ShardEntry.from_dict(s) for s in d["shards"]),
                   sources=FileEntry.from_dict(sources) if sources else None)


@dataclass(frozen=True)
class Manifest:
    """A shards directory's manifest. `path` is where it was read from (for errors; not written)."""
    dataset: DatasetInfo
    splits: dict[str, SplitEntry]
    samples_per_shard: int
    source: dict[str, Any] = field(default_factory=dict)
    """Where the data came from: {"kind": a source kind, ...} (the files' md5s, the plan, the transform)."""
    members: dict[str, str] = field(default_factory=lambda: dict(MEMBERS))
    format_version: int = field(default=FORMAT_VERSION, compare=False)
    """The version read (to_dict writes the current one)."""
    path: str = field(default="", compare=False)

    @property
    def source_kind(self) -> str | None:
        """The source kind that prepared the shards (None in format 1 manifests: MNIST's IDX files)."""
        return self.source.get("kind")

    def split(self, name: str) -> SplitEntry:
        """A split's entry; DataError naming the manifest for a split it does not hold."""
        if name not in self.splits:
            raise DataError(f"{self.path or MANIFEST_NAME} has no split {name!r} (it has {sorted(self.splits)})")
        return self.splits[name]

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form, always the current format (an old manifest is written back as format 2)."""
        return {"format_version": FORMAT_VERSION, "dataset": self.dataset.to_manifest(), "members": dict(self.members),
                "samples_per_shard": self.samples_per_shard, "source": self.source,
                "splits": {name: entry.to_dict() for name, entry in self.splits.items()}}

    @classmethod
    def from_dict(cls, d: Any, path: str = "") -> "Manifest":
        """Any readable format; DataError naming `path` for an unknown version or a malformed record."""
        where = path or MANIFEST_NAME
        version = d.get("format_version") if isinstance(d, dict) else None
        if version not in READABLE_VERSIONS:
            raise DataError(f"{where}: format_version {version!r}, this vaedist reads "
                            f"{' and '.join(map(str, READABLE_VERSIONS))}; prepare the shards again")
        try:
            # Format 1: before datasets had names, every manifest was MNIST's, 28 x 28 grey levels.
            dataset = MNIST if version == 1 else DatasetInfo.from_manifest(d["dataset"])
            splits = {}
            for name, entry in d["splits"].items():
                _check_split(name)
                try:
                    splits[name] = SplitEntry.from_dict(entry)
                except (KeyError, TypeError, AttributeError, ValueError) as e:
                    raise ValueError(f"{name} split: {e}") from None
            return cls(dataset=dataset, splits=splits, samples_per_shard=int(d.get("samples_per_shard", 0)),
                       source=dict(d.get("source") or {}), members=dict(d.get("members") or MEMBERS),
                       format_version=version, path=path)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise DataError(f"{where}: malformed manifest ({e})") from None

    def to_json_bytes(self) -> bytes:
        """Canonical bytes (sorted keys, no timestamps), so manifest_hash identifies the data."""
        return (json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n").encode()


def manifest_path(shards_dir: str) -> str:
    return storage.join(shards_dir, MANIFEST_NAME)


def _read_manifest_bytes(shards_dir: str) -> tuple[bytes, str]:
    path = manifest_path(shards_dir)
    if not storage.exists(path):
        raise DataError(f"{path} not found: prepare the shards first (vaedist data prepare)")
    try:
        return storage.read_bytes(path), path
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e})") from None


def read_manifest(shards_dir: str) -> Manifest:
    """The manifest of a shards directory, checked for format version and shape."""
    raw, path = _read_manifest_bytes(shards_dir)
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    return Manifest.from_dict(d, path)


def write_manifest(out_dir: str, manifest: Manifest) -> None:
    """Last, after every shard: its presence means the shards are complete. A reader never sees half
    a file under the final name (on S3 the move is copy-then-delete)."""
    path = manifest_path(out_dir)
    storage.write_bytes(path + ".partial", manifest.to_json_bytes())
    storage.move(path + ".partial", path)


def manifest_hash(shards_dir: str) -> str:
    """sha256 of manifest.json: names the exact data a run trained on (the file is canonical)."""
    return hashlib.sha256(_read_manifest_bytes(shards_dir)[0]).hexdigest()
