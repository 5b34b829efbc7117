"""index.html's Diagnostics section: active units and KL per dimension, totals with standard errors,
the evidence gap per class and the class-relative outliers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vaedist import analyses
from vaedist.data import DatasetInfo
from vaedist.report.figures import _class_label, _describe, _grid_label, _image_grid, _items, _noun
from vaedist.report.pages import _figure_html, _pm, _rows_html
from vaedist.report.shards import _images_of

ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): unit d is active when Var_x(mu_d) > 0.01
# The Diagnostics section's figures, after index.html's FIGURES.
DIAGNOSTIC_FIGURES = {
    "latent_units.png": "Active units and KL per dimension",
    "outliers.png": "Class-relative outliers",
}


def _units(units: pa.Table, kl: pa.Table) -> tuple[Figure, str]:
    dims = np.array(units.column("dim").to_pylist())
    variance = units.column("mu_variance").to_numpy()
    active = np.array(units.column("active").to_pylist(), dtype=bool)
    kl_mean = kl.column("kl_mean").to_numpy()
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.bar(dims, variance, color=np.where(active, "C0", "0.6"))
    top.axhline(ACTIVE_THRESHOLD, color="C3", linestyle="--", linewidth=1,
                label=f"threshold {ACTIVE_THRESHOLD:g} (Burda et al. 2016)")
    # Symlog: an inactive unit's variance is orders of magnitude below an active one's, and may be 0.
    top.set_yscale("symlog", linthresh=ACTIVE_THRESHOLD / 10)
    top.set_ylim(0, max(float(variance.max()), ACTIVE_THRESHOLD) * 5)  # room above for the line and legend
    top.set_ylabel("Var over x of mu_d")
    top.legend(fontsize=8)
    bottom.bar(dims, kl_mean, color=np.where(active, "C0", "0.6"))
    bottom.set_ylabel("mean KL_d (nats)")
    bottom.set_xlabel("latent dimension d (by index)")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    caption = (f"{int(active.sum())} of {len(dims)} latent dimensions are active: the variance over datapoints of "
               f"the posterior mean mu_d exceeds {ACTIVE_THRESHOLD:g} (top, symmetric log scale; active units blue, "
               "inactive grey). Below, the mean over datapoints of KL(q(z_d|x) || N(0, 1)) per dimension, in nats; "
               f"they sum to the mean KL ({kl_mean.sum():.2f} nats). Dimensions in index order.")
    return fig, caption


def _outliers(rows: list[dict], con, latents_dir: str, shards_dir: str, info: DatasetInfo,
              split_note: str) -> tuple[Figure, str]:
    images = _images_of(con, latents_dir, shards_dir, [row["key"] for row in rows], info)
    titles = [f"{_grid_label(row)}\n{_describe(info, row['label'])}\n"
              + (f"z={row['z_score']:.1f}, " if row["z_score"] is not None else "") + f"l={row['loss']:.0f}"
              for row in rows]
    caption = (f"The {len(rows)} {split_note} datapoints whose l_i lies furthest above that of their own "
               f"{_noun(info)}: z = (l_i - the {_noun(info)}'s mean l_i) / its standard deviation, within the "
               "datapoint's split; highest z first, titled with source (key in older tables), "
               f"{_noun(info)}, z and l_i in nats. Unlike the highest-loss {_items(info)}, each "
               f"{_noun(info)}'s own typical loss is taken out.")
    return _image_grid([images[row["key"]] for row in rows], titles, 255.0, info.image_shape,
                       title_lines=3), caption


def _bits_per_dim_html(totals: list[dict], info: DatasetInfo) -> str:
    """The totals in bits per dimension, nats / (H * W * C * ln 2): the unit image likelihoods are
    compared in (Bernoulli's are bits of the binarised draws, not of the 8-bit images)."""
    height, width, channels = info.image_shape
    per_split = "; ".join(f"{r['split']}: {r['bpd']:.4f} (ELBO)"
                          + (f", {r['bpd_iw']:.4f} (-log p(x))" if r.get("bpd_iw") is not None else "")
                          for r in totals)
    return (f'<p class="bits-per-dim">Bits per dimension (nats / ({height}·{width}·{channels}·ln 2)): '
            f"{per_split}.</p>")


def _diagnostics(con, latents_dir: str, shards_dir: str, info: DatasetInfo, num_examples: int, split: str | None,
                 split_note: str, epoch: int | None) -> tuple[dict[str, tuple[Figure, str]], list[str]]:
    """The figures (name -> (figure, caption)) and the section's HTML, figures in DIAGNOSTIC_FIGURES order."""
    units = analyses.active_units(latents_dir, ACTIVE_THRESHOLD, split=split, epoch=epoch, con=con)
    kl = analyses.kl_per_dim(latents_dir, split=split, epoch=epoch, con=con)
    totals = analyses.totals(latents_dir, split=None, epoch=epoch, con=con).to_pylist()
    with_log_px = any(row.get("nll_mean") is not None for row in totals)
    outliers = analyses.outliers(latents_dir, k=num_examples, split=split, epoch=epoch, con=con).to_pylist()
    figures = {"latent_units.png": _units(units, kl),
               "outliers.png": _outliers(outliers, con, latents_dir, shards_dir, info, split_note)}

    header = ["split", "count", "mean l_i ± s.e."]
    if with_log_px:
        header += ["mean -log p(x) ± s.e.", "mean gap ± s.e."]
    rows = [[r["split"], r["count"], _pm(r["loss_mean"], r["loss_se"])]
            + ([_pm(r["nll_mean"], r["nll_se"]), _pm(r["gap_mean"], r["gap_se"])] if with_log_px else [])
            for r in totals]
    parts = ["<h2>Diagnostics</h2>", "<h3>Totals</h3>",
             ("<p>Per split, in nats: the mean per-datapoint loss l_i (the negative ELBO) and, where the table has "
             "importance-weighted estimates, the mean -log p(x) and the mean evidence gap log p(x) + l_i, each with "
             "its standard error (standard deviation / sqrt(count)).</p>"), _rows_html(header, rows, "totals"),
             _bits_per_dim_html(totals, info)]
    name = "latent_units.png"
    parts.append(_figure_html(name, DIAGNOSTIC_FIGURES[name], figures[name][1], 3))
    parts.append(f"<h3>Evidence gap per {_noun(info)}</h3>")
    if with_log_px:
        gap = analyses.gap_by_digit(latents_dir, split=split, epoch=epoch, con=con).to_pylist()
        gap_header = ["label"] + (["class"] if info.class_names else []) + [
            "count", "mean gap ± s.e.", "mean -log p(x)", "mean l_i"]
        gap_rows = [[r["label"]] + ([info.class_name(r["label"])] if info.class_names else [])
                    + [r["count"], _pm(r["gap_mean"], r["gap_se"]), r["nll_mean"], r["loss_mean"]] for r in gap]
        parts += [(f"<p>{split_note.capitalize()} datapoints, nats: the gap log p(x) + l_i estimates "
                  "KL(q(z|x) || p(z|x)), how far the ELBO falls short of the evidence.</p>"),
                  _rows_html(gap_header, gap_rows, "gap-by-class")]
    else:
        parts.append('<p class="no-log-px">No evidence gap: the table has no log p(x) estimates (encoded with '
                     "encode.num_samples_iw = 0); encode again with num_samples_iw > 0.</p>")
    name = "outliers.png"
    with_source = any(r.get("source") for r in outliers)
    parts += [_figure_html(name, DIAGNOSTIC_FIGURES[name], figures[name][1], 3),
              _rows_html(["key", "split", _noun(info), "l_i", "z", f"{_noun(info)} mean l_i", "rank of l_i"]
                         + (["source"] if with_source else []),
                         [[r["key"], r["split"], _class_label(info, r["label"]), r["loss"], r["z_score"],
                           r["class_mean"], r["global_rank"]] + ([r["source"]] if with_source else [])
                          for r in outliers], "outliers")]
    return figures, parts
