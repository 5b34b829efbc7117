"""Analyses of latent tables that no VAE library offers: per-dimension diagnostics, totals with
standard errors, two tables compared datapoint by datapoint, and training dynamics over a table
that encodes several checkpoints of one run. No Ray.

    print(format_table(active_units("outputs/latents"), "table"))
    compare_by_digit("outputs/latents-big", "outputs/latents-small")   # Δl_i per digit, A - B
    learned_late("outputs/latents-epochs", within=1.0, after=5)

Each analysis is one SQL query over the view `latents` (query.connect), kept below as a module
constant like query.py's, with DuckDB `$name` parameters and two placeholders filled before it
runs:
  {latents}  the view `latents`, or on a table of several checkpoints (one with an `epoch` column)
             `(SELECT * FROM latents WHERE epoch = $epoch)`: one table's analyses see one checkpoint;
  {a}, {b}   the same for the two tables of a comparison, views `latents_a` and `latents_b`.
`class` (the lineage's class_names[label], for datasets that name their classes) is dropped from a
result when the lineage has no class_names. Vector columns are taken apart in SQL (one row per
datapoint and dimension); nothing loops over rows in Python.
"""

from __future__ import annotations

import math
import re
from typing import Any

import duckdb
import pyarrow as pa

from vaedist.query import QueryError, _check_k, _check_split, _execute, connect, read_lineage

EPOCH = "epoch"
VIEW_A, VIEW_B = "latents_a", "latents_b"
CLASS_COLUMN = "class"
SOURCE = "source"
# Lineage fields that must agree before two tables' l_i can be subtracted datapoint by datapoint.
# binarised: Bernoulli models binarised draws, the other likelihoods the 8-bit pixels; tables from
# before likelihoods existed lack the field and were all binarised.
SAME_DATA_FIELDS = ("dataset", "manifest_hash", "binarize_seed", "splits", "binarised")


# ---------------------------------------------------------------------------------------------
# One table. `$split` NULL means both splits.

# Burda et al. (2016), Sec. 5.2: unit d is active when Cov_x(E_q[z_d|x]) = Var_x(mu_d) > threshold.
# The variance is over the datapoints selected (population variance, as theirs). One row per
# (datapoint, dimension) by a join with the dimensions' indices, dim 0-based: over the view's FLOAT[n]
# arrays this runs about twice as fast as unnest() in DuckDB 2.0.
ACTIVE_UNITS_SQL = """\
WITH units AS (
    SELECT dim, l.mu[dim + 1]::DOUBLE AS mu_d
    FROM {latents} AS l, range((SELECT len(mu) FROM latents LIMIT 1)) AS dims(dim)
    WHERE $split IS NULL OR l.split = $split
)
SELECT dim, var_pop(mu_d) AS mu_variance, var_pop(mu_d) > $threshold AS active
FROM units
GROUP BY dim
ORDER BY dim"""

# KL(q(z_d|x) || N(0, 1)) = -1/2 (1 + logvar_d - mu_d^2 - exp(logvar_d)) (Kingma & Welling 2014,
# App. B), averaged over datapoints; the dimensions' kl_mean sum to avg(kl).
KL_PER_DIM_SQL = """\
WITH units AS (
    SELECT dim, l.mu[dim + 1]::DOUBLE AS mu_d, l.logvar[dim + 1]::DOUBLE AS logvar_d
    FROM {latents} AS l, range((SELECT len(mu) FROM latents LIMIT 1)) AS dims(dim)
    WHERE $split IS NULL OR l.split = $split
),
per_dim AS (
    SELECT dim, avg(-0.5 * (1 + logvar_d - mu_d * mu_d - exp(logvar_d))) AS kl_mean
    FROM units
    GROUP BY dim
)
SELECT dim, kl_mean, kl_mean / sum(kl_mean) OVER () AS kl_share
FROM per_dim
ORDER BY dim"""

# Standard errors of the means: stddev_samp / sqrt(n). nll = -log_px, the IW estimate of -log p(x).
TOTALS_SQL = """\
SELECT split,
       count(*)                                     AS count,
       avg(loss)                                    AS loss_mean,
       stddev_samp(loss) / sqrt(count(*))           AS loss_se,
       avg(loss) / ($num_subpixels * ln(2))         AS bpd,
       avg(-log_px)                                 AS nll_mean,
       stddev_samp(log_px) / sqrt(count(log_px))    AS nll_se,
       avg(-log_px) / ($num_subpixels * ln(2))      AS bpd_iw,
       avg(gap)                                     AS gap_mean,
       stddev_samp(gap) / sqrt(count(gap))          AS gap_se
FROM {latents}
WHERE $split IS NULL OR split = $split
GROUP BY split
ORDER BY split"""

GAP_BY_DIGIT_SQL = """\
SELECT label,
       list_extract($class_names, label + 1)        AS class,
       count(*)                                     AS count,
       avg(gap)                                     AS gap_mean,
       stddev_samp(gap) / sqrt(count(*))            AS gap_se,
       avg(-log_px)                                 AS nll_mean,
       avg(loss)                                    AS loss_mean
FROM {latents}
WHERE ($split IS NULL OR split = $split) AND gap IS NOT NULL
GROUP BY label
ORDER BY label"""

# A datapoint's class is its label within its split (a trained model's train l_i sit lower).
# global_rank: 1 = the highest l_i among all the rows selected.
OUTLIERS_SQL = """\
WITH scored AS (
    SELECT key, split, label, loss, source,
           avg(loss) OVER by_class          AS class_mean,
           stddev_samp(loss) OVER by_class  AS class_std,
           rank() OVER (ORDER BY loss DESC) AS global_rank
    FROM {latents}
    WHERE $split IS NULL OR split = $split
    WINDOW by_class AS (PARTITION BY split, label)
)
SELECT key, split, label,
       list_extract($class_names, label + 1) AS class,
       loss,
       (loss - class_mean) / class_std       AS z_score,
       class_mean, class_std, global_rank, source
FROM scored
ORDER BY z_score DESC NULLS LAST, key
LIMIT $k"""


# ---------------------------------------------------------------------------------------------
# Two tables, joined on key. delta = l_i(A) - l_i(B): negative where A explains x_i better.

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


# ---------------------------------------------------------------------------------------------
# Training dynamics: a table with an `epoch` column, one row per datapoint per kept checkpoint.
# "final" is the last epoch in the table.

EPOCHS_SQL = "SELECT DISTINCT epoch FROM {latents} ORDER BY epoch"

# The given $keys, or else the $k with the highest final l_i; one row per key and epoch.
CURVES_SQL = """\
WITH chosen AS (
    SELECT key, loss AS loss_final
    FROM latents
    WHERE epoch = (SELECT max(epoch) FROM latents)
      AND ($split IS NULL OR split = $split)
      AND ($keys::VARCHAR[] IS NULL OR list_contains($keys::VARCHAR[], key))
    ORDER BY loss DESC, key
    LIMIT $k
)
SELECT l.key, l.split, l.label,
       list_extract($class_names, l.label + 1) AS class,
       l.epoch, l.loss, l.recon_nll, l.kl, c.loss_final
FROM latents AS l JOIN chosen AS c ON l.key = c.key
ORDER BY c.loss_final DESC, l.key, l.epoch"""

DIGIT_CURVES_SQL = """\
SELECT label,
       list_extract($class_names, label + 1) AS class,
       epoch,
       count(*)                              AS count,
       avg(loss)                             AS loss_mean,
       stddev_samp(loss) / sqrt(count(*))    AS loss_se,
       avg(recon_nll)                        AS recon_nll_mean,
       avg(kl)                               AS kl_mean
FROM latents
WHERE $split IS NULL OR split = $split
GROUP BY label, epoch
ORDER BY label, epoch"""

# first_epoch_within: the first epoch at which |l_i - final l_i| <= $within (the last epoch always is).
LEARNED_LATE_SQL = """\
WITH final AS (
    SELECT key, loss AS loss_final
    FROM latents
    WHERE epoch = (SELECT max(epoch) FROM latents) AND ($split IS NULL OR split = $split)
),
per_key AS (
    SELECT l.key, any_value(l.split) AS split, any_value(l.label) AS label,
           min(l.epoch) FILTER (WHERE abs(l.loss - f.loss_final) <= $within) AS first_epoch_within,
           arg_min(l.loss, l.epoch)                                           AS loss_first,
           any_value(l.loss) FILTER (WHERE l.epoch = $after)                  AS loss_after,
           any_value(f.loss_final)                                            AS loss_final
    FROM latents AS l JOIN final AS f ON l.key = f.key
    GROUP BY l.key
)
SELECT key, split, label,
       list_extract($class_names, label + 1) AS class,
       first_epoch_within, loss_first, loss_after, loss_final,
       loss_first - loss_final               AS improvement
FROM per_key
WHERE first_epoch_within > $after
ORDER BY first_epoch_within DESC, abs(loss_after - loss_final) DESC, key
LIMIT $k"""

# Each datapoint's largest rise between consecutive kept epochs, where it exceeds $by nats.
FORGOTTEN_SQL = """\
WITH steps AS (
    SELECT key, split, label,
           lag(epoch) OVER by_key AS from_epoch, epoch AS to_epoch,
           lag(loss) OVER by_key  AS loss_from, loss AS loss_to,
           last_value(loss) OVER (by_key ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS loss_final
    FROM latents
    WHERE $split IS NULL OR split = $split
    WINDOW by_key AS (PARTITION BY key ORDER BY epoch)
)
SELECT key, split, label,
       list_extract($class_names, label + 1) AS class,
       from_epoch, to_epoch, loss_from, loss_to, loss_to - loss_from AS rise, loss_final
FROM steps
WHERE loss_to - loss_from > $by
QUALIFY row_number() OVER (PARTITION BY key ORDER BY loss_to - loss_from DESC, to_epoch) = 1
ORDER BY rise DESC, key
LIMIT $k"""

# The rise between two given kept epochs, where it exceeds $by nats.
FORGOTTEN_BETWEEN_SQL = """\
WITH pair AS (
    SELECT key, any_value(split) AS split, any_value(label) AS label,
           any_value(loss) FILTER (WHERE epoch = $from_epoch) AS loss_from,
           any_value(loss) FILTER (WHERE epoch = $to_epoch)   AS loss_to
    FROM latents
    WHERE ($split IS NULL OR split = $split) AND epoch IN ($from_epoch, $to_epoch)
    GROUP BY key
)
SELECT key, split, label,
       list_extract($class_names, label + 1) AS class,
       $from_epoch::BIGINT AS from_epoch, $to_epoch::BIGINT AS to_epoch,
       loss_from, loss_to, loss_to - loss_from AS rise
FROM pair
WHERE loss_to - loss_from > $by
ORDER BY rise DESC, key
LIMIT $k"""


# ---------------------------------------------------------------------------------------------
# Helpers.

_PARAM = re.compile(r"\$([A-Za-z_]\w*)")


def _run(con: duckdb.DuckDBPyConnection, latents_dir: str, sql: str, params: dict[str, Any],
         class_names: list[str] | None = None) -> pa.Table:
    """Run sql with the params it names (DuckDB refuses unused ones); drop `class` without names, and
    `source` where it is NULL throughout (a table written before that column)."""
    used = set(_PARAM.findall(sql))
    params = {**params, "class_names": class_names or []}
    result = _execute(con, str(latents_dir), sql, {k: v for k, v in params.items() if k in used})
    if not class_names and CLASS_COLUMN in result.column_names:
        result = result.drop_columns([CLASS_COLUMN])
    if SOURCE in result.column_names and result.column(SOURCE).null_count == result.num_rows:
        result = result.drop_columns([SOURCE])
    return result


def class_names(latents_dir: str) -> list[str] | None:
    """The lineage's class_names (index = label), or None when the dataset names no classes."""
    return read_lineage(latents_dir).class_names  # checked a list of strings as it is read


def _columns(con: duckdb.DuckDBPyConnection, latents_dir: str, view: str) -> list[str]:
    return _execute(con, str(latents_dir), f"SELECT * FROM {view} LIMIT 0").column_names


def _epochs(con: duckdb.DuckDBPyConnection, latents_dir: str, view: str = "latents") -> list[int]:
    # The encode job writes the epochs into the lineage after checking them against the rows; reading
    # them there saves a scan of the epoch column per call. Tables without that field are scanned.
    listed = read_lineage(latents_dir).epochs
    if isinstance(listed, list) and listed and all(isinstance(e, int) and not isinstance(e, bool) for e in listed):
        return sorted(listed)
    return _execute(con, str(latents_dir), EPOCHS_SQL.format(latents=view)).column(EPOCH).to_pylist()


def _format_epochs(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs)) if len(epochs) <= 12 else \
        f"{', '.join(map(str, epochs[:5]))}, …, {', '.join(map(str, epochs[-5:]))} ({len(epochs)} epochs)"


def _check_epoch(latents_dir: str, epoch: Any, epochs: list[int], what: str = "epoch") -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise QueryError(f"{what} must be an integer epoch, got {epoch!r}")
    if epoch not in epochs:
        raise QueryError(f"{what} {epoch} is not in latent table {latents_dir}; it holds epochs "
                         f"{_format_epochs(epochs)}")


def _check_amount(value: Any, name: str, unit: str = "nats") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise QueryError(f"{name} must be a finite number >= 0 ({unit}), got {value!r}")
    return float(value)


def _check_optional_k(k: int | None) -> None:
    if k is not None:
        _check_k(k)


def _flag(option: str) -> str:
    return "vaedist query --" + option.replace("_", "-")


def _scope(con: duckdb.DuckDBPyConnection, latents_dir: str, view: str, epoch: int | None,
           param: str = "epoch", option: str = "epoch") -> tuple[str, dict[str, Any]]:
    """(relation, params) for one checkpoint of a table: the view itself for a table without an
    epoch column; one epoch's rows of a table with one (required unless it holds a single epoch)."""
    if EPOCH not in _columns(con, latents_dir, view):
        if epoch is not None:
            raise QueryError(f"latent table {latents_dir} has no epoch column (it encodes one checkpoint); "
                             f"leave out {option}={epoch} ({_flag(option)})")
        return view, {}
    epochs = _epochs(con, latents_dir, view)
    if epoch is None:
        if len(epochs) != 1:
            raise QueryError(f"latent table {latents_dir} encodes several checkpoints (epochs "
                             f"{_format_epochs(epochs)}); pick one with {option}= ({_flag(option)})")
        epoch = epochs[0]
    _check_epoch(latents_dir, epoch, epochs)
    return f"(SELECT * FROM {view} WHERE epoch = ${param})", {param: epoch}


def table_epochs(latents_dir: str, *, con: duckdb.DuckDBPyConnection | None = None) -> list[int]:
    """The epochs a table of several checkpoints holds, ascending; [] for a table without an epoch column."""
    con = con or connect(latents_dir)
    return _epochs(con, latents_dir) if EPOCH in _columns(con, latents_dir, "latents") else []


def _one_table(latents_dir: str, con: duckdb.DuckDBPyConnection | None, epoch: int | None,
               split: str | None) -> tuple[duckdb.DuckDBPyConnection, str, dict[str, Any]]:
    _check_split(split)
    con = con or connect(latents_dir)
    relation, params = _scope(con, latents_dir, "latents", epoch)
    return con, relation, {**params, "split": split}


def _require_log_px(con: duckdb.DuckDBPyConnection, latents_dir: str, relation: str,
                    params: dict[str, Any]) -> None:
    sql = f"SELECT count(log_px) AS n FROM {relation}"
    if not _run(con, latents_dir, sql, params).column("n")[0].as_py():
        raise QueryError(f"latent table {latents_dir} has no log_px values (it was encoded with "
                         "encode.num_samples_iw = 0); encode again with num_samples_iw > 0 to estimate gaps")


# ---------------------------------------------------------------------------------------------
# One table.

def active_units(latents_dir: str, threshold: float = 0.01, split: str | None = None, *,
                 epoch: int | None = None, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per latent dimension (0-based `dim`): the variance over datapoints of mu_d and whether it
    exceeds threshold (Burda et al. 2016's active units; the count is sum(active)). epoch picks
    one checkpoint of a table with an epoch column."""
    threshold = _check_amount(threshold, "threshold", "a variance of mu_d")
    con, relation, params = _one_table(latents_dir, con, epoch, split)
    return _run(con, latents_dir, ACTIVE_UNITS_SQL.format(latents=relation), {**params, "threshold": threshold})


def kl_per_dim(latents_dir: str, split: str | None = None, *, epoch: int | None = None,
               con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per latent dimension: the mean over datapoints of KL(q(z_d|x) || N(0, 1)) in nats and its
    share of the total; kl_mean sums to the table's mean kl."""
    con, relation, params = _one_table(latents_dir, con, epoch, split)
    return _run(con, latents_dir, KL_PER_DIM_SQL.format(latents=relation), params)


def totals(latents_dir: str, split: str | None = None, *, epoch: int | None = None,
           con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per split: count, mean l_i (the negative ELBO) with its standard error and in bits per dimension
    (bpd: nats / (H * W * C * ln 2), the image shape from the lineage; MNIST's for tables without one)
    and, when the table has log_px, the mean NLL (-log p(x)) with its standard error, in bits per
    dimension (bpd_iw), and the gap (dropped for a table encoded with K = 0)."""
    con, relation, params = _one_table(latents_dir, con, epoch, split)
    shape = read_lineage(latents_dir).image_shape or [28, 28, 1]
    result = _run(con, latents_dir, TOTALS_SQL.format(latents=relation),
                  {**params, "num_subpixels": math.prod(shape)})
    if result.column("nll_mean").null_count == result.num_rows:
        result = result.drop_columns(["nll_mean", "nll_se", "bpd_iw", "gap_mean", "gap_se"])
    return result


def gap_by_digit(latents_dir: str, split: str | None = "test", *, epoch: int | None = None,
                 con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per digit (class): the mean evidence gap log p(x) + l_i with its standard error, mean NLL and
    mean l_i. Needs a table encoded with num_samples_iw > 0."""
    con, relation, params = _one_table(latents_dir, con, epoch, split)
    _require_log_px(con, latents_dir, relation, params)
    return _run(con, latents_dir, GAP_BY_DIGIT_SQL.format(latents=relation), params, class_names(latents_dir))


def outliers(latents_dir: str, k: int = 10, split: str | None = None, *, epoch: int | None = None,
             con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k datapoints whose l_i lies furthest above their own class: z_score = (l_i - class mean)
    / class stddev, the class being the label within the datapoint's split; with global_rank, the
    rank of l_i among all rows selected (1 = highest)."""
    _check_k(k)
    con, relation, params = _one_table(latents_dir, con, epoch, split)
    return _run(con, latents_dir, OUTLIERS_SQL.format(latents=relation), {**params, "k": k},
                class_names(latents_dir))


# ---------------------------------------------------------------------------------------------
# Two tables.

def connect_pair(latents_dir: str, against_dir: str,
                 con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """One connection with views latents_a (latents_dir) and latents_b (against_dir)."""
    con = connect(latents_dir, view=VIEW_A, con=con)
    return connect(against_dir, view=VIEW_B, con=con)


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
    _check_split(split)
    con = con or connect_pair(latents_dir, against_dir)  # first: a missing table is named as such
    names = _check_same_data(latents_dir, against_dir)
    has_epoch = [EPOCH in _columns(con, path, view) for path, view in ((latents_dir, VIEW_A), (against_dir, VIEW_B))]
    if epoch is not None and not any(has_epoch):
        raise QueryError(f"neither {latents_dir} nor {against_dir} has an epoch column (each encodes one "
                         f"checkpoint); leave out epoch={epoch}")
    a, params_a = _scope(con, latents_dir, VIEW_A, epoch if has_epoch[0] else None, "epoch_a", "epoch")
    b_epoch = against_epoch if against_epoch is not None else epoch if has_epoch[1] else None
    b, params_b = _scope(con, against_dir, VIEW_B, b_epoch, "epoch_b",
                         "against_epoch" if against_epoch is not None else "epoch")
    relations, params = {"a": a, "b": b}, {**params_a, **params_b, "split": split}
    rows = _run(con, f"{latents_dir} vs {against_dir}", ROWS_PER_SPLIT_SQL.format(**relations), params).to_pylist()
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
    return _run(con, f"{latents_dir} vs {against_dir}", COMPARE_BY_DIGIT_SQL.format(**relations), params, names)


def compare_top(latents_dir: str, against_dir: str, k: int = 10, split: str | None = None, *,
                epoch: int | None = None, against_epoch: int | None = None,
                con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k largest improvements (delta < 0, change 'improved', largest first) then the k largest
    regressions (delta > 0, 'regressed'), delta = l_i(latents_dir) - l_i(against_dir): negative
    where the first table (A) explains the datapoint better. Arguments as compare_by_digit."""
    _check_k(k)
    con, relations, params, names = _pair(latents_dir, against_dir, con, split, epoch, against_epoch)
    return _run(con, f"{latents_dir} vs {against_dir}", COMPARE_TOP_SQL.format(**relations),
                {**params, "k": k}, names)


# ---------------------------------------------------------------------------------------------
# Training dynamics.

def _dynamics(latents_dir: str, con: duckdb.DuckDBPyConnection | None, split: str | None
              ) -> tuple[duckdb.DuckDBPyConnection, list[int]]:
    _check_split(split)
    con = con or connect(latents_dir)
    if EPOCH not in _columns(con, latents_dir, "latents"):
        raise QueryError(f"latent table {latents_dir} has no epoch column: it encodes one checkpoint. Training "
                         "dynamics need a table that encodes several checkpoints of one run (one row per "
                         "datapoint per checkpoint, with an epoch column)")
    return con, _epochs(con, latents_dir)


def curves(latents_dir: str, keys: list[str] | None = None, k: int = 10, split: str | None = None, *,
           con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per-datapoint learning curves: l_i (and recon_nll, kl) at every kept epoch for the given keys,
    or else for the k datapoints with the highest final (last-epoch) l_i; highest final l_i first."""
    con, _ = _dynamics(latents_dir, con, split)
    if keys is not None:
        keys = list(keys)
        if not keys or not all(isinstance(key, str) for key in keys):
            raise QueryError(f"keys must be a non-empty list of keys like 'test-00042', got {keys!r}")
        k = len(keys)
    _check_k(k)
    result = _run(con, latents_dir, CURVES_SQL, {"keys": keys, "k": k, "split": split}, class_names(latents_dir))
    if keys is not None:
        missing = sorted(set(keys) - set(result.column("key").to_pylist()))
        if missing:
            where = f" (split {split})" if split else ""
            raise QueryError(f"keys {', '.join(map(repr, missing))} are not in latent table {latents_dir}{where} "
                             "at its last epoch (keys look like 'test-00042')")
    return result


def digit_curves(latents_dir: str, split: str | None = "test", *,
                 con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per digit and kept epoch: count, mean l_i with its standard error, mean recon_nll and kl."""
    con, _ = _dynamics(latents_dir, con, split)
    return _run(con, latents_dir, DIGIT_CURVES_SQL, {"split": split}, class_names(latents_dir))


def learned_late(latents_dir: str, within: float = 1.0, after: int | None = None, split: str | None = None,
                 k: int | None = None, *, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Datapoints whose l_i first comes within `within` nats of its final (last-epoch) value only
    after epoch `after` (a kept epoch; default the first): key, label, first_epoch_within, l_i at the
    first, `after` and last epochs, improvement = first - final. Latest first; k caps the rows."""
    within = _check_amount(within, "within")
    _check_optional_k(k)
    con, epochs = _dynamics(latents_dir, con, split)
    after = epochs[0] if after is None else after
    _check_epoch(latents_dir, after, epochs, "after: epoch")
    return _run(con, latents_dir, LEARNED_LATE_SQL, {"within": within, "after": after, "split": split, "k": k},
                class_names(latents_dir))


def forgotten(latents_dir: str, by: float = 2.0, split: str | None = None, k: int | None = None, *,
              from_epoch: int | None = None, to_epoch: int | None = None,
              con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Datapoints whose l_i rose by more than `by` nats: by default between any two consecutive kept
    epochs, reporting each one's largest rise, where it happened and its final l_i; with from_epoch
    and to_epoch, between those two. Largest rise first; k caps the rows."""
    by = _check_amount(by, "by")
    _check_optional_k(k)
    con, epochs = _dynamics(latents_dir, con, split)
    params = {"by": by, "split": split, "k": k}
    if from_epoch is None and to_epoch is None:
        return _run(con, latents_dir, FORGOTTEN_SQL, params, class_names(latents_dir))
    if from_epoch is None or to_epoch is None:
        raise QueryError("give both from_epoch and to_epoch (or neither, for consecutive epochs), "
                         f"got from_epoch={from_epoch!r}, to_epoch={to_epoch!r}")
    _check_epoch(latents_dir, from_epoch, epochs, "from_epoch")
    _check_epoch(latents_dir, to_epoch, epochs, "to_epoch")
    if from_epoch >= to_epoch:
        raise QueryError(f"from_epoch must come before to_epoch, got {from_epoch} and {to_epoch}")
    return _run(con, latents_dir, FORGOTTEN_BETWEEN_SQL,
                {**params, "from_epoch": from_epoch, "to_epoch": to_epoch}, class_names(latents_dir))
