"""Matplotlib pictures: words for labels, image grids, class colours, and index.html's figures
(reconstructions, prior samples, the latent space, l_i per class, the highest-loss images)."""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.figure import Figure

from vaedist import analyses, data, storage
from vaedist.data import DatasetInfo
from vaedist.report.shards import _images_of

GRID_COLUMNS = 8
DPI = 100


# ---------------------------------------------------------------------------------------------
# Words and pictures.

def _digits(info: DatasetInfo) -> bool:
    """MNIST's kind of labels: ten classes that need no names. Unlabelled data (num_classes 0, every
    label -1) and datasets that name their classes have classes and images."""
    return not info.class_names and info.num_classes == 10


def _noun(info: DatasetInfo) -> str:
    return "digit" if _digits(info) else "class"


def _items(info: DatasetInfo) -> str:
    return "digits" if _digits(info) else "images"


def _class_label(info: DatasetInfo, label: int) -> str:
    """A label's name: the class name, the digit, or "unlabelled" for -1."""
    return "unlabelled" if label < 0 else info.class_name(label)


def _describe(info: DatasetInfo, label: int) -> str:
    """"Ankle boot" where the dataset names its classes, "digit 3" for MNIST, "unlabelled" for -1."""
    return f"digit {label}" if _digits(info) and label >= 0 else _class_label(info, label)


SOURCE_CHARS = 18  # of a source in an image's title: a grid cell is ~1.1 inches wide


def _grid_label(row: dict) -> str:
    """What an image in a grid is titled by: where it came from (the table's `source`: its last path
    component, the end kept when long, as the row or key is there), else its key (tables written
    before the source column)."""
    source = row.get("source")
    if not source:
        return row["key"]
    name = source.rsplit("/", 1)[-1] or source
    return name if len(name) <= SOURCE_CHARS else "…" + name[-(SOURCE_CHARS - 1):]


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
    return ("tab10" if info.num_classes <= 10 else "tab20"), -0.5, max(info.num_classes, 1) - 0.5


def _class_colour(info: DatasetInfo, label: int):
    import matplotlib

    cmap, vmin, vmax = _class_colours(info)
    return matplotlib.colormaps[cmap]((label - vmin) / (vmax - vmin))


# ---------------------------------------------------------------------------------------------
# index.html's figures.

def _reconstructions(model, train_seed: int, shards_dir: str, manifest: data.Manifest, info: DatasetInfo, n: int,
                     seed: int) -> tuple[Figure, str]:
    indices, images, labels = data.load_split_arrays(data.shard_paths(shards_dir, "test", manifest=manifest),
                                                     info=info)
    if len(indices) == 0:
        raise data.DataError(f"shards {shards_dir} hold no test datapoints to reconstruct")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(indices), size=min(n, len(indices)), replace=False))
    # The input training's test evaluation uses (Bernoulli: the fixed binarisation seeded by train.seed).
    likelihood = model.likelihood
    x = likelihood.eval_input(images[pick], indices[pick], "test", train_seed, torch.device("cpu"))
    with torch.no_grad():
        mu, _ = model.encode(x)
        probs = likelihood.mean(model.decode(mu)).numpy()
    x = likelihood.to_image(x)
    # Grid rows alternate: inputs, then their reconstructions below them.
    sources = dict(zip(pick.tolist(), data.read_sources(shards_dir, manifest, "test", indices[pick])))
    tiles, titles, row_labels = [], [], []
    for start in range(0, len(pick), GRID_COLUMNS):
        block = slice(start, start + GRID_COLUMNS)
        pad = [None] * (GRID_COLUMNS - len(pick[block]))
        tiles += [*x.numpy()[block], *pad, *probs[block], *pad]
        titles += [f"{_grid_label({'key': data.key_for('test', int(indices[i])), 'source': sources[i]})}\n"
                   f"{_describe(info, int(labels[i]))}" for i in pick[block]] + [""] * len(pad)
        titles += [""] * GRID_COLUMNS
        row_labels += ["input", "reconstruction"]
    caption = (f"{len(pick)} test datapoints drawn with seed {seed}, titled with source: each "
               f"{likelihood.input_note.format(seed=train_seed)} above its reconstruction, "
               f"{likelihood.mean_note.replace('(z)', '(mu)')} at the posterior mean "
               f"(model.likelihood = {likelihood.name}).")
    return _image_grid(tiles, titles, 1.0, info.image_shape, row_labels), caption


def _samples(model, info: DatasetInfo, n: int, seed: int) -> tuple[Figure, str]:
    generator = torch.Generator().manual_seed(seed)
    probs = model.sample(n, generator, mean=True).numpy()
    prior = "N(0, I)" if len(model.latent_groups) == 1 else "p(z), top group first"
    caption = (f"{n} samples z ~ {prior} (seed {seed}) shown as {model.likelihood.mean_note} rather than "
               "draws from p(x|z).")
    return _image_grid(list(probs), [""] * n, 1.0, info.image_shape, title_lines=0), caption


def _samples_by_group(model, info: DatasetInfo, seed: int) -> tuple[Figure, str]:
    """A model of several latent groups: one row per group, top first; along a row that group's noise
    varies and every other group's is the first column's, so z_l and the groups below it change while
    those above stay fixed (each drawn from its prior given the one above)."""
    groups = model.latent_groups
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(1, model.latent_dim, generator=generator)
    starts = np.cumsum([0, *groups])
    rows = []
    for l in reversed(range(len(groups))):
        eps = base.repeat(GRID_COLUMNS, 1)
        eps[1:, starts[l]:starts[l + 1]] = torch.randn(GRID_COLUMNS - 1, groups[l], generator=generator)
        rows.append(eps)
    with torch.no_grad():
        probs = model.decode_prior_sample(torch.cat(rows), mean=True).numpy()
    labels = [f"z_{l + 1} ({groups[l]}) varies" for l in reversed(range(len(groups)))]
    caption = (f"Ancestral samples (seed {seed}) shown as {model.likelihood.mean_note}: each row varies the noise of one "
               "latent group (z_1 is next to x), the first column's noise elsewhere, so a row shows what its group "
               "and the groups below it decide with the groups above held fixed.")
    return _image_grid(list(probs), [""] * len(probs), 1.0, info.image_shape, labels, title_lines=0), caption


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
    if info.num_classes == 0:  # unlabelled data: nothing to colour by
        ax.scatter(xy[:, 0], xy[:, 1], color="C0", s=3, alpha=0.6, linewidths=0)
    else:
        points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap=cmap, vmin=vmin, vmax=vmax, s=3, alpha=0.6,
                            linewidths=0)
        bar = fig.colorbar(points, ax=ax, ticks=range(info.num_classes), label=_noun(info))
        if info.class_names:
            bar.ax.set_yticklabels(info.class_names, fontsize=8)
    ax.set_xlabel("component 1" if mu.shape[1] > 2 else "mu[0]")
    ax.set_ylabel("component 2" if mu.shape[1] > 2 else ("mu[1]" if mu.shape[1] == 2 else ""))
    coloured = f", coloured by {_noun(info)}" if info.num_classes else " (unlabelled)"
    caption = f"Posterior means of {len(mu)} {split_note} datapoints{coloured}: {how}."
    return fig, caption


def _class_ticks(ax, info: DatasetInfo, labels: list[int]) -> None:
    ax.set_xticks(labels, [_class_label(info, label) for label in labels],
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
    worst = analyses.worst_explained(latents_dir, k=n, split=split, epoch=epoch, con=con).to_pylist()
    images = _images_of(con, latents_dir, shards_dir, [row["key"] for row in worst], info)
    titles = [f"{_grid_label(row)}\n{_describe(info, row['label'])}\nl={row['loss']:.1f}" for row in worst]
    caption = (f"The {len(worst)} {split_note} datapoints with the highest loss l_i, highest first, "
               f"as their original pixels, titled with source (key in older tables), {_noun(info)} and loss in nats.")
    return _image_grid([images[row["key"]] for row in worst], titles, 255.0, info.image_shape,
                       title_lines=3), caption
