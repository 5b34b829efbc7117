"""comparison.html (write_comparison): two latent tables' l_i over the same datapoints, Δl_i class by
class, and the largest improvements and regressions with their images."""

from __future__ import annotations

import html
import json

import matplotlib.style
import numpy as np
from matplotlib.figure import Figure

from vaedist import analyses, schema, storage
from vaedist.data import DatasetInfo
from vaedist.report.figures import (GRID_COLUMNS, _class_colour, _class_ticks, _describe, _grid_label, _image_grid,
                                    _noun, _save, _title)
from vaedist.report.pages import _figure_html, _inputs_html, _page, _pm, _rows_html
from vaedist.report.shards import _images_of, _open_shards

# write_comparison's page and figures; names of their own, so it can share a report's directory.
COMPARISON_PAGE = "comparison.html"
COMPARISON_FIGURES = {
    "comparison_by_class.png": "Δl_i per {noun}",
    "comparison_top.png": "Largest improvements and regressions",
}

# Δl_i per datapoint for the comparison's distribution; {a} and {b} as vaedist.analyses.core fills them (one epoch each).
DELTAS_SQL = """\
SELECT a.label, a.loss - b.loss AS delta
FROM {a} AS a JOIN {b} AS b ON a.key = b.key
WHERE $split IS NULL OR a.split = $split
ORDER BY a.label, a.key"""


def _comparison_epochs(latents_dir: str, against_dir: str, epoch: int | None,
                       against_epoch: int | None) -> tuple[int | None, int | None, dict[str, int | None]]:
    """(epoch of A, epoch of B, the analysis' epoch arguments). A table of several checkpoints is
    compared at the epoch asked for, else its last; B at against_epoch, else at epoch where it has
    that column too (as analyses.compare_by_digit), else its last. What cannot be (an epoch for a
    table without the column, one not in it) is passed on for the analysis to refuse by name."""
    epochs_a, epochs_b = analyses.table_epochs(latents_dir), analyses.table_epochs(against_dir)
    if not epochs_a and not epochs_b:
        return None, None, {"epoch": epoch, "against_epoch": against_epoch}
    epoch_a = (epoch if epoch is not None else epochs_a[-1]) if epochs_a else None
    if against_epoch is not None or not epochs_b:
        epoch_b = against_epoch
    else:
        epoch_b = epoch if epoch is not None else epochs_b[-1]
    return epoch_a, epoch_b, {"epoch": epoch_a, "against_epoch": epoch_b}


def _comparison_by_class(labels: np.ndarray, deltas: np.ndarray, by_class: list[dict],
                         info: DatasetInfo) -> tuple[Figure, str]:
    present = [r["label"] for r in by_class]
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[2, 1])
    left.boxplot([deltas[labels == label] for label in present], positions=present,
                 flierprops={"markersize": 2, "alpha": 0.4})
    left.errorbar(present, [r["delta_mean"] for r in by_class],
                  yerr=[r["delta_se"] if r["delta_se"] is not None else 0.0 for r in by_class],
                  fmt="D", color="C3", markersize=4, capsize=3, label="mean ± s.e.")
    left.axhline(0, color="0.4", linewidth=0.8)
    left.legend(fontsize=8)
    _class_ticks(left, info, present)
    left.set_ylabel("Δl_i = l_i(A) - l_i(B) (nats)")
    right.bar(present, [r["improved_fraction"] for r in by_class],
              color=[_class_colour(info, label) for label in present])
    right.axhline(0.5, color="0.4", linewidth=0.8, linestyle="--")
    right.set_ylim(0, 1)
    _class_ticks(right, info, present)
    right.set_ylabel("fraction improved (Δl_i < 0)")
    caption = (f"Left: the distribution of Δl_i = l_i(A) - l_i(B) over the datapoints of each {_noun(info)} (boxes "
               "span the quartiles, whiskers 1.5 IQR), with its mean ± the paired standard error in red; below 0, A "
               f"explains the datapoints better. Right: the fraction of each {_noun(info)}'s datapoints that A "
               "explains better (Δl_i < 0).")
    return fig, caption


def write_comparison(latents_dir: str, against_dir: str, out_dir: str, *, epoch: int | None = None,
                     against_epoch: int | None = None, shards_dir: str | None = None, num_examples: int = 8) -> str:
    """Write comparison.html and its figures into out_dir: l_i of table A (latents_dir) against table
    B (against_dir) datapoint by datapoint, Δl_i = l_i(A) - l_i(B), per class and the num_examples
    largest improvements and regressions with their images; returns the page's path.

    The tables must hold the same datapoints from the same shards (analyses.compare_by_digit refuses
    others). A table of several checkpoints is compared at `epoch` (B at against_epoch; see
    _comparison_epochs), by default its last. shards_dir defaults to A's lineage's.
    """
    latents_dir, against_dir, out_dir = str(latents_dir), str(against_dir), str(out_dir)
    if num_examples <= 0:
        raise ValueError(f"num_examples must be > 0, got {num_examples}")
    con = analyses.connect_pair(latents_dir, against_dir)
    epoch_a, epoch_b, epoch_args = _comparison_epochs(latents_dir, against_dir, epoch, against_epoch)
    lineage_a, lineage_b = analyses.read_lineage(latents_dir), analyses.read_lineage(against_dir)
    pair = f"{latents_dir} vs {against_dir}"
    counts = analyses.run_sql(pair, f"SELECT count(*) FILTER (WHERE split = 'test') AS n_test FROM {analyses.VIEW_A}",
                              con=con).to_pylist()[0]
    split = "test" if counts["n_test"] else None
    split_note = "test" if split else "train and test"
    by_class = analyses.compare_by_digit(latents_dir, against_dir, split=split, con=con, **epoch_args)
    top = analyses.compare_top(latents_dir, against_dir, k=num_examples, split=split, con=con,
                               **epoch_args).to_pylist()

    if shards_dir is None and not lineage_a.shards_dir:
        raise analyses.QueryError(f"{storage.join(latents_dir, schema.LINEAGE_FILE)} names no shards_dir; give one "
                               "explicitly")
    shards_dir = str(shards_dir or lineage_a.shards_dir)
    from_lineage = f" (named in {storage.join(latents_dir, schema.LINEAGE_FILE)}; give another explicitly)"
    _, info = _open_shards(shards_dir, lineage_a, latents_dir, from_lineage)

    relations, params = {}, {"split": split}
    for side, view, at in (("a", analyses.VIEW_A, epoch_a), ("b", analyses.VIEW_B, epoch_b)):
        relations[side] = view if at is None else f"(SELECT * FROM {view} WHERE epoch = $epoch_{side})"
        if at is not None:
            params[f"epoch_{side}"] = at
    deltas = analyses.run_sql(pair, DELTAS_SQL.format(**relations), con=con, params=params)
    labels, delta = deltas.column("label").to_numpy(), deltas.column("delta").to_numpy()
    images = _images_of(con, latents_dir, shards_dir, [r["key"] for r in top], info, view=analyses.VIEW_A)

    tiles, titles, row_labels = [], [], []
    for change in ("improved", "regressed"):
        rows = [r for r in top if r["change"] == change]
        for start in range(0, max(len(rows), 1), GRID_COLUMNS):
            block = rows[start:start + GRID_COLUMNS]
            tiles += [images[r["key"]] for r in block] + [None] * (GRID_COLUMNS - len(block))
            titles += [f"{_grid_label(r)}\n{_describe(info, r['label'])}\nΔ={r['delta']:+.1f}" for r in block]
            titles += [""] * (GRID_COLUMNS - len(block))
            row_labels.append(change)
    figures = {
        "comparison_by_class.png": _comparison_by_class(labels, delta, by_class.to_pylist(), info),
        "comparison_top.png": (
            _image_grid(tiles, titles, 255.0, info.image_shape, row_labels, title_lines=3),
            (f"The {num_examples} {split_note} datapoints whose l_i fell most from B to A (improved, Δl_i < 0, "
            f"largest first) and the {num_examples} whose l_i rose most (regressed), as their original pixels, "
            f"titled with source (key in older tables), {_noun(info)} and Δl_i in nats; fewer where fewer changed "
            "that way.")),
    }
    storage.makedirs(out_dir)
    with matplotlib.style.context("default"):
        for name, (fig, _) in figures.items():
            _save(fig, storage.join(out_dir, name))

    def side(path: str, at: int | None) -> str:
        return path if at is None else f"{path} at epoch {at}"

    noun = _noun(info)
    by_class_rows = [[r["label"]] + ([info.class_name(r["label"])] if info.class_names else [])
                     + [r["count"], r["loss_a_mean"], r["loss_b_mean"], _pm(r["delta_mean"], r["delta_se"]),
                        f"{r['improved_fraction']:.1%}"] for r in by_class.to_pylist()]
    by_class_header = ["label"] + (["class"] if info.class_names else []) + [
        "count", "mean l_i(A)", "mean l_i(B)", "mean Δl_i ± s.e.", "improved"]
    with_source = any(r.get("source") for r in top)
    top_rows = [[r["change"], r["key"], _describe(info, r["label"]) if info.class_names else r["label"],
                 r["loss_a"], r["loss_b"], f"{r['delta']:+.2f}"] + ([r["source"]] if with_source else []) for r in top]
    body = [_inputs_html({"A": side(latents_dir, epoch_a), "B": side(against_dir, epoch_b), "shards": shards_dir,
                          "dataset": f"{info.name}, images {'x'.join(map(str, info.image_shape))}"}),
            (f"<p>Δl_i = l_i(A) - l_i(B), the difference of the two tables' per-datapoint losses (negative ELBO) for "
            f"the same datapoint, in nats: negative where A explains the datapoint better. {split_note.capitalize()} "
            "datapoints.</p>"),
            f"<h2>Δl_i per {noun}</h2>", _rows_html(by_class_header, by_class_rows, "compare-by-class")]
    name = "comparison_by_class.png"
    body.append(_figure_html(name, _title(COMPARISON_FIGURES[name], info), figures[name][1]))
    name = "comparison_top.png"
    body += [_figure_html(name, COMPARISON_FIGURES[name], figures[name][1]),
             _rows_html(["change", "key", noun, "l_i(A)", "l_i(B)", "Δl_i"] + (["source"] if with_source else []),
                        top_rows, "compare-top"),
             "<h2>Lineage of A</h2>", f"<pre>{html.escape(json.dumps(lineage_a.to_dict(), indent=2, sort_keys=True))}</pre>",
             "<h2>Lineage of B</h2>", f"<pre>{html.escape(json.dumps(lineage_b.to_dict(), indent=2, sort_keys=True))}</pre>"]
    page = storage.join(out_dir, COMPARISON_PAGE)
    storage.write_bytes(page, _page("vaedist comparison", body).encode())
    return page
