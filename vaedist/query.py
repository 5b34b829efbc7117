"""SQL over a published latent table with DuckDB, and the ready-made analyses. No Ray.

    con = connect("outputs/latents")   # a view named `latents`, one row per datapoint
    con.sql("SELECT label, avg(loss) FROM latents GROUP BY label").show()
    print(format_table(loss_by_digit("outputs/latents"), "table"))
    worst_explained("outputs/latents-epochs", k=5, epoch=2)   # one checkpoint of a table of several

A published table is a directory (local or s3://...) of Parquet files, possibly one level of
hive partitions, beside `_lineage.json` and `_SUCCESS`; names starting with `_` or `.` (the
encode job's staging directories) are not part of it. Each analysis is one SQL query, kept below
as a module constant so the README can quote it; parameters are DuckDB's `$name` placeholders.
"""

from __future__ import annotations

import csv
import io
import json
import math
from decimal import Decimal
from typing import Any, Literal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vaedist import schema, storage, tables

SPLITS = ("train", "test")
SPACES = ("mu", "z")
_MAX_MESSAGE = 600  # characters of a DuckDB error kept in a QueryError


class QueryError(ValueError):
    """A latent table that cannot be read, or a query that fails; the message names the table or the SQL problem."""


# ---------------------------------------------------------------------------------------------
# The analyses' SQL. `$split` NULL means both splits. {latents} is filled before a query runs, as in
# analysis.py: the view `latents`, or on a table of several checkpoints (one with an `epoch` column)
# `(SELECT * FROM latents WHERE epoch = $epoch)`, so that each analysis sees one checkpoint. `class`
# (the lineage's class_names[label]) is dropped from a result when the dataset names no classes.

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


# ---------------------------------------------------------------------------------------------
# Opening a table.

def _not_published(latents_dir: str, why: str) -> QueryError:
    return QueryError(f"{latents_dir} is not a published vaedist latent table: {why}")


def _is_hidden(name: str) -> bool:
    return name.startswith(("_", "."))


def table_files(latents_dir: str) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, sorted Parquet file paths) of a published table, checked for `_SUCCESS`."""
    fs, _, files = _table_files(latents_dir)
    return fs, files


def _table_files(latents_dir: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """(filesystem, root, files): the table found at latents_dir (vaedist.tables.find: a publish that
    was interrupted is read from the complete table it left beside)."""
    latents_dir = str(latents_dir)
    fs, root = storage.resolve(tables.find(latents_dir) or latents_dir)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise _not_published(latents_dir, "it does not exist")
    if info.type != pafs.FileType.Directory:
        raise _not_published(latents_dir, "it is not a directory")
    root = root.rstrip("/")
    files = []
    for entry in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        parts = entry.path[len(root) + 1:].split("/")
        if entry.type == pafs.FileType.File and entry.path.endswith(".parquet") and not any(map(_is_hidden, parts)):
            files.append(entry.path)
    if not files:
        raise _not_published(latents_dir, "it holds no .parquet files")
    if fs.get_file_info(f"{root}/{schema.SUCCESS_FILE}").type != pafs.FileType.File:
        raise _not_published(latents_dir, _unfinished(fs, root))
    return fs, root, sorted(files)


def _unfinished(fs: pafs.FileSystem, root: str) -> str:
    """Why a directory of Parquet files without _SUCCESS is not a table: an encode job that has not
    finished (or died), named as far as its files tell."""
    name = root.rsplit("/", 1)[-1]
    why = f"it has no {schema.SUCCESS_FILE} marker: it is unfinished"
    if ".staging-" in name:
        why += f" (the staging directory of an encode job publishing to {name.split('.staging-')[0].lstrip('.')})"
    try:
        with fs.open_input_stream(f"{root}/{schema.LINEAGE_FILE}") as f:
            lineage = json.loads(f.read())
        job = lineage.get("job") or {}
        written = f"; written by `{job['command']}` on {job.get('host', '?')} at {job.get('started', '?')}" \
            if job.get("command") else ""
        why += f"{written}, encoding checkpoint {lineage.get('checkpoint', '?')}"
    except (OSError, ValueError, AttributeError):
        why += "; written by an encode job that had not yet written its lineage"
    return why + (". Wait for that job, or run the same `vaedist encode` again (it keeps the files finished and "
                  "publishes the table whole)")


def _hive(root: str, files: list[str]) -> bool:
    """Partition directories named key=value, as Ray Data writes with partition_cols."""
    return any("=" in part for f in files for part in f[len(root):].split("/")[:-1])


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


_database: duckdb.DuckDBPyConnection | None = None


def _cursor() -> duckdb.DuckDBPyConnection:
    """A fresh connection to one in-memory database per process: opening a DuckDB database costs
    ~20 ms, a cursor nothing, and a cursor's temporary views and registrations are its own."""
    global _database
    if _database is None:
        _database = duckdb.connect()
    con = _database.cursor()
    con.execute("SET enable_progress_bar = false")  # library calls must not draw on the terminal
    return con


def _select_list(names: list[str], casts: list[str]) -> str:
    """The view's columns: all of the files' (with `casts` replacing some), plus `source` as NULL for a
    table written before that column existed, in its place after `shard`: every reader sees one shape."""
    replace = f" REPLACE ({', '.join(casts)})" if casts else ""
    if "source" in names:
        return f"*{replace}"
    if "shard" not in names:  # not laid out as vaedist writes tables: the column goes last
        return f"*{replace}, NULL::VARCHAR AS source"
    first = ", ".join(f'"{n}"' for n in names[:names.index("shard") + 1])
    return f"{first}, NULL::VARCHAR AS source, * EXCLUDE ({first}){replace}"


def connect(latents_dir: str, *, view: str = schema.VIEW_NAME,
            con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with a view `latents` over the published table at latents_dir.
    view names the view otherwise; con adds it to that connection (e.g. two tables side by side).
    A table written before the `source` column existed reads with source NULL."""
    latents_dir = str(latents_dir)
    fs, root, files = _table_files(latents_dir)
    hive = _hive(root, files)
    own = con is None
    con = _cursor() if own else con
    try:
        if storage.is_uri(latents_dir):
            # DuckDB's httpfs extension cannot be installed offline; pyarrow's S3 client is built in.
            dataset = pads.dataset(files, filesystem=fs, format="parquet",
                                   partitioning="hive" if hive else None, partition_base_dir=root)
            if "source" in dataset.schema.names:
                con.register(view, dataset)
            else:
                con.register(f"_{view}_files", dataset)
                con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT "
                            f"{_select_list(dataset.schema.names, [])} FROM _{view}_files")
        else:
            # DuckDB reads fixed-size lists back from Parquet as FLOAT[]; cast to FLOAT[n] so the
            # view has the same types as an Arrow scan (and array_distance works directly).
            file_schema = pq.read_schema(files[0])
            casts = [f"{c}::FLOAT[{file_schema.field(c).type.list_size}] AS {c}" for c in schema.VECTOR_COLUMNS
                     if c in file_schema.names and pa.types.is_fixed_size_list(file_schema.field(c).type)]
            file_list = ", ".join(_sql_string(f) for f in files)
            con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT {_select_list(file_schema.names, casts)} FROM "
                        f"read_parquet([{file_list}], hive_partitioning = {str(hive).lower()})")
    except (duckdb.Error, pa.ArrowException, OSError) as e:
        if own:
            con.close()
        raise QueryError(f"latent table {latents_dir} cannot be read: {_trim(e)}") from None
    return con


def read_lineage(latents_dir: str) -> dict[str, Any]:
    """The table's `_lineage.json` (checkpoint, shards_dir, latent_dim, seeds, config, ...)."""
    path = storage.join(tables.find(str(latents_dir)) or str(latents_dir), schema.LINEAGE_FILE)
    if not storage.exists(path):
        raise QueryError(f"{path} not found: {latents_dir} is not a published vaedist latent table")
    return storage.read_json_object(path, QueryError)


# ---------------------------------------------------------------------------------------------
# Running SQL.

def _trim(error: Exception) -> str:
    text = str(error).strip()
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " …"


def _execute(con: duckdb.DuckDBPyConnection, latents_dir: str, sql: str,
             params: dict[str, Any] | None = None) -> pa.Table:
    try:
        relation = con.sql(sql, params=params)
        return relation.to_arrow_table() if relation is not None else pa.table({})
    except (duckdb.Error, pa.ArrowException, OSError) as e:  # Arrow/OS: a URI table's scan failing
        raise QueryError(f"query on latent table {latents_dir} failed: {_trim(e)}") from None


def run_sql(latents_dir: str, sql: str, *, params: dict[str, Any] | None = None,
            con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The result of `sql` (which reads the view `latents`) as an Arrow table; a statement that
    returns no rows (e.g. COPY) gives an empty table. params fill `$name` placeholders; con
    reuses a connect(latents_dir)."""
    if not sql or not sql.strip():
        raise QueryError("empty SQL: give a query over the view 'latents', e.g. "
                         "SELECT label, avg(loss) FROM latents GROUP BY label")
    return _execute(con or connect(latents_dir), str(latents_dir), sql, params)


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise QueryError(f"split must be one of {', '.join(SPLITS)} or None (both), got {split!r}")


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise QueryError(f"k must be a positive integer, got {k!r}")


# ---------------------------------------------------------------------------------------------
# Ready-made analyses. Each takes the table's path and optionally a connection to reuse. On a table
# that encodes several checkpoints of one run, `epoch` picks one (required unless it holds a single
# epoch); on a table of one checkpoint it must be left out. The scoping is analysis.py's, so that
# every one-table analysis treats epochs alike. analysis.py builds on this module, hence the imports
# inside the functions.

def _one_checkpoint(latents_dir: str, con: duckdb.DuckDBPyConnection | None, epoch: int | None,
                    split: str | None) -> tuple[duckdb.DuckDBPyConnection, str, dict[str, Any]]:
    """(connection, relation for {latents}, params) for one checkpoint of the table."""
    from vaedist.analysis import _one_table

    return _one_table(str(latents_dir), con, epoch, split)


def _run(con: duckdb.DuckDBPyConnection, latents_dir: str, sql: str, params: dict[str, Any],
         classes: bool = True) -> pa.Table:
    """Run sql with the params it names; `class` from the lineage's class_names, dropped without
    them (a table without _lineage.json, written by other tools, names no classes)."""
    from vaedist.analysis import _run as run
    from vaedist.analysis import class_names

    names = None
    if classes and storage.exists(storage.join(str(latents_dir), schema.LINEAGE_FILE)):
        names = class_names(latents_dir)
    return run(con, str(latents_dir), sql, params, names)


def loss_by_digit(latents_dir: str, split: str | None = "test", *, epoch: int | None = None,
                  con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """Per digit (class): count, mean and 10/50/90th percentiles of l_i, mean recon_nll and kl, and
    mean gap when the table has log_px (gap_mean is dropped for a table encoded with K = 0)."""
    con, relation, params = _one_checkpoint(latents_dir, con, epoch, split)
    result = _run(con, latents_dir, LOSS_BY_DIGIT_SQL.format(latents=relation), params)
    if result.column("gap_mean").null_count == result.num_rows:
        result = result.drop_columns(["gap_mean"])
    return result


def worst_explained(latents_dir: str, k: int = 10, split: str | None = None, *, epoch: int | None = None,
                    con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k datapoints with the highest l_i (ties by key), highest first."""
    _check_k(k)
    con, relation, params = _one_checkpoint(latents_dir, con, epoch, split)
    return _run(con, latents_dir, WORST_EXPLAINED_SQL.format(latents=relation), {**params, "k": k})


def largest_gaps(latents_dir: str, k: int = 10, split: str | None = None, *, epoch: int | None = None,
                 con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k datapoints with the largest gap = log_px + l_i, the estimated KL(q(z|x) || p(z|x))."""
    from vaedist.analysis import _require_log_px

    _check_k(k)
    con, relation, params = _one_checkpoint(latents_dir, con, epoch, split)
    _require_log_px(con, str(latents_dir), relation, params)
    return _run(con, latents_dir, LARGEST_GAPS_SQL.format(latents=relation), {**params, "k": k})


def neighbours(latents_dir: str, key: str, k: int = 10, space: Literal["mu", "z"] = "mu", *,
               epoch: int | None = None, con: duckdb.DuckDBPyConnection | None = None) -> pa.Table:
    """The k datapoints nearest to `key` by Euclidean distance in `space` (mu or z), nearest first,
    among the rows of the same checkpoint. The query datapoint itself is excluded from the result."""
    _check_k(k)
    if space not in SPACES:
        raise QueryError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
    con, relation, params = _one_checkpoint(latents_dir, con, epoch, None)
    params = {**params, "key": key, "k": k}
    count = _run(con, latents_dir, KEY_COUNT_SQL.format(latents=relation), params, classes=False)
    found = count.column("n")[0].as_py()
    if found == 0:
        raise QueryError(f"key {key!r} is not in latent table {latents_dir} (keys look like 'test-00042')")
    if found > 1:
        raise QueryError(f"key {key!r} appears {found} times in latent table {latents_dir}; "
                         "a published table holds each datapoint once (per checkpoint)")
    return _run(con, latents_dir, NEIGHBOURS_SQL.format(space=space, latents=relation), params)


# ---------------------------------------------------------------------------------------------
# Printing results.

def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _short_float32(values: list) -> list:
    """float32 values as the shortest decimals that read back to the same float32 (0.1, not
    0.10000000149011612), so CSV and JSON stay readable and still round-trip."""
    arr = np.array([np.nan if v is None else v for v in values], np.float32)
    return [None if v is None else s for v, s in zip(values, arr.astype(str).astype(np.float64).tolist())]


def _column_values(column: pa.ChunkedArray) -> list:
    values = column.to_pylist()
    t = column.type
    if pa.types.is_float32(t):
        return _short_float32(values)
    if _is_list(t) and pa.types.is_float32(t.value_type):
        flat = _short_float32([x for v in values if v is not None for x in v])
        out, at = [], 0
        for v in values:
            out.append(None if v is None else flat[at:at + len(v)])
            at += 0 if v is None else len(v)
        return out
    return values


def _finite(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)  # dates, times, intervals


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0 or 1e-3 <= abs(value) < 1e7:
            return f"{value:.4f}"
        return f"{value:.4e}"
    if isinstance(value, list):
        if len(value) <= 3:
            return "[" + ", ".join(_vector_item(v) for v in value) + "]"
        return "[" + ", ".join(_vector_item(v) for v in value[:2]) + f", … ({len(value)})]"
    if isinstance(value, dict):
        return json.dumps(value, default=_json_default)
    return str(value)


def _vector_item(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else _cell(value)


def format_table(table: pa.Table, fmt: Literal["table", "csv", "json"] = "table") -> str:
    """Render a result for the terminal or a pipe; the text ends with a newline.

    table: aligned columns, floats to 4 decimals, vectors shortened to `[0.12, -0.40, … (50)]`,
           and a row count. csv: a header row, then one row per record; vectors as JSON arrays,
           nulls empty. json: JSON lines, one object per record; NaN and infinities as null.
    """
    columns = {name: _column_values(table.column(name)) for name in table.column_names}
    rows = list(zip(*columns.values())) if columns else []
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(table.column_names)
        for row in rows:
            writer.writerow(["" if v is None else json.dumps(v, default=_json_default) if isinstance(v, (list, dict))
                             else v for v in row])
        return buf.getvalue()
    if fmt == "json":
        return "".join(json.dumps(dict(zip(table.column_names, map(_finite, row))), default=_json_default,
                                  allow_nan=False) + "\n" for row in rows)
    if fmt == "table":
        header = table.column_names
        cells = [[_cell(v) for v in row] for row in rows]
        widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
        right = [_is_numeric(table.schema.field(i).type) for i in range(len(header))]

        def line(items: list[str]) -> str:
            return "  ".join(s.rjust(w) if r else s.ljust(w) for s, w, r in zip(items, widths, right)).rstrip()

        lines = [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]
        lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
        return "\n".join(lines) + "\n"
    raise ValueError(f"format must be one of table, csv, json, got {fmt!r}")
