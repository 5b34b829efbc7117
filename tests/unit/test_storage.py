"""vaedist.storage's S3 settings and errors, without a server: the timeouts reach every copy of the
filesystem (Ray Train pickles the one it is given to its workers), and failures name the path."""

from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import pytest

from vaedist import storage


@pytest.fixture
def s3_env(monkeypatch):
    for name, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


def options(fs: pafs.S3FileSystem) -> dict:
    return fs.__reduce__()[1][0]


def test_ray_train_gets_the_s3_filesystem_with_its_timeouts(s3_env, monkeypatch):
    monkeypatch.setenv(storage.REQUEST_TIMEOUT_ENV, "7.5")
    fs, inside = storage.resolve("s3://bucket/runs")
    assert inside == "bucket/runs"
    assert (options(fs)["connect_timeout"], options(fs)["request_timeout"]) == (storage.S3_CONNECT_TIMEOUT, 7.5)
    assert options(fs)["endpoint_override"] == "http://127.0.0.1:9"  # from_uri's reading of the variables
    ray = storage.ray_storage("s3://bucket/runs")
    assert ray["storage_path"] == "bucket/runs" and ray["storage_filesystem"] is fs
    shipped = pickle.loads(pickle.dumps(fs))  # what a Ray Train worker gets
    assert (options(shipped)["connect_timeout"], options(shipped)["request_timeout"]) == (storage.S3_CONNECT_TIMEOUT, 7.5)


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/", "s3://bucket/a/b", "s3://bucket/a/b/",
                                 "s3://bucket/a//b", "s3://bucket/a%20b/c", "s3://bucket/x?region=eu-west-1",
                                 "s3://key:secret@bucket/.staging-1/x.parquet"])
def test_an_s3_uri_means_what_pyarrow_says_with_one_client_per_store(s3_env, uri):
    fs, inside = storage.resolve(uri)
    theirs, their_inside = pafs.FileSystem.from_uri(uri)
    assert inside == their_inside
    assert {k: v for k, v in options(fs).items() if "timeout" not in k} == \
        {k: v for k, v in options(theirs).items() if "timeout" not in k}
    assert storage.resolve(uri.replace("bucket", "bucket/more", 1))[0] is fs  # the same store: the same client


def test_other_aws_variables_get_another_client(s3_env, monkeypatch):
    fs, _ = storage.resolve("s3://bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:10")
    other, _ = storage.resolve("s3://bucket/x")
    assert other is not fs and options(other)["endpoint_override"] == "http://127.0.0.1:10"


def test_local_paths_go_to_ray_as_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.ray_storage("runs") == {"storage_path": str(tmp_path / "runs")}


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_timeout_is_named(s3_env, monkeypatch, value):
    monkeypatch.setenv(storage.CONNECT_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=rf"{storage.CONNECT_TIMEOUT_ENV}='{value}': expected a number of seconds > 0"):
        storage.resolve("s3://bucket/x")


def test_a_failed_write_names_the_operation_and_path_and_leaves_no_file(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    target = str(tmp_path / "file" / "below")  # a file's child: cannot be created
    with pytest.raises(storage.StorageError, match=rf"writing {target} failed: "):
        storage.write_bytes(target, b"data")
    with pytest.raises(storage.StorageError, match=rf"moving {tmp_path}/file to {target} failed: "):
        storage.move(str(tmp_path / "file"), target)
    with pytest.raises(FileNotFoundError):  # as itself: callers test for it
        storage.read_bytes(str(tmp_path / "missing"))
