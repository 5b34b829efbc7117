"""Training dynamics end to end on a real local Ray: a run that keeps several checkpoints
(output.keep_epochs), encoded into one table with an epoch column (`vaedist encode --epochs` /
`--all-kept`), then queried per epoch.

Most assertions share one run whose model cannot change (train.lr=1e-30: Adam's step is then some
1e-30, far below float32 resolution of the weights), so every epoch's rows must be the same numbers:
that checks that each epoch draws the same per-key noise. One more encode, of the shared 2-epoch
`trained_run` (conftest), checks that each epoch's rows come from that epoch's checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch
from click.testing import CliRunner

from vaedist import storage
from vaedist.analyses import loss_by_digit, run_sql
from vaedist.checkpoint import CheckpointError, kept_checkpoint_dirs, load_checkpoint
from vaedist.cli import cli
from vaedist.console import VERBOSE_ENV
from vaedist.encode import EncodeError, encode

from conftest import REPO, debug_config

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 35  # about how long this file takes in `make test` (conftest: longest first)

EPOCHS = [0, 1, 2]
TEST_ROWS = 4000  # small_shards' test split
# Cheap encodes: the test split only, one Monte Carlo sample (so that l_i is the very number training
# evaluated, with the training seed), two importance samples (so that log_px is there to compare).
ENCODE = ["encode.num_samples_mc=1", "encode.num_samples_iw=2", "encode.splits=[test]", "encode.concurrency=1"]
STILL = ["train.epochs=3", "output.keep_epochs=[0,1,2]", "train.lr=1e-30", *ENCODE]


def read_table(path: str) -> pd.DataFrame:
    files = [f"{path}/{f}" for f in storage.listdir(path) if f.endswith(".parquet")]
    return pads.dataset(files, format="parquet").to_table().to_pandas().sort_values(["epoch", "key"],
                                                                                     ignore_index=True)


@contextlib.contextmanager
def cli_in_process():
    """A CliRunner in this process. The commands' set_verbose() adds a handler bound to CliRunner's
    stream to the `vaedist` logger and sets VAEDIST_VERBOSE; both are undone afterwards."""
    logger = logging.getLogger("vaedist")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    verbose = os.environ.get(VERBOSE_ENV)
    try:
        yield CliRunner()
    finally:
        logger.handlers[:] = handlers
        logger.propagate = propagate
        logger.setLevel(level)
        if verbose is None:
            os.environ.pop(VERBOSE_ENV, None)
        else:
            os.environ[VERBOSE_ENV] = verbose


def encode_args(cfg, *args: str) -> list[str]:
    """`vaedist encode` for the run of cfg (made by debug_config) with the overrides of STILL."""
    overrides = [f"data.shards_dir={cfg.data.shards_dir}", f"output.storage_path={cfg.output.storage_path}",
                 f"output.run_name={cfg.output.run_name}", *STILL]
    return ["encode", "--config", str(REPO / "configs" / "debug.yaml"), *[f"--set={o}" for o in overrides], *args]


@pytest.fixture(scope="module")
def still(ray_cluster, small_shards, tmp_path_factory):
    """(config, TrainResult, table path): the lr=1e-30 run, its kept epochs encoded in one job by
    `vaedist encode --epochs 2,0,1` (encode(cfg, epochs=[2, 0, 1]) underneath)."""
    from vaedist.train import train

    root = tmp_path_factory.mktemp("dynamics")
    cfg = debug_config(small_shards, root, "still", *STILL)
    result = train(cfg)
    out = str(root / "epochs")
    with cli_in_process() as runner:
        done = runner.invoke(cli, encode_args(cfg, "--epochs", "2,0,1", "--out", out))
    assert done.exit_code == 0, done.output
    assert f"published {out}: test {TEST_ROWS} rows" in done.output
    return cfg, result, out


def test_the_weights_of_the_still_run_do_not_change(still):
    _, result, _ = still
    kept = kept_checkpoint_dirs(result.run_dir)
    assert [epoch for epoch, _ in kept] == EPOCHS
    states = [load_checkpoint(path) for _, path in kept]
    assert [s.epoch for s in states] == EPOCHS
    assert states[-1].global_step > 0  # the optimiser did step
    for state in states[1:]:
        for name, weights in states[0].model.items():
            assert torch.equal(state.model[name], weights), name


def test_one_job_encodes_every_kept_epoch_with_the_same_noise(still):
    _, result, path = still
    table = read_table(path)
    assert len(table) == len(EPOCHS) * TEST_ROWS and table.key.nunique() == TEST_ROWS
    assert table.epoch.dtype == np.int64 and sorted(table.epoch.unique()) == EPOCHS
    assert not table.duplicated(["key", "epoch"]).any()
    lineage = json.loads(storage.read_bytes(f"{path}/_lineage.json"))
    assert lineage["epochs"] == EPOCHS and lineage["rows"] == {"test": TEST_ROWS}
    assert lineage["checkpoints"] == [{"epoch": epoch, "path": f"{directory}/checkpoint.pt"}
                                      for epoch, directory in kept_checkpoint_dirs(result.run_dir)]
    # One model at every epoch: every column computed with noise is the same number at every epoch.
    by_epoch = [table[table.epoch == e].reset_index(drop=True) for e in EPOCHS]
    for other in by_epoch[1:]:
        assert other.key.tolist() == by_epoch[0].key.tolist()
        for column in ("loss", "recon_nll", "kl", "log_px", "gap"):
            np.testing.assert_array_equal(other[column].to_numpy(), by_epoch[0][column].to_numpy(), err_msg=column)
        for column in ("mu", "logvar", "z"):
            np.testing.assert_array_equal(np.stack(other[column]), np.stack(by_epoch[0][column]), err_msg=column)
    assert by_epoch[0].loss.std() > 1  # not trivially equal: l_i differs from datapoint to datapoint
    # S = 1 with the training seed: each epoch's mean l_i is the test loss training reported for it.
    for epoch, rows in zip(EPOCHS, by_epoch):
        assert rows.loss.mean() == pytest.approx(result.epochs[epoch]["test_loss"], rel=1e-9)
    # The one-table analyses see one checkpoint: the counts are one epoch's.
    assert sum(loss_by_digit(path, epoch=1).column("count").to_pylist()) == TEST_ROWS


def test_all_kept_gives_the_same_table_and_digit_curves_read_it(still, tmp_path):
    cfg, _, path = still
    all_kept = encode(cfg, all_kept=True, out=str(tmp_path / "all-kept"))
    assert all_kept.rows == {"test": TEST_ROWS} and all_kept.lineage.epochs == EPOCHS
    expected = read_table(path)
    pd.testing.assert_frame_equal(read_table(all_kept.path), expected)

    with cli_in_process() as runner:
        curves = runner.invoke(cli, ["query", "digit-curves", "--latents", path, "--format", "json"])
    assert curves.exit_code == 0, curves.output
    rows = pd.DataFrame([json.loads(line) for line in curves.output.splitlines()])
    assert len(rows) == 10 * len(EPOCHS) and rows.groupby("label").epoch.apply(list).tolist() == [EPOCHS] * 10
    per_digit = expected[expected.epoch == 0].groupby("label").size()
    assert rows.groupby("label")["count"].sum().tolist() == (per_digit * len(EPOCHS)).tolist()
    assert (rows.groupby("label").loss_mean.nunique() == 1).all()  # the model did not change


def test_each_epoch_is_encoded_with_its_own_checkpoint(trained_run, tmp_path):
    # trained_run (2 epochs, lr 2e-3) learns; Ray's two checkpoints of it are still there to encode.
    cfg, result = trained_run
    cfg = debug_config(cfg.data.shards_dir, cfg.output.storage_path, cfg.output.run_name, *ENCODE)
    enc = encode(cfg, epochs=[1, 0], out=str(tmp_path / "learning"))
    assert enc.lineage.epochs == [0, 1]
    means = run_sql(enc.path, "SELECT epoch, avg(loss) AS loss FROM latents GROUP BY epoch ORDER BY epoch").to_pylist()
    assert [m["epoch"] for m in means] == [0, 1]
    for m in means:  # exactly the test loss training reported at that epoch (S = 1, training seed)
        assert m["loss"] == pytest.approx(result.epochs[m["epoch"]]["test_loss"], rel=1e-9)
    assert means[1]["loss"] < means[0]["loss"]
    with pytest.raises(CheckpointError, match=r"run .*/trained kept no checkpoints for good; train with "
                                              r"output.keep_epochs"):
        encode(cfg, all_kept=True, out=str(tmp_path / "none"))


def test_bad_epochs_and_runs_are_refused_before_any_work(still, tmp_path):
    cfg, result, _ = still
    out = str(tmp_path / "never")
    with pytest.raises(CheckpointError, match=rf"run {result.run_dir} has no checkpoint of epoch 5; it has epochs "
                                              r"\[0, 1, 2\] \(keep more with output.keep_epochs\)"):
        encode(cfg, epochs=[0, 5], out=out)
    with pytest.raises(EncodeError, match=r"--epochs lists an epoch twice: \[1, 1\]"):
        encode(cfg, epochs=[1, 1], out=out)
    missing = debug_config(cfg.data.shards_dir, cfg.output.storage_path, "no-such-run", *ENCODE)
    for kwargs in ({"epochs": [0]}, {"all_kept": True}):
        with pytest.raises(CheckpointError, match=rf"run directory {cfg.output.storage_path}/no-such-run does not "
                                                  "exist"):
            encode(missing, out=out, **kwargs)
    assert not storage.exists(out)
    for args, code, message in ((["--epochs", "0,7"], 1, "has no checkpoint of epoch 7; it has epochs [0, 1, 2]"),
                                (["--epochs", "0,one"], 2, "expected epochs separated by commas"),
                                (["--epochs", "0", "--all-kept"], 2, "give --epochs or --all-kept, not both")):
        with cli_in_process() as runner:
            failed = runner.invoke(cli, encode_args(cfg, *args, "--out", out))
        assert failed.exit_code == code and message in failed.output, failed.output
        assert "Traceback" not in failed.output
    assert not storage.exists(out)
