"""The whole pipeline on s3:// paths: moto's S3 server on 127.0.0.1, a real local Ray, real shards.

Every path (shards, Ray Train storage, the latent table) is an s3:// URI; the endpoint and the
credentials come from the standard AWS variables only, set before Ray starts so that every worker
inherits them. The bucket is listed with boto3, not through vaedist, to see what really landed.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import debug_config, moto_s3, start_local_ray

pytestmark = pytest.mark.integration

BUCKET = "vaedist-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server with one bucket; the AWS variables point at it for the module, then are restored."""
    with moto_s3(BUCKET) as client:
        yield client


@pytest.fixture(scope="module")
def s3_ray(s3):
    """A 2-CPU local Ray started after the AWS variables are set: its workers inherit them. A Ray
    already running in this process (the shared session one) was started without them: stop it."""
    ray = start_local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


def keys_under(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    # pyarrow writes empty "dir/" marker objects when it creates a directory: not files.
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))


def test_prepare_train_encode_query_on_s3(s3, s3_ray, mnist_dir, tmp_path, monkeypatch):
    from vaedist import schema
    from vaedist.data import prepare_shards, verify_shards
    from vaedist.encode import FAIL_ENV, EncodeError, encode
    from vaedist.analyses import loss_by_digit, read_lineage
    from vaedist.train import train

    monkeypatch.chdir(tmp_path)  # anything written to a local path by mistake would land here
    shards = f"s3://{BUCKET}/shards"
    prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=500, limit_per_split=1000, progress=False)
    assert keys_under(s3, "shards/") == ["shards/manifest.json", "shards/test/test-000000.tar",
                                         "shards/test/test-000001.tar", "shards/train/train-000000.tar",
                                         "shards/train/train-000001.tar"]
    assert verify_shards(shards) == {"train": {"shards": 2, "samples": 1000}, "test": {"shards": 2, "samples": 1000}}

    runs = f"s3://{BUCKET}/runs"
    cfg = debug_config(shards, runs, "s3run", "train.epochs=2", "scaling.num_workers=2",
                       "encode.num_samples_iw=4", "encode.concurrency=2")
    result = train(cfg)
    assert result.run_dir == f"{runs}/s3run"
    assert [(r["epoch"], r["restored_from_epoch"], r["world_size"]) for r in result.epochs] == [(0, -1, 2), (1, -1, 2)]
    assert result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]
    assert all(r["test_count"] == 1000 for r in result.epochs)
    keys = keys_under(s3, "runs/s3run/")
    assert "runs/s3run/epoch-0001/checkpoint.pt" in keys and "runs/s3run/epoch-0001/config.yaml" in keys
    assert "runs/s3run/metrics.jsonl" in keys
    assert result.latest_checkpoint == f"{runs}/s3run/epoch-0001"
    body = s3.get_object(Bucket=BUCKET, Key="runs/s3run/metrics.jsonl")["Body"].read().decode()
    assert [json.loads(line) for line in body.splitlines()] == result.metrics

    # A rerun resumes from the checkpoint in the bucket: epochs 0-1 are not trained again.
    again = train(debug_config(shards, runs, "s3run", "train.epochs=3", "scaling.num_workers=2"))
    assert [(r["epoch"], r["restored_from_epoch"]) for r in again.epochs] == [(0, -1), (1, -1), (2, 1)]
    assert again.epochs[:2] == result.epochs
    assert "runs/s3run/epoch-0002/checkpoint.pt" in keys_under(s3, "runs/s3run/")

    out = f"s3://{BUCKET}/latents"
    enc = encode(cfg, checkpoint=again.latest_checkpoint, out=out)
    assert enc.path == out and enc.rows == {"train": 1000, "test": 1000}
    table_keys = keys_under(s3, "latents/")
    assert f"latents/{schema.SUCCESS_FILE}" in table_keys and f"latents/{schema.LINEAGE_FILE}" in table_keys
    assert any(k.endswith(".parquet") for k in table_keys)
    parquet = {k: s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in table_keys if k.endswith(".parquet")}
    assert not [k for k in keys_under(s3, "") if k.startswith(".latents.")], "staging left behind"
    assert read_lineage(out).checkpoint == f"{again.latest_checkpoint}/checkpoint.pt"
    by_digit = loss_by_digit(out, split="test").to_pylist()
    assert sorted(r["label"] for r in by_digit) == list(range(10))
    assert sum(r["count"] for r in by_digit) == 1000
    assert all(0 < r["loss_mean"] < 1000 and r["gap_mean"] is not None for r in by_digit)

    # Publishing again over an existing table on S3 replaces it: still one row per datapoint. The job
    # dies first (each actor after 5 batches: its second file); the rerun keeps the files finished in
    # the bucket and writes the same bytes as the first job.
    monkeypatch.setenv(FAIL_ENV, "5")
    with pytest.raises(EncodeError, match=rf"injected fault.* {out} still holds the table published before"):
        encode(cfg, checkpoint=again.latest_checkpoint, out=out)
    monkeypatch.delenv(FAIL_ENV)
    again_enc = encode(cfg, checkpoint=again.latest_checkpoint, out=out)
    assert again_enc.rows == {"train": 1000, "test": 1000}
    assert again_enc.files_reused >= 1 and again_enc.files_reused + again_enc.files_encoded == 4
    assert sum(r["count"] for r in loss_by_digit(out, split=None).to_pylist()) == 2000
    assert keys_under(s3, "latents/") == table_keys
    for key in (k for k in table_keys if k.endswith(".parquet")):
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == parquet[key], key

    assert os.listdir(tmp_path) == [], "something was written to a local path instead of the bucket"
