"""Printing a result (an Arrow table) for the terminal or a pipe: aligned columns, CSV or JSON lines.

    print(format_table(loss_by_digit("outputs/latents"), "table"))
"""

from __future__ import annotations

import csv
import io
import json
import math
from decimal import Decimal
from typing import Any, Literal

import numpy as np
import pyarrow as pa

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
