"""The report: PNG figures and HTML pages over published latent tables. Matplotlib (Agg), no Ray.

    index = write_report("outputs/latents", "outputs/report")          # index.html (+ dynamics.html)
    page = write_comparison("outputs/latents-a", "outputs/latents-b", "outputs/report")  # comparison.html

index.html: reconstructions, prior samples, the latent space, l_i per class, the highest-loss
images, diagnostics (active units and KL per dimension, totals with standard errors, the evidence
gap per class, class-relative outliers), the training curves and the lineage. A table of several
checkpoints of one run (an `epoch` column) is shown there at one epoch (the last unless told), and
also gets dynamics.html: per-class mean l_i over the epochs, and the datapoints learned latest and
most forgotten with their own curves. comparison.html: two tables' l_i over the same datapoints,
class by class, and the largest changes with their images.

The checkpoint and the shards default to the ones named in the table's _lineage.json; the dataset
(image shape, class names) is the shards' manifest's; labels are spoken of as "digit 3" for MNIST
and by name ("Ankle boot") where the dataset names its classes. The training curves come from the
metrics.jsonl of the run the checkpoint belongs to (<run_dir>/[kept/]epoch-NNNN/checkpoint.pt).
Same inputs give the same bytes: seeded choices, ordered queries, fixed colour limits, the default
style whatever the user's matplotlibrc, and no Software stamp in the PNGs.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from typing import Any

import matplotlib.style
import numpy as np
import pyarrow as pa
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vaedist import analysis, data, query, schema, storage
from vaedist.checkpoint import (CHECKPOINT_DIR_RE, KEPT_DIR, METRICS_FILE, CheckpointError, check_data_compatible,
                                load_model, read_metrics)
from vaedist.data import DatasetInfo

GRID_COLUMNS = 8
DPI = 100
ACTIVE_THRESHOLD = 0.01  # Burda et al. (2016): unit d is active when Var_x(mu_d) > 0.01
DYNAMICS_PER_GROUP = 8   # datapoints learned latest, and as many most forgotten
LEARNED_WITHIN_NATS = 1.0

# file name -> title ({noun}: "digit" or "class", {items}: "digits" or "images"); also the order
# of the sections in index.html.
FIGURES = {
    "reconstructions.png": "Reconstructions",
    "samples.png": "Samples from the prior",
    "latent_space.png": "Latent space",
    "loss_by_digit.png": "Loss per {noun}",
    "worst_explained.png": "Highest-loss {items}",
}
# The Diagnostics section's figures, after those above.
DIAGNOSTIC_FIGURES = {
    "latent_units.png": "Active units and KL per dimension",
    "outliers.png": "Class-relative outliers",
}
# Written only when the checkpoint's run has metrics; its section comes after the diagnostics.
TRAINING_FIGURE = "training.png"
# Written beside index.html for a table of several checkpoints (an epoch column).
DYNAMICS_PAGE = "dynamics.html"
DYNAMICS_FIGURES = {
    "dynamics_by_class.png": "Mean l_i per {noun} over the epochs",
    "dynamics_extremes.png": "Learned latest and most forgotten",
}
# write_comparison's page and figures; names of their own, so it can share a report's directory.
COMPARISON_PAGE = "comparison.html"
COMPARISON_FIGURES = {
    "comparison_by_class.png": "Δl_i per {noun}",
    "comparison_top.png": "Largest improvements and regressions",
}

# Δl_i per datapoint for the comparison's distribution; {a} and {b} as analysis.py's (one epoch each).
DELTAS_SQL = """\
SELECT a.label, a.loss - b.loss AS delta
FROM {a} AS a JOIN {b} AS b ON a.key = b.key
WHERE $split IS NULL OR a.split = $split
ORDER BY a.label, a.key"""


# ---------------------------------------------------------------------------------------------
# Words and pictures.

def _noun(info: DatasetInfo) -> str:
    return "class" if info.class_names else "digit"


def _items(info: DatasetInfo) -> str:
    return "images" if info.class_names else "digits"


def _describe(info: DatasetInfo, label: int) -> str:
    """"Ankle boot" where the dataset names its classes, "digit 3" for MNIST."""
    return info.class_name(label) if info.class_names else f"digit {label}"


def _title(template: str, info: DatasetInfo) -> str:
    return template.format(noun=_noun(info), items=_items(info))


def _save(fig: Figure, path: str) -> None:
    buf = io.BytesIO()
    # Agg writes no date into a PNG; dropping Software keeps the bytes independent of the version.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    storage.write_bytes(path, buf.getvalue())


def _show(ax, image: np.ndarray, shape: tuple[int, int, int], vmax: float) -> None:
    """One flat image [H*W*C] (channels last, as the shards store it): grey for C = 1, RGB for
    C = 3, else the mean over its channels in grey. vmax: 255 for uint8 levels, 1 for probabilities
    and binarised pixels."""
    h, w, c = shape
    pixels = np.asarray(image).reshape(h, w, c)
    if c == 3:
        ax.imshow(np.clip(pixels.astype(np.float64) / vmax, 0, 1), interpolation="nearest")
    else:
        grey = pixels[..., 0] if c == 1 else pixels.astype(np.float64).mean(axis=-1)
        ax.imshow(grey, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")


def _blank(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _image_grid(images: list[np.ndarray | None], titles: list[str], vmax: float, shape: tuple[int, int, int],
                row_labels: list[str] | None = None, title_lines: int = 2) -> Figure:
    """Images (None: an empty cell) in rows of GRID_COLUMNS, each with a small title of up to
    title_lines lines, and optionally a label per grid row."""
    rows = max(1, -(-len(images) // GRID_COLUMNS))
    height, width = shape[0], shape[1]
    cell = 1.1 * max(height / width, 0.5)
    fig = Figure(figsize=(GRID_COLUMNS * 1.1, rows * (cell - 0.08 + 0.14 * title_lines)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, GRID_COLUMNS, squeeze=False))
    for i, ax in enumerate(axes.flat):
        _blank(ax)
        if i < len(images) and images[i] is not None:
            _show(ax, images[i], shape, vmax)
            ax.set_title(titles[i], fontsize=7)
    if row_labels:
        for r in range(rows):
            axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
    return fig


def _class_colours(info: DatasetInfo) -> tuple[str, float, float]:
    """(colormap, vmin, vmax) that give label l the colour it has in every figure of a report."""
    return ("tab10" if info.num_classes <= 10 else "tab20"), -0.5, info.num_classes - 0.5


def _class_colour(info: DatasetInfo, label: int):
    import matplotlib

    cmap, vmin, vmax = _class_colours(info)
    return matplotlib.colormaps[cmap]((label - vmin) / (vmax - vmin))


# ---------------------------------------------------------------------------------------------
# Shards.

def _images_of(con, latents_dir: str, shards_dir: str, keys: list[str], info: DatasetInfo,
               view: str = schema.VIEW_NAME) -> dict[str, np.ndarray]:
    """key -> the datapoint's pixels (uint8, flat), read from the shards the table names, each once."""
    if not keys:
        return {}
    where = query.run_sql(latents_dir, f"SELECT DISTINCT key, shard, index FROM {view} "
                          "WHERE list_contains($keys, key) ORDER BY key", con=con,
                          params={"keys": list(keys)}).to_pylist()
    images = {}
    for shard in sorted({row["shard"] for row in where}):
        path = storage.join(shards_dir, *shard.split("/"))
        indices, pixels, _ = data.load_split_arrays([path], info=info)
        position = {int(i): p for p, i in enumerate(indices)}
        for row in where:
            if row["shard"] != shard:
                continue
            if row["index"] not in position:
                raise data.DataError(f"shard {path} does not hold key {row['key']!r} named by the latent table "
                                     f"{latents_dir}; were the shards prepared again since encoding?")
            images[row["key"]] = pixels[position[row["index"]]]
    return images


def _open_shards(shards_dir: str, lineage: dict, latents_dir: str,
                 from_lineage: str) -> tuple[dict, DatasetInfo]:
    """(manifest, dataset) of the shards, refused unless they are the ones the table was encoded from."""
    try:
        manifest = data.read_manifest(shards_dir)
        shards_hash = data.manifest_hash(shards_dir)
    except data.DataError as e:
        raise data.DataError(f"{e}{from_lineage if shards_dir == lineage.get('shards_dir') else ''}") from None
    if lineage.get("manifest_hash") and lineage["manifest_hash"] != shards_hash:
        raise data.DataError(f"shards {shards_dir} have manifest hash {shards_hash[:12]}…, but latent table "
                             f"{latents_dir} was encoded from {lineage['manifest_hash'][:12]}…; give the shards "
                             "it was encoded from")
    return manifest, data.manifest_dataset(manifest)


# ---------------------------------------------------------------------------------------------
# index.html's figures.

def _reconstructions(model, train_seed: int, shards_dir: str, manifest: dict, info: DatasetInfo, n: int,
                     seed: int) -> tuple[Figure, str]:
    indices, images, labels = data.load_split_arrays(data.shard_paths(shards_dir, "test", manifest=manifest),
                                                     info=info)
    if len(indices) == 0:
        raise data.DataError(f"shards {shards_dir} hold no test datapoints to reconstruct")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(indices), size=min(n, len(indices)), replace=False))
    # The fixed binarisation training's test evaluation uses, seeded by train.seed.
    x = data.fixed_binarize(images[pick], indices[pick], "test", seed=train_seed)
    with torch.no_grad():
        mu, _ = model.encode(x)
        probs = torch.sigmoid(model.decode(mu)).numpy()
    # Grid rows alternate: inputs, then their reconstructions below them.
    tiles, titles, row_labels = [], [], []
    for start in range(0, len(pick), GRID_COLUMNS):
        block = slice(start, start + GRID_COLUMNS)
        pad = [None] * (GRID_COLUMNS - len(pick[block]))
        tiles += [*x.numpy()[block], *pad, *probs[block], *pad]
        titles += [f"{data.key_for('test', int(indices[i]))}\n{_describe(info, int(labels[i]))}"
                   for i in pick[block]] + [""] * len(pad)
        titles += [""] * GRID_COLUMNS
        row_labels += ["input", "reconstruction"]
    caption = (f"{len(pick)} test datapoints drawn with seed {seed}: each binarised input "
               f"(fixed binarisation, seed train.seed = {train_seed}) above its reconstruction "
               "sigmoid(decode(mu)), the decoder's pixel probabilities at the posterior mean.")
    return _image_grid(tiles, titles, 1.0, info.image_shape, row_labels), caption


def _samples(model, info: DatasetInfo, n: int, seed: int) -> tuple[Figure, str]:
    generator = torch.Generator().manual_seed(seed)
    probs = model.sample(n, generator, mean=True).numpy()
    caption = (f"{n} samples z ~ N(0, I) (seed {seed}) shown as the decoder's pixel probabilities "
               "sigmoid(decode(z)) rather than binary draws.")
    return _image_grid(list(probs), [""] * n, 1.0, info.image_shape, title_lines=0), caption


def _project_2d(mu: np.ndarray) -> tuple[np.ndarray, str]:
    """mu [n, d] -> [n, 2] and how: as is for d = 2, PCA by SVD for d > 2, against 0 for d = 1."""
    d = mu.shape[1]
    if d == 2:
        return mu, "the two latent dimensions of mu"
    if d == 1:
        return np.column_stack([mu[:, 0], np.zeros(len(mu))]), "mu (one latent dimension) on the x axis"
    centred = mu - mu.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    # SVD fixes each component only up to sign; make the largest loading positive, so the
    # picture does not flip between LAPACK builds.
    signs = np.sign(vt[np.arange(2), np.abs(vt[:2]).argmax(axis=1)])
    explained = (s[:2] ** 2).sum() / max((s ** 2).sum(), 1e-30)
    return centred @ (vt[:2] * signs[:, None]).T, (f"the first two principal components of mu (PCA of the "
                                                    f"{d}-dimensional means; {explained:.0%} of their variance)")


def _latent_space(labels: np.ndarray, mu: np.ndarray, info: DatasetInfo, split_note: str) -> tuple[Figure, str]:
    xy, how = _project_2d(mu)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    cmap, vmin, vmax = _class_colours(info)
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, vmin=vmin, vmax=vmax, s=3, alpha=0.6,
                        linewidths=0)
    bar = fig.colorbar(points, ax=ax, ticks=range(info.num_classes), label=_noun(info))
    if info.class_names:
        bar.ax.set_yticklabels(info.class_names, fontsize=8)
    ax.set_xlabel("component 1" if mu.shape[1] > 2 else "mu[0]")
    ax.set_ylabel("component 2" if mu.shape[1] > 2 else ("mu[1]" if mu.shape[1] == 2 else ""))
    caption = f"Posterior means of {len(mu)} {split_note} datapoints, coloured by {_noun(info)}: {how}."
    return fig, caption


def _class_ticks(ax, info: DatasetInfo, labels: list[int]) -> None:
    ax.set_xticks(labels, [info.class_name(label) for label in labels],
                  rotation=30 if info.class_names else 0, ha="right" if info.class_names else "center")
    ax.set_xlabel(_noun(info))


def _loss_distribution(labels: np.ndarray, loss: np.ndarray, info: DatasetInfo,
                       split_note: str) -> tuple[Figure, str]:
    present = sorted(set(labels.tolist()))
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([loss[labels == label] for label in present], positions=present,
               flierprops={"markersize": 2, "alpha": 0.4})
    _class_ticks(ax, info, present)
    ax.set_ylabel("l_i = recon_nll + kl (nats)")
    caption = (f"The per-datapoint loss l_i (negative ELBO) of the {split_note} datapoints by {_noun(info)}: boxes "
               "span the quartiles, whiskers 1.5 IQR, points beyond them are outliers.")
    return fig, caption


def _worst(con, latents_dir: str, shards_dir: str, info: DatasetInfo, n: int, split: str | None,
           split_note: str, epoch: int | None) -> tuple[Figure, str]:
    worst = query.worst_explained(latents_dir, k=n, split=split, epoch=epoch, con=con).to_pylist()
    images = _images_of(con, latents_dir, shards_dir, [row["key"] for row in worst], info)
    titles = [f"{row['key']}\n{_describe(info, row['label'])}\nl={row['loss']:.1f}" for row in worst]
    caption = (f"The {len(worst)} {split_note} datapoints with the highest loss l_i, highest first, "
               f"as their original pixels, titled with key, {_noun(info)} and loss in nats.")
    return _image_grid([images[row["key"]] for row in worst], titles, 255.0, info.image_shape,
                       title_lines=3), caption


# ---------------------------------------------------------------------------------------------
# index.html's Diagnostics.

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
    titles = [f"{row['key']}\n{_describe(info, row['label'])}\n"
              + (f"z={row['z_score']:.1f}, " if row["z_score"] is not None else "") + f"l={row['loss']:.0f}"
              for row in rows]
    caption = (f"The {len(rows)} {split_note} datapoints whose l_i lies furthest above that of their own "
               f"{_noun(info)}: z = (l_i - the {_noun(info)}'s mean l_i) / its standard deviation, within the "
               "datapoint's split; highest z first, titled with key, "
               f"{_noun(info)}, z and l_i in nats. Unlike the highest-loss {_items(info)}, each "
               f"{_noun(info)}'s own typical loss is taken out.")
    return _image_grid([images[row["key"]] for row in rows], titles, 255.0, info.image_shape,
                       title_lines=3), caption


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


def _diagnostics(con, latents_dir: str, shards_dir: str, info: DatasetInfo, num_examples: int, split: str | None,
                 split_note: str, epoch: int | None) -> tuple[dict[str, tuple[Figure, str]], list[str]]:
    """The figures (name -> (figure, caption)) and the section's HTML, figures in DIAGNOSTIC_FIGURES order."""
    units = analysis.active_units(latents_dir, ACTIVE_THRESHOLD, split=split, epoch=epoch, con=con)
    kl = analysis.kl_per_dim(latents_dir, split=split, epoch=epoch, con=con)
    totals = analysis.totals(latents_dir, split=None, epoch=epoch, con=con).to_pylist()
    with_log_px = any(row.get("nll_mean") is not None for row in totals)
    outliers = analysis.outliers(latents_dir, k=num_examples, split=split, epoch=epoch, con=con).to_pylist()
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
             "its standard error (standard deviation / sqrt(count)).</p>"), _rows_html(header, rows, "totals")]
    name = "latent_units.png"
    parts.append(_figure_html(name, DIAGNOSTIC_FIGURES[name], figures[name][1], 3))
    parts.append(f"<h3>Evidence gap per {_noun(info)}</h3>")
    if with_log_px:
        gap = analysis.gap_by_digit(latents_dir, split=split, epoch=epoch, con=con).to_pylist()
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
    parts += [_figure_html(name, DIAGNOSTIC_FIGURES[name], figures[name][1], 3),
              _rows_html(["key", "split", _noun(info), "l_i", "z", f"{_noun(info)} mean l_i", "rank of l_i"],
                         [[r["key"], r["split"], info.class_name(r["label"]), r["loss"], r["z_score"], r["class_mean"],
                           r["global_rank"]] for r in outliers], "outliers")]
    return figures, parts


# ---------------------------------------------------------------------------------------------
# The training curves (the checkpoint's run's metrics.jsonl).

def _run_dir_of(checkpoint_file: str) -> str | None:
    """<run_dir>/epoch-NNNN/checkpoint.pt or <run_dir>/kept/epoch-NNNN/checkpoint.pt -> <run_dir>;
    None for a checkpoint outside a run directory. (os.path splits URIs too: their separators are '/'.)"""
    checkpoint_dir = os.path.dirname(checkpoint_file)
    if not CHECKPOINT_DIR_RE.match(os.path.basename(checkpoint_dir)):
        return None
    parent = os.path.dirname(checkpoint_dir)
    return os.path.dirname(parent) if os.path.basename(parent) == KEPT_DIR else parent


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _training_metrics(run_dir: str) -> tuple[list[dict], dict | None]:
    """The run's epoch rows (sorted by epoch) and its last final row, checked field by field."""
    path = storage.join(run_dir, METRICS_FILE)
    try:
        rows = read_metrics(run_dir)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not JSON lines: {e}") from None

    def bad(n: int, field: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"{path} row {n}: {field} is {value!r}, expected {expected}")

    epochs, final = [], None
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise bad(n, "the row", row, "a JSON object")
        if row.get("kind") == "epoch":
            if not _is_int(row.get("epoch"), 0):
                raise bad(n, "epoch", row.get("epoch"), "an integer >= 0")
            if not _is_number(row.get("train_loss")):
                raise bad(n, "train_loss", row.get("train_loss"), "a finite number")
            # null on epochs without a test evaluation (train.eval_every_epochs)
            if row.get("test_loss") is not None and not _is_number(row["test_loss"]):
                raise bad(n, "test_loss", row["test_loss"], "a finite number or null")
            epochs.append(row)
        elif row.get("kind") == "final":
            if not _is_number(row.get("test_nll_iw")):
                raise bad(n, "test_nll_iw", row.get("test_nll_iw"), "a finite number")
            if not _is_int(row.get("num_samples_iw"), 1):
                raise bad(n, "num_samples_iw", row.get("num_samples_iw"), "an integer > 0")
            if "epoch" in row and not _is_int(row["epoch"], 0):
                raise bad(n, "epoch", row["epoch"], "an integer >= 0")
            final = row
    return sorted(epochs, key=lambda r: r["epoch"]), final


def _training_inputs(run_dir: str | None,
                     checkpoint_file: str) -> tuple[str | None, list[dict], dict | None, str | None]:
    """(run directory, epoch rows, final row, why there are no epoch rows or None). An explicit
    run_dir must exist; the default, the checkpoint's own run, may not be there at all."""
    if run_dir is not None:
        run_dir = str(run_dir)
        if not storage.exists(run_dir):
            raise CheckpointError(f"run directory {run_dir} does not exist")
    else:
        run_dir = _run_dir_of(checkpoint_file)
    if run_dir is None:
        return None, [], None, (f"checkpoint {checkpoint_file} is not inside a run directory "
                                "(<run_dir>/[kept/]epoch-NNNN/checkpoint.pt)")
    epochs, final = _training_metrics(run_dir)
    if epochs:
        return run_dir, epochs, final, None
    path = storage.join(run_dir, METRICS_FILE)
    return run_dir, [], final, f"{path} {'has no epoch rows' if storage.exists(path) else 'does not exist'}"


def _training(epochs: list[dict], final: dict | None) -> tuple[Figure, str]:
    evaluated = [r for r in epochs if r.get("test_loss") is not None]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([r["epoch"] for r in epochs], [r["train_loss"] for r in epochs], marker="o", markersize=4,
            label="train")
    ax.plot([r["epoch"] for r in evaluated], [r["test_loss"] for r in evaluated], marker="s", markersize=4,
            label="test")
    if final is not None:
        ax.plot([final.get("epoch", epochs[-1]["epoch"])], [final["test_nll_iw"]], marker="*", markersize=10,
                linestyle="none", color="black", label=f"test NLL, importance-weighted (K = {final['num_samples_iw']})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (as numbered in metrics.jsonl and epoch-NNNN)")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    caption = (f"The mean per-datapoint loss l_i (negative ELBO, nats) over {len(epochs)} epochs. Train: averaged "
               "over the epoch's minibatches while the weights changed, with fresh binarisation and without the "
               f"KL warm-up weight. Test: at the end of the {len(evaluated)} evaluated epochs, with the fixed "
               "binarisation (epochs without a test evaluation are left out).")
    if final is not None:
        caption += " The star is the importance-weighted test NLL after training."
    return fig, caption


def _training_html(figure: tuple[str, str] | None, final: dict | None, no_metrics: str | None,
                   run_dir: str | None) -> str:
    """The Training section: the figure (name, caption) and the final NLL, or why there is none."""
    if figure is None:
        return f'<h2>Training</h2>\n<p class="no-training-metrics">No training metrics: {html.escape(no_metrics)}.</p>'
    name, caption = figure
    parts = ["<h2>Training</h2>",
             (f'<figure><img src="{html.escape(name)}" alt="Training curves">'
              f"<figcaption>{html.escape(caption)}</figcaption></figure>")]
    if final is None:
        metrics_path = storage.join(run_dir, METRICS_FILE)
        parts.append(f'<p class="final-nll">No importance-weighted test NLL: {html.escape(metrics_path)} has no '
                     "final row (train.num_samples_iw_final = 0, or the run has not finished).</p>")
    else:
        count = f", {final['test_count']:,} test datapoints" if _is_int(final.get("test_count"), 1) else ""
        elbo = (f"; the test negative ELBO at the same point: {final['test_loss']:.2f} nats"
                if _is_number(final.get("test_loss")) else "")
        parts.append(f'<p class="final-nll">Importance-weighted test NLL after training: '
                     f"<strong>{final['test_nll_iw']:.2f} nats</strong> (K = {final['num_samples_iw']} importance "
                     f"samples{count}{elbo}).</p>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Pages.

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


def _lineage_html(lineage: dict) -> list[str]:
    return ["<h2>Lineage</h2>", f"<pre>{html.escape(json.dumps(lineage, indent=2, sort_keys=True))}</pre>"]


def _format_epochs(epochs: list[int]) -> str:
    return ", ".join(map(str, epochs)) if len(epochs) <= 12 else \
        f"{', '.join(map(str, epochs[:5]))}, …, {', '.join(map(str, epochs[-5:]))}"


def _resolve_inputs(latents_dir: str, checkpoint: str | None, shards_dir: str | None) -> tuple[dict, str, str]:
    lineage_path = storage.join(latents_dir, schema.LINEAGE_FILE)
    try:
        lineage = query.read_lineage(latents_dir)
    except query.QueryError:
        if checkpoint is None or shards_dir is None:
            raise
        lineage = {}
    for name, value in (("checkpoint", checkpoint), ("shards_dir", shards_dir)):
        if value is None and not lineage.get(name):
            raise query.QueryError(f"{lineage_path} names no {name}; give one explicitly")
    return lineage, checkpoint or lineage["checkpoint"], shards_dir or lineage["shards_dir"]


def _pick_epoch(latents_dir: str, epochs: list[int], epoch: int | None) -> int | None:
    """The epoch index.html shows: the one asked for, else the table's last; None for a table
    without an epoch column (where asking for one is an error)."""
    if not epochs:
        if epoch is not None:
            raise query.QueryError(f"latent table {latents_dir} has no epoch column (it encodes one checkpoint); "
                                   f"leave out epoch={epoch} (vaedist report --epoch)")
        return None
    if epoch is None:
        return epochs[-1]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch not in epochs:
        raise query.QueryError(f"epoch {epoch!r} is not in latent table {latents_dir}; it holds epochs "
                               f"{_format_epochs(epochs)}")
    return epoch


def _checkpoint_of_epoch(lineage: dict, lineage_path: str, epoch: int, last: int) -> str:
    """The checkpoint a table of several checkpoints names for `epoch`: its `checkpoints` entry,
    or the lineage's `checkpoint` (the last epoch's)."""
    for entry in lineage.get("checkpoints") or []:
        if isinstance(entry, dict) and entry.get("epoch") == epoch and entry.get("path"):
            return entry["path"]
    if epoch == last and lineage.get("checkpoint"):
        return lineage["checkpoint"]
    raise query.QueryError(f"{lineage_path} names no checkpoint of epoch {epoch}; give one explicitly "
                           "(vaedist report --checkpoint)")


def _rows_of(epoch: int | None) -> tuple[str, dict[str, Any]]:
    """(relation, params): the view `latents`, or one epoch's rows of a table of several checkpoints
    (as analysis.py scopes its queries)."""
    if epoch is None:
        return schema.VIEW_NAME, {}
    return f"(SELECT * FROM {schema.VIEW_NAME} WHERE epoch = $epoch)", {"epoch": epoch}


def write_report(latents_dir: str, out_dir: str, checkpoint: str | None = None, shards_dir: str | None = None,
                 num_examples: int = 16, seed: int = 0, run_dir: str | None = None,
                 epoch: int | None = None) -> str:
    """Write the figures and index.html into out_dir (local or a URI); returns index.html's path.

    checkpoint and shards_dir default to the ones in the table's _lineage.json. num_examples is the
    number of reconstructions, samples, highest-loss images and outliers; seed picks the reconstructed
    test datapoints and the prior samples. run_dir, whose metrics.jsonl gives the training curves,
    defaults to the run the checkpoint belongs to (<run_dir>/[kept/]epoch-NNNN/checkpoint.pt); without
    metrics the Training section says why. A table of several checkpoints (an epoch column) is shown
    at `epoch` (default: its last) and also gets dynamics.html over all of its epochs.
    """
    latents_dir, out_dir = str(latents_dir), str(out_dir)
    if num_examples <= 0:
        raise ValueError(f"num_examples must be > 0, got {num_examples}")
    con = query.connect(latents_dir)
    lineage, lineage_checkpoint, shards_dir = _resolve_inputs(latents_dir, checkpoint, shards_dir)
    lineage_path = storage.join(latents_dir, schema.LINEAGE_FILE)
    epochs = analysis.table_epochs(latents_dir, con=con)
    shown_epoch = _pick_epoch(latents_dir, epochs, epoch)
    from_lineage = f" (named in {lineage_path}; give another explicitly)"
    checkpoint_from_lineage = checkpoint is None
    if checkpoint_from_lineage:
        checkpoint = (_checkpoint_of_epoch(lineage, lineage_path, shown_epoch, epochs[-1]) if epochs
                      else lineage_checkpoint)
    try:
        model, cfg, state = load_model(checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{from_lineage if checkpoint_from_lineage else ''}") from None
    manifest, info = _open_shards(shards_dir, lineage, latents_dir, from_lineage)
    check_data_compatible(state, info.name, info.image_shape, shards_dir)
    relation, epoch_params = _rows_of(shown_epoch)
    latent_dim = schema.latent_dim_of(query.run_sql(latents_dir, "SELECT mu FROM latents LIMIT 0", con=con).schema)
    if latent_dim != model.latent_dim:
        raise CheckpointError(f"checkpoint {checkpoint} has latent_dim {model.latent_dim} but latent table "
                              f"{latents_dir} has {latent_dim}: not the model the table was encoded with")

    # The test split when the table has it (the held-out picture), else every row.
    counts = query.run_sql(latents_dir, "SELECT count(*) AS n, count(*) FILTER (WHERE split = 'test') AS n_test "
                           f"FROM {relation}", con=con, params=epoch_params).to_pylist()[0]
    if counts["n"] == 0:
        raise query.QueryError(f"latent table {latents_dir} has no rows to report on")
    split = "test" if counts["n_test"] else None
    split_note = "test" if split else "train and test"
    rows = query.run_sql(latents_dir, f"SELECT label, loss, mu FROM {relation} WHERE $split IS NULL OR split = $split "
                         "ORDER BY key", con=con, params={**epoch_params, "split": split})
    labels = rows.column("label").to_numpy()
    loss = rows.column("loss").to_numpy()
    mu = rows.column("mu").combine_chunks().flatten().to_numpy().reshape(len(rows), latent_dim).astype(np.float64)

    run_dir, training_epochs, final, no_metrics = _training_inputs(run_dir, state["path"])

    storage.makedirs(out_dir)
    with matplotlib.style.context("default"):
        figures = {
            "reconstructions.png": _reconstructions(model, cfg.train.seed, shards_dir, manifest, info, num_examples,
                                                    seed),
            "samples.png": _samples(model, info, num_examples, seed),
            "latent_space.png": _latent_space(labels, mu, info, split_note),
            "loss_by_digit.png": _loss_distribution(labels, loss, info, split_note),
            "worst_explained.png": _worst(con, latents_dir, shards_dir, info, num_examples, split, split_note,
                                          shown_epoch),
        }
        diagnostics, diagnostics_html = _diagnostics(con, latents_dir, shards_dir, info, num_examples, split,
                                                     split_note, shown_epoch)
        for name, (fig, caption) in {**figures, **diagnostics}.items():
            _save(fig, storage.join(out_dir, name))
        sections = [_figure_html(name, _title(FIGURES[name], info), caption) for name, (_, caption) in figures.items()]
        training_figure = None
        if training_epochs:
            fig, caption = _training(training_epochs, final)
            _save(fig, storage.join(out_dir, TRAINING_FIGURE))
            training_figure = (TRAINING_FIGURE, caption)
        dynamics = None
        if len(epochs) > 1:
            dynamics = _write_dynamics(con, latents_dir, shards_dir, info, split, split_note, epochs,
                                       shown_epoch, out_dir, {"latent table": latents_dir, "shards": shards_dir})

    summary = query.loss_by_digit(latents_dir, split=split, epoch=shown_epoch, con=con)
    inputs = {"latent table": latents_dir, "checkpoint": checkpoint, "shards": shards_dir,
              "dataset": f"{info.name}, images {'x'.join(map(str, info.image_shape))}",
              "run": run_dir if run_dir is not None else "none"}
    body = [_inputs_html(inputs)]
    if epochs:
        which = "the last" if shown_epoch == epochs[-1] else "chosen with epoch="
        several = len(epochs) > 1
        body.append(f'<p class="epoch-note">This table encodes {len(epochs)} checkpoint{"s" if several else ""} of '
                    f"one run (epoch{'s' if several else ''} {_format_epochs(epochs)}). The figures "
                    f"and tables on this page are of epoch {shown_epoch} ({which})"
                    + (f'; <a href="{DYNAMICS_PAGE}">training dynamics</a> follows the datapoints over every epoch.'
                       if dynamics else ".") + "</p>")
    body += [f"<h2>Loss by {_noun(info)}</h2>\n<p>{html.escape(split_note)} datapoints, nats</p>",
             _html_table(summary, "loss-by-class"), *sections, *diagnostics_html,
             _training_html(training_figure, final, no_metrics, run_dir), *_lineage_html(lineage)]
    index = storage.join(out_dir, "index.html")
    storage.write_bytes(index, _page("vaedist report", body).encode())
    return index


# ---------------------------------------------------------------------------------------------
# dynamics.html: a table of several checkpoints of one run, over its epochs.

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
    by_class = analysis.digit_curves(latents_dir, split=split, con=con)
    learned = analysis.learned_late(latents_dir, within=LEARNED_WITHIN_NATS, split=split, k=DYNAMICS_PER_GROUP,
                                    con=con).to_pylist()
    # by = 0: the largest rises whatever their size, so that the page shows the most forgotten.
    forgot = analysis.forgotten(latents_dir, by=0.0, split=split, k=DYNAMICS_PER_GROUP, con=con).to_pylist()
    keys = list(dict.fromkeys(r["key"] for r in learned + forgot))
    curves: dict[str, tuple[list, list]] = {}
    if keys:
        for r in analysis.curves(latents_dir, keys=keys, split=split, con=con).to_pylist():
            x, y = curves.setdefault(r["key"], ([], []))
            x.append(r["epoch"])
            y.append(r["loss"])
    images = _images_of(con, latents_dir, shards_dir, keys, info)
    first, last = epochs[0], epochs[-1]
    groups = [
        ("learned latest", learned, [f"{r['key']}\n{_describe(info, r['label'])}\nwithin at {r['first_epoch_within']}"
                                     for r in learned]),
        ("most forgotten", forgot, [f"{r['key']}\n{_describe(info, r['label'])}\n+{r['rise']:.1f} at "
                                    f"{r['from_epoch']}→{r['to_epoch']}" for r in forgot]),
    ]
    figures = {"dynamics_by_class.png": _class_curves(by_class, info, split_note)}
    if learned or forgot:
        figures["dynamics_extremes.png"] = (_extremes(groups, curves, images, info), (
            f"Top: the {len(learned)} {split_note} datapoints learned latest: their l_i first came within "
            f"{LEARNED_WITHIN_NATS:g} nats of its final (epoch {last}) value at the latest epoch, after epoch {first} "
            f"(analysis.learned_late; ties by the distance at epoch {first}). Bottom: the {len(forgot)} most "
            "forgotten, whose l_i rose most between two consecutive encoded epochs (analysis.forgotten), that rise "
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


# ---------------------------------------------------------------------------------------------
# comparison.html: two tables over the same datapoints.

def _comparison_epochs(latents_dir: str, against_dir: str, epoch: int | None,
                       against_epoch: int | None) -> tuple[int | None, int | None, dict[str, int | None]]:
    """(epoch of A, epoch of B, the analysis' epoch arguments). A table of several checkpoints is
    compared at the epoch asked for, else its last; B at against_epoch, else at epoch where it has
    that column too (as analysis.compare_by_digit), else its last. What cannot be (an epoch for a
    table without the column, one not in it) is passed on for the analysis to refuse by name."""
    epochs_a, epochs_b = analysis.table_epochs(latents_dir), analysis.table_epochs(against_dir)
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

    The tables must hold the same datapoints from the same shards (analysis.compare_by_digit refuses
    others). A table of several checkpoints is compared at `epoch` (B at against_epoch; see
    _comparison_epochs), by default its last. shards_dir defaults to A's lineage's.
    """
    latents_dir, against_dir, out_dir = str(latents_dir), str(against_dir), str(out_dir)
    if num_examples <= 0:
        raise ValueError(f"num_examples must be > 0, got {num_examples}")
    con = analysis.connect_pair(latents_dir, against_dir)
    epoch_a, epoch_b, epoch_args = _comparison_epochs(latents_dir, against_dir, epoch, against_epoch)
    lineage_a, lineage_b = query.read_lineage(latents_dir), query.read_lineage(against_dir)
    pair = f"{latents_dir} vs {against_dir}"
    counts = query.run_sql(pair, f"SELECT count(*) FILTER (WHERE split = 'test') AS n_test FROM {analysis.VIEW_A}",
                           con=con).to_pylist()[0]
    split = "test" if counts["n_test"] else None
    split_note = "test" if split else "train and test"
    by_class = analysis.compare_by_digit(latents_dir, against_dir, split=split, con=con, **epoch_args)
    top = analysis.compare_top(latents_dir, against_dir, k=num_examples, split=split, con=con,
                               **epoch_args).to_pylist()

    if shards_dir is None and not lineage_a.get("shards_dir"):
        raise query.QueryError(f"{storage.join(latents_dir, schema.LINEAGE_FILE)} names no shards_dir; give one "
                               "explicitly")
    shards_dir = str(shards_dir or lineage_a["shards_dir"])
    from_lineage = f" (named in {storage.join(latents_dir, schema.LINEAGE_FILE)}; give another explicitly)"
    _, info = _open_shards(shards_dir, lineage_a, latents_dir, from_lineage)

    relations, params = {}, {"split": split}
    for side, view, at in (("a", analysis.VIEW_A, epoch_a), ("b", analysis.VIEW_B, epoch_b)):
        relations[side] = view if at is None else f"(SELECT * FROM {view} WHERE epoch = $epoch_{side})"
        if at is not None:
            params[f"epoch_{side}"] = at
    deltas = query.run_sql(pair, DELTAS_SQL.format(**relations), con=con, params=params)
    labels, delta = deltas.column("label").to_numpy(), deltas.column("delta").to_numpy()
    images = _images_of(con, latents_dir, shards_dir, [r["key"] for r in top], info, view=analysis.VIEW_A)

    tiles, titles, row_labels = [], [], []
    for change in ("improved", "regressed"):
        rows = [r for r in top if r["change"] == change]
        for start in range(0, max(len(rows), 1), GRID_COLUMNS):
            block = rows[start:start + GRID_COLUMNS]
            tiles += [images[r["key"]] for r in block] + [None] * (GRID_COLUMNS - len(block))
            titles += [f"{r['key']}\n{_describe(info, r['label'])}\nΔ={r['delta']:+.1f}" for r in block]
            titles += [""] * (GRID_COLUMNS - len(block))
            row_labels.append(change)
    figures = {
        "comparison_by_class.png": _comparison_by_class(labels, delta, by_class.to_pylist(), info),
        "comparison_top.png": (
            _image_grid(tiles, titles, 255.0, info.image_shape, row_labels, title_lines=3),
            (f"The {num_examples} {split_note} datapoints whose l_i fell most from B to A (improved, Δl_i < 0, "
            f"largest first) and the {num_examples} whose l_i rose most (regressed), as their original pixels, "
            f"titled with key, {_noun(info)} and Δl_i in nats; fewer where fewer changed that way.")),
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
    top_rows = [[r["change"], r["key"], _describe(info, r["label"]) if info.class_names else r["label"],
                 r["loss_a"], r["loss_b"], f"{r['delta']:+.2f}"] for r in top]
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
             _rows_html(["change", "key", noun, "l_i(A)", "l_i(B)", "Δl_i"], top_rows, "compare-top"),
             "<h2>Lineage of A</h2>", f"<pre>{html.escape(json.dumps(lineage_a, indent=2, sort_keys=True))}</pre>",
             "<h2>Lineage of B</h2>", f"<pre>{html.escape(json.dumps(lineage_b, indent=2, sort_keys=True))}</pre>"]
    page = storage.join(out_dir, COMPARISON_PAGE)
    storage.write_bytes(page, _page("vaedist comparison", body).encode())
    return page
