"""The encode job's row counter: its history is what the benchmarks' fixed cost and steady rate come from."""
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vaedist.bench.encode import fixed_cost
from vaedist.console import RowsDisplay


def test_rows_history_is_each_finished_files_time_and_the_rows_by_then(tmp_path):
    lines = []
    display = RowsDisplay(str(tmp_path), total_rows=60, echo=lines.append)
    display.start -= 5  # as if the job had started 5 s ago (a file's time is never after it was seen)
    display.wall_start -= 5
    # Files finished out of the order the poll lists them; one still being written (no footer).
    for name, rows, after in (("b.parquet", 20, 2.0), ("a.parquet", 10, 1.0), ("c.parquet", 30, 3.0)):
        pq.write_table(pa.table({"x": list(range(rows))}), tmp_path / name)
        os.utime(tmp_path / name, (display.wall_start + after,) * 2)
    (tmp_path / "d.parquet").write_bytes(b"PAR1 half a file")
    with display:
        pass  # the exit counts once more
    assert [rows for _, rows in display.history] == [10, 30, 60]
    assert [t for t, _ in display.history] == pytest.approx([1.0, 2.0, 3.0], abs=0.01)
    # A job that starts writing at 1 s and then writes 25 rows/s has no fixed cost before its first row
    # other than that second: (1.0 - 10 / 25) = 0.6 s extrapolated back, 25 rows/s steady.
    fixed, steady = fixed_cost(display.history)
    assert steady == pytest.approx(25.0, rel=1e-3) and fixed == pytest.approx(0.6, abs=0.01)
    assert lines[-1].startswith("encode: 60 of 60 rows written")


def test_no_rows_is_no_history_not_a_point_at_zero(tmp_path):
    """A poll that found nothing used to record (1 s, 0 rows): the benchmarks then called every job's
    fixed cost exactly 1.0 s."""
    with RowsDisplay(str(tmp_path), total_rows=10, echo=lambda line: None) as display:
        display._count()
    assert display.history == [] and fixed_cost(display.history) == (0.0, None)
