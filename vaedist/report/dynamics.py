"""dynamics.html, for a table of several checkpoints of one run: mean l_i per class over the epochs,
and the datapoints learned latest and most forgotten with their own curves."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vaedist import analyses, storage
from vaedist.data import DatasetInfo
from vaedist.report.figures import (GRID_COLUMNS, _blank, _class_colour, _describe, _grid_label, _noun, _save, _show,
                                    _title)
from vaedist.report.pages import _figure_html, _format_epochs, _inputs_html, _page, _rows_html
from vaedist.report.shards import _images_of, _sources_of

DYNAMICS_PER_GROUP = 8   # datapoints learned latest, and as many most forgotten
LEARNED_WITHIN_NATS = 1.0
# Written beside index.html for a table of several checkpoints (an epoch column).
DYNAMICS_PAGE = "dynamics.html"
DYNAMICS_FIGURES = {
    "dynamics_by_class.png": "Mean l_i per {noun} over the epochs",
    "dynamics_extremes.png": "Learned latest and most forgotten",
}


def _class_curves(rows: pa.Table, info: DatasetInfo, split_note: str) -> tuple[Figure, str]:
    table = rows.to_pylist()  # ordered by label, epoch
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for label in sorted({r["label"] for r in table}):
        mine = [r for r in table if r["label"] == label]
        x = [r["epoch"] for r in mine]
        mean = np.array([r["loss_mean"] for r in mine])
        se = np.array([r["loss_se"] if r["loss_se"] is not None else 0.0 for r in mine])
        colour = _class_colour(info, label)
        ax.plot(x, mean, marker="o", markersize=3, color=colour, label=info.class_name(label))
        ax.fill_between(x, mean - se, mean + se, color=colour, alpha=0.25, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean l_i (nats)")
    ax.legend(title=_noun(info), fontsize=8, ncols=2)
    caption = (f"The mean per-datapoint loss l_i of the {split_note} datapoints of each {_noun(info)} at every "
               "encoded epoch, with a band of ± one standard error of the mean; colours as in the latent space.")
    return fig, caption


def _extremes(groups: list[tuple[str, list[dict], list[str]]], curves: dict[str, tuple[list, list]],
              images: dict[str, np.ndarray], info: DatasetInfo) -> Figure:
    """Per group (name, rows, titles) with rows: a row of images, each above its own l_i curve; a
    forgotten datapoint's largest rise (from_epoch -> to_epoch) is drawn in red."""
    groups = [g for g in groups if g[1]]
    fig = Figure(figsize=(GRID_COLUMNS * 1.1, 2.9 * len(groups)), layout="constrained")
    axes = fig.subplots(2 * len(groups), GRID_COLUMNS, squeeze=False,
                        gridspec_kw={"height_ratios": [1.25, 1.0] * len(groups)})
    for g, (name, rows, titles) in enumerate(groups):
        image_axes, curve_axes = axes[2 * g], axes[2 * g + 1]
        for i in range(GRID_COLUMNS):
            _blank(image_axes[i])
            if i >= len(rows):
                curve_axes[i].set_axis_off()
                continue
            key = rows[i]["key"]
            _show(image_axes[i], images[key], info.image_shape, 255.0)
            image_axes[i].set_title(titles[i], fontsize=7)
            x, y = curves[key]
            ax = curve_axes[i]
            ax.plot(x, y, marker="o", markersize=2, linewidth=1, color="C0")
            if "from_epoch" in rows[i]:
                rise = [j for j, e in enumerate(x) if e in (rows[i]["from_epoch"], rows[i]["to_epoch"])]
                ax.plot([x[j] for j in rise], [y[j] for j in rise], linewidth=1.5, color="C3")
            ax.tick_params(labelsize=6)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=3))
        image_axes[0].set_ylabel(name, fontsize=8)
        curve_axes[0].set_ylabel("l_i (nats)", fontsize=7)
    return fig


def _write_dynamics(con, latents_dir: str, shards_dir: str, info: DatasetInfo, split: str | None,
                    split_note: str, epochs: list[int], shown_epoch: int, out_dir: str,
                    inputs: dict[str, str]) -> str:
    """dynamics.html and its figures, over every epoch of a table of several checkpoints."""
    by_class = analyses.digit_curves(latents_dir, split=split, con=con)
    learned = analyses.learned_late(latents_dir, within=LEARNED_WITHIN_NATS, split=split, k=DYNAMICS_PER_GROUP,
                                    con=con).to_pylist()
    # by = 0: the largest rises whatever their size, so that the page shows the most forgotten.
    forgot = analyses.forgotten(latents_dir, by=0.0, split=split, k=DYNAMICS_PER_GROUP, con=con).to_pylist()
    keys = list(dict.fromkeys(r["key"] for r in learned + forgot))
    curves: dict[str, tuple[list, list]] = {}
    if keys:
        for r in analyses.curves(latents_dir, keys=keys, split=split, con=con).to_pylist():
            x, y = curves.setdefault(r["key"], ([], []))
            x.append(r["epoch"])
            y.append(r["loss"])
    images = _images_of(con, latents_dir, shards_dir, keys, info)
    sources = _sources_of(con, latents_dir, keys)
    for r in learned + forgot:
        r["source"] = sources.get(r["key"])
    first, last = epochs[0], epochs[-1]
    groups = [
        ("learned latest", learned, [f"{_grid_label(r)}\n{_describe(info, r['label'])}\nwithin at {r['first_epoch_within']}"
                                     for r in learned]),
        ("most forgotten", forgot, [f"{_grid_label(r)}\n{_describe(info, r['label'])}\n+{r['rise']:.1f} at "
                                    f"{r['from_epoch']}→{r['to_epoch']}" for r in forgot]),
    ]
    figures = {"dynamics_by_class.png": _class_curves(by_class, info, split_note)}
    if learned or forgot:
        figures["dynamics_extremes.png"] = (_extremes(groups, curves, images, info), (
            f"Top: the {len(learned)} {split_note} datapoints learned latest: their l_i first came within "
            f"{LEARNED_WITHIN_NATS:g} nats of its final (epoch {last}) value at the latest epoch, after epoch {first} "
            f"(analyses.learned_late; ties by the distance at epoch {first}). Bottom: the {len(forgot)} most "
            "forgotten, whose l_i rose most between two consecutive encoded epochs (analyses.forgotten), that rise "
            "in red. Each image (original pixels) above its own l_i curve over the epochs."))
    for name, (fig, _) in figures.items():
        _save(fig, storage.join(out_dir, name))

    def shown(label: int) -> Any:
        return info.class_name(label) if info.class_names else label

    rows = [["learned latest", r["key"], shown(r["label"]), r["loss_first"], r["loss_final"],
             f"within {LEARNED_WITHIN_NATS:g} nats from epoch {r['first_epoch_within']}"] for r in learned]
    rows += [["most forgotten", r["key"], shown(r["label"]), curves[r["key"]][1][0], r["loss_final"],
              f"+{r['rise']:.2f} nats from epoch {r['from_epoch']} to {r['to_epoch']}"] for r in forgot]
    body = [_inputs_html({**inputs, "epochs": _format_epochs(epochs),
                          "datapoints": f"{split_note} split" if split else "train and test splits"}),
            (f'<p><a href="index.html">The report</a> shows epoch {shown_epoch} of this table; this page follows its '
            f"{len(epochs)} epochs.</p>")]
    name = "dynamics_by_class.png"
    body.append(_figure_html(name, _title(DYNAMICS_FIGURES[name], info), figures[name][1]))
    name = "dynamics_extremes.png"
    if name in figures:
        body += [_figure_html(name, DYNAMICS_FIGURES[name], figures[name][1]),
                 _rows_html(["group", "key", _noun(info), f"l_i at epoch {first}", f"l_i at epoch {last}", "when"],
                            rows, "extremes")]
    else:
        body.append(f'<p class="no-extremes">No datapoint was learned late or forgotten: no l_i came within '
                    f"{LEARNED_WITHIN_NATS:g} nats of its final value only after epoch {first}, and none rose "
                    "between consecutive epochs.</p>")
    page = storage.join(out_dir, DYNAMICS_PAGE)
    storage.write_bytes(page, _page("vaedist training dynamics", body).encode())
    return page
