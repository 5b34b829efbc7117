"""The out-of-distribution readout (vaedist.analyses.ood, `vaedist query ood`, ood.html) checked against NumPy
recomputations of AUROC, AUPR and FPR at 95% TPR; the lineage checks that decide which two-table
analysis applies; the `source` column in queries and the report; labels of unlabelled data (-1);
and a checkpoint of another channel count refused by encode before any work. No Ray: the tables are
written by conftest's write_latent_table from real MNIST and Fashion-MNIST shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from vaedist import analyses, schema
from vaedist.analyses import OOD_SQL, check_ood_pair, ood, pair_kind
from vaedist.checkpoint import CheckpointError, save_checkpoint
from vaedist.cli import cli
from vaedist.config import Config, ModelConfig
from vaedist.data import DatasetInfo, load_idx, manifest_hash, prepare_shards, read_manifest
from vaedist.model import VAE
from vaedist.report import OOD_FIGURES, OOD_PAGE, write_ood
from vaedist.rng import NOISE_SCHEME

from conftest import ood_reference as reference, write_latent_table


def run_ood_sql(s_in, s_out, log_px_in=None, log_px_out=None) -> dict[str, dict]:
    """OOD_SQL over two in-memory tables of test rows."""
    con = duckdb.connect()
    for name, loss, log_px in (("a", s_in, log_px_in), ("b", s_out, log_px_out)):
        con.register(name, pa.table({"split": ["test"] * len(loss), "loss": np.asarray(loss, np.float64),
                                     "log_px": pa.array(log_px, pa.float64()) if log_px is not None
                                     else pa.nulls(len(loss), pa.float64())}))
    return {r["score"]: r for r in con.sql(OOD_SQL.format(a="a", b="b")).to_arrow_table().to_pylist()}


@pytest.mark.parametrize("s_in, s_out", [
    (np.arange(10.0), np.arange(5.0, 25.0)),                             # overlapping, no ties
    (np.array([1, 1, 2, 2, 2, 3, 5.0]), np.array([2, 2, 3, 3, 3, 3, 1, 9.0])),  # ties within and across sides
    (np.array([5.0, 6, 7]), np.array([1.0, 2, 3, 4])),                    # OUT all below IN: AUROC 0
    (np.full(4, 3.0), np.full(6, 3.0)),                                  # every score equal: AUROC 0.5
])
def test_ood_sql_matches_the_definitions_with_ties(s_in, s_out):
    got = run_ood_sql(s_in, s_out)
    assert list(got) == ["loss"]  # no log_px: no nll row
    want = reference(s_in, s_out)
    for name, value in want.items():
        assert got["loss"][name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert got["loss"]["in_count"] == len(s_in) and got["loss"]["out_count"] == len(s_out)


def test_ood_sql_on_random_scores_and_nll_is_minus_log_px():
    rng = np.random.default_rng(0)
    s_in, s_out = rng.normal(100, 10, 700), rng.normal(110, 15, 300).round()  # some ties on OUT's side
    got = run_ood_sql(s_in, s_out, log_px_in=-s_in - 1, log_px_out=-s_out - 1)
    for score in ("loss", "nll"):
        want = reference(s_in + (score == "nll"), s_out + (score == "nll"))
        for name, value in want.items():
            assert got[score][name] == pytest.approx(value, rel=1e-12), (score, name)
    assert 0.6 < got["loss"]["auroc"] < 0.8


# ---------------------------------------------------------------------------------------------
# Tables of one checkpoint on MNIST and on Fashion-MNIST.

@pytest.fixture(scope="module")
def pair(mnist_dir, fashion_dir, tmp_path_factory) -> dict[str, str]:
    """A checkpoint "trained" on Fashion-MNIST (an untrained model saved as such: the readout needs its
    scores, not its quality), and its tables: IN on Fashion-MNIST, OUT on MNIST (with sources), a twin
    of IN by another checkpoint, and OUT with other K."""
    root = tmp_path_factory.mktemp("ood")
    shards = {"fashion": str(root / "fashion"), "mnist": str(root / "mnist")}
    prepare_shards(shards["fashion"], "fashion-mnist", source_dir=fashion_dir, samples_per_shard=150,
                   limit_per_split=300, progress=False)
    prepare_shards(shards["mnist"], source_dir=mnist_dir, samples_per_shard=150, limit_per_split=300, progress=False)
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(latent_dim=4, hidden_dims=[32]))
    model = VAE(cfg.model).eval()
    checkpoint = str(root / "run" / "epoch-0003")
    save_checkpoint(checkpoint, model_state=model.state_dict(), optimizer_state=None, epoch=3, global_step=0,
                    config=cfg, manifest_hash=manifest_hash(shards["fashion"]), history=[], dataset="fashion-mnist")

    def lineage(data: str, ckpt: str = checkpoint) -> dict:
        info = read_manifest(shards[data]).dataset
        return {"checkpoint": f"{ckpt}/checkpoint.pt", "checkpoint_epoch": 3, "config": cfg.to_dict(),
                "shards_dir": shards[data], "manifest_hash": manifest_hash(shards[data]), "dataset": info.name,
                "class_names": list(info.class_names) if info.class_names else None, "latent_dim": 4, "num_samples_mc": 2, "seed": 0,
                "binarize_seed": cfg.train.seed, "noise_scheme": NOISE_SCHEME,
                "train_manifest_hash": manifest_hash(shards["fashion"]), "train_dataset": "fashion-mnist",
                "same_data_as_training": data == "fashion"}

    models = {None: model}
    return {
        **shards, "checkpoint": checkpoint,
        "in": write_latent_table(root / "in", shards["fashion"], models, lineage("fashion")),
        "out": write_latent_table(root / "out", shards["mnist"], models, lineage("mnist"), sources=True),
        "in_other_checkpoint": write_latent_table(root / "in-other", shards["fashion"], models,
                                                  lineage("fashion", str(root / "run" / "epoch-0004"))),
        "out_k4": write_latent_table(root / "out-k4", shards["mnist"], models, lineage("mnist"), num_samples_iw=4),
    }


def test_ood_matches_numpy_on_the_two_tables(pair):
    result = {r["score"]: r for r in ood(pair["in"], pair["out"]).to_pylist()}
    assert list(result) == ["loss", "nll"]
    test_in = pd.read_parquet(pair["in"]).query("split == 'test'")
    test_out = pd.read_parquet(pair["out"]).query("split == 'test'")
    for score, column in (("loss", "loss"), ("nll", "log_px")):
        sign = -1.0 if column == "log_px" else 1.0
        want = reference(sign * test_in[column].to_numpy(), sign * test_out[column].to_numpy())
        assert result[score]["in_count"] == result[score]["out_count"] == 300
        for name, value in want.items():
            assert result[score][name] == pytest.approx(value, rel=1e-9), (score, name)


def test_ood_cli_prints_both_scores(pair):
    result = CliRunner().invoke(cli, ["query", "ood", "--latents", pair["in"], "--against", pair["out"],
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [r["score"] for r in rows] == ["loss", "nll"] and all(0 <= r["auroc"] <= 1 for r in rows)
    missing = CliRunner().invoke(cli, ["query", "ood", "--latents", pair["in"]])
    assert missing.exit_code != 0 and "ood needs --against" in missing.output


@pytest.mark.parametrize("a, b, message", [
    ("in", "in_other_checkpoint", r"needs two tables encoded by the same checkpoint; these were not: .*in: "
                                  r"checkpoint .*epoch-0003/checkpoint.pt \(epoch 3\) on fashion-mnist .*in-other: "
                                  r"checkpoint .*epoch-0004/checkpoint.pt"),
    ("in", "in", r"encode the same data \(manifest [0-9a-f]{12}\)"),
    ("in", "out_k4", r"different numbers of samples \(num_samples_iw 8 vs 4\)"),
])
def test_ood_refuses_tables_it_cannot_read_out(pair, a, b, message):
    with pytest.raises(analyses.QueryError, match=message):
        ood(pair[a], pair[b])


def test_compare_still_refuses_one_checkpoint_on_two_data(pair):
    """compare subtracts l_i datapoint by datapoint: different data must stay refused, although the keys
    (test-00000, ...) of MNIST and Fashion-MNIST coincide."""
    with pytest.raises(analyses.QueryError, match=r"not encoded from the same datapoints and binarisation: "
                                               r"dataset 'fashion-mnist' vs 'mnist'; manifest_hash"):
        analyses.compare_by_digit(pair["in"], pair["out"])


def test_pair_kind_follows_the_lineages(pair):
    assert pair_kind(pair["in"], pair["out"]) == "ood"
    assert pair_kind(pair["in"], pair["in_other_checkpoint"]) == "comparison"  # the same data, two models
    # Neither: the comparison, which refuses it by name (test_compare_still_refuses_...).
    assert pair_kind(pair["in_other_checkpoint"], pair["out"]) == "comparison"
    check_ood_pair(pair["in"], pair["out"])  # no error


def test_report_against_writes_the_ood_page(pair, tmp_path):
    result = CliRunner().invoke(cli, ["report", "--latents", pair["in"], "--against", pair["out"],
                                      "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote {tmp_path}/r/{OOD_PAGE}"
    page = (tmp_path / "r" / OOD_PAGE).read_text()
    assert all((tmp_path / "r" / name).stat().st_size > 5000 for name in OOD_FIGURES)
    assert 'class="ood"' in page and "AUROC" in page and "fashion-mnist" in page
    # Same inputs, same bytes.
    again = write_ood(pair["in"], pair["out"], str(tmp_path / "again"))
    for name in OOD_FIGURES:
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "r" / name).read_bytes()
    assert Path(again).read_text() == page.replace(str(tmp_path / "r"), str(tmp_path / "again"))


# ---------------------------------------------------------------------------------------------
# The source column.

def test_source_column_is_shown_and_old_tables_read_without_it(pair, mnist_dir):
    out, old = pair["out"], pair["in"]
    worst = analyses.worst_explained(out, k=5, split="test").to_pylist()
    # The built-in MNIST source: the IDX file and row the image came from; the row holds those pixels.
    images, _, _ = load_idx("mnist", "test", source_dir=mnist_dir)
    shard_rows = pd.read_parquet(out).set_index("key")
    from vaedist.data import load_split_arrays, shard_paths
    indices, pixels, _ = load_split_arrays(shard_paths(pair["mnist"], "test"))
    for row in worst:
        file, row_number = row["source"].split("#")
        assert file == "mnist/t10k-images-idx3-ubyte" and row["key"] == f"test-{int(row_number):05d}"
        position = int(np.flatnonzero(indices == int(row_number))[0])
        np.testing.assert_array_equal(pixels[position].reshape(28, 28), images[int(row_number)])
        assert shard_rows.loc[row["key"], "source"] == row["source"]
    assert "source" in analyses.outliers(out, k=3).column_names
    # A table written before the column: the view has it, NULL, in its place; results leave it out.
    con = analyses.connect(old)
    names = [r[0] for r in con.sql("DESCRIBE latents").fetchall()]
    assert names[names.index("shard") + 1] == "source"
    assert con.sql("SELECT count(source) FROM latents").fetchall() == [(0,)]
    assert "source" not in analyses.worst_explained(old, k=3).column_names
    assert "source" not in analyses.outliers(old, k=3).column_names


# ---------------------------------------------------------------------------------------------
# Unlabelled data: label -1, no classes.

def test_unlabelled_table_queries_and_figures(pair, tmp_path):
    from vaedist.report.figures import _describe, _latent_space, _loss_distribution, _noun

    table = tmp_path / "unlabelled"
    shutil.copytree(pair["out"], table)
    for f in table.glob("*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.set_column(t.schema.get_field_index("label"), "label",
                                    pa.array(np.full(t.num_rows, -1, np.int64))), f)
    lineage = json.loads((table / schema.LINEAGE_FILE).read_text())
    (table / schema.LINEAGE_FILE).write_text(json.dumps({**lineage, "class_names": None}))
    by_label = analyses.loss_by_digit(str(table)).to_pylist()
    assert [r["label"] for r in by_label] == [-1] and by_label[0]["count"] == 300
    assert {r["label"] for r in analyses.outliers(str(table), k=5).to_pylist()} == {-1}
    assert [r["label"] for r in analyses.gap_by_digit(str(table)).to_pylist()] == [-1]
    info = DatasetInfo("images:things", (28, 28, 1), None, num_classes=0)
    assert _describe(info, -1) == "unlabelled" and _noun(info) == "class"
    labels, rng = np.full(50, -1), np.random.default_rng(0)
    _, caption = _latent_space(labels, rng.normal(size=(50, 4)), info, "test")
    assert "unlabelled" in caption
    _loss_distribution(labels, rng.normal(size=50), info, "test")
    named = DatasetInfo("images:pets", (28, 28, 1), ("cat", "dog"), num_classes=2)
    assert _describe(named, 1) == "dog" and _describe(named, -1) == "unlabelled"


# ---------------------------------------------------------------------------------------------
# Encode: other data that fits is taken (the integration test encodes it); other shapes are not.

def test_encode_refuses_another_channel_count_before_any_work(pair, tmp_path):
    from conftest import debug_config
    from vaedist.encode import encode

    cfg = debug_config(pair["mnist"], tmp_path, "colour")
    run_dir = tmp_path / "colour" / "epoch-0000"
    save_checkpoint(str(run_dir), model_state=VAE(cfg.model, (28, 28, 3)).state_dict(), optimizer_state=None,
                    epoch=0, global_step=0, config=cfg, manifest_hash="0" * 64, history=[], dataset="images:rgb",
                    image_shape=(28, 28, 3))
    message = (rf"checkpoint {run_dir}/checkpoint.pt was trained on images:rgb images of shape \[28, 28, 3\], but "
               rf"the shards in {pair['mnist']} hold mnist images of shape \[28, 28, 1\] \(height, width, channels\)")
    with pytest.raises(CheckpointError, match=message):
        encode(cfg, checkpoint=str(run_dir), out=str(tmp_path / "latents"))
    result = CliRunner().invoke(cli, ["encode", "--checkpoint", str(run_dir), "--shards", pair["fashion"],
                                      "--out", str(tmp_path / "latents"), "--set", f"output.storage_path={tmp_path}"])
    assert result.exit_code != 0 and "hold fashion-mnist images of shape [28, 28, 1]" in result.output
    assert not (tmp_path / "latents").exists()


def test_report_of_a_model_on_data_it_was_not_trained_on(pair, tmp_path):
    """index.html of MNIST encoded by the Fashion-MNIST checkpoint: MNIST's digits (the data's labels,
    not the model's classes), the training data named, grids titled by source."""
    from vaedist.report import write_report

    page = Path(write_report(pair["out"], str(tmp_path / "r"), num_examples=4)).read_text()
    assert "model trained on: <code>fashion-mnist (manifest" in page and "Loss by digit" in page
    assert "Ankle boot" not in page
