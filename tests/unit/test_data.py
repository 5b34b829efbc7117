"""MNIST sources, shards, manifest and binarisation, against the real MNIST files.

The MNIST directory is $VAEDIST_MNIST_DIR, else <repo>/../shared/data/mnist; without it these
tests skip. Shards are prepared from small slices so the file runs in seconds.
"""

import gzip
import hashlib
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from vaedist.data import shards as shard_format
from vaedist.data import (MNIST, MNIST_FILES, MNIST_MD5, MNIST_NUM_SAMPLES, DataError, dynamic_binarize,
                          fixed_binarize, iter_shard, key_for, load_mnist, load_split_arrays,
                          manifest_hash, parse_key, prepare_shards, read_manifest, shard_paths,
                          verify_shards)

LIMIT = 200          # datapoints per split in the prepared slice
PER_SHARD = 64       # so each split has 4 shards: 64, 64, 64, 8


@pytest.fixture(scope="session")
def mnist_idx_dir() -> Path:
    env = os.environ.get("VAEDIST_MNIST_DIR")
    path = Path(env) if env else (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "mnist").resolve()
    names = [name for pair in MNIST_FILES.values() for name in pair]
    if not all((path / name).is_file() or (path / f"{name}.gz").is_file() for name in names):
        pytest.skip(f"MNIST IDX files not found in {path} (set VAEDIST_MNIST_DIR to a directory holding them)")
    return path


@pytest.fixture(scope="module")
def mnist(mnist_idx_dir) -> dict:
    return {split: load_mnist(split, str(mnist_idx_dir)) for split in ("train", "test")}


@pytest.fixture(scope="module")
def small_shards(mnist_idx_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shards")
    manifest = prepare_shards(str(out), source_dir=str(mnist_idx_dir), samples_per_shard=PER_SHARD,
                              limit_per_split=LIMIT, progress=False)
    return out, manifest


@pytest.fixture
def shards_copy(small_shards, tmp_path) -> Path:
    """A private copy of the prepared slice, for tests that damage it."""
    return Path(shutil.copytree(small_shards[0], tmp_path / "shards"))


def copy_split_files(mnist_idx_dir: Path, dest: Path, split: str, gunzip: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES[split]:
        src, gz = mnist_idx_dir / name, mnist_idx_dir / f"{name}.gz"
        if not gunzip and gz.is_file():
            shutil.copy(gz, dest / gz.name)
            continue
        raw = src.read_bytes() if src.is_file() else gzip.decompress(gz.read_bytes())
        if gunzip:
            (dest / name).write_bytes(raw)
        else:
            (dest / gz.name).write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
    return dest


def flip_byte(path: Path, offset: int) -> None:
    buf = bytearray(path.read_bytes())
    buf[offset] ^= 0xFF
    path.write_bytes(bytes(buf))


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


# ---------------------------------------------------------------------------------------------
# load_mnist

@pytest.mark.parametrize("split", ["train", "test"])
def test_load_mnist_counts_shapes_and_md5(mnist, split):
    images, labels, info = mnist[split]
    n = MNIST_NUM_SAMPLES[split]
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images.min() == 0
    assert info == {"kind": "idx", "files": {name: MNIST_MD5[name] for name in MNIST_FILES[split]}}


def test_load_mnist_known_first_labels(mnist):
    # The well-known start of each split: guards against a wrong offset or byte order.
    assert mnist["train"][1][:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]
    assert mnist["test"][1][:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]


def test_load_mnist_reads_raw_idx_files(mnist, mnist_idx_dir, tmp_path):
    raw_dir = copy_split_files(mnist_idx_dir, tmp_path / "raw", "test", gunzip=True)
    images, labels, info = load_mnist("test", str(raw_dir))
    assert np.array_equal(images, mnist["test"][0]) and np.array_equal(labels, mnist["test"][1])
    assert info == mnist["test"][2]


def test_load_mnist_rejects_a_flipped_pixel_byte(mnist_idx_dir, tmp_path):
    raw_dir = copy_split_files(mnist_idx_dir, tmp_path / "raw", "test", gunzip=True)
    flip_byte(raw_dir / "t10k-images-idx3-ubyte", 16 + 5000 * 784 + 400)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: md5 .* expected 2646ac64"):
        load_mnist("test", str(raw_dir))


def test_load_mnist_rejects_a_corrupt_gz(mnist_idx_dir, tmp_path):
    gz_dir = copy_split_files(mnist_idx_dir, tmp_path / "gz", "test", gunzip=False)
    path = gz_dir / "t10k-labels-idx1-ubyte.gz"
    flip_byte(path, path.stat().st_size // 2)
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_mnist("test", str(gz_dir))


def test_load_mnist_rejects_a_bad_magic_number(mnist_idx_dir, tmp_path):
    raw_dir = copy_split_files(mnist_idx_dir, tmp_path / "raw", "test", gunzip=True)
    flip_byte(raw_dir / "t10k-labels-idx1-ubyte", 2)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: magic number"):
        load_mnist("test", str(raw_dir))


def test_load_mnist_names_a_missing_file(mnist_idx_dir, tmp_path):
    raw_dir = copy_split_files(mnist_idx_dir, tmp_path / "raw", "test", gunzip=True)
    (raw_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte \(raw or \.gz\) not found"):
        load_mnist("test", str(raw_dir))
    with pytest.raises(DataError, match="does not exist"):
        load_mnist("test", str(tmp_path / "nowhere"))


def test_load_mnist_download_failure_says_how_to_go_offline(monkeypatch, tmp_path):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match=r"could not download MNIST .*offline\? pass --mnist-dir DIR or set VAEDIST_MNIST_DIR=DIR"):
        load_mnist("train", download_dir=str(tmp_path))
    with pytest.raises(DataError, match="VAEDIST_MNIST_DIR"):
        load_mnist("train")


def test_load_mnist_download_parses_torchvisions_raw_folder(monkeypatch, mnist, mnist_idx_dir, tmp_path):
    import torchvision.datasets
    raw_dir = copy_split_files(mnist_idx_dir, tmp_path / "MNIST" / "raw", "test", gunzip=True)

    class FakeMNIST:  # what torchvision leaves after a download: the IDX files in raw_folder
        def __init__(self, root, train, download):
            assert (root, train, download) == (str(tmp_path), False, True)
            self.raw_folder = str(raw_dir)

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    images, labels, info = load_mnist("test", download_dir=str(tmp_path))
    assert np.array_equal(images, mnist["test"][0]) and np.array_equal(labels, mnist["test"][1])
    assert info == {"kind": "torchvision", "files": mnist["test"][2]["files"]}


# ---------------------------------------------------------------------------------------------
# Keys

@pytest.mark.parametrize("split,index,key", [("train", 0, "train-00000"), ("train", 42, "train-00042"),
                                             ("test", 9999, "test-09999"), ("train", 123456, "train-123456")])
def test_key_round_trip(split, index, key):
    assert key_for(split, index) == key
    assert parse_key(key) == (split, index)


@pytest.mark.parametrize("key", ["train-42", "train-000042", "valid-00042", "train-00042.npy",
                                 "train_00042", "train-0004a", ""])
def test_parse_key_rejects_malformed(key):
    with pytest.raises(DataError, match="malformed key"):
        parse_key(key)


# ---------------------------------------------------------------------------------------------
# prepare_shards and the manifest

def test_prepare_writes_the_manifest_and_layout(small_shards, mnist):
    out, manifest = small_shards
    assert manifest == read_manifest(str(out))
    assert manifest.format_version == 2
    assert manifest.to_dict()["dataset"] == {"name": "mnist", "image_shape": [28, 28, 1], "dtype": "uint8",
                                   "num_classes": 10, "class_names": None}
    assert manifest.members == {"image": "npy", "label": "cls"}
    assert manifest.source == {"kind": "idx", "files": MNIST_MD5}
    for split in ("train", "test"):
        entry = manifest.split(split)
        assert entry.num_samples == LIMIT
        assert [s.num_samples for s in entry.shards] == [64, 64, 64, 8]
        assert [s.first_index for s in entry.shards] == [0, 64, 128, 192]
        assert [s.path for s in entry.shards] == [f"{split}/{split}-{i:06d}.tar" for i in range(4)]
        for shard in entry.shards:
            path = out / shard.path
            assert shard.bytes == path.stat().st_size
            assert shard.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (out / "manifest.json").read_bytes().endswith(b"}\n")


@pytest.mark.parametrize("split", ["train", "test"])
def test_shards_hold_the_source_datapoints_in_order(small_shards, mnist, split):
    out, _ = small_shards
    samples = [s for path in shard_paths(str(out), split) for s in iter_shard(path)]
    assert [key for key, _, _ in samples] == [key_for(split, i) for i in range(LIMIT)]
    assert np.array_equal(np.stack([image for _, image, _ in samples]), mnist[split][0][:LIMIT])
    assert [label for _, _, label in samples] == mnist[split][1][:LIMIT].tolist()


def test_prepare_is_byte_reproducible(small_shards, mnist_idx_dir, tmp_path):
    out, manifest = small_shards
    again = prepare_shards(str(tmp_path / "again"), source_dir=str(mnist_idx_dir), samples_per_shard=PER_SHARD,
                           limit_per_split=LIMIT, progress=False)
    for split in ("train", "test"):
        for first, second in zip(manifest.split(split).shards, again.split(split).shards):
            assert (hashlib.sha256((out / first.path).read_bytes()).digest()
                    == hashlib.sha256((tmp_path / "again" / second.path).read_bytes()).digest())
    assert manifest_hash(str(out)) == manifest_hash(str(tmp_path / "again"))
    assert manifest_hash(str(out)) == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("split", ["train", "test"])
def test_webdataset_reads_exactly_what_the_fast_reader_reads(small_shards, split):
    """The ecosystem's reader (webdataset.WebDataset, with its default decoders) and ours agree on
    every key, image and label of a split."""
    out, _ = small_shards
    paths = shard_paths(str(out), split)
    indices, images, labels = load_split_arrays(paths)
    samples = list(wds.WebDataset(paths, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [key_for(split, int(i)) for i in indices]
    assert np.array_equal(np.stack([s["npy"] for s in samples]).reshape(len(samples), -1), images)
    assert all(s["npy"].dtype == np.uint8 and s["npy"].shape == (28, 28) for s in samples)
    assert [s["cls"] for s in samples] == labels.tolist()


def test_shard_paths_order_and_cap(small_shards):
    out, manifest = small_shards
    paths = shard_paths(str(out), "train", manifest=manifest)
    assert paths == [str(out / f"train/train-{i:06d}.tar") for i in range(4)]
    assert shard_paths(str(out), "train", max_shards=2) == paths[:2]
    with pytest.raises(ValueError):
        shard_paths(str(out), "train", max_shards=-1)


def test_reprepare_with_fewer_shards_removes_stale_ones(shards_copy, mnist_idx_dir):
    prepare_shards(str(shards_copy), source_dir=str(mnist_idx_dir), samples_per_shard=100, limit_per_split=LIMIT,
                   progress=False)
    assert sorted(p.name for p in (shards_copy / "train").iterdir()) == ["train-000000.tar", "train-000001.tar"]
    assert verify_shards(str(shards_copy)) == {s: {"shards": 2, "samples": LIMIT} for s in ("train", "test")}


def test_a_crashed_prepare_leaves_the_previous_shards_as_they_were(shards_copy, mnist_idx_dir, monkeypatch):
    before = {str(p.relative_to(shards_copy)): p.read_bytes() for p in shards_copy.rglob("*") if p.is_file()}
    real = shard_format._shard_bytes
    calls = []

    def crash_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shard_format, "_shard_bytes", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(str(shards_copy), source_dir=str(mnist_idx_dir), samples_per_shard=50, limit_per_split=LIMIT,
                       progress=False)
    # The new first shard was written (as .partial) and thrown away; nothing else changed.
    assert {str(p.relative_to(shards_copy)): p.read_bytes() for p in shards_copy.rglob("*") if p.is_file()} == before
    verify_shards(str(shards_copy))


@pytest.mark.parametrize("content,message", [(None, "not found"), (b"{not json", "not valid JSON"),
                                             (b'{"format_version": 99}', "format_version 99"),
                                             (b'{"format_version": 1, "splits": {"train": {}}}', "malformed")])
def test_read_manifest_errors_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "manifest.json")) + ".*" + message):
        read_manifest(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# verify_shards

def test_verify_passes_on_fresh_shards(small_shards):
    assert verify_shards(str(small_shards[0])) == {s: {"shards": 4, "samples": LIMIT} for s in ("train", "test")}


def _flip(path: Path) -> None:
    flip_byte(path, 1536 + 128 + 300)  # a pixel of the first image: still a valid tar


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _extra(path: Path) -> None:
    shutil.copy(path, path.parent / "train-000099.tar")


@pytest.mark.parametrize("damage,message", [(_flip, "train-000002.tar: sha256 mismatch"),
                                            (_truncate, "train-000002.tar: size mismatch"),
                                            (Path.unlink, "train-000002.tar is missing"),
                                            (_extra, "train-000099.tar is not listed")])
def test_verify_names_the_damaged_shard(shards_copy, damage, message):
    damage(shards_copy / "train" / "train-000002.tar")
    with pytest.raises(DataError, match=re.escape(message)):
        verify_shards(str(shards_copy))


# ---------------------------------------------------------------------------------------------
# iter_shard on hand-crafted bad shards

GOOD = [("train-00000.cls", b"3"), ("train-00000.npy", npy_bytes(np.zeros((28, 28), np.uint8)))]


@pytest.mark.parametrize("members,message", [
    ([("train-00001.cls", b"4"), ("train-00001.npy", npy_bytes(np.zeros((27, 28), np.uint8)))], "shape"),
    ([("train-00001.cls", b"4"), ("train-00001.npy", npy_bytes(np.zeros((28, 28), np.float32)))], "dtype"),
    ([("train-00001.npy", npy_bytes(np.zeros((28, 28), np.uint8)))], "no .cls member"),
    ([("train-00001.cls", b"4")], "no .npy member"),
    ([("train-00001.cls", b"12"), ("train-00001.npy", GOOD[1][1])], "not a class 0..9"),
    ([("train-00001.cls", b"4"), ("train-00001.npy", b"not an array")], "not a readable array"),
    ([("train-00001.cls", b"4"), ("train-00001.npy", GOOD[1][1]), ("train-00001.png", b"")], "unexpected member"),
])
def test_iter_shard_names_shard_and_key(tmp_path, members, message):
    path = write_tar(tmp_path / "bad.tar", GOOD + members)
    with pytest.raises(DataError, match=re.escape(f"shard {path}, key 'train-00001'") + ".*" + re.escape(message)):
        list(iter_shard(str(path)))
    with pytest.raises(DataError, match=re.escape(str(path))):  # the fast loader falls back and fails the same
        load_split_arrays([str(path)])


def test_iter_shard_names_a_malformed_key(tmp_path):
    path = write_tar(tmp_path / "bad.tar", [("train-1.cls", b"4"), ("train-1.npy", GOOD[1][1])])
    with pytest.raises(DataError, match=r"key 'train-1': malformed key"):
        list(iter_shard(str(path)))


def test_iter_shard_checks_the_count(small_shards):
    path = shard_paths(str(small_shards[0]), "test")[0]
    assert len(list(iter_shard(path, expected_count=PER_SHARD))) == PER_SHARD
    with pytest.raises(DataError, match=re.escape(f"shard {path}: holds 64 datapoints, expected 65")):
        list(iter_shard(path, expected_count=65))


@pytest.mark.parametrize("where", ["data", "header"])
def test_iter_shard_rejects_a_truncated_or_damaged_tar(shards_copy, where):
    path = shards_copy / "test" / "test-000001.tar"
    if where == "data":
        os.truncate(path, 10 * 2560 + 1600)  # inside the 11th image
    else:
        flip_byte(path, 20 * 2560 + 3)  # a name byte: the header checksum fails mid-archive
    with pytest.raises(DataError, match=re.escape(f"shard {path}") + ".*truncated or corrupt"):
        list(iter_shard(str(path)))
    with pytest.raises(DataError, match=re.escape(f"shard {path}")):
        load_split_arrays([str(path)])


# ---------------------------------------------------------------------------------------------
# load_split_arrays

@pytest.mark.parametrize("split", ["train", "test"])
def test_load_split_arrays_matches_the_source(small_shards, mnist, split):
    out, manifest = small_shards
    paths = shard_paths(str(out), split)
    counts = [s.num_samples for s in manifest.split(split).shards]
    # Our own shards take the sliced fast path; a silent fall back to tarfile would be ~50x slower.
    assert all(shard_format._decode_canonical(Path(p).read_bytes(), MNIST) is not None for p in paths)
    indices, images, labels = load_split_arrays(paths, counts)
    assert indices.dtype == np.int64 and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(indices, np.arange(LIMIT))
    assert np.array_equal(images, mnist[split][0][:LIMIT].reshape(LIMIT, 784))
    assert np.array_equal(labels, mnist[split][1][:LIMIT])
    indices, images, labels = load_split_arrays(paths[2:])
    assert np.array_equal(indices, np.arange(128, LIMIT))
    assert np.array_equal(images, mnist[split][0][128:LIMIT].reshape(-1, 784))


def test_load_split_arrays_reads_other_writers_shards(mnist, tmp_path):
    # webdataset's TarWriter stamps mtimes and owners: not our layout, so the tarfile path reads it.
    path = tmp_path / "test-other.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(10, 20):
            writer.write({"__key__": key_for("test", i), "npy": mnist["test"][0][i], "cls": int(mnist["test"][1][i])})
    assert shard_format._decode_canonical(path.read_bytes(), MNIST) is None
    indices, images, labels = load_split_arrays([str(path)], [10])
    assert np.array_equal(indices, np.arange(10, 20))
    assert np.array_equal(images, mnist["test"][0][10:20].reshape(10, 784))
    assert np.array_equal(labels, mnist["test"][1][10:20])


def test_load_split_arrays_errors(small_shards, shards_copy):
    paths = shard_paths(str(small_shards[0]), "test")
    with pytest.raises(DataError, match=re.escape(f"shard {paths[3]}: holds 8 datapoints, expected 64")):
        load_split_arrays(paths, [64, 64, 64, 64])
    with pytest.raises(DataError, match="load one split at a time"):
        load_split_arrays([paths[0], shard_paths(str(small_shards[0]), "train")[0]])
    # A label byte changed inside valid tar structure: only the decoder can notice.
    damaged = shards_copy / "test" / "test-000000.tar"
    buf = bytearray(damaged.read_bytes())
    buf[5 * 2560 + 512] = ord("x")
    damaged.write_bytes(bytes(buf))
    with pytest.raises(DataError, match=re.escape(f"shard {damaged}, key 'test-00005': label 'x'")):
        load_split_arrays([str(damaged)])
    assert load_split_arrays([])[1].shape == (0, 784)


# ---------------------------------------------------------------------------------------------
# Binarisation

def _reference_fixed_bit(pixel: int, index: int, j: int, split: str, seed: int) -> int:
    """The documented hash, one pixel at a time in Python integers."""
    mask = 2**64 - 1

    def mix(z):
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    gamma = 0x9E3779B97F4A7C15
    stream = mix((seed % 2**64) ^ int.from_bytes(hashlib.sha256(split.encode()).digest()[:8], "big"))
    row = mix((stream + (index + 1) * gamma) & mask)
    r = mix((row + (j + 1) * gamma) & mask) >> 32
    return int(r / 2**32 < pixel / 255)


def test_fixed_binarize_matches_the_documented_hash(mnist):
    images = mnist["test"][0]
    out = fixed_binarize(images[[3, 7]], np.array([3, 7]), "test", seed=5)
    for row, index in enumerate([3, 7]):
        pixels = images[index].reshape(-1)
        expected = [_reference_fixed_bit(int(p), index, j, "test", 5) for j, p in enumerate(pixels)]
        assert out[row].tolist() == expected


def test_fixed_binarize_is_per_datapoint(mnist):
    images = mnist["test"][0][:300].reshape(300, 784)
    indices = np.arange(300)
    full = fixed_binarize(images, indices, "test", seed=1)
    assert full.dtype == torch.float32 and full.shape == (300, 784)
    assert set(full.unique().tolist()) == {0.0, 1.0}
    perm = np.random.default_rng(0).permutation(300)[:57]
    shuffled = fixed_binarize(torch.from_numpy(images[perm]).reshape(57, 28, 28), torch.from_numpy(indices[perm]),
                              "test", seed=1)
    assert torch.equal(shuffled, full[perm])
    assert torch.equal(fixed_binarize(images[[42]], [42], "test", seed=1), full[[42]])


def test_fixed_binarize_depends_on_seed_split_and_index(mnist):
    images = mnist["test"][0][:100]
    base = fixed_binarize(images, np.arange(100), "test", seed=0)
    assert not torch.equal(base, fixed_binarize(images, np.arange(100), "test", seed=1))
    assert not torch.equal(base, fixed_binarize(images, np.arange(100), "train", seed=0))
    assert not torch.equal(base, fixed_binarize(images, np.arange(100, 200), "test", seed=0))


def test_fixed_binarize_is_bernoulli_of_grey_level(mnist):
    images = mnist["test"][0][:2000].reshape(2000, 784)
    out = fixed_binarize(images, np.arange(2000), "test", seed=3).numpy()
    p = images / 255.0
    assert out[images == 0].max() == 0 and out[images == 255].min() == 1
    grey = (images > 50) & (images < 200)  # ~80k pixels with 0 < p < 1
    assert abs(out[grey].mean() - p[grey].mean()) < 0.01
    assert abs(out.mean() - p.mean()) < 0.005


def test_dynamic_binarize_is_seeded_and_bernoulli(mnist):
    images = torch.from_numpy(mnist["test"][0][:500].reshape(500, 784))

    def draw(seed):
        return dynamic_binarize(images, torch.Generator().manual_seed(seed))

    first = draw(0)
    assert first.dtype == torch.float32 and first.shape == images.shape
    assert torch.equal(first, draw(0))
    assert not torch.equal(first, draw(1))
    grey = (images > 50) & (images < 200)
    assert abs(first[grey].mean().item() - (images[grey].float() / 255).mean().item()) < 0.01
    assert first[images == 0].max() == 0 and first[images == 255].min() == 1
    with pytest.raises(TypeError, match="uint8"):
        dynamic_binarize(images.float() / 255, torch.Generator())
