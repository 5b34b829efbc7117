"""The Python API (vaedist.api) on the session's small checkpoint and latent table (conftest's
latent_tables, written without Ray): a model's numbers are its table rows' numbers, a table reads
the same through DuckDB, pandas and the analyses, and bad input is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import vaedist
from vaedist import analyses
from vaedist.analyses import QueryError
from vaedist.checkpoint import CheckpointError
from vaedist.data import fixed_binarize


@pytest.fixture(scope="module")
def model(latent_tables):
    return vaedist.load_model(latent_tables["checkpoint"])


@pytest.fixture(scope="module")
def data(latent_tables):
    return vaedist.read_images(latent_tables["shards"], split="test")


@pytest.fixture(scope="module")
def rows(latent_tables):
    """The table's test rows by datapoint index."""
    df = vaedist.open_table(latent_tables["latents"]).to_pandas()
    return df[df.split == "test"].set_index("index")


def test_importing_vaedist_loads_neither_torch_duckdb_nor_ray():
    code = ("import sys, vaedist; vaedist.__version__; "
            "import json; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'duckdb', 'ray'})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert json.loads(proc.stdout) == []
    assert {"load_model", "open_table", "load_config", "Config"} <= set(dir(vaedist))
    with pytest.raises(AttributeError, match="no attribute 'lod_model'"):
        vaedist.lod_model  # noqa: B018


def test_model_loss_log_px_and_posterior_are_the_tables_rows(model, data, rows, latent_tables):
    lineage = vaedist.open_table(latent_tables["latents"]).lineage
    parts = model.loss(data.images, indices=data.indices, split="test", num_samples=lineage.num_samples_mc,
                       seed=lineage.seed)
    expected = rows.loc[data.indices]
    # The same per-key binarisation and noise: the whole split in one batch gives the 500-row batches' numbers.
    np.testing.assert_allclose(parts.loss.numpy(), expected["loss"], rtol=1e-6)
    np.testing.assert_allclose(parts.recon_nll.numpy(), expected["recon_nll"], rtol=1e-6)
    np.testing.assert_allclose(parts.kl.numpy(), expected["kl"], rtol=1e-5, atol=1e-6)
    assert torch.equal(parts.loss, parts.recon_nll + parts.kl)

    some = slice(0, 40)
    log_px = model.log_px(data.images[some], num_samples=lineage.num_samples_iw, indices=data.indices[some],
                          split="test", seed=lineage.seed)
    np.testing.assert_allclose(log_px.numpy(), expected["log_px"].iloc[some], rtol=1e-6)
    assert (log_px.numpy() >= -parts.loss.numpy()[some] - 50).all()  # a tighter bound: near -l_i, not far below

    mu, logvar = model.encode(data.images[some], indices=data.indices[some])
    np.testing.assert_allclose(mu.numpy(), np.stack(expected["mu"].iloc[some]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logvar.numpy(), np.stack(expected["logvar"].iloc[some]), rtol=1e-5, atol=1e-6)


def test_model_input_is_the_keyed_binarisation_in_any_layout(model, data):
    images, indices = data.images[:6], data.indices[:6]
    expected = fixed_binarize(images.reshape(6, -1), indices, "test", seed=model.config.train.seed)
    for layout in (images, images[..., 0], images.reshape(6, -1), torch.from_numpy(images)):
        assert torch.equal(model.inputs(layout, indices=indices, split="test"), expected)
    # Another split or index is another draw; a float tensor is taken as already the input.
    assert not torch.equal(model.inputs(images, indices=indices, split="train"), expected)
    assert torch.equal(model.encode(expected)[0], model.encode(images, indices=indices)[0])


def test_decode_and_sample_give_images(model):
    z = torch.zeros(3, model.latent_dim)
    images = model.decode(z)
    assert images.shape == (3, 28, 28, 1) and images.min() >= 0 and images.max() <= 1
    assert model.decode(z, params=True).shape == (3, 784)
    torch.testing.assert_close(model.decode(z), torch.sigmoid(model.decode(z, params=True)).reshape(3, 28, 28, 1))
    drawn = model.sample(4, seed=3)
    assert drawn.shape == (4, 28, 28, 1) and set(drawn.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(drawn, model.sample(4, seed=3)) and not torch.equal(drawn, model.sample(4, seed=4))
    assert model.sample(2, mean=True).dtype == torch.float32


@pytest.mark.parametrize("call, message", [
    (lambda m, d: m.encode(d.images[:2, :14]), r"images must be \[B, 28, 28, 1\] .* got \[2, 14, 28, 1\]"),
    (lambda m, d: m.encode(d.images[:2].astype(np.int64)), "images must be uint8"),
    (lambda m, d: m.encode(torch.zeros(2, 10)), r"a float input must be the model's input \[B, 784\]"),
    (lambda m, d: m.loss(d.images[:2], indices=[0, -1]), "indices must be 2 non-negative integers"),
    (lambda m, d: m.loss(d.images[:2], indices=[0]), "indices must be 2 non-negative integers"),
    (lambda m, d: m.decode(torch.zeros(2, 3)), r"z must be \[B, 4\]"),
    (lambda m, d: m.sample(0), "n must be a positive integer"),
    (lambda m, d: m.log_px(d.images[:2], num_samples=0), r"num_samples must be a positive integer \(K importance"),
    (lambda m, d: m.loss(d.images[:2], num_samples=0), r"num_samples must be a positive integer \(S samples"),
])
def test_bad_model_input_is_named(model, data, call, message):
    with pytest.raises(ValueError, match=message):
        call(model, data)


def test_load_model_names_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path}/none does not exist"):
        vaedist.load_model(str(tmp_path / "none"))


def test_table_reads_the_same_through_duckdb_pandas_arrow_and_the_analyses(latent_tables):
    table = vaedist.open_table(latent_tables["latents"])
    df = table.to_pandas()
    assert table.num_rows == len(df) == 2000  # the staging directory and _leak.parquet are not part of it
    assert table.to_arrow().num_rows == 2000 and table.to_arrow().schema.field("mu").type.list_size == 4
    by_label = table.relation().filter("split = 'test'").aggregate("label, avg(loss) AS loss").order("label").df()
    pd.testing.assert_series_equal(by_label.set_index("label")["loss"],
                                   df[df.split == "test"].groupby("label")["loss"].mean(), check_names=False)
    assert table.sql("SELECT count(*) AS n FROM latents WHERE label = $label", label=3).column("n")[0].as_py() == \
        int((df.label == 3).sum())
    assert table.analysis("loss-by-digit", split="train").equals(
        analyses.loss_by_digit(latent_tables["latents"], split="train"))
    with pytest.raises(QueryError, match="unknown analysis 'loss-by-dgit': did you mean 'loss-by-digit'"):
        table.analysis("loss-by-dgit")


def test_table_lineage_is_attributes(latent_tables):
    lineage = vaedist.open_table(latent_tables["latents"]).lineage
    assert lineage.checkpoint == latent_tables["checkpoint"] and lineage.num_samples_iw == 8
    assert lineage.to_dict()["latent_dim"] == 4 and lineage.extra == {"an_unknown_key": [1, 2]}
    with pytest.raises(AttributeError, match="nope"):
        lineage.nope  # noqa: B018


def test_open_table_says_why_a_path_is_not_a_table(tmp_path, latent_tables):
    with pytest.raises(QueryError, match="is not a published vaedist latent table: it does not exist"):
        vaedist.open_table(str(tmp_path / "none"))
    with pytest.raises(QueryError, match="no _SUCCESS marker"):
        vaedist.open_table(os.path.join(latent_tables["latents"], ".staging-0"))


def test_steps_take_a_config_object_or_a_yaml_path(tmp_path):
    from vaedist import api

    (tmp_path / "bad.yaml").write_text("data:\n  samples_per_shard: 0\n")
    with pytest.raises(vaedist.ConfigError, match="data.samples_per_shard: must be > 0"):
        api.prepare(str(tmp_path / "bad.yaml"))
    cfg = vaedist.load_config(None, ["train.epochs=1"])
    assert isinstance(cfg, vaedist.Config) and cfg.train.epochs == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_same_numbers_on_a_gpu(latent_tables, model, data):
    on_gpu = vaedist.load_model(latent_tables["checkpoint"], device="cuda")
    assert on_gpu.device.type == "cuda"
    args = dict(indices=data.indices[:64], split="test", num_samples=2, seed=0)
    np.testing.assert_allclose(on_gpu.loss(data.images[:64], **args).loss.cpu().numpy(),
                               model.loss(data.images[:64], **args).loss.numpy(), rtol=1e-5)
