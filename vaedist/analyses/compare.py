"""Two latent tables of the same datapoints compared datapoint by datapoint (usually two models):
delta = l_i(A) - l_i(B), negative where A explains x_i better. No Ray.

    compare_by_digit("outputs/latents-big", "outputs/latents-small")   # Δl_i per digit, A - B
    compare_top("outputs/latents-epochs", "outputs/latents-epochs", epoch=50, against_epoch=5)

The tables are joined on key in one SQL query per analysis (module constants below, views
latents_a and latents_b as {a} and {b}); tables of different datapoints or binarisation are refused.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa

from vaedist.analyses.core import (EPOCH, VIEW_A, VIEW_B, QueryError, check_k, check_split, class_names, columns,
                                   connect_pair, read_lineage, run, scope)

# Lineage fields that must agree before two tables' l_i can be subtracted datapoint by datapoint.
# binarised: Bernoulli models binarised draws, the other likelihoods the 8-bit pixels; tables from
# before likelihoods existed lack the field and were all binarised.
SAME_DATA_FIELDS = ("dataset", "manifest_hash", "binarize_seed", "splits", "binarised")

_PAIRS = """\
WITH pairs AS (
    SELECT a.key, a.split, a.label, a.loss AS loss_a, b.loss AS loss_b, a.loss - b.loss AS delta, a.source
    FROM {a} AS a JOIN {b} AS b ON a.key = b.key
    WHERE $split IS NULL OR a.split = $split
)"""

# The s.e. is the paired one: the spread of the per-datapoint differences.
COMPARE_BY_DIGIT_SQL = _PAIRS + """
SELECT label,
       list_extract($class_names, label + 1)  AS class,
       count(*)                               AS count,
       avg(loss_a)                            AS loss_a_mean,
       avg(loss_b)                            AS loss_b_mean,
       avg(delta)                             AS delta_mean,
       stddev_samp(delta) / sqrt(count(*))    AS delta_se,
       avg((delta < 0)::DOUBLE)               AS improved_fraction
FROM pairs
GROUP BY label
ORDER BY label"""

COMPARE_TOP_SQL = _PAIRS + """,
improved AS (SELECT 'improved' AS change, * FROM pairs WHERE delta < 0 ORDER BY delta, key LIMIT $k),
regressed AS (SELECT 'regressed' AS change, * FROM pairs WHERE delta > 0 ORDER BY delta DESC, key LIMIT $k)
SELECT change, key, split, label, list_extract($class_names, label + 1) AS class, loss_a, loss_b, delta, source
FROM (SELECT * FROM improved UNION ALL SELECT * FROM regressed)
ORDER BY change, abs(delta) DESC, key"""

# Counted apart from the join, so that tables over different datapoints are refused, not half-joined.
ROWS_PER_SPLIT_SQL = """\
SELECT 'a' AS side, split, count(*) AS count FROM {a} AS a GROUP BY split
UNION ALL
SELECT 'b' AS side, split, count(*) AS count FROM {b} AS b GROUP BY split
ORDER BY side, split"""


def _check_same_data(latents_dir: str, against_dir: str) -> list[str] | None:
    """Refuse tables of different datapoints or binarisation; return the class names."""
    a, b = (read_lineage(path) for path in (latents_dir, against_dir))
    # A field one table's lineage lacks (None: an older or hand-made table) is not held against it.
    differ = [f"{field} {getattr(a, field)!r} vs {getattr(b, field)!r}" for field in SAME_DATA_FIELDS
              if None not in (getattr(a, field), getattr(b, field)) and getattr(a, field) != getattr(b, field)]
    missing = [f"{field} (not in {path}/_lineage.json)" for path, lineage in ((latents_dir, a), (against_dir, b))
               for field in ("manifest_hash",) if getattr(lineage, field) is None]
    if differ or missing:
        raise QueryError(f"cannot compare latent tables {latents_dir} and {against_dir}: they were not encoded "
                         f"from the same datapoints and binarisation: {'; '.join(differ + missing)}")
    return class_names(latents_dir) or class_names(against_dir)


def _pair(latents_dir: str, against_dir: str, con: duckdb.DuckDBPyConnection | None, split: str | None,
          epoch: int | None, against_epoch: int | None
          ) -> tuple[duckdb.DuckDBPyConnection, dict[str, str], dict[str, Any], list[str] | None]:
    check_split(split)
    con = con or connect_pair(latents_dir, against_dir)  # first: a missing table is named as such
    names = _check_same_data(latents_dir, against_dir)
    has_epoch = [EPOCH in columns(con, path, view) for path, view in ((latents_dir, VIEW_A), (against_dir, VIEW_B))]
    if epoch is not None and not any(has_epoch):
        raise QueryError(f"neither {latents_dir} nor {against_dir} has an epoch column (each encodes one "
                         f"checkpoint); leave out epoch={epoch}")
    a, params_a = scope(con, latents_dir, VIEW_A, epoch if has_epoch[0] else None, "epoch_a", "epoch")
    b_epoch = against_epoch if against_epoch is not None else epoch if has_epoch[1] else None
    b, params_b = scope(con, against_dir, VIEW_B, b_epoch, "epoch_b",
                        "against_epoch" if against_epoch is not None else "epoch")
    relations, params = {"a": a, "b": b}, {**params_a, **params_b, "split": split}
    rows = run(con, f"{latents_dir} vs {against_dir}", ROWS_PER_SPLIT_SQL.format(**relations), params).to_pylist()
    counts = {side: ", ".join(f"{r['split']} {r['count']}" for r in rows if r["side"] == side) or "no rows"
              for side in ("a", "b")}
    if counts["a"] != counts["b"]:
        raise QueryError(f"cannot compare latent tables {latents_dir} and {against_dir}: they hold different "
                         f"datapoints (rows per split: {counts['a']} vs {counts['b']})")
    return con, relations, params, names


def compare_by_digit(latents_dir: str, against_dir: str, split: str | None = "test", *,
                     epoch: int | None = None, against_epoch: int | None = None,
                     con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per digit, over the datapoints of both tables (joined on key): count, mean l_i of each, mean
    delta = l_i(latents_dir) - l_i(against_dir) with its paired standard error, and the fraction
    improved (delta < 0). Negative delta: the first table (A) explains the datapoint better.

    The tables must share manifest_hash, binarize_seed, splits and rows per split. epoch picks the
    checkpoint of a table with an epoch column (of both, unless against_epoch picks B's); con: a
    connect_pair(latents_dir, against_dir)."""
    con, relations, params, names = _pair(latents_dir, against_dir, con, split, epoch, against_epoch)
    return run(con, f"{latents_dir} vs {against_dir}", COMPARE_BY_DIGIT_SQL.format(**relations), params, names)


def compare_top(latents_dir: str, against_dir: str, k: int = 10, split: str | None = None, *,
                epoch: int | None = None, against_epoch: int | None = None,
                con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k largest improvements (delta < 0, change 'improved', largest first) then the k largest
    regressions (delta > 0, 'regressed'), delta = l_i(latents_dir) - l_i(against_dir): negative
    where the first table (A) explains the datapoint better. Arguments as compare_by_digit."""
    check_k(k)
    con, relations, params, names = _pair(latents_dir, against_dir, con, split, epoch, against_epoch)
    return run(con, f"{latents_dir} vs {against_dir}", COMPARE_TOP_SQL.format(**relations),
                {**params, "k": k}, names)

