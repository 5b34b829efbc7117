"""A sweep's trials and its bad inputs, before any of it runs (no Ray): grid and sample parsing, the
trial list and names, every trial's config checked, and a sweep directory that holds another sweep."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from vaedist.cli import cli
from vaedist.config import load_config
from vaedist.sweep import SweepError, check_identity, plan_sweep, with_cli
from vaedist.sweep.spec import split_values, write_identity

from conftest import REPO

DEBUG = REPO / "configs" / "debug.yaml"


def cfg_with(tmp_path, grid=(), sample=(), *overrides, **fields):
    base = load_config(DEBUG, [f"output.storage_path={tmp_path}", *overrides])
    return with_cli(base, grid=list(grid), sample=list(sample), **fields)


def test_the_grid_is_the_cartesian_product_in_order_with_stable_names_and_checked_configs(tmp_path):
    sweep = plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3,3e-4", "model.latent_dim=10,20,50"]))
    assert [t.overrides for t in sweep.trials][:4] == [
        {"train.lr": 1e-3, "model.latent_dim": 10}, {"train.lr": 1e-3, "model.latent_dim": 20},
        {"train.lr": 1e-3, "model.latent_dim": 50}, {"train.lr": 3e-4, "model.latent_dim": 10}]
    assert len(sweep.trials) == 6 and sweep.keys == ["train.lr", "model.latent_dim"]
    assert sweep.trials[0].name == "t000-lr=0.001-latent_dim=10"
    t = sweep.trials[5]
    assert (t.config.train.lr, t.config.model.latent_dim) == (3e-4, 50)
    assert t.config.output.run_name == t.name and t.config.output.storage_path == str(tmp_path / "debug-sweep")
    assert plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3,3e-4", "model.latent_dim=10,20,50"])).identity() == \
        sweep.identity()


def test_list_values_samples_and_the_command_line_merged_with_the_config(tmp_path):
    assert split_values("[64],[128, 64]") == ["[64]", "[128, 64]"]
    sweep = plan_sweep(cfg_with(tmp_path, ["model.hidden_dims=[64],[128,64]"],
                                ["train.lr=loguniform(1e-4,3e-3)", "model.activation=choice(elu,relu)"],
                                num_samples=3, seed=7))
    assert len(sweep.trials) == 6 and sweep.trials[1].config.model.hidden_dims == [128, 64]
    lrs = [t.overrides["train.lr"] for t in sweep.trials]
    assert all(1e-4 <= lr <= 3e-3 for lr in lrs) and lrs[0] == lrs[1] and lrs[0] != lrs[2]
    again = plan_sweep(cfg_with(tmp_path, ["model.hidden_dims=[64],[128,64]"],
                                ["train.lr=loguniform(1e-4,3e-3)", "model.activation=choice(elu,relu)"],
                                num_samples=3, seed=7))
    assert [t.name for t in again.trials] == [t.name for t in sweep.trials]  # same seed, same trials
    # The config's sweep.grid, with --grid replacing the axis of the same key.
    cfg = cfg_with(tmp_path, ["train.lr=1e-2"], (), 'sweep.grid=["train.lr=1e-3,3e-4", "model.latent_dim=4"]')
    assert cfg.sweep.grid == ["train.lr=1e-2", "model.latent_dim=4"]


@pytest.mark.parametrize("grid, sample, fields, message", [
    (["train.lrr=1e-3,3e-4"], [], {}, r"train\.lrr: unknown key"),
    (["model.latent_dim=10,ten"], [], {},
     r"trial t001-latent_dim=_ten_ \(model\.latent_dim=\"ten\"\): model\.latent_dim: must be an integer, got 'ten'"),
    (["model.latent_dim=10,0"], [], {}, r"model\.latent_dim: must be > 0, got 0"),
    (["train.lr="], [], {}, r"sweep\.grid train\.lr: the grid axis has no values"),
    ([], [], {}, r"nothing to sweep"),
    (["train.lr=1e-3,1e-3"], [], {}, r"given twice"),
    (["output.run_name=a,b"], [], {}, r"output\.run_name cannot be swept"),
    (["train.lr=1e-3"], ["train.lr=uniform(1,2)"], {}, r"train\.lr both in the grid and sampled"),
    ([], ["train.lr=gaussian(0,1)"], {}, r"not one of loguniform"),
    ([], ["train.lr=loguniform(0,1)"], {}, r"loguniform needs low > 0"),
    ([], ["model.latent_dim=uniform(4,16)"], {}, r"model\.latent_dim: must be an integer"),
    (["train.lr=1e-3,3e-4"], [], {"num_samples": 2}, r"sweep\.num_samples: 2 draws of nothing"),
    (["train.lr=1e-3,3e-4"], [], {"scheduler": "asha", "asha_grace_epochs": 2},
     r"sweep\.asha_grace_epochs: 2 must be fewer than train\.epochs \(2\)"),
])
def test_bad_grids_are_errors_naming_the_key_and_value(tmp_path, grid, sample, fields, message):
    with pytest.raises(SweepError, match=message):
        plan_sweep(cfg_with(tmp_path, grid, sample, **fields))


def test_a_sweep_directory_holding_another_sweep_or_something_else_is_refused(tmp_path):
    first = plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3,3e-4"]))
    assert check_identity(first) is False
    write_identity(first)
    assert check_identity(plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3,3e-4"], (),
                                              "sweep.max_concurrent_trials=1"))) is True  # a resume
    # The IDX files' location is not the sweep's identity ($VAEDIST_MNIST_DIR sets it for the CLI only).
    assert check_identity(plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3,3e-4"], (),
                                              f"data.mnist_dir={tmp_path}"))) is True
    with pytest.raises(SweepError, match=r"holds another sweep.s results \(trials only in the recorded sweep: "
                                         r"t001-lr=0\.0003; only in this one: t001-lr=0\.0001"):
        check_identity(plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3,1e-4"])))
    with pytest.raises(SweepError, match=r"model\.latent_dim: 8 recorded vs 16 now"):
        check_identity(plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3,3e-4"], (), "model.latent_dim=16")))
    (tmp_path / "other-sweep").mkdir()
    (tmp_path / "other-sweep" / "metrics.jsonl").write_text("")
    with pytest.raises(SweepError, match=r"other-sweep exists and is not a vaedist sweep"):
        check_identity(plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3"], (), name="other-sweep")))


def test_the_command_refuses_bad_input_before_any_trial_starts(tmp_path):
    runner = CliRunner()
    base = ["sweep", "--config", str(DEBUG), "--set", f"output.storage_path={tmp_path}"]
    done = runner.invoke(cli, [*base, "--grid", "model.latent_dim=4,eight"])
    assert done.exit_code == 1 and "model.latent_dim: must be an integer, got 'eight'" in done.output
    done = runner.invoke(cli, [*base, "--grid", "train.nope=1,2"])
    assert done.exit_code == 1 and "train.nope: unknown key" in done.output
    done = runner.invoke(cli, base)
    assert done.exit_code == 1 and "nothing to sweep" in done.output
    write_identity(plan_sweep(cfg_with(tmp_path, ["train.lr=1e-3,3e-4"])))
    done = runner.invoke(cli, [*base, "--grid", "train.lr=1e-3,5e-4"])
    assert done.exit_code == 1 and "holds another sweep's results" in done.output
    assert not (tmp_path / "debug-sweep" / "t000-lr=0.001").exists()  # nothing ran
    identity = json.loads((tmp_path / "debug-sweep" / "sweep.json").read_text())
    assert [t["overrides"]["train.lr"] for t in identity["trials"]] == [1e-3, 3e-4]  # the recorded sweep untouched


def test_sweep_table_has_the_documented_columns_in_order(tmp_path):
    """sweep.parquet's columns are results.COLUMNS (the swept keys where SWEPT_KEYS stands), which the
    docs' generated reference prints: a column added to the table but not to COLUMNS fails here."""
    import json

    from vaedist.sweep import results

    trials = [{"name": "t000-lr=0.001", "overrides": {"train.lr": 0.001}},
              {"name": "t001-lr=0.0003", "overrides": {"train.lr": 0.0003}}]
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "s", "keys": ["train.lr"], "sampled": {},
                                                     "config": {"train.epochs": 2}, "trials": trials}))
    table = results.collect(str(tmp_path))
    expected = [c for name in results.COLUMNS for c in (["train.lr"] if name == results.SWEPT_KEYS else [name])]
    assert table.column_names == expected
    assert {f.name: f.type for f in table.schema if f.name != "train.lr"} == {
        name: tp for name, (tp, _) in results.COLUMNS.items() if name != results.SWEPT_KEYS}
    assert table.column("status").to_pylist() == ["pending", "pending"]
