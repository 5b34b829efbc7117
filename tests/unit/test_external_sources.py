"""Your own images: the images, webdataset and arrays sources, the transform, the shard writer and
provenance, on real files written here with Pillow, webdataset's ShardWriter and NumPy. No Ray: the
prepare job's tasks run in a plain loop (prepare_external(use_ray=False)), the same code the Ray Data
job runs per task (tests/integration/test_prepare.py runs it through Ray)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import tarfile
import zlib
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vaedist.config import ConfigError, load_config
from vaedist.data import (DataError, Manifest, SplitEntry, load_split_arrays, read_manifest, read_sources,
                          shard_paths)
from vaedist.data import verify_shards
from vaedist.data.common import DatasetInfo
from vaedist.data.external import batch_from_rows, concat_batches
from vaedist.data.external.transform import BadImage, ImageTransform, convert_array, decode_image, is_test
from vaedist.data.external.webdataset import expand_braces
from vaedist.data.common import key_for
from vaedist.data.shards import (IMAGE_EXT, LABEL_EXT, _decode_canonical, _iter_samples, _layout, _shard_bytes,
                                 _tarinfo)
from vaedist.prepare import prepare_external, task_groups

RNG = np.random.default_rng(0)


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, mode: str, size: tuple[int, int], seed: int = 0, fmt: str | None = None) -> None:
    """A random image of `mode` and (width, height) at path, in the format its extension names."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)


def prepare(tmp_path: Path, *overrides: str, out: str = "shards") -> tuple[Manifest, str]:
    cfg = load_config(None, ["data.samples_per_shard=8", *overrides])
    shards = str(tmp_path / out)
    return prepare_external(cfg, shards, progress=False, use_ray=False), shards


def split_arrays(shards: str, split: str):
    manifest = read_manifest(shards)
    return load_split_arrays(shard_paths(shards, split), info=manifest.dataset)


# ---------------------------------------------------------------------------------------------
# The transform

def test_modes_become_the_documented_pixels():
    tf = ImageTransform(None, None, background=(255, 255, 255))
    grey16 = Image.fromarray(np.array([[0, 257, 65535, 32768]], np.uint16))
    assert grey16.mode.startswith("I;16")
    assert decode_image(png_bytes(grey16), "g16", tf)[..., 0].tolist() == [[0, 1, 255, 128]]
    rgba = np.array([[[200, 100, 0, 0], [200, 100, 0, 255], [200, 100, 0, 128]]], np.uint8)
    out = decode_image(png_bytes(Image.fromarray(rgba, "RGBA")), "rgba", tf)
    expected = [[[255, 255, 255], [200, 100, 0], [(200 * 128 + 255 * 127 + 127) // 255,
                                                  (100 * 128 + 255 * 127 + 127) // 255, (255 * 127 + 127) // 255]]]
    assert out.tolist() == expected
    black = ImageTransform(None, None, background=(0, 0, 0))
    assert decode_image(png_bytes(Image.fromarray(rgba, "RGBA")), "rgba", black)[0, 0].tolist() == [0, 0, 0]
    # A palette image becomes its colours; grey to RGB repeats; RGB to grey is Pillow's 601 luma.
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    assert decode_image(png_bytes(palette), "p", tf).shape == (1, 3, 3)
    assert decode_image(png_bytes(Image.fromarray(np.full((2, 2), 7, np.uint8))), "l",
                        ImageTransform(None, 3)).tolist() == [[[7, 7, 7]] * 2] * 2
    rgb = Image.fromarray(np.array([[[255, 0, 0]]], np.uint8))
    assert decode_image(png_bytes(rgb), "r", ImageTransform(None, 1))[0, 0, 0] == rgb.convert("L").getpixel((0, 0))


def test_resize_covers_then_crops_the_centre():
    # 40 wide x 20 high, left half 0 and right half 255 in columns 0-19 / 20-39, to 10 x 10: scaled by
    # 0.5 to 20 x 10, then columns 5..14 kept: half dark, half light.
    array = np.zeros((20, 40), np.uint8)
    array[:, 20:] = 255
    out = decode_image(png_bytes(Image.fromarray(array)), "x", ImageTransform((10, 10), None))
    assert out.shape == (10, 10, 1)
    assert (out[:, :4, 0] == 0).all() and (out[:, 6:, 0] == 255).all()
    same = convert_array(np.arange(12, dtype=np.uint8).reshape(3, 4), "a", ImageTransform((3, 4), 1))
    assert same[..., 0].tolist() == np.arange(12).reshape(3, 4).tolist()  # no resampling when it already fits
    assert convert_array(np.zeros((5, 7, 3), np.uint8), "a", ImageTransform((2, 2), 1)).shape == (2, 2, 1)


def test_hash_split_is_stable_and_near_the_fraction():
    names = [f"class/{i:05d}.png" for i in range(4000)]
    test = is_test(names, 0.1)
    assert 0.08 < test.mean() < 0.12
    assert np.array_equal(is_test(names[:1000] + ["new.png"], 0.1)[:1000], test[:1000])  # adding moves nothing


def shard_bytes_by_tarfile(split: str, first_index: int, images: np.ndarray, labels: np.ndarray) -> bytes:
    """A shard by tarfile, sample by sample: the reference the NumPy layout (_shard_bytes) must equal."""
    header = _layout(images.shape[1:]).npy_header
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for offset, (image, label) in enumerate(zip(images, labels)):
            key = key_for(split, first_index + offset)
            for ext, data in ((LABEL_EXT, b"%d" % int(label)), (IMAGE_EXT, header + image.tobytes())):
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("classes", [10, 20, 1234567, 0])
def test_sliced_shard_layout_is_tarfiles_for_any_label(classes):
    # The NumPy layout (writer and reader) against tarfile, for MNIST's digits, two-digit classes (the
    # 20 of the prepare benchmark: they used to fall back to tarfile, ~10x slower, on both sides), a
    # huge class count, and unlabelled data (-1, what a folder without class folders gives).
    for shape, first in (((28, 28), 0), ((5, 3, 3), 99990), ((1, 1), 123456)):
        images = RNG.integers(0, 256, (13, *shape), dtype=np.uint8)
        labels = RNG.integers(0, classes, 13) if classes else np.full(13, -1)
        labels[0] = classes - 1 if classes else -1
        data = _shard_bytes("train", first, images, labels)
        assert data == shard_bytes_by_tarfile("train", first, images, labels)
        info = DatasetInfo("x", (*shape[:2], shape[2] if len(shape) == 3 else 1), None, classes)
        fast = _decode_canonical(data, info)
        assert fast is not None, "our own shards must take the sliced path"
        slow = list(_iter_samples(data, "x.tar", 13, info))
        assert np.array_equal(fast[1], np.arange(first, first + 13))
        assert np.array_equal(fast[2], np.stack([im.reshape(-1) for _, im, _ in slow]))
        assert np.array_equal(fast[3], [label for _, _, label in slow]) and np.array_equal(fast[3], labels)
    # A label the dataset cannot hold is left to the tarfile reader, which names it.
    if classes:
        wrong = DatasetInfo("x", (1, 1, 1), None, max(classes - 1, 1))
        data = _shard_bytes("train", 0, np.zeros((2, 1, 1), np.uint8), np.array([0, classes - 1]))
        assert _decode_canonical(data, wrong) is None
        with pytest.raises(DataError, match="is not a class"):
            list(_iter_samples(data, "x.tar", 2, wrong))


def test_task_groups_keep_order_and_spread_over_the_cpus():
    tasks = [{"i": i} for i in range(100)]
    for cpus in (1, 2, 3, 64):
        groups = task_groups(tasks, cpus)
        assert [t for g in groups for t in g] == tasks  # every task once, in order
        assert max(map(len, groups)) <= 8 and (len(groups) >= 4 * cpus or max(map(len, groups)) == 1)
    assert list(map(len, task_groups(tasks, 2))) == [8] * 12 + [4]
    assert task_groups([], 2) == []


def test_the_ray_data_switches_the_prepare_job_sets_exist():
    """The job turns Ray Data's operator resource reservation off (docs: performance); a DataContext
    without the field would take the assignment silently and run the job at the old, slower pace."""
    import dataclasses

    from ray.data import DataContext

    fields = {f.name for f in dataclasses.fields(DataContext)}
    assert {"op_resource_reservation_enabled", "target_max_block_size", "raise_original_map_exception"} <= fields


def test_concat_batches_keeps_rows_and_checks_shapes():
    img = lambda v, shape=(2, 2, 1): np.full(shape, v, np.uint8)  # noqa: E731
    a = batch_from_rows([(0, img(1), 3, "a/1.png", ""), (1, None, 4, "a/2.png", "bad")])
    only_bad = batch_from_rows([(0, None, 5, "b/1.png", "bad")])  # its placeholder image is 1 x 1 x 1
    c = batch_from_rows([(1, img(7), 6, "c/1.png", "")])
    got = concat_batches([a, only_bad, c])
    assert got["image"].shape == (4, 2, 2, 1) and got["image"][:, 0, 0, 0].tolist() == [1, 0, 0, 7]
    assert got["label"].tolist() == [3, 4, 5, 6] and got["split"].tolist() == [0, 1, 0, 1]
    assert got["source"].tolist() == ["a/1.png", "a/2.png", "b/1.png", "c/1.png"]
    assert got["error"].tolist() == ["", "bad", "bad", ""]
    other = batch_from_rows([(0, img(2, (3, 2, 1)), 0, "d/1.png", "")])
    with pytest.raises(DataError, match=r"a/1.png is 2x2x1 .* but d/1.png is 3x2x1"):
        concat_batches([a, other])


def test_brace_patterns():
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{x,y}/s-{0..1}.tar") == ["x/s-0.tar", "x/s-1.tar", "y/s-0.tar", "y/s-1.tar"]


# ---------------------------------------------------------------------------------------------
# images

def test_class_folders_mixed_modes_and_sizes(tmp_path):
    modes = ["L", "RGB", "RGBA", "P", "I;16", "LA", "1"]
    exts = [".png", ".jpg", ".png", ".gif", ".tif", ".webp", ".bmp"]
    root = tmp_path / "pets"
    n = 0
    for c in ("dog", "cat", "bird"):
        for i in range(10):
            mode, ext = modes[n % len(modes)], exts[n % len(exts)]
            if ext == ".jpg" and mode not in ("L", "RGB"):
                mode = "RGB"
            if ext in (".gif", ".bmp") and mode in ("RGBA", "LA", "I;16"):
                mode = "L"
            write_image(root / c / f"{i:02d}{ext}", mode, (20 + 3 * (n % 5), 30 - 2 * (n % 4)), seed=n)
            n += 1
    (root / "README.txt").write_text("not an image")
    manifest, shards = prepare(tmp_path, "data.source=images", f"data.source_path={root}", "data.image_size=[12,10]",
                               "data.channels=3", "data.test_fraction=0.3")
    info = manifest.dataset
    assert info.image_shape == (12, 10, 3) and info.class_names == ("bird", "cat", "dog")
    source = manifest.source
    assert source["num_files"] == 30 and source["other_files_ignored"] == 1 and source["num_skipped"] == 0
    assert manifest.split("train").num_samples + manifest.split("test").num_samples == 30
    verify_shards(shards)
    for split in ("train", "test"):
        indices, images, labels = split_arrays(shards, split)
        sources = read_sources(shards, manifest, split)
        assert len(sources) == len(labels) and list(sources) == sorted(sources, key=str.encode)
        for index, source, label in zip(indices, sources, labels):
            assert info.class_names[label] == source.split("/")[0]
            with open(root / source, "rb") as f:
                expected = decode_image(f.read(), source, ImageTransform((12, 10), 3))
            assert np.array_equal(images[index].reshape(12, 10, 3), expected)
        assert (is_test(list(sources), 0.3) == (split == "test")).all()
    # The same files give the same bytes.
    again, _ = prepare(tmp_path, "data.source=images", f"data.source_path={root}", "data.image_size=[12,10]",
                       "data.channels=3", "data.test_fraction=0.3", out="again")
    assert again == manifest


def test_train_test_layout_and_own_size(tmp_path):
    root = tmp_path / "digits"
    for split, count in (("train", 12), ("test", 5)):
        for i in range(count):
            write_image(root / split / str(i % 3) / f"{i}.png", "L", (9, 7), seed=i)
    manifest, shards = prepare(tmp_path, "data.source=images", f"data.source_path={root}")
    assert manifest.dataset.image_shape == (7, 9, 1)  # unset: the images' own, as they agree
    assert manifest.source["transform"]["image_size_from"] == "images"
    assert {s: e.num_samples for s, e in manifest.splits.items()} == {"train": 12, "test": 5}
    assert manifest.dataset.class_names == ("0", "1", "2")
    assert read_sources(shards, manifest, "test")[0] == "test/0/0.png"
    _, images, labels = split_arrays(shards, "test")
    assert labels.tolist() == [0, 0, 1, 1, 2]
    assert np.array_equal(images[0].reshape(7, 9), np.asarray(Image.open(root / "test/0/0.png")))


def test_flat_folder_is_unlabelled(tmp_path):
    root = tmp_path / "flat"
    for i in range(20):
        write_image(root / f"{i:03d}.png", "RGB", (8, 8), seed=i)
    manifest, shards = prepare(tmp_path, "data.source=images", f"data.source_path={root}", "data.test_fraction=0.25")
    assert manifest.dataset.num_classes == 0 and manifest.dataset.class_names is None
    _, _, labels = split_arrays(shards, "train")
    assert (labels == -1).all()
    verify_shards(shards)


def test_bad_images_are_named_and_skipped_only_when_asked(tmp_path):
    root = tmp_path / "some-bad"
    for i in range(12):
        write_image(root / f"{i:02d}.png", "L", (6, 6), seed=i)
    good = png_bytes(Image.fromarray(np.full((6, 6), 9, np.uint8)))
    (root / "05-truncated.png").write_bytes(good[: len(good) // 2])
    (root / "07-text.jpg").write_text("this is not a JPEG")
    args = ("data.source=images", f"data.source_path={root}", "data.test_fraction=0.3")
    with pytest.raises(DataError, match=r"05-truncated\.png"):
        prepare(tmp_path, *args)
    manifest, shards = prepare(tmp_path, *args, "data.skip_bad_images=true")
    skipped = sorted(s["source"] for s in manifest.source["skipped"])
    assert skipped == ["05-truncated.png", "07-text.jpg"] and manifest.source["num_skipped"] == 2
    assert sum(e.num_samples for e in manifest.splits.values()) == 12
    (root / "05-truncated.png").unlink()
    with pytest.raises(DataError, match=r"07-text\.jpg: not an image"):
        prepare(tmp_path, *args)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def test_decompression_bomb_guard_stays_on(tmp_path):
    root = tmp_path / "bomb"
    for i in range(6):
        write_image(root / f"{i}.png", "L", (4, 4), seed=i)
    (root / "huge.png").write_bytes(_png_header_only(30000, 30000))  # 900M pixels, a few bytes on disk
    with pytest.raises(DataError, match=r"huge\.png: over Pillow's decompression-bomb limit"):
        prepare(tmp_path, "data.source=images", f"data.source_path={root}", "data.test_fraction=0.5")
    # Between the limit and twice it Pillow only warns: the guard, entered once per decode task (not
    # per image), makes that an error too, and leaves the process's warning filters as they were.
    (root / "huge.png").write_bytes(_png_header_only(10000, 10000))  # 100M pixels: 1.1x the limit
    filters = list(warnings.filters)
    with pytest.raises(DataError, match=r"huge\.png: over Pillow's decompression-bomb limit"):
        prepare(tmp_path, "data.source=images", f"data.source_path={root}", "data.test_fraction=0.5")
    assert warnings.filters == filters
    with pytest.raises(BadImage, match="decompression-bomb"):
        decode_image(_png_header_only(10000, 10000), "alone.png", ImageTransform(None, None))
    assert warnings.filters == filters


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="is empty"):
        prepare(tmp_path, "data.source=images", f"data.source_path={empty}")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("x")
    (texts / "b.csv").write_text("y")
    with pytest.raises(DataError, match=r"holds no image files .* among its 2 files, e.g. a.txt, b.csv"):
        prepare(tmp_path, "data.source=images", f"data.source_path={texts}")
    mixed = tmp_path / "mixed"
    write_image(mixed / "a" / "1.png", "L", (5, 5))
    write_image(mixed / "2.png", "L", (5, 5))
    with pytest.raises(DataError, match=r"2\.png is not in a class subfolder but a/1\.png is"):
        prepare(tmp_path, "data.source=images", f"data.source_path={mixed}", "data.test_fraction=0.5")
    sizes = tmp_path / "sizes"
    for i in range(8):
        write_image(sizes / f"{i}.png", "L", (5, 5) if i else (6, 5), seed=i)
    with pytest.raises(DataError, match=r"images differ in size or channels: .*0\.png is 5x6x1 .* set data.image_size"):
        prepare(tmp_path, "data.source=images", f"data.source_path={sizes}", "data.test_fraction=0.5")
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path, "data.source=images", f"data.source_path={tmp_path / 'nowhere'}")


def test_config_checks():
    with pytest.raises(ConfigError, match="data.source=images needs data.source_path"):
        load_config(None, ["data.source=images"])
    with pytest.raises(ConfigError, match="data.channels"):
        load_config(None, ["data.channels=2"])
    with pytest.raises(ConfigError, match="data.image_size"):
        load_config(None, ["data.image_size=[0, 4]"])
    with pytest.raises(ConfigError, match="data.train_pattern and data.test_pattern go together"):
        load_config(None, ["data.source=webdataset", "data.train_pattern=a.tar"])


# ---------------------------------------------------------------------------------------------
# webdataset

def _write_wds(pattern: str, samples: list[dict], maxcount: int) -> None:
    import webdataset as wds

    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


def test_webdataset_jpg_cls_and_png_json(tmp_path):
    images = [RNG.integers(0, 256, (10, 12, 3), dtype=np.uint8) for _ in range(30)]
    (tmp_path / "jpg").mkdir()
    _write_wds(str(tmp_path / "jpg" / "part-%04d.tar"),
               [{"__key__": f"s{i:04d}", "jpg": png_bytes(Image.fromarray(im), "JPEG"), "cls": str(i % 4).encode()}
                for i, im in enumerate(images)], maxcount=12)
    manifest, shards = prepare(tmp_path, "data.source=webdataset",
                               f"data.source_path={tmp_path}/jpg/part-{{0000..0002}}.tar", "data.test_fraction=0.3",
                               out="from-jpg")
    assert manifest.dataset.image_shape == (10, 12, 3) and manifest.dataset.num_classes == 4
    sources = list(read_sources(shards, manifest, "train")) + list(read_sources(shards, manifest, "test"))
    assert sorted(sources) == sorted(f"{tmp_path}/jpg/part-{i // 12:04d}.tar#s{i:04d}" for i in range(30))
    _, _, labels = split_arrays(shards, "train")
    train_keys = [int(s.rsplit("#s", 1)[1]) for s in read_sources(shards, manifest, "train")]
    assert labels.tolist() == [k % 4 for k in train_keys]

    # png + json labels, the splits given as two patterns.
    for split, rng in (("train", range(0, 20)), ("test", range(20, 30))):
        (tmp_path / f"png-{split}").mkdir()
        _write_wds(str(tmp_path / f"png-{split}" / f"{split}-%02d.tar"),
                   [{"__key__": f"k{i}", "png": png_bytes(Image.fromarray(images[i]).convert("L")),
                     "json": json.dumps({"label": i % 3, "caption": "x"}).encode()} for i in rng], maxcount=8)
    manifest, shards = prepare(tmp_path, "data.source=webdataset", "data.label_key=json:label",
                               f"data.train_pattern={tmp_path}/png-train/train-{{00..02}}.tar",
                               f"data.test_pattern={tmp_path}/png-test", out="from-png")
    assert {s: e.num_samples for s, e in manifest.splits.items()} == {"train": 20, "test": 10}
    _, images_test, labels_test = split_arrays(shards, "test")
    assert labels_test.tolist() == [i % 3 for i in range(20, 30)]
    assert np.array_equal(images_test[0].reshape(10, 12), np.asarray(Image.fromarray(images[20]).convert("L")))
    assert read_sources(shards, manifest, "test")[0] == f"{tmp_path}/png-test/test-00.tar#k20"


def test_webdataset_without_an_image_entry_lists_what_it_saw(tmp_path):
    (tmp_path / "w").mkdir()
    _write_wds(str(tmp_path / "w" / "s-%02d.tar"),
               [{"__key__": f"k{i}", "txt": b"hello", "cls": b"1"} for i in range(4)], maxcount=10)
    with pytest.raises(DataError, match=r"s-00\.tar, key 'k0': no an image entry .*entries are: cls, txt"):
        prepare(tmp_path, "data.source=webdataset", f"data.source_path={tmp_path}/w/s-00.tar")
    with pytest.raises(DataError, match=r"1 shard\(s\) not found, e.g. .*s-01\.tar"):
        prepare(tmp_path, "data.source=webdataset", f"data.source_path={tmp_path}/w/s-{{00..01}}.tar")


def test_s3_patterns_empty_or_unreachable(tmp_path, monkeypatch):
    from conftest import free_ports, moto_s3

    with moto_s3("wds-bucket") as s3:
        s3.put_object(Bucket="wds-bucket", Key="shards/readme.txt", Body=b"x")
        with pytest.raises(DataError, match=r"s3://wds-bucket/shards/ matches no \.tar shards"):
            prepare(tmp_path, "data.source=webdataset", "data.source_path=s3://wds-bucket/shards/")
        with pytest.raises(DataError, match=r"2 shard\(s\) not found, e.g. s3://wds-bucket/shards/a-0\.tar"):
            prepare(tmp_path, "data.source=webdataset", "data.source_path=s3://wds-bucket/shards/a-{0..1}.tar")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(6):
                data = png_bytes(Image.fromarray(np.full((4, 4), i, np.uint8)))
                info = tarfile.TarInfo(f"k{i}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        s3.put_object(Bucket="wds-bucket", Key="shards/a-0.tar", Body=buf.getvalue())
        manifest, shards = prepare(tmp_path, "data.source=webdataset", "data.source_path=s3://wds-bucket/shards/a-0.tar",
                                   "data.test_fraction=0.5")
        assert sum(e.num_samples for e in manifest.splits.values()) == 6
        assert read_sources(shards, manifest, "train")[0].startswith("s3://wds-bucket/shards/a-0.tar#k")
    port, = free_ports(1)  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(DataError, match=r"cannot list s3://wds-bucket/shards"):
        prepare(tmp_path, "data.source=webdataset", "data.source_path=s3://wds-bucket/shards/a-0.tar")


# ---------------------------------------------------------------------------------------------
# arrays

def test_npz_with_labels_and_keras_layout(tmp_path):
    images = RNG.integers(0, 256, (40, 6, 5), dtype=np.uint8)
    labels = RNG.integers(0, 7, 40)
    np.savez(tmp_path / "digits.npz", images=images, labels=labels)
    manifest, shards = prepare(tmp_path, "data.source=arrays", f"data.source_path={tmp_path}/digits.npz",
                               "data.test_fraction=0.25")
    assert manifest.dataset.image_shape == (6, 5, 1) and manifest.dataset.num_classes == 7
    for split in ("train", "test"):
        indices, got, got_labels = split_arrays(shards, split)
        rows = [int(s.split("[")[1][:-1]) for s in read_sources(shards, manifest, split)]
        assert np.array_equal(got.reshape(-1, 6, 5), images[rows]) and np.array_equal(got_labels, labels[rows])
    assert read_sources(shards, manifest, "train")[0].startswith(f"{tmp_path}/digits.npz#images[")

    np.savez_compressed(tmp_path / "keras.npz", x_train=images[:30], y_train=labels[:30], x_test=images[30:],
                        y_test=labels[30:])
    manifest, shards = prepare(tmp_path, "data.source=arrays", f"data.source_path={tmp_path}/keras.npz",
                               "data.image_size=[3,3]", "data.channels=3", out="keras")
    assert {s: e.num_samples for s, e in manifest.splits.items()} == {"train": 30, "test": 10}
    assert manifest.dataset.image_shape == (3, 3, 3)
    assert read_sources(shards, manifest, "test")[2] == f"{tmp_path}/keras.npz#x_test[2]"

    np.save(tmp_path / "plain.npy", RNG.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8))
    manifest, _ = prepare(tmp_path, "data.source=arrays", f"data.source_path={tmp_path}/plain.npy",
                          "data.test_fraction=0.5", out="plain")
    assert manifest.dataset.num_classes == 0 and manifest.dataset.image_shape == (4, 4, 3)
    np.save(tmp_path / "floats.npy", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"floats\.npy: float32 \[3, 4, 4\], expected uint8 images"):
        prepare(tmp_path, "data.source=arrays", f"data.source_path={tmp_path}/floats.npy")


def test_builtin_sources_are_synthesised():
    splits = {"train": SplitEntry(180000, ()), "test": SplitEntry(10000, ())}
    manifest = Manifest(DatasetInfo("mnist8m", (28, 28, 1)), splits, samples_per_shard=10000, source={"kind": "idx"})
    assert list(read_sources("x", manifest, "train", np.array([3, 60003, 179999]))) == [
        "mnist/train-images-idx3-ubyte#3", "mnist/train-images-idx3-ubyte#3:v1", "mnist/train-images-idx3-ubyte#59999:v2"]
    manifest = dataclasses.replace(manifest, dataset=DatasetInfo("fashion-mnist", (28, 28, 1)))
    assert read_sources("x", manifest, "test", np.array([42]))[0] == "fashion-mnist/t10k-images-idx3-ubyte#42"
    with pytest.raises(DataError, match="index 10000 is outside"):
        read_sources("x", manifest, "test", np.array([10000]))


def test_sources_file_is_checked(tmp_path):
    root = tmp_path / "few"
    for i in range(10):
        write_image(root / f"{i}.png", "L", (3, 3), seed=i)
    manifest, shards = prepare(tmp_path, "data.source=images", f"data.source_path={root}", "data.test_fraction=0.5")
    path = Path(shards, manifest.split("test").sources.path)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(DataError, match=r"sources file .*test/sources\.parquet: .* \(corrupt or overwritten\)"):
        read_sources(shards, read_manifest(shards), "test")
    with pytest.raises(DataError, match=r"test/sources\.parquet"):
        verify_shards(shards)
    assert os.path.exists(Path(shards, "manifest.json"))
