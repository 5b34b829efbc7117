"""Ray Train on a real 2-CPU local cluster over real WebDataset shards; a model of two latent groups
through the pipeline (2 workers, the encode job, DuckDB, the report)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from vaedist import storage
from vaedist.checkpoint import checkpoint_dirs, load_model
from vaedist.config import ConfigError
from vaedist.data import DataError, load_split_arrays, read_manifest
from vaedist.engine import evaluate_sums
from vaedist.train import train

from conftest import debug_config

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 60  # about how long this file takes in `make test` (conftest: longest first)


def recompute_test_loss(checkpoint_dir: str, shards: str, max_test_shards: int = 0) -> float:
    """A single-process evaluation of a checkpoint over the whole test split, no Ray."""
    model, cfg, _ = load_model(checkpoint_dir)
    shards_meta = read_manifest(shards).split("test").shards
    shards_meta = shards_meta[:max_test_shards] if max_test_shards else shards_meta
    idx, images, _ = load_split_arrays([storage.join(shards, s.path) for s in shards_meta])
    sums = evaluate_sums(model, images, idx, "test", cfg.train.seed, torch.device("cpu"))
    return sums["loss"] / sums["count"]


@pytest.fixture(scope="module")
def two_workers(ray_cluster, small_shards, tmp_path_factory):
    """One run on two workers of what the module's other runs do not train: a model of two latent
    groups (6 and 2 dimensions) and the iwae objective (train.objective, k = 2), whose own value is
    logged beside the plain ELBO that every run reports. (config, TrainResult)."""
    cfg = debug_config(small_shards, tmp_path_factory.mktemp("w2"), "w2", "scaling.num_workers=2",
                       "model.kind=hierarchical", "model.latent_dim=8", "model.latent_groups=[6, 2]",
                       "train.objective=iwae", "train.iwae_samples=2")
    return cfg, train(cfg)


def test_training_learns_syncs_and_reports_exact_test_loss(two_workers, small_shards):
    cfg, result = two_workers
    epochs = result.epochs
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    # The IWAE bound is above the ELBO of the same samples (Jensen): its negative is below train_loss.
    assert all(0 < r["train_objective"] < r["train_loss"] for r in epochs), epochs
    assert epochs[-1]["test_loss"] < epochs[0]["test_loss"]
    assert all(r["world_size"] == 2 and r["test_count"] == 4000 for r in epochs)
    # Each group's test KL, z_1 first, sums to the test KL.
    assert all(len(r["test_kl_groups"]) == 2 and sum(r["test_kl_groups"]) == pytest.approx(r["test_kl"], rel=1e-9)
               for r in epochs), epochs
    # DDP synchronises: every rank holds the same parameters after each epoch.
    for r in epochs:
        assert len(r["rank_param_sums"]) == 2
        assert len(set(r["rank_param_sums"])) == 1, r["rank_param_sums"]
    # The reported test loss (sum and count reduced across ranks) equals a single-process recomputation.
    latest = dict(checkpoint_dirs(result.run_dir))[1]
    assert recompute_test_loss(latest, small_shards) == pytest.approx(epochs[-1]["test_loss"], rel=1e-6)
    model, saved_cfg, state = load_model(latest)
    assert saved_cfg == cfg and state.epoch == 1
    assert sum(float(p.detach().double().sum()) for p in model.parameters()) == pytest.approx(epochs[-1]["rank_param_sums"][0])


def test_the_two_group_model_is_encoded_queried_and_reported_per_group(two_workers, tmp_path):
    """The encode job, the per-group KL queried with DuckDB, and the report of a model of two groups."""
    from vaedist.analyses import read_lineage, run_sql
    from vaedist.config import config_from_dict
    from vaedist.encode import encode
    from vaedist.report import write_report

    cfg, result = two_workers
    # One sample of z with the training seed: each row's loss is the very number training evaluated.
    enc_cfg = config_from_dict(cfg.to_dict(), ["encode.splits=[test]", "encode.num_samples_mc=1",
                                               "encode.num_samples_iw=4", "encode.concurrency=1",
                                               "encode.kl_per_dim=true"])
    out = encode(enc_cfg, checkpoint=result.latest_checkpoint, out=str(tmp_path / "latents")).path
    assert read_lineage(out).latent_groups == [6, 2] and read_lineage(out).latent_dim == 8
    row = run_sql(out, """
        SELECT count(*) AS n, avg(loss) AS loss, avg(kl_groups[1]) AS kl_1, avg(kl_groups[2]) AS kl_2,
               count(*) FILTER (WHERE loss != recon_nll + list_sum(kl_groups) OR kl != list_sum(kl_groups)) AS inexact,
               count(*) FILTER (WHERE len(mu) != 8 OR len(kl_groups) != 2) AS misshapen,
               max(abs(list_sum(kl_dims[1:6]) - kl_groups[1]) + abs(list_sum(kl_dims[7:8]) - kl_groups[2]))
                   AS kl_dims_off,
               avg(log_px + loss) AS gap
        FROM latents""").to_pylist()[0]
    assert row["n"] == 4000 and row["inexact"] == 0 and row["misshapen"] == 0 and row["kl_dims_off"] < 1e-3
    assert row["loss"] == pytest.approx(result.epochs[-1]["test_loss"], rel=1e-9)
    assert row["kl_1"] > 0 and row["kl_2"] >= 0 and row["gap"] > 0
    page = write_report(out, str(tmp_path / "report"))
    text = open(page).read()
    assert "KL by latent group" in text and "samples_by_group.png" in text
    assert (tmp_path / "report" / "samples_by_group.png").stat().st_size > 0


def test_crash_mid_run_resumes_and_eval_every_epochs_skips_evaluation_in_between(ray_cluster, small_shards,
                                                                               tmp_path):
    # One run for four behaviours: a crash at epoch 2, test evaluation only every 2nd epoch and
    # after the last (train.eval_every_epochs=2), a likelihood of the 8-bit pixels (the others
    # train Bernoulli) trained, resumed, then encoded, and two workers fed by `stream` ingest (the
    # shards through Ray Data) in step.
    from vaedist.config import config_from_dict
    from vaedist.console import format_epoch
    from vaedist.encode import encode
    from vaedist.analyses import read_lineage, run_sql

    cfg = debug_config(small_shards, tmp_path, "crash", "train.epochs=3", "train.fail_at_epoch=2",
                       "output.max_failures=1", "train.eval_every_epochs=2", "model.likelihood=discretized-logistic",
                       "data.ingest=stream", "scaling.num_workers=2")
    result = train(cfg)
    rows = result.epochs
    assert [r["epoch"] for r in rows] == [0, 1, 2] and all(r["ingest"] == "stream" for r in rows)
    # Epochs 0 and 1 ran once, in the first attempt; epoch 2 ran after the restart, from epoch 1's checkpoint.
    assert [r["restored_from_epoch"] for r in rows] == [-1, -1, 1]
    # Equal shares, equal batches: 4,000 rows / 2 ranks / batch 50 = 40 steps each, every epoch.
    assert all(r["rank_sample_counts"] == [2000, 2000] for r in rows)
    assert all(len(set(r["rank_param_sums"])) == 1 for r in rows)  # DDP kept the ranks in sync
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert storage.exists(storage.join(result.run_dir, ".fault-injected-epoch-2"))

    assert [r["test_count"] for r in rows] == [0, 4000, 4000]  # every 2nd epoch, and the last
    assert [r["test_loss"] is None for r in rows] == [True, False, False]
    # Ray ranked the unevaluated checkpoint last: only evaluated epochs survive best-1 + latest.
    kept = dict(checkpoint_dirs(result.run_dir))
    assert 2 in kept and set(kept) <= {1, 2}, kept
    assert result.best_checkpoint in (kept.get(1), kept[2])
    lines = [format_epoch(r) for r in rows]
    assert "test l_i        -" in lines[0] and "test l_i        -" not in lines[1]
    # Bits per dimension beside the nats, and the encoded table agrees with training to the row.
    assert rows[2]["test_bpd"] == pytest.approx(rows[2]["test_loss"] / (784 * math.log(2)), rel=1e-12)
    assert rows[0]["test_bpd"] is None and 0 < rows[2]["test_bpd"] < 8  # below a uniform 8 bits/dim
    enc = encode(config_from_dict(cfg.to_dict(), ["encode.num_samples_mc=1", "encode.num_samples_iw=4",
                                                  "encode.splits=[test]", "encode.concurrency=1"]),
                 checkpoint=result.latest_checkpoint, out=str(tmp_path / "latents"))
    lineage = read_lineage(enc.path)
    assert lineage.likelihood == "discretized-logistic" and lineage.binarised is False
    got = run_sql(enc.path, "SELECT avg(loss) AS loss, avg(bpd) AS bpd, max(abs(bpd_iw + log_px / (784 * ln(2)))) "
                            "AS off FROM latents").to_pylist()[0]
    assert got["loss"] == pytest.approx(rows[2]["test_loss"], rel=1e-9)
    assert got["bpd"] == pytest.approx(rows[2]["test_bpd"], rel=1e-9) and got["off"] < 1e-9


def test_bad_inputs_fail_before_training(ray_cluster, small_shards, tmp_path):
    with pytest.raises(DataError, match="does not exist; run `vaedist data prepare`"):
        train(debug_config(str(tmp_path / "nowhere"), tmp_path, "bad"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="manifest"):
        train(debug_config(str(tmp_path / "empty"), tmp_path, "bad"))
    broken = tmp_path / "broken"
    shutil.copytree(small_shards, broken)
    shard = broken / "train" / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[5000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000001.tar: sha256 mismatch"):
        train(debug_config(str(broken), tmp_path, "bad"))
    shard.write_bytes(bytes(data[:4096]))
    with pytest.raises(DataError, match=r"train-000001.tar: size mismatch, 4096 bytes.*truncated"):
        train(debug_config(str(broken), tmp_path, "bad"))
    with pytest.raises(ConfigError, match="scaling.num_workers: 5 workers but only 4 training shards"):
        train(debug_config(small_shards, tmp_path, "bad", "scaling.num_workers=5"))
    # The 2-CPU local Ray cannot grow: refused instead of waiting for resources forever.
    with pytest.raises(ConfigError, match=r"= 3 x 1: training needs 3 CPU\(s\), but the embedded local Ray has 2"):
        train(debug_config(small_shards, tmp_path, "bad", "scaling.num_workers=3"))
    with pytest.raises(ConfigError, match=r"scaling.use_gpu with .*: training needs 1 GPU\(s\), but the embedded "
                                          r"local Ray has 0; set scaling.use_gpu=false"):
        train(debug_config(small_shards, tmp_path, "bad", "scaling.use_gpu=true"))
    assert not storage.exists(storage.join(str(tmp_path), "bad", "epoch-0000"))
