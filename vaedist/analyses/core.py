"""The analyses' shared machinery: opening a published latent table in DuckDB, running SQL over it,
scoping an analysis to one checkpoint. No Ray.

    con = connect("outputs/latents")   # a view named `latents`, one row per datapoint
    con.sql("SELECT label, avg(loss) FROM latents GROUP BY label").show()
    run_sql("outputs/latents", "SELECT count(*) AS n FROM latents WHERE label = $label", params={"label": 3})

A published table is a directory (local or s3://...) of Parquet files, possibly one level of
hive partitions, beside `_lineage.json` and `_SUCCESS`; names starting with `_` or `.` (the
encode job's staging directories) are not part of it. The analyses themselves live beside this
module (one_table, compare, dynamics, ood), each one SQL query kept as a module constant with
DuckDB's `$name` parameters; vaedist.analyses.ANALYSES lists them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vaedist import schema, storage, tables
from vaedist.lineage import Lineage, LineageError
from vaedist.lineage import read_lineage as _read_lineage_file

SPLITS = ("train", "test")
SPACES = ("mu", "z")
EPOCH = "epoch"
VIEW_A, VIEW_B = "latents_a", "latents_b"
CLASS_COLUMN = "class"
SOURCE = "source"
EPOCHS_SQL = "SELECT DISTINCT epoch FROM {latents} ORDER BY epoch"
_MAX_MESSAGE = 600  # characters of a DuckDB error kept in a QueryError


class QueryError(ValueError):
    """A latent table that cannot be read, or a query that fails; the message names the table or the SQL problem."""


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
            record = Lineage.from_dict(json.loads(f.read()), f"{root}/{schema.LINEAGE_FILE}")
        job = record.job or {}
        written = f"; written by `{job['command']}` on {job.get('host', '?')} at {job.get('started', '?')}" \
            if job.get("command") else ""
        why += f"{written}, encoding checkpoint {record.checkpoint or '?'}"
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


def cursor() -> duckdb.DuckDBPyConnection:
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
    con = cursor() if own else con
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


def read_lineage(latents_dir: str) -> Lineage:
    """The table's `_lineage.json` (checkpoint, shards_dir, latent_dim, seeds, config, ...)."""
    try:
        return _read_lineage_file(tables.find(str(latents_dir)) or str(latents_dir))
    except LineageError as e:
        raise QueryError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Running SQL.

def _trim(error: Exception) -> str:
    text = str(error).strip()
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE] + " …"


def execute(con: duckdb.DuckDBPyConnection, latents_dir: str, sql: str,
            params: dict[str, Any] | None = None) -> pa.Table:
    """sql's result on con as an Arrow table; a DuckDB, Arrow or OS error becomes a QueryError naming the table."""
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
    return execute(con or connect(latents_dir), str(latents_dir), sql, params)


def check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise QueryError(f"split must be one of {', '.join(SPLITS)} or None (both), got {split!r}")


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise QueryError(f"k must be a positive integer, got {k!r}")


# ---------------------------------------------------------------------------------------------
# Scoping and running an analysis. An analysis takes the table's path and optionally a connection
# to reuse. On a table that encodes several checkpoints of one run, `epoch` picks one (required
# unless it holds a single epoch); on a table of one checkpoint it must be left out. {latents} in an
# analysis's SQL is filled with the view `latents`, or on a table of several checkpoints (one with
# an `epoch` column) `(SELECT * FROM latents WHERE epoch = $epoch)`; {a}, {b} likewise for the two
# tables of a comparison, views `latents_a` and `latents_b`. `class` (the lineage's
# class_names[label]) is dropped from a result when the lineage has no class_names.

_PARAM = re.compile(r"\$([A-Za-z_]\w*)")


def run(con: duckdb.DuckDBPyConnection, latents_dir: str, sql: str, params: dict[str, Any],
        class_names: list[str] | None = None) -> pa.Table:
    """Run sql with the params it names (DuckDB refuses unused ones); drop `class` without names, and
    `source` where it is NULL throughout (a table written before that column)."""
    used = set(_PARAM.findall(sql))
    params = {**params, "class_names": class_names or []}
    result = execute(con, str(latents_dir), sql, {k: v for k, v in params.items() if k in used})
    if not class_names and CLASS_COLUMN in result.column_names:
        result = result.drop_columns([CLASS_COLUMN])
    if SOURCE in result.column_names and result.column(SOURCE).null_count == result.num_rows:
        result = result.drop_columns([SOURCE])
    return result


def run_classes(con: duckdb.DuckDBPyConnection, latents_dir: str, sql: str, params: dict[str, Any],
                classes: bool = True) -> pa.Table:
    """run() with `class` from the lineage's class_names where the table has a lineage (a table
    without _lineage.json, written by other tools, names no classes)."""
    names = None
    if classes and storage.exists(storage.join(str(latents_dir), schema.LINEAGE_FILE)):
        names = class_names(latents_dir)
    return run(con, str(latents_dir), sql, params, names)


def class_names(latents_dir: str) -> list[str] | None:
    """The lineage's class_names (index = label), or None when the dataset names no classes."""
    return read_lineage(latents_dir).class_names  # checked a list of strings as it is read


def columns(con: duckdb.DuckDBPyConnection, latents_dir: str, view: str) -> list[str]:
    return execute(con, str(latents_dir), f"SELECT * FROM {view} LIMIT 0").column_names


def epochs_in(con: duckdb.DuckDBPyConnection, latents_dir: str, view: str = "latents") -> list[int]:
    # The encode job writes the epochs into the lineage after checking them against the rows; reading
    # them there saves a scan of the epoch column per call. Tables without that field are scanned.
    listed = read_lineage(latents_dir).epochs
    if isinstance(listed, list) and listed and all(isinstance(e, int) and not isinstance(e, bool) for e in listed):
        return sorted(listed)
    return execute(con, str(latents_dir), EPOCHS_SQL.format(latents=view)).column(EPOCH).to_pylist()


def format_epochs(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs)) if len(epochs) <= 12 else \
        f"{', '.join(map(str, epochs[:5]))}, …, {', '.join(map(str, epochs[-5:]))} ({len(epochs)} epochs)"


def check_epoch(latents_dir: str, epoch: Any, epochs: list[int], what: str = "epoch") -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise QueryError(f"{what} must be an integer epoch, got {epoch!r}")
    if epoch not in epochs:
        raise QueryError(f"{what} {epoch} is not in latent table {latents_dir}; it holds epochs "
                         f"{format_epochs(epochs)}")


def check_amount(value: Any, name: str, unit: str = "nats") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise QueryError(f"{name} must be a finite number >= 0 ({unit}), got {value!r}")
    return float(value)


def check_optional_k(k: int | None) -> None:
    if k is not None:
        check_k(k)


def _flag(option: str) -> str:
    return "vaedist query --" + option.replace("_", "-")


def scope(con: duckdb.DuckDBPyConnection, latents_dir: str, view: str, epoch: int | None,
          param: str = "epoch", option: str = "epoch") -> tuple[str, dict[str, Any]]:
    """(relation, params) for one checkpoint of a table: the view itself for a table without an
    epoch column; one epoch's rows of a table with one (required unless it holds a single epoch)."""
    if EPOCH not in columns(con, latents_dir, view):
        if epoch is not None:
            raise QueryError(f"latent table {latents_dir} has no epoch column (it encodes one checkpoint); "
                             f"leave out {option}={epoch} ({_flag(option)})")
        return view, {}
    epochs = epochs_in(con, latents_dir, view)
    if epoch is None:
        if len(epochs) != 1:
            raise QueryError(f"latent table {latents_dir} encodes several checkpoints (epochs "
                             f"{format_epochs(epochs)}); pick one with {option}= ({_flag(option)})")
        epoch = epochs[0]
    check_epoch(latents_dir, epoch, epochs)
    return f"(SELECT * FROM {view} WHERE epoch = ${param})", {param: epoch}


def table_epochs(latents_dir: str, *, con: duckdb.DuckDBPyConnection | None = None) -> list[int]:
    """The epochs a table of several checkpoints holds, ascending; [] for a table without an epoch column."""
    con = con or connect(latents_dir)
    return epochs_in(con, latents_dir) if EPOCH in columns(con, latents_dir, "latents") else []


def one_table(latents_dir: str, con: duckdb.DuckDBPyConnection | None, epoch: int | None,
              split: str | None) -> tuple[duckdb.DuckDBPyConnection, str, dict[str, Any]]:
    """(connection, relation for {latents}, params) for one checkpoint of the table."""
    check_split(split)
    con = con or connect(latents_dir)
    relation, params = scope(con, latents_dir, "latents", epoch)
    return con, relation, {**params, "split": split}


def require_log_px(con: duckdb.DuckDBPyConnection, latents_dir: str, relation: str,
                   params: dict[str, Any]) -> None:
    sql = f"SELECT count(log_px) AS n FROM {relation}"
    if not run(con, latents_dir, sql, params).column("n")[0].as_py():
        raise QueryError(f"latent table {latents_dir} has no log_px values (it was encoded with "
                         "encode.num_samples_iw = 0); encode again with num_samples_iw > 0 to estimate gaps")


def connect_pair(latents_dir: str, against_dir: str,
                 con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
    """One connection with views latents_a (latents_dir) and latents_b (against_dir)."""
    con = connect(latents_dir, view=VIEW_A, con=con)
    return connect(against_dir, view=VIEW_B, con=con)
