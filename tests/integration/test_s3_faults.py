"""S3 that answers errors: a fault-injecting proxy (tests/s3_faults.py) between vaedist and moto's
S3 server. Transient faults (500 InternalError, 503 SlowDown, a reset connection) are retried by
pyarrow's S3 client (its standard retry strategy: three attempts); lasting ones end in one error
naming the object and the operation, and nothing published is lost. No Ray."""

from __future__ import annotations

import pytest

from vaedist import storage, tables
from vaedist.query import QueryError, run_sql

from conftest import moto_s3
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
