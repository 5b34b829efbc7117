"""Storage that works and storage that fails, on one local Ray and one moto S3 server for the module.

Every S3 request of the module (the driver's and the Ray workers') goes through a fault-injecting
proxy on loopback (tests/s3_faults.py) in front of moto's S3 server: the AWS variables and vaedist's
S3 timeouts are set before Ray starts, so every worker inherits them. The bucket is listed with
boto3 straight from moto, not through vaedist or the proxy, to see what really landed.

- The whole pipeline on s3:// paths (shards, Ray Train storage, the latent table), meeting transient
  faults (500 InternalError, 503 SlowDown, reset connections, stalls, a slow trickle) at chosen
  requests of each step: prepare's shard writes, Ray Train's checkpoint uploads, the encode job's
  writes, the reads of query and report. Each is retried by the S3 client and the step completes.
- Lasting faults at the same points end in one error naming the path and the operation; what was
  published before is intact, nothing half-written is visible, and a rerun completes.
- A local disk that fills up (a small tmpfs) during prepare, checkpointing and an encode.
"""

from __future__ import annotations

import json
import os

import pytest

from vaedist import storage, tables
from vaedist.analyses import QueryError, run_sql

from conftest import debug_config, moto_s3, start_local_ray
from s3_faults import FaultProxy, Rule, fill, small_disk
from unit.test_tables import NEW_ROWS, OLD_ROWS, leftovers, staged, write_table

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 150  # about how long this file takes in `make test` (conftest: longest first)

BUCKET = "vaedist-test"
COPY = "x-amz-copy-source"  # a PUT with this header is a server-side copy (CopyObject)
TIMEOUT = 2  # seconds: the S3 client's connect and request timeouts in this module (vaedist's default: 5, 10)
# A stall: the request is read, then nothing is sent for STALL seconds and the connection closed. A
# read gives up at TIMEOUT, before that, and retries; an upload is given up only several seconds after
# its timeout (7 to 10 s measured, for timeouts of 1 to 3 s), so the close comes first, and it retries.
STALL = TIMEOUT + 1
TRICKLE = 0.05  # seconds between a trickle's pieces: slow, but never TIMEOUT without a byte


@pytest.fixture(scope="module")
def s3(request):
    """(boto3 client straight to moto, the proxy) with AWS_ENDPOINT_URL at the proxy for the module."""
    with moto_s3(BUCKET) as client, FaultProxy(os.environ["AWS_ENDPOINT_URL"]) as proxy:
        env = {"AWS_ENDPOINT_URL": proxy.endpoint, storage.CONNECT_TIMEOUT_ENV: str(TIMEOUT),
               storage.REQUEST_TIMEOUT_ENV: str(TIMEOUT)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield client, proxy
        finally:
            reporter = request.config.pluginmanager.get_plugin("terminalreporter")
            capture = request.config.pluginmanager.get_plugin("capturemanager")
            if reporter and capture:  # the count the reliability guide quotes, past the output capture
                with capture.global_and_fixture_disabled():
                    reporter.write_line(f"S3 faults injected: {proxy.injected['transient']} transient (each "
                                        f"once), {proxy.injected['lasting']} answers of lasting faults")
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="module")
def s3_ray(s3):
    """A 2-CPU local Ray started after the variables are set: its workers inherit them. A Ray already
    running in this process (the shared session one) was started without them: stop it."""
    ray = start_local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def faulty(s3):
    _, proxy = s3
    proxy.clear()
    yield proxy
    proxy.clear()


def keys_under(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    # pyarrow writes empty "dir/" marker objects when it creates a directory: not files.
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []) if not obj["Key"].endswith("/"))


def body(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def count(out: str) -> int:
    return run_sql(out, "SELECT count(*) AS n FROM latents").to_pylist()[0]["n"]


def served(rules: list[Rule]) -> list[int]:
    return [r.served for r in rules]


def test_prepare_train_encode_query_report_on_s3_survive_faults(s3, s3_ray, faulty, mnist_dir, tmp_path, monkeypatch):
    from vaedist import schema
    from vaedist.analyses import loss_by_digit, read_lineage
    from vaedist.checkpoint import load_checkpoint
    from vaedist.data import prepare_shards, verify_shards
    from vaedist.encode import EncodeError, encode
    from vaedist.report import write_report
    from vaedist.train import train

    client, _ = s3
    monkeypatch.chdir(tmp_path)  # anything written to a local path by mistake would land here
    shards = f"s3://{BUCKET}/shards"
    # Prepare: a shard's upload answers 503, moving a shard into place (a server-side copy) meets a
    # reset connection, the manifest's upload stalls.
    rules = [Rule("PUT", r"/shards/train/train-000001\.tar\.partial", 503),
             Rule("PUT", r"/shards/test/test-000000\.tar$", "reset", header=COPY),
             Rule("PUT", r"/shards/manifest\.json\.partial", "stall", seconds=STALL)]
    faulty.add(*rules)
    prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=500, limit_per_split=1000, progress=False)
    assert served(rules) == [1, 1, 1]
    assert keys_under(client, "shards/") == ["shards/manifest.json", "shards/test/test-000000.tar",
                                             "shards/test/test-000001.tar", "shards/train/train-000000.tar",
                                             "shards/train/train-000001.tar"]
    assert verify_shards(shards) == {"train": {"shards": 2, "samples": 1000}, "test": {"shards": 2, "samples": 1000}}

    # Ray Train's checkpoint uploads (its workers, through vaedist's S3 filesystem): a 503 on epoch 0's
    # is retried; every upload of epoch 1's fails: one error naming the directory and the S3
    # operation, epoch 0's checkpoint as it was and no part of epoch 1's visible. Epoch 0 is not
    # evaluated (train.eval_every_epochs=2; the last epoch always is), so the rerun below restores
    # Ray's checkpoint-manager snapshot with an unevaluated checkpoint in it: it used to hold a null
    # score there, and the rerun failed in Ray's checkpoint manager.
    runs = f"s3://{BUCKET}/runs"
    run = ("train.epochs=2", "train.eval_every_epochs=2", "scaling.num_workers=2")
    cfg = debug_config(shards, runs, "s3run", *run, "encode.num_samples_iw=4", "encode.concurrency=1")
    rules = [Rule("PUT", r"/runs/s3run/epoch-0000/checkpoint\.pt", 503)]
    faulty.add(*rules, Rule("PUT", r"/runs/s3run/epoch-0001/", 500, times=None))
    with pytest.raises(Exception, match=rf"saving the checkpoint of epoch 1 to {runs}/s3run/epoch-0001 failed: "
                                        r"[\s\S]*INTERNAL_FAILURE during (Put|UploadPart|CompleteMultipartUpload)"):
        train(debug_config(shards, runs, "s3run", *run, "output.max_failures=0"))
    assert served(rules) == [1]
    faulty.clear()
    keys = keys_under(client, "runs/s3run/")
    assert "runs/s3run/epoch-0000/checkpoint.pt" in keys and not [k for k in keys if "epoch-0001" in k]
    assert "runs/s3run/checkpoint_manager_snapshot.json" in keys  # what the rerun restores
    epoch0 = {k: body(client, k) for k in keys if k.startswith("runs/s3run/epoch-0000/")}
    assert load_checkpoint(f"{runs}/s3run/epoch-0000").epoch == 0

    # The rerun resumes from the checkpoint in the bucket (epoch 0 is not trained again), its upload
    # of epoch 1 meeting a stall.
    rules = [Rule("PUT", r"/runs/s3run/epoch-0001/config\.yaml", "stall", seconds=STALL)]
    faulty.add(*rules)
    again = train(cfg)
    assert served(rules) == [1]
    assert again.run_dir == f"{runs}/s3run"
    assert [(r["epoch"], r["restored_from_epoch"], r["world_size"]) for r in again.epochs] == [(0, -1, 2), (1, 0, 2)]
    assert again.epochs[-1]["train_loss"] < again.epochs[0]["train_loss"]
    assert [r["test_count"] for r in again.epochs] == [0, 1000]
    keys = keys_under(client, "runs/s3run/")
    assert "runs/s3run/epoch-0001/checkpoint.pt" in keys and "runs/s3run/epoch-0001/config.yaml" in keys
    assert again.latest_checkpoint == f"{runs}/s3run/epoch-0001"
    assert [json.loads(line) for line in body(client, "runs/s3run/metrics.jsonl").decode().splitlines()] == again.metrics
    assert {k: body(client, k) for k in keys_under(client, "runs/s3run/epoch-0000/")} == epoch0

    # The encode actors' uploads into staging (multipart: start, part, complete) each meet one fault,
    # and every part upload of one file fails: the command's error names the file, the operation and
    # what the path holds. The rerun keeps the files finished in the bucket and encodes the rest.
    out = f"s3://{BUCKET}/latents"
    staged_file = r"/\.latents\.staging-\w+/{}\.parquet\?{}"
    rules = [Rule("POST", staged_file.format("train-00000", "uploads"), 503),
             Rule("PUT", staged_file.format("test-00000", "partNumber"), 500),
             Rule("POST", staged_file.format("train-00001", "uploadId"), "reset")]
    lasting = Rule("PUT", staged_file.format("test-00001", "partNumber"), 500, times=None)
    faulty.add(*rules, lasting)
    with pytest.raises(EncodeError, match=rf"the encode job failed: OSError: writing s3://{BUCKET}/"
                                          r"\.latents\.staging-\w+/test-00001\.parquet failed: "
                                          r".*INTERNAL_FAILURE during UploadPart"
                                          rf".*\. No table is published at {out}; [123] of 4 files are finished"):
        encode(cfg, checkpoint=again.latest_checkpoint, out=out)
    faulty.remove(lasting)
    assert not keys_under(client, "latents/")
    enc = encode(cfg, checkpoint=again.latest_checkpoint, out=out)
    assert served(rules) == [1, 1, 1]  # in the failed job or, for files it did not reach, in the rerun
    faulty.clear()
    assert enc.path == out and enc.rows == {"train": 1000, "test": 1000}
    assert enc.files_reused >= 1 and enc.files_reused + enc.files_encoded == 4
    table_keys = keys_under(client, "latents/")
    assert f"latents/{schema.SUCCESS_FILE}" in table_keys and f"latents/{schema.LINEAGE_FILE}" in table_keys
    assert [k for k in table_keys if k.endswith(".parquet")]
    assert not [k for k in keys_under(client, "") if k.startswith(".latents.")], "staging left behind"

    # Reads by queries and the report: a 503 on the lineage, a stall and a trickle on Parquet files,
    # a reset on the checkpoint and a 503 on the metrics the report reads.
    rules = [Rule("GET", r"/latents/_lineage\.json", 503),
             Rule("GET", r"/latents/test-00000\.parquet", "stall", seconds=STALL),
             Rule("GET", r"/latents/train-00000\.parquet", "trickle", seconds=TRICKLE)]
    faulty.add(*rules)
    assert read_lineage(out).checkpoint == f"{again.latest_checkpoint}/checkpoint.pt"
    by_digit = loss_by_digit(out, split="test").to_pylist()
    assert sorted(r["label"] for r in by_digit) == list(range(10))
    assert sum(r["count"] for r in by_digit) == 1000
    assert all(0 < r["loss_mean"] < 1000 and r["gap_mean"] is not None for r in by_digit)
    assert sum(r["count"] for r in loss_by_digit(out, split=None).to_pylist()) == 2000
    assert served(rules) == [1, 1, 1]
    faulty.clear()
    report_rules = [Rule("GET", r"/runs/s3run/epoch-0001/checkpoint\.pt", "reset"),
                    Rule("GET", r"/runs/s3run/metrics\.jsonl", 503)]
    faulty.add(*report_rules)
    page = write_report(out, f"s3://{BUCKET}/report", num_examples=4)
    assert served(report_rules) == [1, 1] and storage.exists(page)
    # The same read failing for good: one line naming the file and the operation.
    faulty.add(Rule("GET", r"/runs/s3run/epoch-0001/checkpoint\.pt", 500, times=None))
    with pytest.raises(Exception, match=rf"{runs}/s3run/epoch-0001/checkpoint\.pt[\s\S]*INTERNAL_FAILURE during GetObject"):
        write_report(out, f"s3://{BUCKET}/report-again", num_examples=4)
    faulty.clear()

    assert count(out) == 2000 and keys_under(client, "latents/") == table_keys

    assert os.listdir(tmp_path) == [], "something was written to a local path instead of the bucket"


def test_a_prepare_failing_for_good_on_s3_leaves_the_previous_shards(s3, faulty, mnist_dir):
    from vaedist.data import prepare_shards, read_manifest, verify_shards

    client, _ = s3
    shards = f"s3://{BUCKET}/shards-again"
    prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=250, limit_per_split=250, progress=False)
    before = {k: body(client, k) for k in keys_under(client, "shards-again/")}
    faulty.add(Rule("PUT", r"/shards-again/test/test-000001\.tar\.partial", 500, times=None))
    with pytest.raises(storage.StorageError, match=rf"writing {shards}/test/test-000001\.tar\.partial failed: "
                                                   r".*INTERNAL_FAILURE during (Put|UploadPart)"):
        prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=250, limit_per_split=500, progress=False)
    faulty.clear()
    assert {k: body(client, k) for k in keys_under(client, "shards-again/")} == before  # no .partial left
    assert read_manifest(shards).split("test").num_samples == 250
    verify_shards(shards)
    prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=250, limit_per_split=500, progress=False)
    assert verify_shards(shards)["test"] == {"shards": 2, "samples": 500}
    assert not [k for k in keys_under(client, "shards-again/") if k.endswith(".partial")]


def test_transient_errors_during_publish_and_reads_are_retried(s3, faulty, request):
    out, (staging, _) = staged(f"s3://{BUCKET}/{request.node.name}")
    rules = [Rule("DELETE", r"/table/_SUCCESS$", 503),
             Rule("PUT", r"/table/_lineage\.json$", 503, header=COPY),
             Rule("PUT", r"/table/train-00000\.parquet$", 500, header=COPY),
             Rule("PUT", r"/table/_SUCCESS$", "reset", header=COPY),
             Rule("GET", r"/table/test-00001\.parquet", 503),
             Rule("GET", r"/table/train-00000\.parquet", "reset")]
    faulty.add(*rules)
    tables.publish(staging, out)
    assert count(out) == NEW_ROWS and leftovers(out) == []
    assert served(rules) == [1] * len(rules)


def test_lasting_errors_end_in_one_clear_error_and_lose_nothing(s3, faulty, request):
    out, (staging, _) = staged(f"s3://{BUCKET}/{request.node.name}")
    faulty.add(Rule("PUT", r"/table/", 500, times=None, header=COPY))
    with pytest.raises(OSError, match=r"(?s)copying key '.*\.table\.staging-0123abcd/_lineage\.json'.*to key "
                                      r"'.*/table/_lineage\.json'.*INTERNAL_FAILURE"):
        tables.publish(staging, out)
    # The old table was cleared before the copy began; the verified new one is found beside it.
    assert count(out) == NEW_ROWS
    faulty.clear()
    faulty.add(Rule("GET", r"\.parquet", 500, times=None))
    with pytest.raises(QueryError, match=rf"latent table {out} cannot be read: .*'\S+/test-00001\.parquet': AWS Error "
                                         r"INTERNAL_FAILURE during GetObject operation"):
        count(out)
    faulty.clear()
    tables.recover(out)  # what the next encode does first
    assert count(out) == NEW_ROWS and leftovers(out) == []
    assert OLD_ROWS != NEW_ROWS


def files_under(root: str) -> dict[str, bytes]:
    """Every file's bytes but Ray Train's own records of its runs (rewritten by each run)."""
    found = {}
    for parent, _, names in os.walk(root):
        for name in names:
            path = os.path.join(parent, name)
            if not name.startswith((".validate_storage_marker", "checkpoint_manager_snapshot")):
                found[os.path.relpath(path, root)] = open(path, "rb").read()
    return found


def test_a_full_local_disk_during_prepare_checkpointing_and_encode(s3_ray, mnist_dir, tmp_path):
    """Each write meets a disk with too little left: one error naming the path and ENOSPC, the previous
    shards, checkpoint and table as they were; once space is freed, prepare and the encode complete."""
    from vaedist.checkpoint import checkpoint_dirs, load_checkpoint, read_metrics
    from vaedist.data import prepare_shards, verify_shards
    from vaedist.encode import EncodeError, encode
    from vaedist.model import build_model
    from vaedist.train import train

    enospc = r"[\s\S]*No space left on device"
    with small_disk(tmp_path / "disk", "16m") as disk:
        shards, runs, out = f"{disk}/shards", f"{disk}/runs", f"{disk}/latents"
        prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=250, limit_per_split=500, progress=False)
        write_table(out, OLD_ROWS, "old")  # a table published before
        cfg = debug_config(shards, runs, "local", "train.epochs=2", "output.max_failures=0", "encode.num_samples_iw=0")
        # Room for one checkpoint and a half (float32 weights and Adam's two moments): epoch 0's is
        # saved, epoch 1's meets the full disk.
        weights = sum(p.numel() for p in build_model(cfg.model, (28, 28, 1)).parameters())
        filler = fill(disk, leave=int(1.5 * 3 * 4 * weights))
        with pytest.raises(Exception, match=rf"saving the checkpoint of epoch 1 to {runs}/local/epoch-0001 failed: {enospc}"):
            train(cfg)
        # Epoch 0's checkpoint as it was saved, no part of epoch 1's, and no metrics of an epoch without one.
        assert [e for e, _ in checkpoint_dirs(f"{runs}/local")] == [0]
        assert not [n for n in os.listdir(f"{runs}/local") if "0001" in n]
        assert load_checkpoint(f"{runs}/local/epoch-0000").epoch == 0
        assert [r["epoch"] for r in read_metrics(f"{runs}/local") if r["kind"] == "epoch"] == [0]
        os.remove(filler)
        before = files_under(disk)

        filler = fill(disk, leave=16 << 10)
        with pytest.raises(storage.StorageError, match=rf"writing {shards}/train/train-000000\.tar\.partial failed: {enospc}"):
            prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=250, limit_per_split=500, progress=False)
        with pytest.raises(EncodeError, match=rf"writing {disk}/\.latents\.staging-\w+/\S+\.parquet failed: {enospc}"
                                              rf".* The path {out} still holds the table published before"):
            encode(cfg, checkpoint=f"{runs}/local/epoch-0000", out=out)
        after = files_under(disk)
        after.pop("filler")
        # Nothing changed; the encode's unfinished staging directory is new (kept for its rerun).
        assert {k: v for k, v in after.items() if not k.startswith(".latents.staging-")} == before
        assert count(out) == OLD_ROWS

        os.remove(filler)
        prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=250, limit_per_split=500, progress=False)
        assert files_under(shards) == {k.removeprefix("shards/"): v for k, v in before.items() if k.startswith("shards/")}
        verify_shards(shards)
        # (A training run resuming after a checkpoint write that failed: the S3 test above.)
        assert encode(cfg, checkpoint=f"{runs}/local/epoch-0000", out=out).rows == {"train": 500, "test": 500}
        assert count(out) == 1000
