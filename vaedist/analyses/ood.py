"""Out-of-distribution readout: how well one checkpoint's per-datapoint scores tell data it was not
trained on (OUT) from its own kind of data (IN). No Ray.

    print(format_table(ood("outputs/latents-fashion", "outputs/latents-mnist-by-fashion"), "table"))
    vaedist query ood --latents outputs/latents-fashion --against outputs/latents-mnist-by-fashion

The two tables are the test splits of data encoded by the same checkpoint (vaedist encode --shards
puts any data that fits through a model), with the same estimators (S, K). Two scores, higher = more
out of distribution: l_i (`loss`, the negative ELBO) and -log p(x) (`nll`, the importance-weighted
estimate; only where both tables have log_px). For each: AUROC, AUPR and the FPR at 95% TPR, with OUT
the positive class, and each table's mean score with its standard error. AUROC below 0.5 means the
model scores OUT as *more* likely than IN, as Nalisnick et al. (2019) found for VAEs trained on
Fashion-MNIST and shown MNIST.

One SQL query, like the comparisons' (the same {a}/{b} views, latents_a = IN, latents_b = OUT), over the
distinct score values, so ties count as they should and nothing loops over rows in Python:
- AUROC = P(s_out > s_in) + P(s_out = s_in) / 2: the Mann-Whitney rank statistic, summed over OUT
  datapoints as (#IN below + #IN equal / 2) / (n_in n_out);
- AUPR = average precision: the mean over OUT datapoints of the precision among all datapoints
  scoring at least as high (the area under the precision-recall step curve, as scikit-learn's
  average_precision_score);
- FPR at 95% TPR = the fraction of IN flagged at the highest threshold that flags >= 95% of OUT
  (flagged = score >= threshold).
"""

from __future__ import annotations

from typing import Any, Literal

import duckdb
import pyarrow as pa

from vaedist.analyses.core import EPOCH, VIEW_A, VIEW_B, QueryError, columns, connect_pair, read_lineage, run
from vaedist.lineage import Lineage

SCORES = {"loss": "l_i, the negative ELBO", "nll": "-log p(x), importance-weighted"}
# Lineage fields that make two tables' scores the same function of x: the same model (checkpoint and
# its epoch, evaluation binarisation, noise scheme) and the same estimators (S and K samples).
SAME_CHECKPOINT_FIELDS = ("checkpoint", "checkpoint_epoch", "binarize_seed", "noise_scheme")
SAME_ESTIMATOR_FIELDS = ("num_samples_mc", "num_samples_iw")

OOD_SQL = """\
WITH scores AS (
    SELECT 'loss' AS score, 0 AS is_out, loss AS s FROM {a} WHERE split = 'test'
    UNION ALL SELECT 'loss', 1, loss FROM {b} WHERE split = 'test'
    UNION ALL SELECT 'nll', 0, -log_px FROM {a} WHERE split = 'test' AND log_px IS NOT NULL
    UNION ALL SELECT 'nll', 1, -log_px FROM {b} WHERE split = 'test' AND log_px IS NOT NULL
),
moments AS (
    SELECT score,
           count(*) FILTER (WHERE is_out = 0)                                           AS in_count,
           avg(s) FILTER (WHERE is_out = 0)                                             AS in_mean,
           stddev_samp(s) FILTER (WHERE is_out = 0) / sqrt(count(*) FILTER (WHERE is_out = 0))  AS in_se,
           count(*) FILTER (WHERE is_out = 1)                                           AS out_count,
           avg(s) FILTER (WHERE is_out = 1)                                             AS out_mean,
           stddev_samp(s) FILTER (WHERE is_out = 1) / sqrt(count(*) FILTER (WHERE is_out = 1))  AS out_se
    FROM scores
    GROUP BY score
    HAVING count(*) FILTER (WHERE is_out = 0) > 0 AND count(*) FILTER (WHERE is_out = 1) > 0
),
levels AS (
    SELECT score, s, count(*) FILTER (WHERE is_out = 0) AS in_at, count(*) FILTER (WHERE is_out = 1) AS out_at
    FROM scores
    GROUP BY score, s
),
-- The threshold swept down through the distinct values; flagged = score >= s.
curve AS (
    SELECT score, s, in_at, out_at,
           sum(out_at) OVER down AS tp,
           sum(in_at) OVER down  AS fp,
           coalesce(sum(in_at) OVER (PARTITION BY score ORDER BY s
                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS in_below
    FROM levels
    WINDOW down AS (PARTITION BY score ORDER BY s DESC ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
),
metrics AS (
    SELECT c.score,
           sum(c.out_at * (c.in_below + 0.5 * c.in_at)) / (any_value(m.in_count) * any_value(m.out_count)) AS auroc,
           sum(c.out_at * c.tp / (c.tp + c.fp)) / any_value(m.out_count)                                   AS aupr,
           min(c.fp) FILTER (WHERE 100 * c.tp >= 95 * m.out_count) / any_value(m.in_count)                AS fpr95
    FROM curve AS c JOIN moments AS m USING (score)
    GROUP BY c.score
)
SELECT score, in_count, in_mean, in_se, out_count, out_mean, out_se,
       auroc::DOUBLE AS auroc, aupr::DOUBLE AS aupr, fpr95::DOUBLE AS fpr_at_95_tpr
FROM moments JOIN metrics USING (score)
ORDER BY score = 'nll', score"""


def _describe(path: str, lineage: Lineage) -> str:
    """A table's lineage in a line: which checkpoint encoded which data."""
    def known(value: Any) -> Any:
        return "?" if value is None else value

    return (f"{path}: checkpoint {known(lineage.checkpoint)} (epoch {known(lineage.checkpoint_epoch)}) "
            f"on {known(lineage.dataset)} (manifest {str(known(lineage.manifest_hash))[:12]}), "
            f"S = {known(lineage.num_samples_mc)}, K = {known(lineage.num_samples_iw)}")


def same_checkpoint(a: Lineage, b: Lineage) -> bool:
    """Whether two lineages name the same checkpoint (and so the same model and binarisation)."""
    named = all(getattr(a, field) is not None and getattr(a, field) == getattr(b, field)
                for field in ("checkpoint", "checkpoint_epoch"))
    return named and all(getattr(a, field) == getattr(b, field) for field in SAME_CHECKPOINT_FIELDS)


def same_data(a: Lineage, b: Lineage) -> bool:
    return bool(a.manifest_hash) and a.manifest_hash == b.manifest_hash


def pair_kind(latents_dir: str, against_dir: str) -> Literal["comparison", "ood"]:
    """Which two-table analysis fits: 'ood' for one checkpoint's encodings of two different data;
    otherwise 'comparison' (the same datapoints, l_i subtracted datapoint by datapoint, usually of two
    models), whose own checks refuse tables that are not of the same data, naming what differs."""
    a, b = read_lineage(latents_dir), read_lineage(against_dir)
    different_data = bool(a.manifest_hash) and bool(b.manifest_hash) and not same_data(a, b)
    return "ood" if different_data and same_checkpoint(a, b) else "comparison"


def check_ood_pair(latents_dir: str, against_dir: str) -> None:
    """Refuse tables that are not one checkpoint's encodings of two different data, or whose scores
    were estimated differently, naming both lineages."""
    a, b = read_lineage(latents_dir), read_lineage(against_dir)
    both = f"{_describe(latents_dir, a)}; {_describe(against_dir, b)}"
    if not same_checkpoint(a, b):
        raise QueryError(f"an out-of-distribution readout needs two tables encoded by the same checkpoint; "
                         f"these were not: {both}")
    estimators = [f"{field} {getattr(a, field)!r} vs {getattr(b, field)!r}" for field in SAME_ESTIMATOR_FIELDS
                  if getattr(a, field) != getattr(b, field)]
    if estimators:
        raise QueryError(f"latent tables {latents_dir} and {against_dir} estimate their scores with different "
                         f"numbers of samples ({'; '.join(estimators)}), so the scores are not the same function of "
                         "x; encode both with the same encode.num_samples_mc and encode.num_samples_iw")
    if same_data(a, b):
        raise QueryError(f"latent tables {latents_dir} and {against_dir} encode the same data (manifest "
                         f"{a.manifest_hash[:12]}): an out-of-distribution readout needs data of two kinds "
                         "(IN: --latents, OUT: --against)")


def ood(latents_dir: str, against_dir: str, *, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per score (loss = l_i; nll = -log p(x), when both tables have log_px): each table's test-split
    count, mean and standard error, and AUROC, AUPR and FPR at 95% TPR for telling OUT (against_dir)
    from IN (latents_dir), OUT positive, higher score = more out of distribution.

    Both tables must be encodings by one checkpoint with the same S and K, of different data, each
    with a test split and of one checkpoint (no epoch column). con: a connect_pair(latents_dir,
    against_dir)."""
    latents_dir, against_dir = str(latents_dir), str(against_dir)
    con = con or connect_pair(latents_dir, against_dir)  # first: a missing table is named as such
    check_ood_pair(latents_dir, against_dir)
    pair = f"{latents_dir} vs {against_dir}"
    for path, view in ((latents_dir, VIEW_A), (against_dir, VIEW_B)):
        if EPOCH in columns(con, path, view):
            raise QueryError(f"latent table {path} encodes several checkpoints (an epoch column); an "
                             "out-of-distribution readout takes tables of one checkpoint (vaedist encode without "
                             "--epochs)")
        n_test = run(con, path, f"SELECT count(*) AS n FROM {view} WHERE split = 'test'", {}).column("n")[0].as_py()
        if not n_test:
            raise QueryError(f"latent table {path} has no test split; encode it with encode.splits including test")
    return run(con, pair, OOD_SQL.format(a=VIEW_A, b=VIEW_B), {})
