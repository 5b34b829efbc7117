"""Analyses of one latent table: loss per class, the worst-explained datapoints, the largest
evidence gaps, nearest neighbours in latent space, per-dimension diagnostics, totals with standard
errors and outliers within a class. No Ray.

    print(format_table(loss_by_digit("outputs/latents"), "table"))
    worst_explained("outputs/latents-epochs", k=5, epoch=2)   # one checkpoint of a table of several
    active_units("outputs/latents", threshold=0.01)

Each analysis is one SQL query kept below as a module constant, with DuckDB `$name` parameters and
{latents} filled before it runs (vaedist.analyses.core: one checkpoint of the table). `$split` NULL
means both splits. Vector columns are taken apart in SQL (one row per datapoint and dimension);
nothing loops over rows in Python.
"""

from __future__ import annotations

import math
from typing import Literal

import duckdb
import pyarrow as pa

from vaedist.analyses.core import (SPACES, QueryError, check_amount, check_k, class_names, one_table, read_lineage,
                                   require_log_px, run, run_classes)

LOSS_BY_DIGIT_SQL = """\
SELECT label,
       list_extract($class_names, label + 1) AS class,
       count(*)                 AS count,
       avg(loss)                AS loss_mean,
       quantile_cont(loss, 0.1) AS loss_p10,
       quantile_cont(loss, 0.5) AS loss_p50,
       quantile_cont(loss, 0.9) AS loss_p90,
       avg(recon_nll)           AS recon_nll_mean,
       avg(kl)                  AS kl_mean,
       avg(gap)                 AS gap_mean
FROM {latents}
WHERE $split IS NULL OR split = $split
GROUP BY label
ORDER BY label"""

WORST_EXPLAINED_SQL = """\
SELECT key, split, label, list_extract($class_names, label + 1) AS class, loss, recon_nll, kl, source
FROM {latents}
WHERE $split IS NULL OR split = $split
ORDER BY loss DESC, key
LIMIT $k"""

LARGEST_GAPS_SQL = """\
SELECT key, split, label, list_extract($class_names, label + 1) AS class, gap, log_px, loss, source
FROM {latents}
WHERE ($split IS NULL OR split = $split) AND gap IS NOT NULL
ORDER BY gap DESC, key
LIMIT $k"""

# {space} is 'mu' or 'z' (checked before formatting); distances in float64 from float32 vectors.
NEIGHBOURS_SQL = """\
WITH query AS (SELECT {space} AS v FROM {latents} WHERE key = $key)
SELECT l.key, l.split, l.label, list_extract($class_names, l.label + 1) AS class, l.loss,
       list_distance(l.{space}::DOUBLE[], query.v::DOUBLE[]) AS distance, l.source
FROM {latents} AS l, query
WHERE l.key <> $key
ORDER BY distance, l.key
LIMIT $k"""

KEY_COUNT_SQL = "SELECT count(*) AS n FROM {latents} WHERE key = $key"

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


def loss_by_digit(latents_dir: str, split: str | None = "test", *, epoch: int | None = None,
                  con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per digit (class): count, mean and 10/50/90th percentiles of l_i, mean recon_nll and kl, and
    mean gap when the table has log_px (gap_mean is dropped for a table encoded with K = 0)."""
    con, relation, params = one_table(latents_dir, con, epoch, split)
    result = run_classes(con, latents_dir, LOSS_BY_DIGIT_SQL.format(latents=relation), params)
    if result.column("gap_mean").null_count == result.num_rows:
        result = result.drop_columns(["gap_mean"])
    return result


def worst_explained(latents_dir: str, k: int = 10, split: str | None = None, *, epoch: int | None = None,
                    con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k datapoints with the highest l_i (ties by key), highest first."""
    check_k(k)
    con, relation, params = one_table(latents_dir, con, epoch, split)
    return run_classes(con, latents_dir, WORST_EXPLAINED_SQL.format(latents=relation), {**params, "k": k})


def largest_gaps(latents_dir: str, k: int = 10, split: str | None = None, *, epoch: int | None = None,
                 con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k datapoints with the largest gap = log_px + l_i, the estimated KL(q(z|x) || p(z|x))."""
    check_k(k)
    con, relation, params = one_table(latents_dir, con, epoch, split)
    require_log_px(con, str(latents_dir), relation, params)
    return run_classes(con, latents_dir, LARGEST_GAPS_SQL.format(latents=relation), {**params, "k": k})


def neighbours(latents_dir: str, key: str, k: int = 10, space: Literal["mu", "z"] = "mu", *,
               epoch: int | None = None, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k datapoints nearest to `key` by Euclidean distance in `space` (mu or z), nearest first,
    among the rows of the same checkpoint. The query datapoint itself is excluded from the result."""
    check_k(k)
    if space not in SPACES:
        raise QueryError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    con, relation, params = one_table(latents_dir, con, epoch, None)
    params = {**params, "key": key, "k": k}
    count = run_classes(con, latents_dir, KEY_COUNT_SQL.format(latents=relation), params, classes=False)
    found = count.column("n")[0].as_py()
    if found == 0:
        raise QueryError(f"key {key!r} is not in latent table {latents_dir} (keys look like 'test-00042')")
    if found > 1:
        raise QueryError(f"key {key!r} appears {found} times in latent table {latents_dir}; "
                         "a published table holds each datapoint once (per checkpoint)")
    return run_classes(con, latents_dir, NEIGHBOURS_SQL.format(space=space, latents=relation), params)

def active_units(latents_dir: str, threshold: float = 0.01, split: str | None = None, *,
                 epoch: int | None = None, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per latent dimension (0-based `dim`): the variance over datapoints of mu_d and whether it
    exceeds threshold (Burda et al. 2016's active units; the count is sum(active)). epoch picks
    one checkpoint of a table with an epoch column."""
    threshold = check_amount(threshold, "threshold", "a variance of mu_d")
    con, relation, params = one_table(latents_dir, con, epoch, split)
    return run(con, latents_dir, ACTIVE_UNITS_SQL.format(latents=relation), {**params, "threshold": threshold})


def kl_per_dim(latents_dir: str, split: str | None = None, *, epoch: int | None = None,
               con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per latent dimension: the mean over datapoints of KL(q(z_d|x) || N(0, 1)) in nats and its
    share of the total; kl_mean sums to the table's mean kl."""
    con, relation, params = one_table(latents_dir, con, epoch, split)
    return run(con, latents_dir, KL_PER_DIM_SQL.format(latents=relation), params)


def totals(latents_dir: str, split: str | None = None, *, epoch: int | None = None,
           con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per split: count, mean l_i (the negative ELBO) with its standard error and in bits per dimension
    (bpd: nats / (H * W * C * ln 2), the image shape from the lineage; MNIST's for tables without one)
    and, when the table has log_px, the mean NLL (-log p(x)) with its standard error, in bits per
    dimension (bpd_iw), and the gap (dropped for a table encoded with K = 0)."""
    con, relation, params = one_table(latents_dir, con, epoch, split)
    shape = read_lineage(latents_dir).image_shape or [28, 28, 1]
    result = run(con, latents_dir, TOTALS_SQL.format(latents=relation),
                 {**params, "num_subpixels": math.prod(shape)})
    if result.column("nll_mean").null_count == result.num_rows:
        result = result.drop_columns(["nll_mean", "nll_se", "bpd_iw", "gap_mean", "gap_se"])
    return result


def gap_by_digit(latents_dir: str, split: str | None = "test", *, epoch: int | None = None,
                 con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per digit (class): the mean evidence gap log p(x) + l_i with its standard error, mean NLL and
    mean l_i. Needs a table encoded with num_samples_iw > 0."""
    con, relation, params = one_table(latents_dir, con, epoch, split)
    require_log_px(con, latents_dir, relation, params)
    return run(con, latents_dir, GAP_BY_DIGIT_SQL.format(latents=relation), params, class_names(latents_dir))


def outliers(latents_dir: str, k: int = 10, split: str | None = None, *, epoch: int | None = None,
             con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k datapoints whose l_i lies furthest above their own class: z_score = (l_i - class mean)
    / class stddev, the class being the label within the datapoint's split; with global_rank, the
    rank of l_i among all rows selected (1 = highest)."""
    check_k(k)
    con, relation, params = one_table(latents_dir, con, epoch, split)
    return run(con, latents_dir, OUTLIERS_SQL.format(latents=relation), {**params, "k": k},
               class_names(latents_dir))

