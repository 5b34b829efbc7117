"""The latent table's SQL face, against a real table: an untrained model's rows for real MNIST shards,
written as Parquet the way the encode job lays them out, read back by real DuckDB.

The table is conftest's `latent_tables`, built once per session and shared with test_report.py:
1,000 datapoints of each split in 500-datapoint shards, one Parquet file per shard.
"""

import csv
import io
import json
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from conftest import LATENT_DIM, NUM_ROWS, write_latent_table
from vaedist import schema
from vaedist.analyses import (QueryError, connect, format_table, largest_gaps, loss_by_digit, neighbours, read_lineage,
                              run_sql, worst_explained)
from vaedist.cli import cli
from vaedist.config import Config, ModelConfig
from vaedist.data.sources import FASHION_MNIST
from vaedist.model import VAE

@pytest.fixture(scope="session")
def frame(latent_tables) -> pd.DataFrame:
    """The published rows read by pandas alone, the reference for every number below."""
    files = sorted(Path(latent_tables["latents"]).glob("*.parquet"))
    return pd.concat([pq.read_table(f).to_pandas() for f in files if not f.name.startswith("_")],
                     ignore_index=True)


@pytest.fixture(params=["local", "uri"])
def latents(request, latent_tables) -> str:
    """The table as a local path (DuckDB's read_parquet) and as a URI (a pyarrow dataset)."""
    path = latent_tables["latents"]
    return path if request.param == "local" else "file://" + path


def test_view_exposes_every_column_and_only_published_files(latents):
    con = connect(latents)
    described = con.sql("DESCRIBE latents").fetchall()
    # one checkpoint, one latent group, no per-dimension KL
    assert [row[0] for row in described] == [c for c in schema.COLUMNS if c not in ("epoch", "kl_groups", "kl_dims")]
    types = {row[0]: row[1] for row in described}
    assert types["mu"] == types["logvar"] == types["z"] == f"FLOAT[{LATENT_DIM}]"
    assert con.sql("SELECT count(*), count(DISTINCT key) FROM latents").fetchall() == [(NUM_ROWS, NUM_ROWS)]


def test_run_sql_returns_arrow_with_parameters(latents):
    result = run_sql(latents, "SELECT key, mu FROM latents WHERE split = $split ORDER BY key LIMIT 3",
                     params={"split": "train"})
    assert result.column("key").to_pylist() == ["train-00000", "train-00001", "train-00002"]
    assert result.schema.field("mu").type.list_size == LATENT_DIM


@pytest.mark.parametrize("split", ["test", "train", None])
def test_loss_by_digit_matches_pandas(latent_tables, frame, split):
    result = loss_by_digit(latent_tables["latents"], split=split).to_pandas().set_index("label")
    rows = frame if split is None else frame[frame.split == split]
    grouped = rows.groupby("label")
    expected = pd.DataFrame({
        "count": grouped.size(),
        "loss_mean": grouped.loss.mean(),
        "loss_p10": grouped.loss.quantile(0.1),  # pandas' linear interpolation is quantile_cont
        "loss_p50": grouped.loss.quantile(0.5),
        "loss_p90": grouped.loss.quantile(0.9),
        "recon_nll_mean": grouped.recon_nll.mean(),
        "kl_mean": grouped.kl.mean(),
        "gap_mean": grouped.gap.mean(),
    })
    assert list(result.index) == list(range(10))
    assert list(result.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(result, expected, check_dtype=False, check_names=False, rtol=1e-12)


def test_loss_by_digit_without_log_px_has_no_gap_column(latent_tables):
    result = loss_by_digit(latent_tables["latents_k0"])
    assert "gap_mean" not in result.column_names
    assert sum(result.column("count").to_pylist()) == NUM_ROWS // 2


@pytest.mark.parametrize("split", [None, "test"])
def test_worst_explained_is_numpy_argsort(latents, frame, split):
    result = worst_explained(latents, k=7, split=split)
    assert result.column_names == ["key", "split", "label", "loss", "recon_nll", "kl"]
    rows = frame if split is None else frame[frame.split == split]
    top = rows.iloc[np.argsort(-rows.loss.to_numpy(), kind="stable")[:7]]
    assert result.column("key").to_pylist() == top.key.tolist()
    np.testing.assert_array_equal(result.column("loss").to_numpy(), top.loss.to_numpy())
    assert all(np.diff(result.column("loss").to_numpy()) <= 0)


def test_largest_gaps_is_numpy_argsort(latents, frame):
    result = largest_gaps(latents, k=5)
    top = frame.iloc[np.argsort(-frame.gap.to_numpy(), kind="stable")[:5]]
    assert result.column("key").to_pylist() == top.key.tolist()
    np.testing.assert_allclose(result.column("gap").to_numpy(),
                               result.column("log_px").to_numpy() + result.column("loss").to_numpy(), rtol=1e-9)


def test_largest_gaps_on_a_table_without_log_px_says_so(latent_tables):
    with pytest.raises(QueryError, match=r"latents_k0 has no log_px values .*num_samples_iw"):
        largest_gaps(latent_tables["latents_k0"])


@pytest.mark.parametrize("space", ["mu", "z"])
def test_neighbours_exclude_the_key_and_match_numpy(latents, frame, space):
    key = "test-00042"
    result = neighbours(latents, key, k=6, space=space)
    vectors = np.stack(frame[space].to_numpy()).astype(np.float64)
    distance = np.linalg.norm(vectors - vectors[frame.key.to_numpy() == key][0], axis=1)
    order = [i for i in np.argsort(distance, kind="stable") if frame.key[i] != key][:6]
    assert key not in result.column("key").to_pylist()  # the query datapoint is excluded
    assert result.column("key").to_pylist() == frame.key[order].tolist()
    found = result.column("distance").to_numpy()
    assert all(np.diff(found) >= 0)
    np.testing.assert_allclose(found, distance[order], rtol=1e-12)


@pytest.mark.parametrize("sql, problem", [
    ("SELEC * FROM latents", r"syntax error at or near \"SELEC\""),
    ("SELECT nope FROM latents", r"\"nope\" not found"),
    ("SELECT * FROM other_table", r"other_table does not exist"),
    ("   ", r"empty SQL"),
])
def test_bad_sql_names_the_problem(latent_tables, sql, problem):
    with pytest.raises(QueryError, match=problem):
        run_sql(latent_tables["latents"], sql)


def test_not_a_published_table_names_the_path(latent_tables, tmp_path):
    with pytest.raises(QueryError, match=rf"{tmp_path}/missing is not a published .* does not exist"):
        connect(str(tmp_path / "missing"))
    unfinished = shutil.copytree(latent_tables["latents"], tmp_path / "unfinished")
    (unfinished / schema.SUCCESS_FILE).unlink()
    lineage = json.loads((unfinished / schema.LINEAGE_FILE).read_text())
    (unfinished / schema.LINEAGE_FILE).write_text(json.dumps({**lineage, "job": {
        "command": "vaedist encode --config c.yaml", "host": "node-7", "started": "2026-11-24T10:00:00+00:00"}}))
    with pytest.raises(QueryError, match=rf"{unfinished} is not a published .* no _SUCCESS marker: it is unfinished; "
                                         r"written by `vaedist encode --config c.yaml` on node-7 at 2026-11-24T10:00:00"
                                         rf"\+00:00, encoding checkpoint {lineage['checkpoint']}\. Wait for that job"):
        connect(str(unfinished))
    staging = shutil.copytree(unfinished, tmp_path / ".latents.staging-1234abcd")
    (staging / schema.LINEAGE_FILE).unlink()
    with pytest.raises(QueryError, match=r"unfinished \(the staging directory of an encode job publishing to latents\); "
                                         r"written by an encode job that had not yet written its lineage"):
        connect(str(staging))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / schema.SUCCESS_FILE).write_text("")
    with pytest.raises(QueryError, match=rf"{empty} is not a published .* no \.parquet files"):
        loss_by_digit(str(empty))


@pytest.mark.parametrize("call, problem", [
    (lambda t: neighbours(t, "test-99999"), r"key 'test-99999' is not in latent table"),
    (lambda t: neighbours(t, "test-00001", space="logvar"), r"space must be one of mu, z, got 'logvar'"),
    (lambda t: worst_explained(t, k=0), r"k must be a positive integer, got 0"),
    (lambda t: loss_by_digit(t, split="tset"), r"split must be one of train, test or None .* got 'tset'"),
])
def test_bad_arguments_name_the_value(latent_tables, call, problem):
    with pytest.raises(QueryError, match=problem):
        call(latent_tables["latents"])


def test_format_table_outputs_parse_back(latent_tables):
    result = run_sql(latent_tables["latents"], "SELECT key, label, loss, log_px, mu FROM latents ORDER BY key LIMIT 4")
    rows = result.to_pylist()

    parsed = list(csv.DictReader(io.StringIO(format_table(result, "csv"))))
    assert [r["key"] for r in parsed] == [r["key"] for r in rows]
    assert [float(r["loss"]) for r in parsed] == [r["loss"] for r in rows]  # full precision
    for p, r in zip(parsed, rows):  # float32 vectors in their shortest form, still exact
        assert np.array_equal(np.float32(json.loads(p["mu"])), np.float32(r["mu"]))

    lines = [json.loads(line) for line in format_table(result, "json").splitlines()]  # JSON lines
    assert [line["label"] for line in lines] == [r["label"] for r in rows]
    assert np.array_equal(np.float32([line["mu"] for line in lines]), np.float32([r["mu"] for r in rows]))

    text = format_table(result, "table").splitlines()
    assert text[0].split() == ["key", "label", "loss", "log_px", "mu"]
    assert len(text) == 2 + 4 + 1 and text[-1] == "(4 rows)"
    loss_end = text[0].index("loss") + len("loss")  # numbers right-aligned under their header
    assert all(line[:loss_end].endswith(f"{r['loss']:.4f}") for line, r in zip(text[2:], rows))
    assert f"… ({LATENT_DIM})]" in text[2] and f"{rows[0]['loss']:.4f}" in text[2]
    with pytest.raises(ValueError, match="format must be one of"):
        format_table(result, "xml")


def test_table_opens_without_vaedist(latent_tables):
    """The published files are plain Parquet: DuckDB and pandas read them with no vaedist code."""
    path = latent_tables["latents_k0"]
    count, dims, log_px = duckdb.sql(f"SELECT count(*), min(len(mu)), count(log_px) "
                                     f"FROM read_parquet('{path}/*.parquet')").fetchall()[0]
    assert (count, dims, log_px) == (NUM_ROWS, LATENT_DIM, 0)
    df = pd.read_parquet(path)  # pyarrow skips names starting with _ or . itself
    assert len(df) == NUM_ROWS
    assert len(df.mu[0]) == LATENT_DIM and df.mu[0].dtype == np.float32


def test_lineage_reads_back(latent_tables):
    lineage = read_lineage(latent_tables["latents"])
    assert lineage.checkpoint == latent_tables["checkpoint"] and lineage.extra["an_unknown_key"] == [1, 2]


@pytest.mark.parametrize("as_uri", [False, True])
def test_hive_partitioned_table(latent_tables, tmp_path, as_uri):
    """Ray Data's partition_cols layout: split=<value>/ directories, the column left out of the files."""
    root = tmp_path / "hive"
    for f in Path(latent_tables["latents"]).glob("[!_]*.parquet"):
        table = pq.read_table(f)
        split = table.column("split")[0].as_py()
        (root / f"split={split}").mkdir(parents=True, exist_ok=True)
        pq.write_table(table.drop_columns(["split"]), root / f"split={split}" / f.name)
    (root / schema.SUCCESS_FILE).write_text("")
    path = ("file://" if as_uri else "") + str(root)
    assert run_sql(path, "SELECT split, count(*) AS n FROM latents GROUP BY split ORDER BY split").to_pylist() == [
        {"split": "test", "n": 1000}, {"split": "train", "n": 1000}]
    assert loss_by_digit(path).equals(loss_by_digit(latent_tables["latents"]))


# ---------------------------------------------------------------------------------------------
# A table of several checkpoints (epochs 1 and 3: epoch 1's model is latent_tables' own, so its rows
# are latent_tables' rows), and class names from the lineage.

ANALYSES = {
    "loss_by_digit": lambda path, **kw: loss_by_digit(path, **kw),
    "worst_explained": lambda path, **kw: worst_explained(path, k=7, split=None, **kw),
    "largest_gaps": lambda path, **kw: largest_gaps(path, k=5, **kw),
    "neighbours": lambda path, **kw: neighbours(path, "test-00042", k=6, **kw),
}


def untrained(seed: int) -> VAE:
    """conftest.build_tables' model when seed = 0."""
    torch.manual_seed(seed)
    return VAE(Config(model=ModelConfig(latent_dim=LATENT_DIM, hidden_dims=[32])).model).eval()


@pytest.fixture(scope="module")
def epoch_tables(latent_tables, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("query-epochs")
    shards, lineage = latent_tables["shards"], read_lineage(latent_tables["latents"]).to_dict()
    named = root / "named"
    shutil.copytree(latent_tables["latents"], named)
    (named / schema.LINEAGE_FILE).write_text(json.dumps({**lineage, "class_names": list(FASHION_MNIST.class_names)}))
    return {
        "epochs": write_latent_table(root / "epochs", shards, {1: untrained(0), 3: untrained(1)}, lineage),
        "one_epoch": write_latent_table(root / "one_epoch", shards, {3: untrained(1)}, lineage),
        "named": str(named),
    }


@pytest.mark.parametrize("name", ANALYSES)
def test_an_epoch_of_a_multi_epoch_table_is_that_checkpoint_alone(latent_tables, epoch_tables, name):
    analysis = ANALYSES[name]
    first, single = analysis(epoch_tables["epochs"], epoch=1), analysis(latent_tables["latents"])
    # The same rows give the same result, up to the order of DuckDB's parallel sums.
    pd.testing.assert_frame_equal(first.to_pandas(), single.to_pandas(), check_exact=False, rtol=1e-12)
    third = analysis(epoch_tables["epochs"], epoch=3)
    assert third.column_names == first.column_names and not third.equals(first)
    # A table that holds one epoch needs none named, and gives what that epoch gives in the larger table.
    assert analysis(epoch_tables["one_epoch"]).equals(third)
    assert analysis(epoch_tables["one_epoch"], epoch=3).equals(third)


def test_loss_by_digit_at_an_epoch_matches_pandas(epoch_tables):
    rows = pd.read_parquet(epoch_tables["epochs"])
    rows = rows[(rows.epoch == 3) & (rows.split == "test")]
    result = loss_by_digit(epoch_tables["epochs"], epoch=3).to_pandas().set_index("label")
    assert result["count"].sum() == NUM_ROWS // 2  # one checkpoint's rows, not both
    np.testing.assert_allclose(result.loss_mean, rows.groupby("label").loss.mean(), rtol=1e-12)
    np.testing.assert_allclose(result.loss_p90, rows.groupby("label").loss.quantile(0.9), rtol=1e-12)


@pytest.mark.parametrize("name", ANALYSES)
@pytest.mark.parametrize("table, epoch, problem", [
    ("epochs", None, (r"/epochs encodes several checkpoints \(epochs 1, 3\); pick one with epoch= "
                      r"\(vaedist query --epoch\)")),
    ("epochs", 2, r"epoch 2 is not in latent table .*/epochs; it holds epochs 1, 3"),
    ("one_epoch", 1, r"epoch 1 is not in latent table .*/one_epoch; it holds epochs 3"),
    ("latents", 1, r"latents has no epoch column \(it encodes one checkpoint\); leave out epoch=1"),
    ("epochs", True, r"epoch must be an integer epoch, got True"),
])
def test_epoch_errors_name_the_table_and_the_epochs(latent_tables, epoch_tables, name, table, epoch, problem):
    with pytest.raises(QueryError, match=problem):
        ANALYSES[name]({**latent_tables, **epoch_tables}[table], epoch=epoch)


@pytest.mark.parametrize("name", ["loss_by_digit", "worst_explained", "largest_gaps", "neighbours"])
def test_class_column_from_the_lineage(latent_tables, epoch_tables, name):
    result = ANALYSES[name](epoch_tables["named"])
    columns = result.column_names
    assert columns.index("class") == columns.index("label") + 1
    names = np.array(FASHION_MNIST.class_names)
    assert result.column("class").to_pylist() == names[result.column("label").to_numpy()].tolist()
    assert "class" not in ANALYSES[name](latent_tables["latents"]).column_names  # MNIST's lineage names none
    assert result.drop_columns(["class"]).equals(ANALYSES[name](latent_tables["latents"]))


def test_cli_epoch_option(epoch_tables):
    result = CliRunner().invoke(cli, ["query", "loss-by-digit", "--latents", epoch_tables["epochs"], "--epoch", "3",
                                      "--format", "json"])
    assert result.exit_code == 0, result.output
    parsed = [json.loads(line) for line in result.output.splitlines()]
    assert parsed == loss_by_digit(epoch_tables["epochs"], epoch=3).to_pylist()
    for args in (["worst"], ["gaps"], ["neighbours", "--key", "test-00042"]):
        without = CliRunner().invoke(cli, ["query", *args, "--latents", epoch_tables["epochs"]])
        assert without.exit_code == 1 and "pick one with epoch= (vaedist query --epoch)" in without.output
        assert "Traceback" not in without.output
        with_epoch = CliRunner().invoke(cli, ["query", *args, "--latents", epoch_tables["epochs"], "--epoch", "1"])
        assert with_epoch.exit_code == 0 and with_epoch.output.endswith("rows)\n"), with_epoch.output
    text = CliRunner().invoke(cli, ["query", "worst", "--latents", epoch_tables["named"], "--k", "3"]).output
    assert text.split()[:7] == ["key", "split", "label", "class", "loss", "recon_nll", "kl"]
