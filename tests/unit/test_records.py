"""The typed records of the plumbing (Manifest, Lineage, CheckpointState): round trips, the files the
code wrote before the records existed still read, and an unknown version is an error naming the file.

The fixtures are real files written by vaedist before the records: fixtures/manifest-format2.json
(prepare_shards of 8 MNIST datapoints per split, 4 per shard) and fixtures/checkpoint-unversioned.pt
(save_checkpoint of an MLP with hidden_dims [4] and latent_dim 2, epoch 3, global_step 12).
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from vaedist.checkpoint import (CHECKPOINT_FILE, CHECKPOINT_VERSION, CheckpointError, CheckpointState, config_of,
                                load_checkpoint, load_model, save_checkpoint)
from vaedist.config import Config
from vaedist.data import MNIST, DataError, DatasetInfo, Manifest, read_manifest
from vaedist.data.common import FORMAT_VERSION
from vaedist.data.manifest import MANIFEST_NAME, write_manifest
from vaedist.lineage import LINEAGE_FILE, LINEAGE_VERSION, Lineage, LineageError, read_lineage, write_lineage
from vaedist.model import VAE

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------------------------------------
# Manifest

@pytest.fixture
def shards_dir(tmp_path) -> Path:
    shutil.copy(FIXTURES / "manifest-format2.json", tmp_path / MANIFEST_NAME)
    return tmp_path


def test_manifest_written_before_the_record_reads_and_writes_back_byte_identical(shards_dir, tmp_path):
    manifest = read_manifest(str(shards_dir))
    assert manifest.dataset == MNIST and manifest.format_version == FORMAT_VERSION
    assert manifest.source_kind == "idx" and manifest.samples_per_shard == 4
    test = manifest.split("test")
    assert test.num_samples == 8 and [s.path for s in test.shards] == ["test/test-000000.tar", "test/test-000001.tar"]
    assert [s.first_index for s in test.shards] == [0, 4] and test.sources is None
    # The same canonical bytes, so manifest_hash (sha256 of the file) names the same data.
    out = tmp_path / "again"
    write_manifest(str(out), manifest)
    assert (out / MANIFEST_NAME).read_bytes() == (shards_dir / MANIFEST_NAME).read_bytes()
    assert Manifest.from_dict(manifest.to_dict()) == manifest


def test_format_1_manifest_reads_as_mnist(shards_dir):
    """Format 1 (before datasets had names): the image shape at the top, no dataset entry."""
    v2 = json.loads((shards_dir / MANIFEST_NAME).read_text())
    v1 = {"format_version": 1, "image_shape": [28, 28], "image_dtype": "uint8", "members": v2["members"],
          "samples_per_shard": 4, "source": {"kind": "idx", "files": {}}, "splits": v2["splits"]}
    (shards_dir / MANIFEST_NAME).write_text(json.dumps(v1))
    manifest = read_manifest(str(shards_dir))
    assert manifest.format_version == 1 and manifest.dataset == MNIST
    assert manifest.split("train").num_samples == 8
    assert manifest.to_dict()["format_version"] == FORMAT_VERSION  # written back in the current format
    assert Manifest.from_dict(manifest.to_dict()).dataset == MNIST


def test_manifest_round_trip_with_sources_and_classes():
    d = json.loads((FIXTURES / "manifest-format2.json").read_text())
    d["dataset"] = DatasetInfo("cats", (8, 8, 3), ("a", "b"), 2).to_manifest()
    d["source"] = {"kind": "images", "num_skipped": 0}
    d["splits"]["test"]["sources"] = {"path": "test/sources.parquet", "bytes": 10, "sha256": "f" * 64}
    manifest = Manifest.from_dict(d)
    assert manifest.split("test").sources.path == "test/sources.parquet"
    assert manifest.to_dict() == d


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format_version=99), "format_version 99, this vaedist reads 1 and 2"),
    (lambda d: d.pop("format_version"), "format_version None"),
    (lambda d: d["splits"]["test"]["shards"][0].pop("sha256"), r"malformed manifest \(test split: a shard without sha256\)"),
    (lambda d: d["splits"].update(valid=d["splits"]["test"]), "malformed manifest .*unknown split 'valid'"),
])
def test_bad_manifest_is_an_error_naming_the_file(shards_dir, change, message):
    d = json.loads((shards_dir / MANIFEST_NAME).read_text())
    change(d)
    (shards_dir / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(DataError, match=re.escape(str(shards_dir / MANIFEST_NAME)) + ": " + message):
        read_manifest(str(shards_dir))


def test_a_split_the_manifest_lacks_is_named(shards_dir):
    d = json.loads((shards_dir / MANIFEST_NAME).read_text())
    del d["splits"]["test"]
    (shards_dir / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(DataError, match=re.escape(str(shards_dir / MANIFEST_NAME)) + r" has no split 'test' \(it has \['train'\]\)"):
        read_manifest(str(shards_dir)).split("test")


# ---------------------------------------------------------------------------------------------
# Lineage

def _lineage_before_the_record(class_names=None) -> dict:
    """What encode() wrote before the record (the dict literal it built, then rows and job)."""
    return {
        "checkpoint": "/runs/r/epoch-0001/checkpoint.pt", "checkpoint_epoch": 1, "config": Config().to_dict(),
        "manifest_hash": "a" * 64, "shards_dir": "/data/shards", "splits": ["train", "test"],
        "train_manifest_hash": "a" * 64, "train_dataset": "mnist", "same_data_as_training": True,
        "dataset": "mnist", "image_shape": [28, 28, 1], "class_names": class_names,
        "num_samples_mc": 1, "num_samples_iw": 8, "seed": 0, "binarize_seed": 0, "latent_dim": 32,
        "likelihood": "bernoulli", "binarised": True, "noise_scheme": "keyed-philox-v1", "schema_version": 4,
        "vaedist_version": "0.1.0", "epochs": [0, 1],
        "checkpoints": [{"epoch": 0, "path": "/runs/r/epoch-0000/checkpoint.pt"},
                        {"epoch": 1, "path": "/runs/r/epoch-0001/checkpoint.pt"}],
        "rows": {"train": 60000, "test": 10000},
        "job": {"command": "vaedist encode", "host": "h", "started": "2026-01-01T00:00:00+00:00"},
    }


def test_lineage_written_before_the_record_reads(tmp_path):
    old = _lineage_before_the_record()
    (tmp_path / LINEAGE_FILE).write_text(json.dumps(old, indent=2, sort_keys=True))
    lineage = read_lineage(str(tmp_path))
    assert lineage.version == 0 and lineage.checkpoint == old["checkpoint"] and lineage.rows == old["rows"]
    assert lineage.checkpoint_of_epoch(0) == "/runs/r/epoch-0000/checkpoint.pt"
    assert lineage.checkpoint_of_epoch(5) is None and lineage.extra == {}
    assert lineage.to_dict() == {**old, "version": LINEAGE_VERSION}  # written back, it only gains its version


def test_lineage_round_trip_and_what_old_tables_lack(tmp_path):
    lineage = Lineage.from_dict({**_lineage_before_the_record(["a", "b"]), "a_newer_key": {"x": 1}})
    write_lineage(str(tmp_path), lineage)
    assert read_lineage(str(tmp_path)) == lineage and lineage.extra == {"a_newer_key": {"x": 1}}
    # The first tables named little; what they lack is None, except binarised (they all were).
    first = Lineage.from_dict({"checkpoint": "c", "latent_dim": 2})
    assert first.binarised is True and first.class_names is None and first.epochs is None
    assert "epochs" not in first.to_dict() and "rows" not in first.to_dict()  # written only when set
    assert Lineage.from_dict(first.to_dict()) == first


@pytest.mark.parametrize("content,message", [
    ({"version": 2, "checkpoint": "c"}, r"lineage version 2; this vaedist reads versions 0 to 1"),
    ({"version": "1"}, r"lineage version '1'"),
    ({"class_names": "0123456789"}, r"class_names must be a list of strings \(index = label\), got '0123456789'"),
    ([1, 2], r"expected a JSON object, got list"),
])
def test_bad_lineage_is_an_error_naming_the_file(tmp_path, content, message):
    (tmp_path / LINEAGE_FILE).write_text(json.dumps(content))
    with pytest.raises(LineageError, match=re.escape(str(tmp_path / LINEAGE_FILE)) + ": " + message):
        read_lineage(str(tmp_path))


def test_missing_lineage_is_named(tmp_path):
    with pytest.raises(LineageError, match=re.escape(str(tmp_path / LINEAGE_FILE)) + " not found"):
        read_lineage(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# CheckpointState

def test_checkpoint_written_before_the_record_loads(tmp_path):
    shutil.copy(FIXTURES / "checkpoint-unversioned.pt", tmp_path / CHECKPOINT_FILE)
    model, cfg, state = load_model(str(tmp_path))
    assert state.version == 0 and state.path == str(tmp_path / CHECKPOINT_FILE)
    assert (state.epoch, state.global_step, state.manifest_hash) == (3, 12, "ab" * 32)
    assert (state.dataset, state.image_shape) == ("mnist", (28, 28, 1))
    assert state.history == [{"kind": "epoch", "epoch": 3}] and state.optimizer is None
    assert cfg.model.hidden_dims == [4] and model.latent_dim == 2


def test_checkpoint_without_data_entry_is_mnist(tmp_path):
    """The first checkpoints (before datasets had names) hold no `data` entry: MNIST's shape."""
    raw = torch.load(FIXTURES / "checkpoint-unversioned.pt", weights_only=True)
    del raw["data"], raw["scaler"], raw["global_step"]
    state = CheckpointState.from_dict(raw, "old.pt")
    assert (state.dataset, state.image_shape, state.global_step, state.scaler) == ("mnist", (28, 28, 1), 0, None)


def test_checkpoint_round_trip(tmp_path):
    cfg = Config()
    model = VAE(cfg.model, (8, 8, 3))
    path = save_checkpoint(str(tmp_path), model_state=model.state_dict(), optimizer_state={"state": {}}, epoch=2,
                           global_step=7, config=cfg, manifest_hash="c" * 64, history=[], dataset="cats",
                           image_shape=(8, 8, 3))
    state = load_checkpoint(str(tmp_path))
    assert state.version == CHECKPOINT_VERSION and state.path == path and config_of(state) == cfg
    assert (state.dataset, state.image_shape, state.epoch, state.optimizer) == ("cats", (8, 8, 3), 2, {"state": {}})
    again = CheckpointState.from_dict(state.to_dict(), path)
    assert again.model.keys() == state.model.keys() and again.image_shape == state.image_shape
    assert all(torch.equal(again.model[k], v) for k, v in state.model.items())


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(version=CHECKPOINT_VERSION + 1), "has version 2; this vaedist reads versions 0 to 1"),
    (lambda d: d.pop("manifest_hash"), r"is not a vaedist checkpoint \(missing \['manifest_hash'\]\)"),
])
def test_bad_checkpoint_is_an_error_naming_the_file(tmp_path, change, message):
    raw = torch.load(FIXTURES / "checkpoint-unversioned.pt", weights_only=True)
    change(raw)
    buf = io.BytesIO()
    torch.save(raw, buf)
    (tmp_path / CHECKPOINT_FILE).write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(tmp_path / CHECKPOINT_FILE))} {message}"):
        load_checkpoint(str(tmp_path))
