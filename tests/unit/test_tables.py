"""Publishing a latent table cannot lose it: the publish is killed after each of its storage calls in
turn (a process exit, VAEDIST_FAULT_AFTER_STORAGE_CALLS), on a local disk and on moto's S3 server;
after each, a complete table answers queries, and after the next writer's recovery the new table is
at the published path with nothing left beside it. No Ray: publishing is the driver's work."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from vaedist import schema, storage, tables
from vaedist.analyses import read_lineage, run_sql

from conftest import REPO, moto_s3

BUCKET = "vaedist-tables"
OLD_ROWS, NEW_ROWS = 30, 50


def write_table(path: str, rows: int, version: str) -> str:
    """A small complete table in the encode job's layout: two Parquet files, lineage, _SUCCESS."""
    rng = np.random.default_rng(rows)
    lineage = {"note": version, "latent_dim": 2}
    for part, split in enumerate(("train", "test")):
        n = rows // 2
        vectors = rng.standard_normal((n, 2)).astype(np.float32)
        loss = rng.random(n)
        table = schema.to_table({"key": [f"{split}-{i:05d}" for i in range(n)], "split": [split] * n,
                                 "index": np.arange(n), "label": np.arange(n) % 10, "shard": ["s.tar"] * n,
                                 "source": ["x"] * n, "mu": vectors, "logvar": vectors, "z": vectors,
                                 "recon_nll": loss, "kl": loss, "loss": 2 * loss, "bpd": loss}, 2, lineage)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(path, f"{split}-{part:05d}.parquet"), buf.getvalue())
    storage.write_bytes(storage.join(path, schema.LINEAGE_FILE),
                        json.dumps({**lineage, "job": {"id": version}}).encode())
    storage.write_bytes(storage.join(path, schema.SUCCESS_FILE), b"")
    return path


FORKER = """
import json, os, sys
from vaedist import storage, tables  # no S3 client yet: each child starts its own after the fork
for line in sys.stdin:
    fn, args, fault, env = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            os.environ.update(env, **({storage.FAULT_ENV: str(fault)} if fault else {}))
            getattr(tables, fn)(*args)
            print(storage.calls, flush=True)
            os._exit(0)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@pytest.fixture(scope="module")
def forker():
    """One Python process that forks a child per publish to kill: a child dies as a killed driver
    would, without paying for a fresh interpreter each time."""
    proc = subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    yield proc
    proc.stdin.close()
    proc.wait(timeout=30)


def run(forker, fn: str, *args: str, fault: int = 0) -> tuple[int, int | None]:
    """(exit code, storage calls made when it ran to the end) of tables.fn(*args) in a child process."""
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # moto's, for the S3 cases
    forker.stdin.write(json.dumps([fn, list(args), fault, env]) + "\n")
    forker.stdin.flush()
    first = forker.stdout.readline()
    if fault:
        return int(first), None
    return int(forker.stdout.readline()), int(first)


def count(out: str) -> int:
    return run_sql(out, "SELECT count(*) AS n FROM latents").to_pylist()[0]["n"]


def plain_count(out: str) -> int:
    """DuckDB with no vaedist code, over the published path's own files."""
    fs, root = storage.resolve(out)
    files = [n for n in storage.listdir(out) if n.endswith(".parquet")]
    total = 0
    for name in files:
        with fs.open_input_file(f"{root}/{name}") as f:
            data = pq.read_table(f)
        total += duckdb.sql("SELECT count(*) FROM data").fetchall()[0][0]
    return total


def leftovers(out: str) -> list[str]:
    parent, name = out.rstrip("/").rsplit("/", 1)
    return [n for n in storage.listdir(parent) if n.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def s3_env():
    """moto's S3 server; its AWS variables go to each forked child with its job."""
    with moto_s3(BUCKET):
        yield f"s3://{BUCKET}"


# Each S3 request to moto costs tens of milliseconds on a loaded machine: the S3 cases are the slow tier.
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path)
    return f"{request.getfixturevalue('s3_env')}/{request.node.name.replace('[', '-').rstrip(']')}"


def kill_points(forker, root: str, fn: str, setup) -> int:
    """How many storage calls `fn` makes from the state `setup` builds (a run with no fault)."""
    out, args = setup(f"{root}/count")
    code, calls = run(forker, fn, *args)
    assert code == 0
    return calls


def staged(base: str) -> tuple[str, tuple[str, str]]:
    """An old table at base/table and a complete (verified) new one in its staging directory."""
    out = f"{base}/table"
    write_table(out, OLD_ROWS, "old")
    staging = write_table(tables.staging_path(out, "0123abcd"), NEW_ROWS, "new")
    return out, (staging, out)


def test_a_publish_killed_after_any_storage_call_loses_nothing(root, forker):
    calls = kill_points(forker, root, "publish", staged)
    assert calls >= (4 if storage.is_uri(root) else 5)
    for n in range(1, calls + 1):
        out, args = staged(f"{root}/kill-{n}")
        assert run(forker, "publish", *args, fault=n)[0] == storage.FAULT_EXIT_CODE  # the exit comes after call n
        # A reader finds a complete table, the old or the new, whatever instant the publish died at.
        assert count(out) in (OLD_ROWS, NEW_ROWS), n
        assert read_lineage(out).extra["note"] in ("old", "new")
        # The next writer puts the new (verified) table at `out` and removes what is left beside it.
        tables.recover(out)
        assert count(out) == NEW_ROWS and plain_count(out) == NEW_ROWS, n
        assert read_lineage(out).extra["note"] == "new"
        assert leftovers(out) == [], (n, leftovers(out))


def test_a_recovery_killed_after_any_storage_call_loses_nothing(root, forker):
    # The state to recover from: a publish killed where `out` itself is not a complete table (local:
    # moved aside; S3: emptied), the first such kill point from the middle of the publish on.
    calls = kill_points(forker, root, "publish", staged)
    for mid in range(calls // 2, calls):
        out, args = staged(f"{root}/mid-{mid}")
        assert run(forker, "publish", *args, fault=mid)[0] == storage.FAULT_EXIT_CODE
        if not tables.is_complete(out):
            break
    assert not tables.is_complete(out)

    def killed_mid_publish(base: str) -> tuple[str, tuple[str]]:
        out, args = staged(base)
        assert run(forker, "publish", *args, fault=mid)[0] == storage.FAULT_EXIT_CODE
        return out, (out,)

    calls = kill_points(forker, f"{root}/r", "recover", killed_mid_publish)
    assert calls >= 4
    for n in range(1, calls + 1):
        out, args = killed_mid_publish(f"{root}/rkill-{n}")
        assert run(forker, "recover", *args, fault=n)[0] == storage.FAULT_EXIT_CODE
        assert count(out) in (OLD_ROWS, NEW_ROWS), n
        tables.recover(out)
        assert count(out) == NEW_ROWS and read_lineage(out).extra["note"] == "new", n
        assert leftovers(out) == []


def test_the_reported_state_of_a_killed_local_swap_is_found_and_restored(tmp_path):
    # The state that once lost a table: the old table moved aside, the new one verified in staging,
    # the published path missing. Readers find the new table; recovery publishes it.
    out = str(tmp_path / "lat")
    write_table(tables.sibling_path(out, tables.OLD, "aa"), OLD_ROWS, "old")
    write_table(tables.staging_path(out, "bb"), NEW_ROWS, "new")
    assert not storage.exists(out)
    assert count(out) == NEW_ROWS
    assert [line.split(",")[0] for line in tables.recover(out)] == [
        f"published {tables.staging_path(out, 'bb')}", f"removed {tables.sibling_path(out, tables.OLD, 'aa')}: "
        f"{out} is complete"]
    assert count(out) == NEW_ROWS and leftovers(out) == []


def test_unfinished_staging_is_kept_for_a_rerun_and_never_published(tmp_path):
    out = write_table(str(tmp_path / "lat"), OLD_ROWS, "old")
    unfinished = write_table(tables.staging_path(out, "cc"), NEW_ROWS, "new")
    storage.delete_file(storage.join(unfinished, schema.SUCCESS_FILE))
    assert tables.recover(out) == [] and storage.exists(unfinished)
    assert count(out) == OLD_ROWS
    tables.drop_unfinished(out)
    assert leftovers(out) == []


def test_a_path_holding_something_else_is_never_replaced(tmp_path):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    staging = write_table(tables.staging_path(str(out), "dd"), NEW_ROWS, "new")
    with pytest.raises(tables.TableError, match="holds something else"):
        tables.publish(staging, str(out))
    with pytest.raises(tables.TableError, match="holds something else"):
        tables.recover(str(out))
    assert (out / "thesis.tex").read_text() == "do not delete" and tables.is_complete(staging)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs, mounted for the test (root only; skipped elsewhere) and unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_fails_one_file_with_its_path_and_leaves_the_table_and_no_partial_file(small_disk):
    out = write_table(f"{small_disk}/table", OLD_ROWS, "old")
    staging = tables.staging_path(out, "ee")
    rows = 40_000  # ~2 MB of Parquet: more than the disk holds
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, 2)).astype(np.float32)
    big = schema.to_table({"key": [f"test-{i:06d}" for i in range(rows)], "split": ["test"] * rows,
                           "index": np.arange(rows), "label": np.zeros(rows, int), "shard": ["s"] * rows,
                           "source": ["x"] * rows, "mu": vectors, "logvar": vectors, "z": vectors,
                           "recon_nll": rng.random(rows), "kl": rng.random(rows), "loss": rng.random(rows),
                           "bpd": rng.random(rows)}, 2)
    with pytest.raises(OSError, match=rf"writing {staging}/test-00000\.parquet failed: .*[Nn]o space left on device"):
        tables.write_file(f"{staging}/test-00000.parquet", big)
    assert storage.listdir(staging) == []  # no partial or temporary file
    assert count(out) == OLD_ROWS and tables.recover(out) == [] and count(out) == OLD_ROWS
