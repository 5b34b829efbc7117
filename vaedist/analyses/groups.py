"""Analyses of latent tables of models with several latent groups (model.kind=hierarchical): which
group carries the KL, for which datapoints and classes, and how many of each group's units are
active. No Ray. Each is one SQL query kept below as a module constant, with DuckDB `$name`
parameters and {latents} filled before it runs (vaedist.analyses.core: one checkpoint of the table).

    from vaedist.analyses import active_units_by_group, kl_by_group
    kl_by_group("outputs/latents-hier-mnist", split="test")

Group numbers are 1-based, group 1 being z_1 (next to x), as in kl_groups (DuckDB lists are 1-based).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from vaedist.analyses.core import (QueryError, check_amount, check_split, columns, connect, one_table, read_lineage,
                                   run, run_classes)

# Each group's share of the KL two ways: of the total (sum kl_l / sum kl) and the mean over datapoints
# of kl_l / kl (a datapoint with kl = 0 counts in neither share's numerator, nor in the latter at all).
KL_BY_GROUP_SQL = """\
WITH terms AS (
    SELECT l.split, g AS "group", l.kl_groups[g] AS kl_group, l.kl
    FROM {latents} AS l, range(1, (SELECT len(kl_groups) FROM latents LIMIT 1) + 1) AS groups(g)
    WHERE $split IS NULL OR l.split = $split
)
SELECT split, "group", count(*) AS count, avg(kl_group) AS kl_mean,
       stddev_samp(kl_group) / sqrt(count(*)) AS kl_se,
       sum(kl_group) / sum(kl) AS kl_share_of_total,
       avg(kl_group / nullif(kl, 0)) AS kl_share_mean
FROM terms
GROUP BY split, "group"
ORDER BY split, "group\""""

KL_BY_GROUP_AND_CLASS_SQL = """\
WITH terms AS (
    SELECT l.label, g AS "group", l.kl_groups[g] AS kl_group, l.kl
    FROM {latents} AS l, range(1, (SELECT len(kl_groups) FROM latents LIMIT 1) + 1) AS groups(g)
    WHERE $split IS NULL OR l.split = $split
)
SELECT label, list_extract($class_names, label + 1) AS class, "group", count(*) AS count, avg(kl_group) AS kl_mean,
       sum(kl_group) / sum(kl) AS kl_share_of_total
FROM terms
GROUP BY label, "group"
ORDER BY label, "group\""""

# Burda et al. (2016)'s active units, Cov_x(E_q[z_d]) > threshold, per group. E_q[z_d] is the table's
# mu: exact for a group with no parent group in q (top-down: the top one; bottom-up: z_1), for the
# others q's mean with the parent groups at their own posterior means. $group_of_dim[d + 1] is the
# group of dimension d (0-based), from the lineage's latent_groups.
ACTIVE_UNITS_BY_GROUP_SQL = """\
WITH units AS (
    SELECT dim, l.mu[dim + 1]::DOUBLE AS mu_d
    FROM {latents} AS l, range((SELECT len(mu) FROM latents LIMIT 1)) AS dims(dim)
    WHERE $split IS NULL OR l.split = $split
),
per_dim AS (
    SELECT dim, var_pop(mu_d) AS mu_variance FROM units GROUP BY dim
)
SELECT $group_of_dim[dim + 1] AS "group", count(*) AS units,
       count(*) FILTER (WHERE mu_variance > $threshold) AS active_units
FROM per_dim
GROUP BY "group"
ORDER BY "group\""""


# Collapse over training: a table of several checkpoints (vaedist encode --epochs), each group's mean
# KL term and share per epoch; a group whose share falls to 0 has collapsed onto its prior.
KL_BY_GROUP_OVER_EPOCHS_SQL = """\
WITH terms AS (
    SELECT l.epoch, g AS "group", l.kl_groups[g] AS kl_group
    FROM latents AS l, range(1, (SELECT len(kl_groups) FROM latents LIMIT 1) + 1) AS groups(g)
    WHERE $split IS NULL OR l.split = $split
)
SELECT epoch, "group", count(*) AS count, avg(kl_group) AS kl_mean,
       sum(kl_group) / sum(sum(kl_group)) OVER (PARTITION BY epoch) AS kl_share_of_total
FROM terms
GROUP BY epoch, "group"
ORDER BY epoch, "group\""""


def _require_groups(names: list[str], latents_dir: str) -> None:
    if "kl_groups" not in names:
        raise QueryError(f"latent table {latents_dir} is of a model with one latent group (no kl_groups column); "
                         "the per-group analyses need a model of several (model.kind=hierarchical)")


def _grouped(latents_dir: str, con: duckdb.DuckDBPyConnection | None, epoch: int | None, split: str | None):
    con, relation, params = one_table(latents_dir, con, epoch, split)
    _require_groups(columns(con, latents_dir, "latents"), latents_dir)
    return con, relation, params


def kl_by_group(latents_dir: str, split: str | None = None, *, epoch: int | None = None,
                con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per split and latent group: the mean KL term (nats) with its standard error, its share of the
    total KL, and the mean over datapoints of its share of each datapoint's KL."""
    con, relation, params = _grouped(latents_dir, con, epoch, split)
    return run(con, latents_dir, KL_BY_GROUP_SQL.format(latents=relation), params)


def kl_by_group_and_class(latents_dir: str, split: str | None = "test", *, epoch: int | None = None,
                          con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per label (and class, where the lineage names them) and latent group: the mean KL term (nats)
    and its share of the class's total KL."""
    con, relation, params = _grouped(latents_dir, con, epoch, split)
    return run_classes(con, latents_dir, KL_BY_GROUP_AND_CLASS_SQL.format(latents=relation), params)


def active_units_by_group(latents_dir: str, threshold: float = 0.01, split: str | None = None, *,
                          epoch: int | None = None, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per latent group: its units and how many are active (the variance over datapoints of mu_d above
    threshold, Burda et al. 2016)."""
    threshold = check_amount(threshold, "threshold", "a variance of mu_d")
    con, relation, params = _grouped(latents_dir, con, epoch, split)
    sizes = read_lineage(latents_dir).latent_groups
    if not sizes:
        raise QueryError(f"latent table {latents_dir}: its lineage does not list latent_groups")
    group_of_dim = [g + 1 for g, size in enumerate(sizes) for _ in range(size)]
    return run(con, latents_dir, ACTIVE_UNITS_BY_GROUP_SQL.format(latents=relation),
               {**params, "threshold": threshold, "group_of_dim": group_of_dim})


def kl_by_group_over_epochs(latents_dir: str, split: str | None = "test", *,
                            con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per checkpoint epoch and latent group of a table of several checkpoints: the mean KL term
    (nats) and its share of the epoch's total KL."""
    check_split(split)
    con = con or connect(latents_dir)
    names = columns(con, latents_dir, "latents")
    if "epoch" not in names:
        raise QueryError(f"latent table {latents_dir} encodes one checkpoint (no epoch column); encode several "
                         "with vaedist encode --epochs to follow the groups over training")
    _require_groups(names, latents_dir)
    return run(con, latents_dir, KL_BY_GROUP_OVER_EPOCHS_SQL, {"split": split})
