"""Training dynamics over a latent table that encodes several checkpoints of one run (an `epoch`
column, one row per datapoint per kept checkpoint; `vaedist encode --epochs`). No Ray.

    curves("outputs/latents-epochs", keys=["test-00042"])
    learned_late("outputs/latents-epochs", within=1.0, after=5)
    forgotten("outputs/latents-epochs", by=2.0)

"final" is the last epoch in the table. Each analysis is one SQL query kept below as a module
constant, with DuckDB `$name` parameters; `$split` NULL means both splits.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from vaedist.analyses.core import (EPOCH, QueryError, check_amount, check_epoch, check_k, check_optional_k,
                                   check_split, class_names, columns, connect, epochs_in, run)

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
# Training dynamics.

def _dynamics(latents_dir: str, con: duckdb.DuckDBPyConnection | None, split: str | None
              ) -> tuple[duckdb.DuckDBPyConnection, list[int]]:
    check_split(split)
    con = con or connect(latents_dir)
    if EPOCH not in columns(con, latents_dir, "latents"):
        raise QueryError(f"latent table {latents_dir} has no epoch column: it encodes one checkpoint. Training "
                         "dynamics need a table that encodes several checkpoints of one run (one row per "
                         "datapoint per checkpoint, with an epoch column)")
    return con, epochs_in(con, latents_dir)


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
    check_k(k)
    result = run(con, latents_dir, CURVES_SQL, {"keys": keys, "k": k, "split": split}, class_names(latents_dir))
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
    return run(con, latents_dir, DIGIT_CURVES_SQL, {"split": split}, class_names(latents_dir))


def learned_late(latents_dir: str, within: float = 1.0, after: int | None = None, split: str | None = None,
                 k: int | None = None, *, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Datapoints whose l_i first comes within `within` nats of its final (last-epoch) value only
    after epoch `after` (a kept epoch; default the first): key, label, first_epoch_within, l_i at the
    first, `after` and last epochs, improvement = first - final. Latest first; k caps the rows."""
    within = check_amount(within, "within")
    check_optional_k(k)
    con, epochs = _dynamics(latents_dir, con, split)
    after = epochs[0] if after is None else after
    check_epoch(latents_dir, after, epochs, "after: epoch")
    return run(con, latents_dir, LEARNED_LATE_SQL, {"within": within, "after": after, "split": split, "k": k},
                class_names(latents_dir))


def forgotten(latents_dir: str, by: float = 2.0, split: str | None = None, k: int | None = None, *,
              from_epoch: int | None = None, to_epoch: int | None = None,
              con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Datapoints whose l_i rose by more than `by` nats: by default between any two consecutive kept
    epochs, reporting each one's largest rise, where it happened and its final l_i; with from_epoch
    and to_epoch, between those two. Largest rise first; k caps the rows."""
    by = check_amount(by, "by")
    check_optional_k(k)
    con, epochs = _dynamics(latents_dir, con, split)
    params = {"by": by, "split": split, "k": k}
    if from_epoch is None and to_epoch is None:
        return run(con, latents_dir, FORGOTTEN_SQL, params, class_names(latents_dir))
    if from_epoch is None or to_epoch is None:
        raise QueryError("give both from_epoch and to_epoch (or neither, for consecutive epochs), "
                         f"got from_epoch={from_epoch!r}, to_epoch={to_epoch!r}")
    check_epoch(latents_dir, from_epoch, epochs, "from_epoch")
    check_epoch(latents_dir, to_epoch, epochs, "to_epoch")
    if from_epoch >= to_epoch:
        raise QueryError(f"from_epoch must come before to_epoch, got {from_epoch} and {to_epoch}")
    return run(con, latents_dir, FORGOTTEN_BETWEEN_SQL,
                {**params, "from_epoch": from_epoch, "to_epoch": to_epoch}, class_names(latents_dir))
