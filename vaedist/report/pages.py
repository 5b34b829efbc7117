"""HTML: the page around the sections, tables, figures with captions, the inputs and the lineage,
and the formatting of numbers and epoch lists in them."""

from __future__ import annotations

import html
import json
import math
from typing import Any

import pyarrow as pa

from vaedist.lineage import Lineage


def _pm(mean: float | None, se: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f} ± {se:.2f}" if se is not None and math.isfinite(se) else f"{mean:.2f}"


def _rows_html(header: list[str], rows: list[list[Any]], css_class: str) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.2f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>\n" for row in rows)
    return f'<table class="{css_class}">\n<tr>{head}</tr>\n{body}</table>'


def _html_table(table: pa.Table, css_class: str) -> str:
    return _rows_html(table.column_names, [list(row.values()) for row in table.to_pylist()], css_class)


def _figure_html(name: str, title: str, caption: str, level: int = 2) -> str:
    return (f'<figure><h{level}>{html.escape(title)}</h{level}><img src="{html.escape(name)}" '
            f'alt="{html.escape(title)}"><figcaption>{html.escape(caption)}</figcaption></figure>')


def _page(title: str, body: list[str]) -> str:
    # The empty icon: otherwise browsers ask the server for /favicon.ico, a 404 on every view.
    return "\n".join([
        "<!DOCTYPE html>",
        (f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        '<link rel="icon" href="data:,">'),
        ("<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        # Long paths wrap, and long lineage lines scroll in their box, rather than widen the page.
        "figure{margin:2em 0}img{max-width:100%}figcaption{color:#444}code{overflow-wrap:anywhere}"
        "pre{overflow-x:auto}</style></head><body>"),
        f"<h1>{html.escape(title)}</h1>", *body, "</body></html>", ""])


def _inputs_html(inputs: dict[str, str]) -> str:
    return "\n".join(["<ul>", *(f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>"
                                for k, v in inputs.items()), "</ul>"])


def _lineage_html(lineage: Lineage) -> list[str]:
    return ["<h2>Lineage</h2>", f"<pre>{html.escape(json.dumps(lineage.to_dict(), indent=2, sort_keys=True))}</pre>"]


def _format_epochs(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs)) if len(epochs) <= 12 else \
        f"{', '.join(map(str, epochs[:5]))}, …, {', '.join(map(str, epochs[-5:]))}"
