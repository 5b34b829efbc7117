"""`vaedist bench resume`'s own logic, without Ray: the kill that takes a driver's whole process tree,
the staging files it counts, the phases a run's time is split into and the byte comparison. A real
run (three encodes of ≥ 1M rows) takes minutes; docs/results/performance.md has its figures."""

import os
import subprocess
import time

from vaedist.bench.resume import (Run, clear_table, command_line, describe_killed, descendants, finished_files,
                                  identical_tables, kill_tree, processes)

# A driver in a session of its own whose child starts a grandchild in yet another session (as a
# process may leave its parent's process group) and then a fresh child every 10 ms.
TREE = "sh -c 'setsid sleep 61.5 & while true; do sleep 61.5 & sleep 0.01; done' & sleep 61.5"


def test_the_kill_takes_every_process_the_driver_started_however_it_left_its_group():
    driver = subprocess.Popen(["sh", "-c", TREE], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(descendants(driver.pid, processes())) < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = kill_tree(driver.pid)
    driver.wait(timeout=5)
    assert driver.returncode == -9 and len(killed) >= 5 and killed[0].startswith("sh -c")
    assert describe_killed(killed).startswith(f"{len(killed)} processes: the driver, ")
    left = [pid for pid, (_, _, state) in processes().items() if command_line(pid) == "sleep 61.5 " and state != "Z"]
    assert not left, left


def test_finished_files_are_whole_files_of_this_run(tmp_path):
    staging = tmp_path / ".t.staging-abc"
    assert finished_files(staging) == {}  # not there yet
    staging.mkdir()
    (staging / "train-00000.parquet").write_bytes(b"old")
    os.utime(staging / "train-00000.parquet", (100.0, 100.0))
    (staging / "train-00001.parquet").write_bytes(b"new")
    (staging / ".train-00002.parquet.tmp-1234").write_bytes(b"half")  # still being written
    (staging / "_lineage.json").write_text("{}")
    assert set(finished_files(staging)) == {"train-00000.parquet", "train-00001.parquet"}
    assert set(finished_files(staging, since=time.time() - 60)) == {"train-00001.parquet"}


def test_a_runs_phases_add_up_to_its_time():
    rows_of = {f"train-{i:05d}.parquet": 20 for i in range(3)}
    run = Run("(a)", seconds=15.0, gcs_s=2.0, actor_s=5.0, published_s=14.0,
              files={"train-00000.parquet": 10.0, "train-00001.parquet": 11.0, "train-00002.parquet": 12.0})
    phases = run.phases(rows_of)
    # 20 rows/s between the first file and the last: the first 20 rows began at 9 s.
    assert phases == {"driver start": 2.0, "cluster start": 3.0, "actors' start, model load": 4.0,
                      "encoding": 3.0, "verify, publish": 2.0, "exit": 1.0}
    assert run.rows(rows_of) == 60 and sum(phases.values()) == run.seconds


def test_tables_compare_byte_for_byte(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for table in (a, b):
        table.mkdir()
        (table / "train-00000.parquet").write_bytes(b"PAR1 rows PAR1")
        (table / "_lineage.json").write_text(str(table))  # names the job: not compared
    assert identical_tables(a, b) == (1, 14, [])
    (b / "train-00000.parquet").write_bytes(b"PAR1 rowz PAR1")
    (a / "test-00000.parquet").write_bytes(b"PAR1")
    assert identical_tables(a, b)[2] == ["test-00000.parquet", "train-00000.parquet"]


def test_clearing_a_table_leaves_its_neighbours(tmp_path):
    for name in ("t", ".t.staging-abc", ".t.old-1234", "t2", ".t2.staging-def"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.parquet").write_bytes(b"x")
    clear_table(tmp_path / "t")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".t2.staging-def", "t2"]
