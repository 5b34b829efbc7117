"""A model of several latent groups through the pipeline: Ray Train on 2 workers, the encode job,
the per-group KL queried with DuckDB, and the report."""

from __future__ import annotations

import pytest

from vaedist.config import config_from_dict
from vaedist.encode import encode
from vaedist.analyses import read_lineage, run_sql
from vaedist.report import write_report

from conftest import debug_config

pytestmark = pytest.mark.integration


def test_train_encode_and_query_a_two_group_model(ray_cluster, small_shards, tmp_path):
    from vaedist.train import train

    cfg = debug_config(small_shards, tmp_path / "runs", "hier", "model.kind=hierarchical", "model.latent_groups=[6, 2]",
                       "model.latent_dim=8", "train.objective=iwae", "train.iwae_samples=2", "scaling.num_workers=2",
                       "train.epochs=2", "train.max_steps_per_epoch=8")
    result = train(cfg)
    assert [e["epoch"] for e in result.epochs] == [0, 1]
    assert result.epochs[1]["train_loss"] < result.epochs[0]["train_loss"]
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
