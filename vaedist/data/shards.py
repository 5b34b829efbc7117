"""The WebDataset shards: reproducible writing, the manifest, verification and the fast reader.

Shard layout (FORMAT_VERSION 2; this module is its one source of truth):
<shards_dir>/<split>/<split>-000000.tar, ... are plain ustar archives. Datapoint `index` of `split`
is two adjacent members, `<key>.cls` (the label as ASCII digits) then `<key>.npy` (np.save of the
uint8 image, original grey or colour levels: [H, W] for one channel, else [H, W, C]),
key = key_for(split, index); shard i holds indices [i * samples_per_shard, ...) in order.
<shards_dir>/manifest.json names the dataset (name, image shape, class names) and lists every
shard with its size and sha256; it is written last, so its presence means the shards are complete.
Its record, reader and writer are vaedist.data.manifest's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np

from vaedist import storage
from vaedist.console import LineProgress
from vaedist.data.common import MNIST, SPLITS, UNLABELLED, DataError, DatasetInfo, key_for, parse_key
from vaedist.data.manifest import (FileEntry, Manifest, ShardEntry, SplitEntry, manifest_path, read_manifest,
                                   write_manifest)

IMAGE_EXT = "npy"
LABEL_EXT = "cls"


def _shard_name(split: str, shard_index: int) -> str:
    return f"{split}-{shard_index:06d}.tar"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Every field fixed, so the same datapoints always give byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.type = size, 0, 0o644, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _shard_bytes(split: str, first_index: int, images: np.ndarray, labels: np.ndarray) -> bytes:
    """One shard's bytes: datapoints first_index, first_index + 1, ... of `split`, laid out with NumPy:
    ~10x faster than tarfile and the same bytes (the tests check it against tarfile's)."""
    return _shard_bytes_canonical(split, first_index, images, [b"%d" % int(label) for label in labels])


# Byte offsets of one datapoint in a shard written by _shard_bytes: 512-byte tar blocks, the
# header of each member followed by its data padded to a whole block.
_BLOCK = tarfile.BLOCKSIZE
_LABEL_AT = _BLOCK
_IMAGE_HEADER_AT = 2 * _BLOCK
_NAME, _CHKSUM = slice(0, 100), slice(148, 156)  # ustar header fields that differ between members


@dataclass(frozen=True)
class _Layout:
    """Where the bytes of one datapoint lie, for one stored image shape: the label's text (any length
    up to a block; only its header's size field and checksum depend on it) fills the block after its
    header, so every datapoint takes the same `record` bytes."""
    npy_header: bytes    # what np.save writes before the pixels of any uint8 image of this shape
    num_pixels: int
    pixels_at: int
    record: int          # bytes per datapoint
    image_template: np.ndarray


@lru_cache(maxsize=8)
def _layout(stored_shape: tuple[int, ...]) -> _Layout:
    num_pixels = int(np.prod(stored_shape))
    buf = io.BytesIO()
    np.save(buf, np.zeros(stored_shape, np.uint8))
    header = buf.getvalue()[:-num_pixels]
    return _Layout(
        npy_header=header, num_pixels=num_pixels, pixels_at=3 * _BLOCK + len(header),
        record=3 * _BLOCK + -(-(len(header) + num_pixels) // _BLOCK) * _BLOCK,
        image_template=np.frombuffer(_tarinfo("x", len(header) + num_pixels).tobuf(tarfile.USTAR_FORMAT), np.uint8))


@lru_cache(maxsize=64)
def _label_template(size: int) -> np.ndarray:
    """The ustar header of a label member of `size` bytes (name and checksum to be filled in)."""
    return np.frombuffer(_tarinfo("x", size).tobuf(tarfile.USTAR_FORMAT), np.uint8)


def _headers_for(template: np.ndarray, names: list[bytes]) -> np.ndarray:
    """[n, 512] ustar headers: the template with each name and its POSIX checksum ("%06o\\0 ")."""
    headers = np.repeat(template[None, :], len(names), axis=0)
    headers[:, _NAME] = np.frombuffer(b"".join(name.ljust(100, b"\0") for name in names), np.uint8).reshape(-1, 100)
    headers[:, _CHKSUM] = ord(" ")
    checksum = headers.sum(axis=1, dtype=np.int64)
    headers[:, 148:154] = (checksum[:, None] // 8 ** np.arange(5, -1, -1)) % 8 + ord("0")
    headers[:, 154] = 0
    return headers


def _shard_bytes_canonical(split: str, first_index: int, images: np.ndarray, label_texts: list[bytes]) -> bytes:
    """What tarfile writes for these members (each member's TarInfo as _tarinfo fixes it), laid out with
    NumPy (see _Layout); label_texts b"%d" each."""
    lay = _layout(images.shape[1:])
    n = len(images)
    keys = [key_for(split, first_index + i).encode() for i in range(n)]
    records = np.zeros((n, lay.record), np.uint8)
    sizes = np.fromiter(map(len, label_texts), np.int64, n)
    for size in np.unique(sizes).tolist():
        rows = np.flatnonzero(sizes == size)
        records[rows, :_BLOCK] = _headers_for(_label_template(size),
                                              [keys[i] + f".{LABEL_EXT}".encode() for i in rows])
        text = np.frombuffer(b"".join(label_texts[i] for i in rows), np.uint8).reshape(len(rows), size)
        records[rows, _LABEL_AT:_LABEL_AT + size] = text
    records[:, _IMAGE_HEADER_AT:_IMAGE_HEADER_AT + _BLOCK] = _headers_for(
        lay.image_template, [k + f".{IMAGE_EXT}".encode() for k in keys])
    header = np.frombuffer(lay.npy_header, np.uint8)
    records[:, lay.pixels_at - len(header):lay.pixels_at] = header
    records[:, lay.pixels_at:lay.pixels_at + lay.num_pixels] = images.reshape(n, -1)
    # tarfile's close: two zero blocks, then zeros up to a whole 10240-byte record.
    size = records.nbytes + 2 * _BLOCK
    return records.tobytes() + bytes(2 * _BLOCK + -size % tarfile.RECORDSIZE)


def _headers_match(headers: np.ndarray, template: np.ndarray, names: list[bytes]) -> bool:
    """Each [512] header is the template with the given name and a correct checksum."""
    if not (np.array_equal(headers[:, 100:148], np.broadcast_to(template[100:148], (len(headers), 48)))
            and np.array_equal(headers[:, 156:], np.broadcast_to(template[156:], (len(headers), 356)))):
        return False
    expected = np.frombuffer(b"".join(name.ljust(100, b"\0") for name in names), np.uint8)
    if not np.array_equal(headers[:, _NAME], expected.reshape(-1, 100)):
        return False
    # POSIX checksum: the byte sum with the checksum field read as spaces, stored as "%06o\0 ".
    digits = headers[:, 148:154].astype(np.int64) - ord("0")
    stored = digits @ (8 ** np.arange(5, -1, -1))
    actual = headers.sum(axis=1, dtype=np.int64) - headers[:, _CHKSUM].sum(axis=1, dtype=np.int64) + 8 * 32
    return bool(((digits >= 0) & (digits <= 7)).all() and np.array_equal(stored, actual)
                and np.array_equal(headers[:, 154:156], np.broadcast_to(template[154:156], (len(headers), 2))))


def _canonical_labels(records: np.ndarray, names: list[bytes], info: DatasetInfo) -> np.ndarray | None:
    """The labels (int64) of a shard's records in _shard_bytes' layout, read from each label member's
    header (its size field says how many digits) and its text; None where anything differs from what
    _shard_bytes writes for a valid label of `info` (the tarfile path then reads it or names the fault)."""
    headers = records[:, :_BLOCK]
    octal = headers[:, 124:135].astype(np.int64) - ord("0")  # ustar size: 11 octal digits and a NUL
    if not (((octal >= 0) & (octal <= 7)).all() and not headers[:, 135].any()):
        return None
    sizes = octal @ (8 ** np.arange(10, -1, -1))
    labels = np.empty(len(records), np.int64)
    for size in np.unique(sizes).tolist():
        if not 1 <= size <= 19:  # int64's digits; no dataset has more classes
            return None
        rows = np.flatnonzero(sizes == size)
        if not _headers_match(headers[rows], _label_template(size), [names[i] for i in rows]):
            return None
        text = records[rows, _LABEL_AT:_LABEL_AT + size]
        if info.num_classes == 0:  # unlabelled: every label is UNLABELLED, written "-1"
            if size != 2 or not (text == np.frombuffer(b"%d" % UNLABELLED, np.uint8)).all():
                return None
            labels[rows] = UNLABELLED
            continue
        digits = text.astype(np.int64) - ord("0")
        if not ((digits >= 0) & (digits <= 9)).all() or (size > 1 and (digits[:, 0] == 0).any()):
            return None
        labels[rows] = digits @ (10 ** np.arange(size - 1, -1, -1, dtype=np.int64))
    if info.num_classes and (labels >= info.num_classes).any():
        return None
    return labels


def _decode_canonical(buf: bytes, info: DatasetInfo) -> tuple[str, np.ndarray, np.ndarray, np.ndarray] | None:
    """(split, indices, images [n, pixels] view, labels int64) by slicing, with no per-sample Python.

    Only for a shard in exactly the layout _shard_bytes writes for the dataset's image shape, which
    every byte that tarfile would read is checked against; anything else returns None and the caller
    falls back to the tarfile reader, which accepts other writers' layouts and names the problem in
    damaged ones.
    """
    lay = _layout(info.stored_shape)
    data = np.frombuffer(buf, np.uint8)
    records = data[: len(data) // lay.record * lay.record].reshape(-1, lay.record)
    ends = np.flatnonzero(records[:, 0] == 0)  # the zero blocks that end a tar start with a NUL name
    n = int(ends[0]) if len(ends) else len(records)
    tail = data[n * lay.record:]
    if n == 0 or len(tail) < 2 * _BLOCK or tail.any():
        return None
    records = records[:n]
    first_name = bytes(records[0, _NAME]).split(b"\0", 1)[0].decode("ascii", "replace")
    try:
        split, first_index = parse_key(first_name.removesuffix(f".{LABEL_EXT}"))
    except DataError:
        return None
    keys = [key_for(split, first_index + i).encode() for i in range(n)]
    label_ext, image_ext = f".{LABEL_EXT}".encode(), f".{IMAGE_EXT}".encode()
    npy_header = np.frombuffer(lay.npy_header, np.uint8)
    if not (_headers_match(records[:, _IMAGE_HEADER_AT:_IMAGE_HEADER_AT + _BLOCK], lay.image_template,
                           [k + image_ext for k in keys])
            and np.array_equal(records[:, lay.pixels_at - len(npy_header):lay.pixels_at],
                               np.broadcast_to(npy_header, (n, len(npy_header))))):
        return None
    labels = _canonical_labels(records, [k + label_ext for k in keys], info)
    if labels is None:
        return None
    indices = np.arange(first_index, first_index + n, dtype=np.int64)
    return split, indices, records[:, lay.pixels_at:lay.pixels_at + lay.num_pixels], labels


def _tar_members(buf: bytes, path: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each member of an uncompressed tar, by the book."""
    last = None  # the member before any damage, for the message
    try:
        tar = tarfile.open(fileobj=io.BytesIO(buf), mode="r:")
        while (info := tar.next()) is not None:
            if not info.isfile():
                raise DataError(f"shard {path}: member {info.name!r} is not a regular file")
            yield info.name, tar.extractfile(info).read()
            last = info.name
        end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as e:
        after = f" after member {last!r}" if last else ""
        raise DataError(f"shard {path}: unreadable tar{after} ({e}); truncated or corrupt") from None
    # tarfile takes a damaged header after the first for the end of the archive; a real end is
    # at least two zero blocks.
    tail = buf[end:]
    if len(tail) < 2 * _BLOCK or tail.strip(b"\0"):
        raise DataError(f"shard {path}: tar members stop at byte {end} of {len(buf)}, after {last!r}, "
                        "without an end-of-archive marker; truncated or corrupt")


def _decode_sample(path: str, key: str, fields: dict[str, bytes], info: DatasetInfo) -> tuple[str, np.ndarray, int]:
    where = f"shard {path}, key {key!r}"
    try:
        parse_key(key)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    for ext in (IMAGE_EXT, LABEL_EXT):
        if ext not in fields:
            raise DataError(f"{where}: no .{ext} member")
    try:
        image = np.load(io.BytesIO(fields[IMAGE_EXT]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{where}: .{IMAGE_EXT} is not a readable array ({e})") from None
    if image.shape != info.stored_shape or image.dtype != np.uint8:
        raise DataError(f"{where}: image has shape {image.shape} and dtype {image.dtype}, but the "
                        f"{info.name} manifest says {info.stored_shape} uint8")
    text = fields[LABEL_EXT].decode("ascii", "replace").strip()
    if info.num_classes == 0:  # unlabelled data: every label is UNLABELLED
        if text != str(UNLABELLED):
            raise DataError(f"{where}: label {text[:20]!r}, but the dataset is unlabelled (label {UNLABELLED})")
        return key, image, UNLABELLED
    if not (text.isdigit() and int(text) < info.num_classes):
        raise DataError(f"{where}: label {text[:20]!r} is not a class 0..{info.num_classes - 1}")
    return key, image, int(text)


def _iter_samples(buf: bytes, path: str, expected_count: int | None,
                  info: DatasetInfo) -> Iterator[tuple[str, np.ndarray, int]]:
    key, fields, seen = None, {}, set()
    for name, data in _tar_members(buf, path):
        member_key, _, ext = name.partition(".")  # WebDataset's rule: the key ends at the first dot
        if member_key != key:
            if key is not None:
                yield _decode_sample(path, key, fields, info)
            if member_key in seen:
                raise DataError(f"shard {path}, key {member_key!r}: members of one datapoint are not adjacent")
            seen.add(member_key)
            key, fields = member_key, {}
        if ext not in (IMAGE_EXT, LABEL_EXT) or ext in fields:
            raise DataError(f"shard {path}, key {key!r}: unexpected member {name!r} "
                            f"(a datapoint is one .{LABEL_EXT} and one .{IMAGE_EXT})")
        fields[ext] = data
    if key is not None:
        yield _decode_sample(path, key, fields, info)
    if expected_count is not None and len(seen) != expected_count:
        raise DataError(f"shard {path}: holds {len(seen)} datapoints, expected {expected_count}")


def _read_shard(path: str) -> bytes:
    if not storage.exists(path):
        raise DataError(f"shard {path} is missing")
    try:
        return storage.read_bytes(path)
    except OSError as e:
        raise DataError(f"shard {path}: cannot read it ({e})") from None


def iter_shard(path: str, expected_count: int | None = None,
               info: DatasetInfo = MNIST) -> Iterator[tuple[str, np.ndarray, int]]:
    """(key, image uint8 of info.stored_shape, label) for each datapoint of one shard, in order.

    Any damage (truncated or unreadable tar, a missing or extra member, a bad image or label, a
    count other than expected_count) raises DataError naming the shard and, where known, the key.
    """
    yield from _iter_samples(_read_shard(path), path, expected_count, info)


def decode_shard_bytes(buf: bytes, path: str, expected_count: int | None,
                  info: DatasetInfo) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(split, indices int64, images uint8 [n, pixels], labels int64) of one shard's bytes."""
    fast = _decode_canonical(buf, info)
    if fast is not None and (expected_count is None or len(fast[1]) == expected_count):
        split, indices, images, labels = fast
        return split, indices, np.ascontiguousarray(images), labels
    samples = list(_iter_samples(buf, path, expected_count, info))
    if not samples:
        raise DataError(f"shard {path} holds no datapoints")
    keys = [parse_key(key) for key, _, _ in samples]
    splits = {split for split, _ in keys}
    if len(splits) > 1:
        raise DataError(f"shard {path} mixes splits {sorted(splits)}")
    return (splits.pop(), np.array([index for _, index in keys], np.int64),
            np.stack([image.reshape(-1) for _, image, _ in samples]),
            np.array([label for _, _, label in samples], np.int64))


def load_split_arrays(paths: list[str], expected_counts: list[int] | None = None,
                      info: DatasetInfo = MNIST) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indices int64 [N], images uint8 [N, pixels], labels int64 [N]) decoded from shards of one split
    of the dataset `info` (a manifest's: read_manifest(shards_dir).dataset).

    The hot path of every training worker: shards in this module's own layout are decoded by
    slicing the tar bytes (see _decode_canonical); others go through tarfile, sample by sample.
    """
    if expected_counts is not None and len(expected_counts) != len(paths):
        raise ValueError(f"{len(paths)} shard paths but {len(expected_counts)} expected counts")
    counts = expected_counts if expected_counts is not None else [None] * len(paths)
    parts, split_of = [], {}
    for path, count in zip(paths, counts):
        split, *arrays = decode_shard_bytes(_read_shard(path), path, count, info)
        split_of.setdefault(split, path)
        if len(split_of) > 1:
            raise DataError(f"shard {path} is from split {split!r} but {split_of[next(iter(split_of))]} is not; "
                            "load one split at a time")
        parts.append(arrays)
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, info.num_pixels), np.uint8), np.zeros(0, np.int64)
    indices, images, labels = (np.concatenate(column) for column in zip(*parts))
    return indices, images, labels


# ---------------------------------------------------------------------------------------------
# Preparing, reading and verifying a shards directory.

PARTIAL = ".partial"


def _write_partial(path: str, data: bytes) -> None:
    # Beside the final name until commit_prepare: the previous prepare's shard stays readable.
    storage.write_bytes(path + PARTIAL, data)


def _remove_stale_shards(split_dir: str, split: str, keep: set[str]) -> None:
    """Shards, partial files and a sources file of an earlier prepare that this one did not write."""
    from vaedist.data.provenance import SOURCES_NAME

    pattern = re.compile(rf"({split}-\d{{6}}\.tar|{re.escape(SOURCES_NAME)})(\.partial)?")
    for name in storage.listdir(split_dir):
        if pattern.fullmatch(name) and name not in keep:
            storage.rmtree(storage.join(split_dir, name))


# The steps of writing a shards directory, shared by prepare_shards (built-ins) and the Ray Data
# prepare job of the external sources (vaedist.prepare): the same bytes from the same datapoints.
# Every file is first written as NAME.partial; the previous prepare's manifest and shards stay as they
# were until all of them are written (a prepare that fails, e.g. on a full disk, leaves them readable),
# then commit_prepare puts them in place and writes the manifest last.

def write_shard(out_dir: str, split: str, shard_index: int, first_index: int, images: np.ndarray,
                labels: np.ndarray) -> ShardEntry:
    """Write <out_dir>/<split>/<split>-<shard_index>.tar (as .partial until commit_prepare) holding
    datapoints first_index, ... (images in the dataset's stored shape); returns its manifest entry."""
    name = _shard_name(split, shard_index)
    data = _shard_bytes(split, first_index, images, labels)
    _write_partial(storage.join(out_dir, split, name), data)
    return ShardEntry(path=f"{split}/{name}", first_index=first_index, num_samples=len(labels), bytes=len(data),
                      sha256=hashlib.sha256(data).hexdigest())


def write_split_file(out_dir: str, split: str, name: str, data: bytes) -> FileEntry:
    """A file beside a split's shards (its sources.parquet), with its size and sha256 for the manifest."""
    _write_partial(storage.join(out_dir, split, name), data)
    return FileEntry(path=f"{split}/{name}", bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def commit_prepare(out_dir: str, manifest: Manifest) -> None:
    """Put the written files in place, remove what an earlier prepare left that `manifest` does not
    name, and write the manifest last. The old manifest goes first: no crash leaves a manifest naming
    a mix of old and new shards (on S3 a move is copy-then-delete)."""
    path = manifest_path(out_dir)
    if storage.exists(path):
        storage.rmtree(path)
    for split, entry in manifest.splits.items():
        files = [*entry.shards, *([entry.sources] if entry.sources else [])]
        for f in files:
            final = storage.join(out_dir, *f.path.split("/"))
            storage.move(final + PARTIAL, final)
        _remove_stale_shards(storage.join(out_dir, split), split, {f.path.split("/")[-1] for f in files})
    write_manifest(out_dir, manifest)


def discard_partials(out_dir: str) -> None:
    """After a failed prepare: delete its .partial files (their space; a full disk), nothing else.
    Best effort: the prepare's own error is the one to report."""
    with contextlib.suppress(OSError):
        for split in SPLITS:
            split_dir = storage.join(out_dir, split)
            for name in storage.listdir(split_dir):
                if name.endswith(PARTIAL):
                    storage.delete_file(storage.join(split_dir, name))


def prepare_shards(out_dir: str, dataset: str = "mnist", source_dir: str | None = None,
                   download_dir: str | None = None, samples_per_shard: int = 2500,
                   limit_per_split: int | None = None, variants: int = 20, seed: int = 0,
                   progress: bool = True) -> Manifest:
    """Write <out_dir>/<split>/<split>-000000.tar, ... for both splits of `dataset`, then
    <out_dir>/manifest.json. Returns the manifest.

    source_dir: the dataset's local IDX files (None: torchvision downloads into download_dir);
    limit_per_split keeps only the first N datapoints of each split; variants and seed are
    mnist8m's (images per MNIST training image, the deformations' seed). Shards are written one at
    a time, so a dataset larger than memory (mnist8m) never is in memory whole.
    """
    from vaedist.data.sources import open_split

    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be > 0, got {samples_per_shard}")
    if limit_per_split is not None and limit_per_split <= 0:
        raise ValueError(f"limit_per_split must be > 0 or None, got {limit_per_split}")
    # Both splits' sources open (and are checked) before anything is written.
    opened = {split: open_split(dataset, split, source_dir, download_dir, variants=variants, seed=seed)
              for split in SPLITS}
    info = opened["train"][0].info
    sources = {"kind": None, "files": {}}
    for split, (_, source) in opened.items():
        sources["files"].update(source.pop("files", {}))
        sources.update(source)

    counts = {split: min(src.num_samples, limit_per_split or src.num_samples) for split, (src, _) in opened.items()}
    num_shards = sum(-(-n // samples_per_shard) for n in counts.values())
    splits = {}
    try:
        with LineProgress(num_shards, f"prepare {dataset} shards", "shard", progress) as bar:
            for split, (src, _) in opened.items():
                storage.makedirs(storage.join(out_dir, split))
                shards = []
                for first in range(0, counts[split], samples_per_shard):
                    images, labels = src.read(first, min(first + samples_per_shard, counts[split]))
                    shards.append(write_shard(out_dir, split, first // samples_per_shard, first, images, labels))
                    bar.update(1)
                splits[split] = SplitEntry(num_samples=counts[split], shards=tuple(shards))
    except BaseException:
        discard_partials(out_dir)
        raise

    manifest = Manifest(dataset=info, splits=splits, samples_per_shard=samples_per_shard, source=sources,
                        members={"image": IMAGE_EXT, "label": LABEL_EXT})
    commit_prepare(out_dir, manifest)
    return manifest


def shard_paths(shards_dir: str, split: str, max_shards: int = 0, manifest: Manifest | None = None) -> list[str]:
    """Full paths of a split's shards in manifest order; the first max_shards only (0: all)."""
    if max_shards < 0:
        raise ValueError(f"max_shards must be >= 0 (0 = all), got {max_shards}")
    manifest = manifest if manifest is not None else read_manifest(shards_dir)
    shards = manifest.split(split).shards
    return [storage.join(shards_dir, *s.path.split("/")) for s in shards[: max_shards or None]]


def read_checked_shard(shards_dir: str, shard: ShardEntry) -> bytes:
    """A shard the manifest lists, checked present, complete and unmodified (size, then sha256)."""
    path = storage.join(shards_dir, *shard.path.split("/"))
    buf = _read_shard(path)
    if len(buf) != shard.bytes:
        raise DataError(f"shard {path}: size mismatch, {len(buf)} bytes but the manifest "
                        f"says {shard.bytes} (truncated or overwritten)")
    digest = hashlib.sha256(buf).hexdigest()
    if digest != shard.sha256:
        raise DataError(f"shard {path}: sha256 mismatch, {digest} but the manifest says "
                        f"{shard.sha256} (corrupt)")
    return buf


def verify_shards(shards_dir: str, progress: bool = False) -> dict:
    """Check every shard in the manifest (present, size, sha256, then decoded count, keys, shapes),
    and that no unlisted .tar sits beside them. Returns {split: {"shards": n, "samples": n}}."""
    manifest = read_manifest(shards_dir)
    info = manifest.dataset
    where = manifest_path(shards_dir)
    summary = {}
    total = sum(len(entry.shards) for entry in manifest.splits.values())
    with LineProgress(total, "verify shards", "shard", progress) as bar:
        for split, entry in manifest.splits.items():
            listed = {s.path for s in entry.shards}
            split_dir = storage.join(shards_dir, split)
            for name in storage.listdir(split_dir):
                if name.endswith(".tar") and f"{split}/{name}" not in listed:
                    raise DataError(f"shard {storage.join(split_dir, name)} is not listed in {where} "
                                    "(left from another prepare?)")
            next_index = 0
            for shard in entry.shards:
                path = storage.join(shards_dir, *shard.path.split("/"))
                buf = read_checked_shard(shards_dir, shard)
                if shard.first_index != next_index:
                    raise DataError(f"{where}: shard {path} starts at index {shard.first_index}, "
                                    f"expected {next_index}")
                shard_split, indices, _, _ = decode_shard_bytes(buf, path, shard.num_samples, info)
                expected = np.arange(next_index, next_index + shard.num_samples)
                if shard_split != split or not np.array_equal(indices, expected):
                    bad = int(np.argmax(indices != expected)) if shard_split == split else 0
                    raise DataError(f"shard {path}: datapoint {bad} has key "
                                    f"{key_for(shard_split, int(indices[bad]))!r}, expected "
                                    f"{key_for(split, int(expected[bad]))!r}")
                next_index += shard.num_samples
                bar.update(1)
            if next_index != entry.num_samples:
                raise DataError(f"{where}: split {split} shards hold {next_index} datapoints, "
                                f"num_samples says {entry.num_samples}")
            if entry.sources is not None:  # external sources: one provenance string per datapoint
                from vaedist.data.provenance import read_sources

                read_sources(shards_dir, manifest, split)
            summary[split] = {"shards": len(entry.shards), "samples": next_index}
    return summary
