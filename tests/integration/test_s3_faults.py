"""S3 that answers errors: a fault-injecting proxy (tests/s3_faults.py) between vaedist and moto's
S3 server. Transient faults (500 InternalError, 503 SlowDown, a reset connection) are retried by
pyarrow's S3 client (its standard retry strategy: three attempts); lasting ones end in one error
naming the object and the operation, and nothing published is lost. The publish and the reads run
here; the encode job's actors write through the same proxy on a local Ray."""

from __future__ import annotations

import pytest

from vaedist import storage, tables
from vaedist.analyses import QueryError, run_sql

from conftest import debug_config, moto_s3, start_local_ray
from s3_faults import FaultProxy, Rule
from unit.test_tables import NEW_ROWS, OLD_ROWS, leftovers, staged

pytestmark = pytest.mark.integration

BUCKET = "vaedist-faults"
COPY = "x-amz-copy-source"  # a PUT with this header is a server-side copy (CopyObject)


@pytest.fixture(scope="module")
def proxy():
    with moto_s3(BUCKET), FaultProxy(storage.os.environ["AWS_ENDPOINT_URL"]) as proxy:
        yield proxy


@pytest.fixture
def faulty(proxy, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    proxy.clear()
    yield proxy
    proxy.clear()


def count(out: str) -> int:
    return run_sql(out, "SELECT count(*) AS n FROM latents").to_pylist()[0]["n"]


def test_transient_errors_during_publish_and_reads_are_retried(faulty, request):
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
    assert [r.served for r in rules] == [1] * len(rules)


def test_lasting_errors_end_in_one_clear_error_and_lose_nothing(faulty, request):
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


@pytest.fixture(scope="module")
def proxied_ray(proxy):
    """A 2-CPU local Ray whose workers reach S3 through the proxy (they inherit the endpoint when Ray
    starts); the variable is restored and Ray stopped afterwards."""
    saved = storage.os.environ["AWS_ENDPOINT_URL"]
    storage.os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
    ray = start_local_ray()
    try:
        yield ray
    finally:
        ray.shutdown()
        storage.os.environ["AWS_ENDPOINT_URL"] = saved


def test_an_encode_on_s3_retries_transient_faults_and_names_a_lasting_one(proxied_ray, faulty, mnist_dir):
    from vaedist.checkpoint import save_checkpoint
    from vaedist.data import manifest_hash, prepare_shards
    from vaedist.encode import EncodeError, encode
    from vaedist.model import VAE

    shards, checkpoint, out = (f"s3://{BUCKET}/{name}" for name in ("shards", "checkpoint", "latents"))
    prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=500, limit_per_split=500, progress=False)
    cfg = debug_config(shards, f"s3://{BUCKET}/runs", "faults", "encode.num_samples_iw=0", "encode.concurrency=2")
    save_checkpoint(checkpoint, model_state=VAE(cfg.model).state_dict(), optimizer_state=None, epoch=0,
                    global_step=0, config=cfg, manifest_hash=manifest_hash(shards), history=[])
    # The actors' uploads into staging (multipart: start, part, complete) each meet one fault.
    staged_file = r"/\.latents\.staging-\w+/{}\.parquet\?{}"
    rules = [Rule("POST", staged_file.format("train-00000", "uploads"), 503),
             Rule("PUT", staged_file.format("test-00000", "partNumber"), 500),
             Rule("POST", staged_file.format("train-00000", "uploadId"), "reset")]
    faulty.add(*rules)
    first = encode(cfg, checkpoint=checkpoint, out=out)
    assert first.rows == {"train": 500, "test": 500} and count(out) == 1000
    assert [r.served for r in rules] == [1, 1, 1]
    # Every part upload fails: one line names the file, the operation and the error, and the table
    # published before is still the one at the path.
    faulty.add(Rule("PUT", r"/\.latents\.staging-\w+/.*\?partNumber", 500, times=None))
    with pytest.raises(EncodeError, match=rf"the encode job failed: OSError: writing s3://{BUCKET}/"
                                          r"\.latents\.staging-\w+/(train|test)-0000\d\.parquet failed: "
                                          r".*INTERNAL_FAILURE during UploadPart"
                                          rf".* The path {out} still holds the table published before"):
        encode(cfg, checkpoint=checkpoint, out=out)
    faulty.clear()
    assert count(out) == 1000
