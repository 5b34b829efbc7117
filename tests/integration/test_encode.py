"""The encode batch job on a real local Ray: real shards in, real Parquet out, read back with DuckDB."""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import subprocess
import sys
import time

import duckdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
from _pytest.logging import LogCaptureHandler

from vaedist import schema, storage
from vaedist.analyses import QueryError, loss_by_digit, run_sql
from vaedist.checkpoint import CheckpointError
from vaedist.encode import FAIL_ENV, EncodeError, encode

from conftest import REPO
from contract import assert_tables_close, level_env, lower_level
from unit.test_tables import OLD_ROWS, write_table

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 85  # about how long this file takes in `make test` (conftest: longest first)


def read_sorted(path: str):
    files = [f"{path}/{f}" for f in storage.listdir(path) if f.endswith(".parquet")]
    return pads.dataset(files, format="parquet").to_table().sort_by("key")


def encode_cfg(cfg, *extra: str):
    from vaedist.config import config_from_dict

    return config_from_dict(cfg.to_dict(), ["encode.concurrency=2", "encode.num_samples_iw=8", *extra])


@pytest.fixture(scope="module")
def published(trained_run, tmp_path_factory):
    cfg, result = trained_run
    out = str(tmp_path_factory.mktemp("latents") / "table")
    return cfg, result, encode(encode_cfg(cfg), checkpoint=result.latest_checkpoint, out=out)


def test_one_row_per_datapoint_and_loss_matches_training(published):
    cfg, result, enc = published
    table = read_sorted(enc.path)
    assert enc.rows == {"train": 4000, "test": 4000} and table.num_rows == 8000
    assert len(set(table["key"].to_pylist())) == 8000
    assert table.schema.remove_metadata() == schema.arrow_schema(cfg.model.latent_dim)
    lineage = schema.lineage_of(table.schema)
    assert lineage.checkpoint.startswith(result.latest_checkpoint) and lineage.num_samples_iw == 8
    assert json.loads(storage.read_bytes(f"{enc.path}/_lineage.json"))["rows"] == {"train": 4000, "test": 4000}
    test = table.filter(pc.equal(table["split"], "test"))
    loss = test["loss"].to_numpy()
    np.testing.assert_allclose(loss, test["recon_nll"].to_numpy() + test["kl"].to_numpy(), rtol=1e-12)
    reported = result.epochs[-1]["test_loss"]
    # Same binarisation, different Monte Carlo draws (S = 4 here, 1 in training): agree within MC noise.
    assert abs(loss.mean() - reported) < 0.5, (loss.mean(), reported)
    gap = test["gap"].to_numpy()
    assert gap.mean() > 0 and np.all(np.isfinite(gap))
    # Reading: the view, DuckDB with no vaedist code, and a ready-made analysis agree.
    plain = duckdb.sql(f"SELECT avg(loss) FROM read_parquet('{enc.path}/*.parquet') WHERE split = 'test'").fetchall()[0][0]
    assert plain == pytest.approx(loss.mean())
    by_digit = loss_by_digit(enc.path, split="test").to_pylist()
    assert sum(r["count"] for r in by_digit) == 4000


def test_same_inputs_give_identical_tables_and_single_sample_matches_training_exactly(published, tmp_path):
    cfg, result, enc = published
    # One actor here, two for the published table: the number of actors changes no number.
    again = encode(encode_cfg(cfg, "encode.concurrency=1"), checkpoint=result.latest_checkpoint,
                   out=str(tmp_path / "again"))
    assert read_sorted(again.path).equals(read_sorted(enc.path))
    # With S = 1 and the training seed, each row's loss is the very number training evaluated.
    exact = encode(encode_cfg(cfg, "encode.num_samples_mc=1", "encode.num_samples_iw=0", "encode.splits=[test]",
                              "encode.concurrency=1"),
                   checkpoint=result.latest_checkpoint, out=str(tmp_path / "exact"))
    mean = run_sql(exact.path, "SELECT avg(loss) AS m FROM latents").to_pylist()[0]["m"]
    assert mean == pytest.approx(result.epochs[-1]["test_loss"], rel=1e-9)


def test_benchmark_baseline_writes_the_same_table_as_the_job(published, tmp_path):
    # `vaedist bench encode` compares the job with this plain loop; the comparison is only fair if
    # both compute the same rows. Under the same conditions (an actor's threads) they are bit-identical;
    # with the benchmark's threads (every CPU of the job) and under the instruction-set level below
    # this CPU's, they agree within the contract's tolerances.
    from vaedist.bench.encode import plain_encode

    cfg, result, enc = published
    job = read_sorted(enc.path).replace_schema_metadata(None)
    ec = encode_cfg(cfg).encode
    for name in ("same", "bench", "lower"):
        (tmp_path / name).mkdir()
    rows = plain_encode(encode_cfg(cfg), result.latest_checkpoint, str(tmp_path / "same"), int(ec.cpus_per_actor))
    assert rows == enc.rows
    assert read_sorted(str(tmp_path / "same")).replace_schema_metadata(None).equals(job)
    assert ec.cpus_per_actor * ec.concurrency != ec.cpus_per_actor  # the default really is another count
    plain_encode(encode_cfg(cfg), result.latest_checkpoint, str(tmp_path / "bench"))
    assert_tables_close(read_sorted(str(tmp_path / "bench")).replace_schema_metadata(None), job)
    level = lower_level()
    if level is None:
        return
    script = ("import json, sys; from vaedist.config import config_from_dict; "
              "from vaedist.bench.encode import plain_encode; "
              "plain_encode(config_from_dict(json.loads(sys.argv[1])), sys.argv[2], sys.argv[3], int(sys.argv[4]))")
    env = {**os.environ, **level_env(level),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(encode_cfg(cfg).to_dict()),
                           result.latest_checkpoint, str(tmp_path / "lower"), str(int(ec.cpus_per_actor))], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_tables_close(read_sorted(str(tmp_path / "lower")).replace_schema_metadata(None), job)


def test_a_job_that_dies_mid_write_publishes_nothing_and_a_rerun_resumes_it(published, tmp_path):
    cfg, result, enc = published
    out = str(tmp_path / "table")
    write_table(out, OLD_ROWS, "old")  # a table published there before
    before, listing = read_sorted(out), sorted(storage.listdir(out))
    # The real thing: a job process (its own embedded Ray) whose encoder dies after writing began:
    # one actor, 8 batches a file (a 1,000-datapoint shard each), so two files are finished first.
    overrides = [f"--set={o}" for o in (f"data.shards_dir={cfg.data.shards_dir}", "encode.concurrency=1",
                                        "encode.num_samples_iw=8", "scaling.address=local")]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, FAIL_ENV: "20"}
    job = subprocess.run([sys.executable, str(REPO / "jobs" / "encode.py"), "--config", str(REPO / "configs/debug.yaml"),
                          *overrides, "--checkpoint", result.latest_checkpoint, "--out", out],
                         env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode != 0 and "injected fault" in job.stdout + job.stderr, job.stderr[-2000:]
    assert f"{out} still holds the table published before" in job.stdout + job.stderr
    # The published path still holds the earlier, complete table; the finished files stayed in staging.
    assert before.num_rows == OLD_ROWS
    assert read_sorted(out).equals(before) and sorted(storage.listdir(out)) == listing
    staging, = [n for n in storage.listdir(str(tmp_path)) if n.startswith(".table.staging-")]
    assert len([n for n in storage.listdir(str(tmp_path / staging)) if n.endswith(".parquet")]) >= 2
    # The same job again (here with two actors: the number of actors is not part of its identity)
    # keeps the finished files and encodes the rest; the table is byte for byte an uninterrupted run's.
    done = encode(encode_cfg(cfg), checkpoint=result.latest_checkpoint, out=out)
    assert done.files_reused >= 2 and done.files_reused + done.files_encoded == 8, (done.files_reused,
                                                                                   done.files_encoded)
    assert done.rows == {"train": 4000, "test": 4000} and done.rows_reused == 1000 * done.files_reused
    names = sorted(n for n in storage.listdir(out) if n.endswith(".parquet"))
    assert names == sorted(n for n in storage.listdir(enc.path) if n.endswith(".parquet")) and len(names) == 8
    for name in names:
        assert storage.read_bytes(f"{out}/{name}") == storage.read_bytes(f"{enc.path}/{name}"), name
    assert not any(n.startswith(".table.") for n in storage.listdir(str(tmp_path)))  # staging cleaned


def test_a_failed_encode_gives_its_cpus_back_for_a_retry_in_the_same_process(published, tmp_path, monkeypatch):
    import ray

    cfg, result, _ = published
    out = str(tmp_path / "table")
    monkeypatch.setenv(FAIL_ENV, "1")
    one = encode_cfg(cfg, "encode.concurrency=1")
    with pytest.raises(EncodeError, match="injected fault") as failed:
        encode(one, checkpoint=result.latest_checkpoint, out=out)
    # The error says what the actor raised and where, and what is at the path, as found; not Ray's
    # traceback and retry advice.
    assert re.fullmatch(rf"the encode job failed: RuntimeError: injected fault after 1 batches \({FAIL_ENV}\) "
                        rf"\(in encode_rows, \S+encode\.py:\d+\) \(Ray's traceback: \S+/ray-data\.log\)\. No table is "
                        rf"published at {out}; 0 of 8 files are "
                        r"finished in \S+: the same command again encodes only the rest",
                        str(failed.value)), failed.value
    # While the caller holds the error (here `failed`; a notebook keeps its last one), the failed
    # job's actors must not keep their CPUs: they used to, through the original error's traceback.
    # The resource view takes a moment to catch up.
    assert failed.value is not None
    # pytest's own log capture keeps Ray Data's error records, exc_info and all, and so the very
    # frames in question; a notebook's logging does not. Drop those records, and collect what they
    # held (the error itself is still held, as a caller would).
    for handler in {*logging.getLogger().handlers, *logging.getLogger("ray.data").handlers}:
        if isinstance(handler, LogCaptureHandler):
            handler.clear()  # in place: pytest keeps a reference to the list too
    gc.collect()
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]
    assert not storage.exists(out)
    monkeypatch.delenv(FAIL_ENV)
    done = encode(one, checkpoint=result.latest_checkpoint, out=out)
    assert done.rows == {"train": 4000, "test": 4000}


def test_bad_inputs_are_refused_before_anything_published_is_lost(published, tmp_path, small_shards):
    cfg, result, enc = published
    listing = sorted(storage.listdir(enc.path))
    with pytest.raises(CheckpointError, match="does not exist"):
        encode(encode_cfg(cfg), checkpoint=str(tmp_path / "no-such-checkpoint"), out=enc.path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt cannot be read"):
        encode(encode_cfg(cfg), checkpoint=str(tmp_path / "junk.pt"), out=enc.path)
    # Other shards of the same image shape are encoded (test_cross_data); another shape or channel count
    # is refused before any work (test_ood, test_fashion).
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(EncodeError, match="holds something else"):
        encode(encode_cfg(cfg), checkpoint=result.latest_checkpoint, out=str(precious))
    assert (precious / "thesis.tex").read_text() == "do not delete"
    assert sorted(storage.listdir(enc.path)) == listing
    with pytest.raises(QueryError):
        run_sql(enc.path, "SELEKT * FROM latents")


def test_ray_datas_gpu_and_cpu_warning_is_dropped_during_the_job_only():
    """Ray Data's own check (what a GPU encode actor's remote args go through) logs its "experimental"
    warning; during an encode job it is dropped, and nothing else is, and afterwards it is back."""
    from ray.data._internal.execution.operators.map_operator import _canonicalize_ray_remote_args

    from vaedist.encode import GPU_AND_CPU_WARNING, MAP_OPERATOR_LOGGER, gpu_and_cpu_warning_dropped

    logger = logging.getLogger(MAP_OPERATOR_LOGGER)
    handler = LogCaptureHandler()
    logger.addHandler(handler)
    try:
        with gpu_and_cpu_warning_dropped():
            _canonicalize_ray_remote_args({"num_cpus": 2, "num_gpus": 1})
            logger.warning("another warning")
        assert [r.getMessage() for r in handler.records] == ["another warning"]
        _canonicalize_ray_remote_args({"num_cpus": 2, "num_gpus": 1})
        assert handler.records[-1].getMessage().startswith(GPU_AND_CPU_WARNING)
    finally:
        logger.removeHandler(handler)
