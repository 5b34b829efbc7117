"""sweep.html: a sweep's final test loss against each swept value, every trial's test loss by epoch
(where a scheduler stopped trials, where), the best trials and the whole sweep.parquet.

    vaedist report --sweep debug-sweep --out outputs/report-debug-sweep
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

import matplotlib.style
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vaedist import storage
from vaedist.checkpoint import read_metrics
from vaedist.report.figures import _save
from vaedist.report.pages import _figure_html, _page, _rows_html
from vaedist.sweep.results import read_table, swept_keys

SWEEP_PAGE = "sweep.html"
CURVES_FIGURE = "sweep-curves.png"
BEST_SHOWN = 5
STATUS_STYLE = {"finished": ("C0", "o"), "stopped": ("C3", "x"), "error": ("0.5", "s"), "running": ("0.5", "^")}
TABLE_COLUMNS = ("name", "status", "epochs_run", "epochs", "train_loss", "test_loss", "test_nll_iw", "wall_s")


def _value_figure_name(key: str) -> str:
    return "sweep-" + "".join(c if c.isalnum() else "_" for c in key) + ".png"


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _by_value(rows: list[dict], key: str) -> tuple[Figure, str]:
    """Final test loss of each trial against its value of `key`: a log axis for positive numbers
    spanning more than a decade (learning rates), categories for anything else."""
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    values = [r[key] for r in rows if r["test_loss"] is not None]
    numeric = bool(values) and _numeric(values)
    categories = sorted({json.dumps(v) for v in values}) if not numeric else []
    for status, (colour, marker) in STATUS_STYLE.items():
        picked = [r for r in rows if r["status"] == status and r["test_loss"] is not None]
        if picked:
            xs = [r[key] if numeric else categories.index(json.dumps(r[key])) for r in picked]
            ax.scatter(xs, [r["test_loss"] for r in picked], color=colour, marker=marker, label=status)
    if numeric and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_xscale("log")
    if categories:
        ax.set_xticks(range(len(categories)), categories)
    ax.set_xlabel(key)
    ax.set_ylabel("test l_i (nats), last evaluated epoch")
    ax.legend(fontsize="small")
    fig.tight_layout()
    caption = (f"Each trial's mean test l_i at its last evaluated epoch against its {key}; trials stopped early "
               "by the scheduler are marked x at the epoch they reached.")
    return fig, caption


def _curves(rows: list[dict]) -> tuple[Figure, str]:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        metrics = read_metrics(row["run_dir"]) if storage.exists(row["run_dir"]) else []
        points = sorted((r["epoch"], r["test_loss"]) for r in metrics if r.get("kind") == "epoch"
                        and isinstance(r.get("test_loss"), (int, float)) and math.isfinite(r["test_loss"]))
        if points:
            colour, marker = STATUS_STYLE.get(row["status"], ("0.5", "."))
            ax.plot([p[0] for p in points], [p[1] for p in points], color=colour, alpha=0.7, linewidth=1,
                    marker=marker if row["status"] == "stopped" else None, markevery=[-1])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test l_i (nats)")
    fig.tight_layout()
    return fig, "Every trial's test l_i by epoch (blue: finished; red, ending in x: stopped by the scheduler)."


def _cell(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) and not math.isnan(value) else value


def write_sweep_report(sweep_dir: str, out_dir: str) -> str:
    """Write sweep.html and its figures into out_dir; returns the page's path."""
    table = read_table(sweep_dir)
    keys = swept_keys(table)
    rows = table.to_pylist()
    body = [f"<p>Sweep <code>{html.escape(sweep_dir)}</code>: {len(rows)} trials, "
            + ", ".join(f"{sum(r['status'] == s for r in rows)} {s}" for s in ("finished", "stopped", "error",
                                                                                  "running", "pending")
                        if any(r["status"] == s for r in rows)) + ".</p>"]
    best = sorted([r for r in rows if r["status"] == "finished" and r["test_loss"] is not None],
                  key=lambda r: (r["test_loss"], r["name"]))[:BEST_SHOWN]
    # Models of several latent groups: each group's KL beside the loss, to see which group a trial uses.
    groups = any(r.get("test_kl_groups") for r in best)
    body.append("<h2>Best trials</h2>")
    body.append(_rows_html(["name", *keys, "test l_i", *(["test KL by group (z_1 first)"] if groups else []),
                            "test NLL (IW)", "epochs", "best checkpoint"],
                           [[r["name"], *[_cell(r[k]) for k in keys], r["test_loss"],
                             *([" / ".join(f"{v:.3g}" for v in r["test_kl_groups"] or [])] if groups else []),
                             r["test_nll_iw"], r["epochs_run"], r["best_checkpoint"]] for r in best], "best")
                if best else "<p>No trial has finished yet.</p>")
    with matplotlib.style.context("default"):
        for key in keys:
            fig, caption = _by_value(rows, key)
            _save(fig, storage.join(out_dir, _value_figure_name(key)))
            body.append(_figure_html(_value_figure_name(key), f"Test loss against {key}", caption))
        fig, caption = _curves(rows)
        _save(fig, storage.join(out_dir, CURVES_FIGURE))
        body.append(_figure_html(CURVES_FIGURE, "Test loss by epoch", caption))
    body.append("<h2>All trials</h2>")
    body.append(_rows_html([*TABLE_COLUMNS[:2], *keys, *TABLE_COLUMNS[2:]],
                           [[r["name"], r["status"], *[_cell(r[k]) for k in keys],
                             *[r[c] for c in TABLE_COLUMNS[2:]]] for r in rows], "trials"))
    page = storage.join(out_dir, SWEEP_PAGE)
    storage.write_bytes(page, _page(f"Sweep {sweep_dir.rstrip('/').rpartition('/')[2]}", body).encode())
    return page
