"""The `webdataset` source: existing WebDataset tar shards (img2dataset's, webdataset's ShardWriter,
Ray Data's write_webdataset, ...), local or in object storage.

    data.source: webdataset
    data.source_path: s3://bucket/shards-{000000..000999}.tar      # split by the hash rule, or
    data.train_pattern: /data/train-{0000..0099}.tar               # the splits given as patterns
    data.test_pattern: /data/test-{0000..0009}.tar

A pattern is expanded with brace rules ({a,b}, {000..999} zero-padded to the first bound's width);
a pattern naming a folder (or an s3:// prefix ending in /) means every .tar in it. Shards are read
in the order of the expanded list, samples in their order inside each shard. A sample is the run of
adjacent members sharing a key (WebDataset's rule: the name up to the first '.' of its base name).
Image: the member with extension data.image_key, else the first of jpg, jpeg, png, webp, npy present.
Label: data.label_key cls (ASCII integer) or json:FIELD (an integer field of the json member);
unset, cls where present, else none (label -1). Provenance: shard URL + '#' + key; the hash split
hashes the shard's file name + '#' + key.

The shards are read by vaedist's own tar reader (from_items of shard URLs, then map_batches), not
by ray.data.read_webdataset: Ray 2.60's default decoder leaves jpeg and webp as bytes, and the
project's reader measured several times faster on its own shards (docs: performance).
"""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np

from vaedist import storage
from vaedist.data.common import DataError
from vaedist.data.external import SPLIT_CODES, SourcePlan, batch_from_rows, dataset_name, decode_or_mark
from vaedist.data.external.transform import BadImage, ImageTransform, convert_array, decode_image, is_test

IMAGE_ENTRIES = ("jpg", "jpeg", "png", "webp", "npy")
_BRACE = re.compile(r"\{([^{}]*)\}")
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's base_plus_ext


def expand_braces(pattern: str) -> list[str]:
    """shards-{000..002}.tar -> shards-000.tar, shards-001.tar, shards-002.tar; {a,b} -> a, b."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    bounds = re.fullmatch(r"(\d+)\.\.(\d+)", match[1])
    if bounds:
        first, last = bounds[1], bounds[2]
        if int(last) < int(first):
            raise DataError(f"shard pattern {pattern}: range {{{match[1]}}} runs backwards")
        items = [str(i).zfill(len(first)) for i in range(int(first), int(last) + 1)]
    else:
        items = match[1].split(",")
    return [url for item in items for url in expand_braces(head + item + tail)]


def _list_dir(path: str, pattern: str) -> list[str] | None:
    """Sorted names in a folder or s3 prefix (None if it is not one); DataError if unreachable."""
    try:
        if not storage.is_dir(path):
            return None
        return storage.listdir(path)
    except OSError as e:
        raise DataError(f"cannot list {path} (from shard pattern {pattern}): {e}") from None


def resolve_shards(pattern: str) -> list[str]:
    """The shard URLs (local paths made absolute) of a pattern, in order; DataError naming what is
    missing, an empty match, or an unreachable store."""
    urls = []
    listings: dict[str, list[str] | None] = {}
    missing = []
    for url in expand_braces(pattern):
        folder = url.endswith("/")
        url = storage.absolute(url)
        names = _list_dir(url, pattern)
        if names is not None or folder:  # a folder / prefix: every .tar in it
            urls += [storage.join(url, n) for n in names or () if n.endswith(".tar")]
            continue
        parent, name = url.rstrip("/").rsplit("/", 1)
        if parent not in listings:
            listings[parent] = _list_dir(parent, pattern)
        if name not in (listings[parent] or ()):
            missing.append(url)
        else:
            urls.append(url)
    if missing:
        raise DataError(f"shard pattern {pattern}: {len(missing)} shard(s) not found, e.g. "
                        f"{', '.join(missing[:3])}")
    if not urls:
        raise DataError(f"shard pattern {pattern} matches no .tar shards")
    return urls


def _samples(buf: bytes, url: str):
    """(key, {extension: bytes}) of each sample of one shard, in order."""
    from vaedist.data.shards import _tar_members

    key, fields, seen = None, {}, set()
    for name, data in _tar_members(buf, url):
        match = _KEY.match(name)
        if match is None:
            continue  # no extension: not part of a sample (webdataset passes over these too)
        member_key, ext = match[1], match[2].lower()
        if member_key != key:
            if key is not None:
                yield key, fields
            if member_key in seen:
                raise DataError(f"shard {url}, key {member_key!r}: members of one sample are not adjacent")
            seen.add(member_key)
            key, fields = member_key, {}
        fields[ext] = data
    if key is not None:
        yield key, fields


def _label(fields: dict[str, bytes], label_key: str | None, where: str) -> int:
    if label_key is None:
        if "cls" not in fields:
            return -1
        label_key = "cls"
    if label_key == "cls":
        if "cls" not in fields:
            raise DataError(f"{where}: no cls entry (data.label_key=cls); its entries: {', '.join(sorted(fields))}")
        text = fields["cls"].decode("ascii", "replace").strip()
        if not text.isdigit():
            raise DataError(f"{where}: cls {text[:20]!r} is not a class number >= 0")
        return int(text)
    field = label_key.split(":", 1)[1]
    if "json" not in fields:
        raise DataError(f"{where}: no json entry (data.label_key={label_key}); its entries: {', '.join(sorted(fields))}")
    try:
        value = json.loads(fields["json"])[field]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{where}: json entry has no field {field!r} ({type(e).__name__}: {e})") from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise DataError(f"{where}: json field {field!r} is {value!r}, expected a class number >= 0")
    return value


class WebDatasetSource:
    kind = "webdataset"

    @classmethod
    def from_config(cls, data_cfg) -> "WebDatasetSource":
        return cls(data_cfg.source_path, data_cfg.train_pattern, data_cfg.test_pattern, data_cfg.image_key,
                   data_cfg.label_key, data_cfg.test_fraction)

    def __init__(self, pattern: str | None, train_pattern: str | None = None, test_pattern: str | None = None,
                 image_key: str | None = None, label_key: str | None = None, test_fraction: float = 0.1):
        self.pattern, self.train_pattern, self.test_pattern = pattern, train_pattern, test_pattern
        self.image_key = image_key.lower().lstrip(".") if image_key else None
        self.label_key, self.test_fraction = label_key, test_fraction
        if label_key is not None and label_key != "cls" and not (label_key.startswith("json:") and len(label_key) > 5):
            raise DataError(f"data.label_key {label_key!r}: for webdataset use cls or json:FIELD")

    def plan(self) -> SourcePlan:
        if self.pattern is not None:
            shards = [(url, None) for url in resolve_shards(self.pattern)]
            location = self.pattern
        else:
            shards = [(url, SPLIT_CODES[split]) for split, pattern in (("train", self.train_pattern),
                                                                       ("test", self.test_pattern))
                      for url in resolve_shards(pattern)]
            location = f"train {self.train_pattern}, test {self.test_pattern}"
        urls = [url for url, _ in shards]
        tasks = [{"url": url, "split": split, "image_key": self.image_key, "label_key": self.label_key,
                  "test_fraction": self.test_fraction} for url, split in shards]
        record = {"kind": self.kind, "location": location, "num_files": len(urls),
                  "files_sha256": hashlib.sha256("\n".join(urls).encode()).hexdigest(),
                  "files_sha256_of": "the shard URLs in order joined by newlines",
                  "split": {"rule": "hash", "test_fraction": self.test_fraction,
                            "hash": "sha256 of shard file name + '#' + key, first 8 bytes big-endian < "
                                    "test_fraction * 2**64"} if self.pattern is not None else
                  {"rule": "patterns", "train": self.train_pattern, "test": self.test_pattern},
                  "image_entry": self.image_key or f"first of {', '.join(IMAGE_ENTRIES)}",
                  "labels": self.label_key or "cls where present, else none (label -1)"}
        parent = urls[0].rsplit("/", 1)[0]
        return SourcePlan(self.kind, dataset_name(self.kind, parent), location, tasks, None, "shard", None, record)

    @staticmethod
    def run_task(task: dict, tf: ImageTransform, skip_bad: bool = False) -> dict[str, np.ndarray]:
        url = task["url"]
        try:
            buf = storage.read_bytes(url)
        except OSError as e:
            raise DataError(f"shard {url}: cannot read it ({e})") from None
        shard_name = url.rstrip("/").rsplit("/", 1)[-1]
        samples = list(_samples(buf, url))
        del buf
        split_of = ([task["split"]] * len(samples) if task["split"] is not None else
                    is_test([f"{shard_name}#{key}" for key, _ in samples], task["test_fraction"]).astype(int).tolist())
        rows = []
        for (key, fields), split in zip(samples, split_of):
            where = f"shard {url}, key {key!r}"
            ext = task["image_key"] or next((e for e in IMAGE_ENTRIES if e in fields), None)
            if ext is None or ext not in fields:
                wanted = f"a {ext!r} entry (data.image_key)" if ext else (
                    f"an image entry ({', '.join(IMAGE_ENTRIES)}; data.image_key names another)")
                raise DataError(f"{where}: no {wanted}; the sample's entries are: {', '.join(sorted(fields)) or 'none'}")
            label = _label(fields, task["label_key"], where)
            source = f"{url}#{key}"

            def decode(data=fields[ext], ext=ext, source=source):
                if ext == "npy":
                    try:
                        array = np.load(io.BytesIO(data), allow_pickle=False)
                    except (ValueError, OSError, EOFError) as e:
                        raise BadImage(f"{source}.npy: not a readable array ({e})") from None
                    return convert_array(array, f"{source}.npy", tf)
                return decode_image(data, f"{source}.{ext}", tf)

            image, error = decode_or_mark(decode, source, skip_bad)
            rows.append((split, image, label, source, error))
        return batch_from_rows(rows)


__all__ = ["IMAGE_ENTRIES", "WebDatasetSource", "expand_braces", "resolve_shards"]
