"""A checkpoint encodes data it was not trained on: a Fashion-MNIST checkpoint through the real encode
job (local Ray) over Fashion-MNIST and over MNIST shards; the lineage says which data is which, the
source column names each datapoint's IDX file and row, and `vaedist query ood` over the two tables
matches a NumPy recomputation from their columns.

The checkpoint is an untrained model saved as a Fashion-MNIST run's (no Ray Train run: the encode job
and the readout are under test, not the model's quality)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from vaedist.analyses import ood
from vaedist.checkpoint import checkpoint_dir_name, save_checkpoint
from vaedist.data import load_idx, manifest_hash, prepare_shards, read_manifest, read_sources
from vaedist.encode import encode
from vaedist.model import VAE

from conftest import debug_config, ood_reference

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cross_tables(ray_cluster, mnist_dir, fashion_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    shards = {"fashion": str(root / "fashion"), "mnist": str(root / "mnist")}
    prepare_shards(shards["fashion"], "fashion-mnist", source_dir=fashion_dir, samples_per_shard=200,
                   limit_per_split=400, progress=False)
    prepare_shards(shards["mnist"], source_dir=mnist_dir, samples_per_shard=200, limit_per_split=400, progress=False)
    cfg = debug_config(shards["fashion"], root, "fashion", "data.dataset=fashion-mnist", "encode.splits=[test]",
                       "encode.num_samples_iw=4", "encode.concurrency=1", "tracking.enabled=false")
    torch.manual_seed(0)
    checkpoint = root / "fashion" / checkpoint_dir_name(0)
    save_checkpoint(str(checkpoint), model_state=VAE(cfg.model).state_dict(), optimizer_state=None, epoch=0,
                    global_step=0, config=cfg, manifest_hash=manifest_hash(shards["fashion"]), history=[],
                    dataset="fashion-mnist")
    tables = {"in": encode(cfg, checkpoint=str(checkpoint), out=str(root / "in")),
              # Other data than data.shards_dir names, by the shards_dir argument (vaedist encode --shards).
              "out": encode(cfg, checkpoint=str(checkpoint), out=str(root / "out"), shards_dir=shards["mnist"])}
    return shards, tables, mnist_dir


def test_the_lineage_names_the_training_data_and_the_encoded_data(cross_tables):
    shards, tables, _ = cross_tables
    fashion, mnist = manifest_hash(shards["fashion"]), manifest_hash(shards["mnist"])
    lineage_in = json.loads(open(f"{tables['in'].path}/_lineage.json").read())
    lineage_out = json.loads(open(f"{tables['out'].path}/_lineage.json").read())
    assert (lineage_in["manifest_hash"], lineage_in["train_manifest_hash"], lineage_in["same_data_as_training"],
            lineage_in["dataset"], lineage_in["train_dataset"]) == (fashion, fashion, True, "fashion-mnist",
                                                                    "fashion-mnist")
    assert (lineage_out["manifest_hash"], lineage_out["train_manifest_hash"], lineage_out["same_data_as_training"],
            lineage_out["dataset"], lineage_out["train_dataset"]) == (mnist, fashion, False, "mnist", "fashion-mnist")
    assert lineage_out["shards_dir"] == shards["mnist"] and lineage_out["class_names"] is None
    assert tables["out"].rows == {"test": 400}


def test_the_source_column_points_at_the_image(cross_tables):
    shards, tables, mnist_dir = cross_tables
    rows = pd.read_parquet(tables["out"].path, columns=["key", "index", "source"]).sort_values("index")
    assert rows["source"].tolist() == [f"mnist/t10k-images-idx3-ubyte#{i}" for i in range(400)]
    np.testing.assert_array_equal(rows["source"].to_numpy(), read_sources(shards["mnist"],
                                                                          read_manifest(shards["mnist"]), "test"))
    # The IDX row the source names holds the image the model encoded (the shard's, for that key).
    from vaedist.data import load_split_arrays, shard_paths

    indices, pixels, _ = load_split_arrays(shard_paths(shards["mnist"], "test"))
    images, _, _ = load_idx("mnist", "test", source_dir=mnist_dir)
    for source, index in zip(rows["source"].iloc[[0, 123, 399]], rows["index"].iloc[[0, 123, 399]]):
        row = int(source.split("#")[1])
        np.testing.assert_array_equal(images[row].reshape(-1), pixels[np.flatnonzero(indices == index)[0]])


def test_query_ood_matches_numpy(cross_tables):
    _, tables, _ = cross_tables
    got = {r["score"]: r for r in ood(tables["in"].path, tables["out"].path).to_pylist()}
    test_in, test_out = pd.read_parquet(tables["in"].path), pd.read_parquet(tables["out"].path)
    for score, values in (("loss", lambda t: t["loss"].to_numpy()), ("nll", lambda t: -t["log_px"].to_numpy())):
        want = ood_reference(values(test_in), values(test_out))
        for name, value in want.items():
            assert got[score][name] == pytest.approx(value, rel=1e-9), (score, name)
