"""vaedist.analyses against real Parquet tables and real DuckDB, each number recomputed with NumPy
or pandas from the published rows. No Ray.

Tables: conftest's `latent_tables` (an untrained model over real MNIST shards, 1,000 datapoints per
split), and, written here with conftest's write_latent_table over the same shards: another
untrained model (another checkpoint), one whose latent dimension PRIOR_DIM is forced to the prior,
a table of three checkpoints (epochs 1, 2, 4; epoch 1's model is latent_tables' own, epoch 2's the
other checkpoint's), and a test-split-only table.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import LATENT_DIM, NUM_ROWS, write_latent_table
from vaedist import schema
from vaedist.analyses import (QueryError, active_units, compare_by_digit, compare_top, curves, digit_curves, forgotten,
                              gap_by_digit, kl_per_dim, learned_late, outliers, read_lineage, table_epochs, totals)
from vaedist.cli import cli
from vaedist.config import Config, ModelConfig
from vaedist.model import VAE

PRIOR_DIM = 2
EPOCHS = (1, 2, 4)  # not consecutive numbers: "consecutive" means adjacent among the kept epochs
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def untrained(seed: int) -> VAE:
    """conftest.build_tables' model when seed = 0."""
    torch.manual_seed(seed)
    return VAE(Config(model=ModelConfig(latent_dim=LATENT_DIM, hidden_dims=[32])).model).eval()


def prior_model() -> VAE:
    """Dimension PRIOR_DIM's q(z_d|x) is N(0, 1) for every x: its mu and logvar outputs are zeroed. The
    other units' mu weights are scaled up: an untrained encoder's mu barely varies (variance < 0.01)."""
    model = untrained(0)
    with torch.no_grad():
        layer = model.to_posterior
        layer.weight[:LATENT_DIM] *= 10
        layer.bias[:LATENT_DIM] *= 10
        for row in (PRIOR_DIM, LATENT_DIM + PRIOR_DIM):  # mu_d, logvar_d
            layer.weight[row].zero_()
            layer.bias[row].zero_()
    return model


def with_lineage(source: str, dest: Path, **changes) -> str:
    """A copy of a table with lineage fields changed."""
    shutil.copytree(source, dest)
    lineage = json.loads((dest / schema.LINEAGE_FILE).read_text())
    (dest / schema.LINEAGE_FILE).write_text(json.dumps({**lineage, **changes}))
    return str(dest)


@pytest.fixture(scope="module")
def tables(latent_tables, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("analysis")
    shards = latent_tables["shards"]
    lineage = read_lineage(latent_tables["latents"]).to_dict()
    return {
        **latent_tables,
        "other": write_latent_table(root / "other", shards, {None: untrained(1)},
                                    {**lineage, "checkpoint": "other", "binarize_seed": 0, "dataset": "mnist"}),
        "prior": write_latent_table(root / "prior", shards, {None: prior_model()}, lineage),
        "epochs": write_latent_table(root / "epochs", shards, dict(zip(EPOCHS, map(untrained, (0, 1, 2)))),
                                     {**lineage, "binarize_seed": 0}),
        "test_only": write_latent_table(root / "test_only", shards, {None: untrained(1)},
                                        {**lineage, "binarize_seed": 0}, splits=("test",)),
        "named": with_lineage(latent_tables["latents"], root / "named", class_names=CLASS_NAMES),
    }


_frames: dict[str, pd.DataFrame] = {}


def frame(path: str) -> pd.DataFrame:
    """The published rows read by pandas alone (it skips files named _* and .*)."""
    if path not in _frames:
        df = pd.read_parquet(path)
        _frames[path] = df.sort_values(["key", "epoch"] if "epoch" in df else "key").reset_index(drop=True)
    return _frames[path]


def of_split(df: pd.DataFrame, split: str | None) -> pd.DataFrame:
    return df if split is None else df[df.split == split]


def assert_frame(result, expected: pd.DataFrame, index: str | list[str]) -> None:
    got = result.to_pandas().set_index(index)
    assert list(got.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_names=False, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# One table.

@pytest.mark.parametrize("split", [None, "test"])
def test_active_units_and_kl_per_dim_match_numpy(tables, split):
    rows = of_split(frame(tables["latents"]), split)
    mu = np.stack(rows.mu.to_numpy()).astype(np.float64)
    logvar = np.stack(rows.logvar.to_numpy()).astype(np.float64)
    variance = mu.var(axis=0)  # Burda et al.'s Cov_x over the datapoints: population variance
    threshold = float(np.median(variance))  # some units on each side
    units = active_units(tables["latents"], threshold=threshold, split=split)
    assert units.column("dim").to_pylist() == list(range(LATENT_DIM))
    np.testing.assert_allclose(units.column("mu_variance").to_numpy(), variance, rtol=1e-9)
    assert units.column("active").to_pylist() == (variance > threshold).tolist()
    assert 0 < sum(units.column("active").to_pylist()) < LATENT_DIM

    kl = kl_per_dim(tables["latents"], split=split)
    expected = (-0.5 * (1 + logvar - mu ** 2 - np.exp(logvar))).mean(axis=0)
    np.testing.assert_allclose(kl.column("kl_mean").to_numpy(), expected, rtol=1e-9)
    # The dimensions' KL sum to the table's mean kl (computed by the model in float32).
    np.testing.assert_allclose(kl.column("kl_mean").to_numpy().sum(), rows.kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(kl.column("kl_share").to_numpy(), expected / expected.sum(), rtol=1e-9)


def test_a_dimension_at_the_prior_is_inactive_with_no_kl(tables):
    units = active_units(tables["prior"]).to_pylist()
    assert units[PRIOR_DIM] == {"dim": PRIOR_DIM, "mu_variance": 0.0, "active": False}
    assert [u["active"] for u in units] == [d != PRIOR_DIM for d in range(LATENT_DIM)]
    kl = kl_per_dim(tables["prior"]).column("kl_mean").to_numpy()
    assert abs(kl[PRIOR_DIM]) < 1e-12
    assert all(kl[d] > 0.01 for d in range(LATENT_DIM) if d != PRIOR_DIM)


@pytest.mark.parametrize("split", [None, "train"])
def test_totals_match_pandas(tables, split):
    grouped = of_split(frame(tables["latents"]), split).assign(nll=lambda d: -d.log_px).groupby("split")
    expected = pd.DataFrame({
        "count": grouped.size(),
        "loss_mean": grouped.loss.mean(), "loss_se": grouped.loss.sem(),  # sem: ddof=1 / sqrt(n)
        "bpd": grouped.loss.mean() / (784 * np.log(2)),  # bits per dimension of 28x28x1 images
        "nll_mean": grouped.nll.mean(), "nll_se": grouped.nll.sem(),
        "bpd_iw": grouped.nll.mean() / (784 * np.log(2)),
        "gap_mean": grouped.gap.mean(), "gap_se": grouped.gap.sem(),
    })
    assert_frame(totals(tables["latents"], split=split), expected, "split")


def test_totals_without_log_px_have_no_nll_columns(tables):
    result = totals(tables["latents_k0"])
    assert result.column_names == ["split", "count", "loss_mean", "loss_se", "bpd"]
    assert result.column("count").to_pylist() == [1000, 1000]


@pytest.mark.parametrize("split", [None, "test"])
def test_gap_by_digit_matches_pandas(tables, split):
    grouped = of_split(frame(tables["latents"]), split).groupby("label")
    expected = pd.DataFrame({"count": grouped.size(), "gap_mean": grouped.gap.mean(), "gap_se": grouped.gap.sem(),
                             "nll_mean": -grouped.log_px.mean(), "loss_mean": grouped.loss.mean()})
    assert_frame(gap_by_digit(tables["latents"], split=split), expected, "label")


def test_gap_by_digit_needs_log_px(tables):
    with pytest.raises(QueryError, match=r"latents_k0 has no log_px values .*num_samples_iw > 0"):
        gap_by_digit(tables["latents_k0"])


@pytest.mark.parametrize("split", [None, "test"])
def test_outliers_are_the_highest_within_class_z_scores(tables, split):
    rows = of_split(frame(tables["latents"]), split)
    by_class = rows.groupby(["split", "label"]).loss
    rows = rows.assign(class_mean=by_class.transform("mean"), class_std=by_class.transform("std"),
                       global_rank=rows.loss.rank(method="min", ascending=False).astype(int))
    rows = rows.assign(z_score=(rows.loss - rows.class_mean) / rows.class_std)
    top = rows.sort_values(["z_score", "key"], ascending=[False, True]).head(7)
    result = outliers(tables["latents"], k=7, split=split)
    assert result.column_names == ["key", "split", "label", "loss", "z_score", "class_mean", "class_std",
                                   "global_rank"]
    got = result.to_pandas()
    assert got.key.tolist() == top.key.tolist()
    for column in ("z_score", "class_mean", "class_std"):
        np.testing.assert_allclose(got[column], top[column], rtol=1e-9)
    assert got.global_rank.tolist() == top.global_rank.tolist()
    assert got.global_rank.tolist() != list(range(1, 8))  # not simply the highest l_i


def test_class_names_from_the_lineage(tables, tmp_path):
    names = np.array(CLASS_NAMES)
    for result in (gap_by_digit(tables["named"]), compare_by_digit(tables["named"], tables["latents"]),
                   outliers(tables["named"])):
        columns = result.column_names
        assert columns.index("class") == columns.index("label") + 1
        assert result.column("class").to_pylist() == names[result.column("label").to_numpy()].tolist()
    assert "class" not in gap_by_digit(tables["latents"]).column_names
    bad = with_lineage(tables["latents"], tmp_path / "bad", class_names="0123456789")
    with pytest.raises(QueryError, match=r"bad/_lineage.json: class_names must be a list of strings .* '0123456789'"):
        outliers(bad)


# ---------------------------------------------------------------------------------------------
# Two tables.

def test_a_table_compared_with_itself_changes_nothing(tables):
    result = compare_by_digit(tables["latents"], tables["latents"], split=None).to_pandas()
    assert result["count"].sum() == NUM_ROWS
    assert (result.delta_mean == 0).all() and (result.delta_se == 0).all() and (result.improved_fraction == 0).all()
    assert (result.loss_a_mean == result.loss_b_mean).all()
    assert compare_top(tables["latents"], tables["latents"]).num_rows == 0


@pytest.mark.parametrize("split", ["test", None])
def test_compare_against_another_checkpoint_matches_pandas(tables, split):
    a, b = frame(tables["latents"]), frame(tables["other"])
    pairs = of_split(a, split).merge(b[["key", "loss"]], on="key", suffixes=("_a", "_b"))
    pairs = pairs.assign(delta=pairs.loss_a - pairs.loss_b)
    grouped = pairs.groupby("label")
    expected = pd.DataFrame({
        "count": grouped.size(), "loss_a_mean": grouped.loss_a.mean(), "loss_b_mean": grouped.loss_b.mean(),
        "delta_mean": grouped.delta.mean(), "delta_se": grouped.delta.sem(),
        "improved_fraction": grouped.delta.apply(lambda d: (d < 0).mean()),
    })
    assert_frame(compare_by_digit(tables["latents"], tables["other"], split=split), expected, "label")
    assert 0 < expected.improved_fraction.min() and expected.improved_fraction.max() < 1

    top = compare_top(tables["latents"], tables["other"], k=4, split=split).to_pandas()
    improved = pairs[pairs.delta < 0].sort_values(["delta", "key"]).head(4)
    regressed = pairs[pairs.delta > 0].sort_values(["delta", "key"], ascending=[False, True]).head(4)
    assert top.change.tolist() == ["improved"] * 4 + ["regressed"] * 4
    assert top.key.tolist() == improved.key.tolist() + regressed.key.tolist()
    np.testing.assert_allclose(top.delta, pd.concat([improved.delta, regressed.delta]), rtol=1e-12)


def test_compare_refuses_other_data_naming_both_tables_and_fields(tables, tmp_path):
    other = with_lineage(tables["other"], tmp_path / "moved", manifest_hash="0" * 64, binarize_seed=7,
                         dataset="fashion-mnist")
    with pytest.raises(QueryError) as e:
        compare_by_digit(tables["other"], other)
    message = str(e.value)
    assert f"{tables['other']} and {other}" in message
    assert f"manifest_hash {read_lineage(tables['other']).manifest_hash!r} vs '{'0' * 64}'" in message
    assert "binarize_seed 0 vs 7" in message and "dataset 'mnist' vs 'fashion-mnist'" in message

    with pytest.raises(QueryError, match=r"splits \['train', 'test'\] vs \['test'\]"):
        compare_top(tables["other"], tables["test_only"])
    # Without `splits` in one lineage (latent_tables'), the rows per split tell.
    rows = r"different datapoints \(rows per split: test 1000, train 1000 vs test 1000\)"
    with pytest.raises(QueryError, match=rows):
        compare_by_digit(tables["latents"], tables["test_only"])
    # An 8-bit likelihood's table against a binarised one (tables from before likelihoods were binarised).
    eight_bit = with_lineage(tables["other"], tmp_path / "eight-bit", likelihood="discretized-logistic", binarised=False)
    with pytest.raises(QueryError, match="binarised True vs False"):
        compare_by_digit(tables["latents"], eight_bit)


@pytest.mark.parametrize("first", [True, False])
def test_compare_with_a_missing_table_names_it(tables, tmp_path, first):
    missing = str(tmp_path / "missing")
    args = (missing, tables["latents"]) if first else (tables["latents"], missing)
    with pytest.raises(QueryError, match=rf"{missing} is not a published vaedist latent table: it does not exist"):
        compare_by_digit(*args)


# ---------------------------------------------------------------------------------------------
# A table of several checkpoints.

def at_epoch(df: pd.DataFrame, epoch: int) -> pd.DataFrame:
    return df[df.epoch == epoch].drop(columns="epoch").reset_index(drop=True)


def test_one_checkpoint_of_a_multi_epoch_table(tables, tmp_path):
    epochs = tables["epochs"]
    assert table_epochs(epochs) == list(EPOCHS) and table_epochs(tables["latents"]) == []
    unlisted = with_lineage(epochs, tmp_path / "unlisted", epochs=None)  # found by a scan instead
    assert read_lineage(epochs).epochs == list(EPOCHS) and table_epochs(unlisted) == list(EPOCHS)
    # Epoch 1's model is latent_tables' and epoch 2's the other table's: the same rows, the same results
    # (up to the order of DuckDB's parallel sums).
    pd.testing.assert_frame_equal(active_units(epochs, epoch=1).to_pandas(),
                                  active_units(tables["latents"]).to_pandas(), rtol=1e-12)
    pd.testing.assert_frame_equal(totals(epochs, epoch=2).to_pandas(), totals(tables["other"]).to_pandas(), rtol=1e-12)
    single = frame(tables["latents"])
    # conftest writes its tables as encode did before the source column (readers see it NULL).
    assert "epoch" not in single
    assert frame(epochs).columns.tolist() == [c for c in schema.COLUMNS if c not in ("source", "kl_groups", "kl_dims")]
    pd.testing.assert_frame_equal(at_epoch(frame(epochs), 1)[single.columns], single)
    same = compare_by_digit(epochs, tables["latents"], epoch=1, split=None).to_pandas()
    assert same["count"].sum() == NUM_ROWS and (same.delta_mean == 0).all()


@pytest.mark.parametrize("call, problem", [
    (lambda t: totals(t["epochs"]),
     r"epochs encodes several checkpoints \(epochs 1, 2, 4\); pick one with epoch= \(vaedist query --epoch\)"),
    (lambda t: kl_per_dim(t["epochs"], epoch=3), r"epoch 3 is not in latent table .*/epochs; it holds epochs 1, 2, 4"),
    (lambda t: outliers(t["latents"], epoch=1), r"latents has no epoch column .*; leave out epoch=1"),
    (lambda t: compare_by_digit(t["epochs"], t["latents"]),
     r"epochs encodes several checkpoints .*pick one with epoch="),
    (lambda t: compare_top(t["epochs"], t["epochs"], epoch=1, against_epoch=3),
     r"epoch 3 is not in latent table .*/epochs; it holds epochs 1, 2, 4"),
    (lambda t: compare_top(t["epochs"], t["latents"], epoch=1, against_epoch=1),
     r"latents has no epoch column .*leave out against_epoch=1"),
    (lambda t: compare_top(t["latents"], t["other"], epoch=1), r"neither .* has an epoch column"),
    (lambda t: curves(t["latents"]), r"latents has no epoch column: it encodes one checkpoint"),
    (lambda t: learned_late(t["epochs"], after=3), r"after: epoch 3 is not in latent table .*epochs 1, 2, 4"),
    (lambda t: forgotten(t["epochs"], from_epoch=2, to_epoch=5), r"to_epoch 5 is not in latent table"),
    (lambda t: forgotten(t["epochs"], from_epoch=4, to_epoch=2), r"from_epoch must come before to_epoch"),
    (lambda t: forgotten(t["epochs"], from_epoch=4), r"give both from_epoch and to_epoch"),
    (lambda t: forgotten(t["epochs"], by=-1), r"by must be a finite number >= 0 \(nats\), got -1"),
    (lambda t: curves(t["epochs"], keys=["test-00001", "test-99999"]), r"keys 'test-99999' are not in latent table"),
    (lambda t: active_units(t["latents"], split="tset"), r"split must be one of train, test .* got 'tset'"),
])
def test_bad_input_names_what_is_wrong(tables, call, problem):
    with pytest.raises(QueryError, match=problem):
        call(tables)


def test_compare_two_epochs_of_one_table_matches_pandas(tables):
    df = frame(tables["epochs"])
    pairs = at_epoch(df, 4).merge(at_epoch(df, 1)[["key", "loss"]], on="key", suffixes=("_a", "_b"))
    pairs = pairs[pairs.split == "test"].assign(delta=lambda p: p.loss_a - p.loss_b)
    result = compare_by_digit(tables["epochs"], tables["epochs"], epoch=4, against_epoch=1).to_pandas()
    np.testing.assert_allclose(result.delta_mean, pairs.groupby("label").delta.mean(), rtol=1e-9)
    np.testing.assert_allclose(result.improved_fraction, pairs.groupby("label").delta.apply(lambda d: (d < 0).mean()))


def finals(df: pd.DataFrame) -> pd.Series:
    return df[df.epoch == df.epoch.max()].set_index("key").loss


@pytest.mark.parametrize("split", [None, "train"])
def test_curves_match_pandas(tables, split):
    df = of_split(frame(tables["epochs"]), split)
    final = finals(df)
    chosen = final.reset_index().sort_values(["loss", "key"], ascending=[False, True]).key.head(3).tolist()
    result = curves(tables["epochs"], k=3, split=split).to_pandas()
    assert result.key.tolist() == [key for key in chosen for _ in EPOCHS]
    assert result.epoch.tolist() == list(EPOCHS) * 3
    expected = df.set_index(["key", "epoch"]).loc[list(zip(result.key, result.epoch))]
    np.testing.assert_array_equal(result.loss, expected.loss)
    np.testing.assert_array_equal(result.loss_final, final[result.key])

    keys = ["test-00007", "train-00003"]
    given = curves(tables["epochs"], keys=keys).to_pandas()
    assert sorted(set(given.key)) == keys and len(given) == 2 * len(EPOCHS)
    np.testing.assert_array_equal(given.loss, frame(tables["epochs"]).set_index(["key", "epoch"])
                                  .loc[list(zip(given.key, given.epoch))].loss)


def test_digit_curves_match_pandas(tables):
    grouped = of_split(frame(tables["epochs"]), "test").groupby(["label", "epoch"])
    expected = pd.DataFrame({"count": grouped.size(), "loss_mean": grouped.loss.mean(), "loss_se": grouped.loss.sem(),
                             "recon_nll_mean": grouped.recon_nll.mean(), "kl_mean": grouped.kl.mean()})
    assert_frame(digit_curves(tables["epochs"]), expected, ["label", "epoch"])


@pytest.mark.parametrize("within, after", [(1.0, 1), (3.0, 2), (0.5, 1)])
def test_learned_late_matches_pandas(tables, within, after):
    df = frame(tables["epochs"])
    df = df.assign(loss_final=df.key.map(finals(df)))
    close = df[(df.loss - df.loss_final).abs() <= within]
    first_within = close.groupby("key").epoch.min()
    at = df.pivot(index="key", columns="epoch", values="loss")
    expected = pd.DataFrame({"first_epoch_within": first_within, "loss_first": at[EPOCHS[0]],
                             "loss_after": at[after], "loss_final": at[EPOCHS[-1]]})
    expected = expected[expected.first_epoch_within > after].reset_index()
    expected = expected.assign(order=(expected.loss_after - expected.loss_final).abs()).sort_values(
        ["first_epoch_within", "order", "key"], ascending=[False, False, True])
    result = learned_late(tables["epochs"], within=within, after=after).to_pandas()
    assert 0 < len(result) < NUM_ROWS
    assert result.key.tolist() == expected.key.tolist()
    for column in ("first_epoch_within", "loss_first", "loss_after", "loss_final"):
        np.testing.assert_array_equal(result[column], expected[column])
    np.testing.assert_allclose(result.improvement, expected.loss_first - expected.loss_final, rtol=1e-12)


@pytest.mark.parametrize("by", [2.0, 10.0])
def test_forgotten_between_consecutive_epochs_matches_pandas(tables, by):
    df = frame(tables["epochs"])  # sorted by key, epoch
    steps = df.assign(from_epoch=df.groupby("key").epoch.shift(), loss_from=df.groupby("key").loss.shift(),
                      rise=df.groupby("key").loss.diff())
    steps = steps[steps.rise > by].sort_values(["key", "rise", "epoch"], ascending=[True, False, True])
    worst = steps.groupby("key").head(1).sort_values(["rise", "key"], ascending=[False, True])
    result = forgotten(tables["epochs"], by=by).to_pandas()
    assert 0 < len(result) < NUM_ROWS
    assert result.key.tolist() == worst.key.tolist()
    assert result.from_epoch.tolist() == worst.from_epoch.astype(int).tolist()
    assert result.to_epoch.tolist() == worst.epoch.tolist()
    assert set(zip(result.from_epoch, result.to_epoch)) <= {(1, 2), (2, 4)}  # kept epochs, adjacent
    np.testing.assert_array_equal(result.rise, worst.loss - worst.loss_from)
    np.testing.assert_array_equal(result.loss_final, finals(df)[result.key])
    assert len(forgotten(tables["epochs"], by=by, k=3)) == min(3, len(result))


def test_forgotten_between_two_epochs_matches_pandas(tables):
    at = frame(tables["epochs"]).query("split == 'test'").pivot(index="key", columns="epoch", values="loss")
    rise = (at[4] - at[1])[lambda r: r > 2.0].reset_index(name="rise").sort_values(["rise", "key"],
                                                                                   ascending=[False, True])
    result = forgotten(tables["epochs"], by=2.0, split="test", from_epoch=1, to_epoch=4).to_pandas()
    assert len(result) > 0 and result.key.tolist() == rise.key.tolist()
    np.testing.assert_array_equal(result.rise, rise.rise)
    assert set(result.from_epoch) == {1} and set(result.to_epoch) == {4}


def test_tables_as_uris_give_the_same_results(tables):
    """A URI opens as a pyarrow dataset (FixedSizeList vectors), not through read_parquet."""
    uri = {name: "file://" + tables[name] for name in ("epochs", "latents")}
    pd.testing.assert_frame_equal(active_units(uri["epochs"], epoch=2).to_pandas(),
                                  active_units(tables["epochs"], epoch=2).to_pandas(), rtol=1e-12)
    assert compare_top(uri["epochs"], uri["latents"], epoch=4).equals(compare_top(tables["epochs"], tables["latents"],
                                                                                  epoch=4))
    assert forgotten(uri["epochs"]).equals(forgotten(tables["epochs"]))


# ---------------------------------------------------------------------------------------------
# The command line.

def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, ["query", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_analyses(tables):
    assert f"{LATENT_DIM - 1} of {LATENT_DIM} dimensions active" in invoke("active-units", "--latents", tables["prior"])

    parsed = list(csv.DictReader(io.StringIO(invoke("totals", "--latents", tables["latents"], "--format", "csv"))))
    expected = totals(tables["latents"]).to_pylist()
    assert [r["split"] for r in parsed] == ["test", "train"]
    np.testing.assert_allclose([float(r["loss_se"]) for r in parsed], [r["loss_se"] for r in expected],
                               rtol=1e-12)  # DuckDB's parallel sums may differ in the last bit

    lines = invoke("compare", "--latents", tables["latents"], "--against", tables["latents"], "--split", "all",
                   "--format", "json").splitlines()
    assert len(lines) == 10 and all(json.loads(line)["delta_mean"] == 0 for line in lines)

    lines = invoke("forgotten", "--latents", tables["epochs"], "--by", "2", "--from-epoch", "1", "--to-epoch", "4",
                   "--k", "3", "--format", "json").splitlines()
    assert [json.loads(line)["key"] for line in lines] == \
        forgotten(tables["epochs"], by=2.0, from_epoch=1, to_epoch=4, k=3).column("key").to_pylist()

    text = invoke("curves", "--latents", tables["epochs"], "--key", "test-00007", "--key", "train-00003")
    assert text.splitlines()[-1] == f"({2 * len(EPOCHS)} rows)"


@pytest.mark.parametrize("args, expected", [
    (["compare", "--latents", "{latents}"], "compare needs --against"),
    (["learned-late", "--latents", "{epochs}", "--after", "3"], "after: epoch 3 is not in latent table"),
    (["totals", "--latents", "{epochs}"], "pick one with epoch= (vaedist query --epoch)"),
    (["digit-curves", "--latents", "{latents}"], "has no epoch column"),
    (["compare", "--latents", "{latents}", "--against", "{tmp}/none"], "none is not a published vaedist latent table"),
])
def test_cli_bad_input_is_one_clear_line(tables, tmp_path, args, expected):
    args = [a.format(tmp=tmp_path, **tables) for a in args]
    result = CliRunner().invoke(cli, ["query", *args])
    assert result.exit_code != 0 and expected in result.output, result.output
    assert "Traceback" not in result.output


def test_bench_analyses_runs_every_analysis(tables):
    result = CliRunner().invoke(cli, ["bench", "analyses", "--latents", tables["epochs"], "--repeats", "1"])
    assert result.exit_code == 0, result.output
    for name in ("loss-by-digit (baseline)", "active-units", "compare-top", "gap-by-digit", "learned-late",
                 "forgotten (pair)"):
        assert f"\n{name} " in result.output, result.output
