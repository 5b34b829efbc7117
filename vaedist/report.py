"""The report: PNG figures and an index.html over a published latent table. Matplotlib (Agg), no Ray.

    index = write_report("outputs/latents", "outputs/report")

The checkpoint and the shards default to the ones named in the table's _lineage.json; the training
curves come from the metrics.jsonl of the run the checkpoint belongs to (<run_dir>/[kept/]epoch-NNNN/
checkpoint.pt). Same inputs give the same bytes: seeded choices, fixed colour limits, the default
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
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vaedist import data, query, schema, storage
from vaedist.checkpoint import CHECKPOINT_DIR_RE, KEPT_DIR, METRICS_FILE, CheckpointError, load_model, read_metrics

IMAGE_SIDE = 28
GRID_COLUMNS = 8
DPI = 100

# file name -> title; also the order of the sections in index.html.
FIGURES = {
    "reconstructions.png": "Reconstructions",
    "samples.png": "Samples from the prior",
    "latent_space.png": "Latent space",
    "loss_by_digit.png": "Loss per digit",
    "worst_explained.png": "Highest-loss digits",
}
# Written only when the checkpoint's run has metrics; its section comes after the figures above.
TRAINING_FIGURE = "training.png"


def _save(fig: Figure, path: str) -> None:
    buf = io.BytesIO()
    # Agg writes no date into a PNG; dropping Software keeps the bytes independent of the version.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    storage.write_bytes(path, buf.getvalue())


def _image_grid(images: list[np.ndarray | None], titles: list[str], vmax: float,
                row_labels: list[str] | None = None) -> Figure:
    """Images [784] (None: an empty cell) in rows of GRID_COLUMNS, each with a small title, and
    optionally a label per grid row."""
    rows = -(-len(images) // GRID_COLUMNS)
    fig = Figure(figsize=(GRID_COLUMNS * 1.1, rows * 1.3), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, GRID_COLUMNS, squeeze=False))
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i < len(images) and images[i] is not None:
            ax.imshow(images[i].reshape(IMAGE_SIDE, IMAGE_SIDE), cmap="gray", vmin=0, vmax=vmax,
                      interpolation="nearest")
            ax.set_title(titles[i], fontsize=7)
    if row_labels:
        for r in range(rows):
            axes[r, 0].set_ylabel(row_labels[r], fontsize=8)
    return fig


def _reconstructions(model, train_seed: int, shards_dir: str, manifest: dict, n: int,
                     seed: int) -> tuple[Figure, str]:
    indices, images, labels = data.load_split_arrays(data.shard_paths(shards_dir, "test", manifest=manifest))
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
        titles += [f"{data.key_for('test', int(indices[i]))} ({labels[i]})" for i in pick[block]] + [""] * len(pad)
        titles += [""] * GRID_COLUMNS
        row_labels += ["input", "reconstruction"]
    caption = (f"{len(pick)} test datapoints drawn with seed {seed}: each binarised input "
               f"(fixed binarisation, seed train.seed = {train_seed}) above its reconstruction "
               "sigmoid(decode(mu)), the decoder's pixel probabilities at the posterior mean.")
    return _image_grid(tiles, titles, 1.0, row_labels), caption


def _samples(model, n: int, seed: int) -> tuple[Figure, str]:
    generator = torch.Generator().manual_seed(seed)
    probs = model.sample(n, generator, mean=True).numpy()
    caption = (f"{n} samples z ~ N(0, I) (seed {seed}) shown as the decoder's pixel probabilities "
               "sigmoid(decode(z)) rather than binary draws.")
    return _image_grid(list(probs), [""] * n, 1.0), caption


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


def _latent_space(labels: np.ndarray, mu: np.ndarray, split_note: str) -> tuple[Figure, str]:
    xy, how = _project_2d(mu)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    points = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=3, alpha=0.6,
                        linewidths=0)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel("component 1" if mu.shape[1] > 2 else "mu[0]")
    ax.set_ylabel("component 2" if mu.shape[1] > 2 else ("mu[1]" if mu.shape[1] == 2 else ""))
    caption = f"Posterior means of {len(mu)} {split_note} datapoints, coloured by digit: {how}."
    return fig, caption


def _loss_distribution(labels: np.ndarray, loss: np.ndarray, split_note: str) -> tuple[Figure, str]:
    digits = sorted(set(labels.tolist()))
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.boxplot([loss[labels == d] for d in digits], positions=digits, tick_labels=[str(d) for d in digits],
               flierprops={"markersize": 2, "alpha": 0.4})
    ax.set_xlabel("digit")
    ax.set_ylabel("l_i = recon_nll + kl (nats)")
    caption = (f"The per-datapoint loss l_i (negative ELBO) of the {split_note} datapoints by digit: boxes span "
               "the quartiles, whiskers 1.5 IQR, points beyond them are outliers.")
    return fig, caption


def _worst(con, latents_dir: str, shards_dir: str, n: int, split: str | None, split_note: str) -> tuple[Figure, str]:
    worst = query.worst_explained(latents_dir, k=n, split=split, con=con).to_pylist()
    where = query.run_sql(latents_dir, "SELECT key, shard, index FROM latents WHERE list_contains($keys, key)",
                          con=con, params={"keys": [row["key"] for row in worst]}).to_pylist()
    location = {row["key"]: (row["shard"], row["index"]) for row in where}
    images = {}
    for shard in sorted({shard for shard, _ in location.values()}):
        path = storage.join(shards_dir, *shard.split("/"))
        indices, pixels, _ = data.load_split_arrays([path])
        position = {int(i): p for p, i in enumerate(indices)}
        for key, (s, index) in location.items():
            if s != shard:
                continue
            if index not in position:
                raise data.DataError(f"shard {path} does not hold key {key!r} named by the latent table "
                                     f"{latents_dir}; were the shards prepared again since encoding?")
            images[key] = pixels[position[index]]
    tiles = [images[row["key"]] for row in worst]
    titles = [f"{row['key']}\ndigit {row['label']}, l={row['loss']:.1f}" for row in worst]
    caption = (f"The {len(worst)} {split_note} datapoints with the highest loss l_i, highest first, "
               "as their original grey levels, titled with key, digit and loss in nats.")
    return _image_grid(tiles, titles, 255.0), caption


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


def _html_table(table) -> str:
    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.2f}" if isinstance(v, float) else html.escape(str(v))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.column_names)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row.values()) + "</tr>\n"
                   for row in table.to_pylist())
    return f"<table>\n<tr>{head}</tr>\n{body}</table>"


def _index_html(sections: list[tuple[str, str, str]], summary_html: str, summary_note: str,
                inputs: dict[str, str], lineage: dict, training_html: str) -> str:
    # The empty icon: otherwise browsers ask the server for /favicon.ico, a 404 on every view.
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>vaedist report</title>'
             '<link rel="icon" href="data:,">',
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             # Long paths wrap, and long lineage lines scroll in their box, rather than widen the page.
             "figure{margin:2em 0}img{max-width:100%}figcaption{color:#444}code{overflow-wrap:anywhere}"
             "pre{overflow-x:auto}</style></head><body>",
             "<h1>vaedist report</h1>", "<ul>"]
    parts += [f"<li>{html.escape(k)}: <code>{html.escape(v)}</code></li>" for k, v in inputs.items()]
    parts += ["</ul>", f"<h2>Loss by digit</h2>\n<p>{html.escape(summary_note)}</p>", summary_html]
    for name, title, caption in sections:
        parts.append(f'<figure><h2>{html.escape(title)}</h2><img src="{html.escape(name)}" '
                     f'alt="{html.escape(title)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    parts.append(training_html)
    parts += ["<h2>Lineage</h2>", f"<pre>{html.escape(json.dumps(lineage, indent=2, sort_keys=True))}</pre>",
              "</body></html>", ""]
    return "\n".join(parts)


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


def write_report(latents_dir: str, out_dir: str, checkpoint: str | None = None, shards_dir: str | None = None,
                 num_examples: int = 16, seed: int = 0, run_dir: str | None = None) -> str:
    """Write the figures and index.html into out_dir (local or a URI); returns index.html's path.

    checkpoint and shards_dir default to the ones in the table's _lineage.json. num_examples is the
    number of reconstructions, samples and highest-loss digits; seed picks the reconstructed test
    datapoints and the prior samples. run_dir, whose metrics.jsonl gives the training curves, defaults
    to the run the checkpoint belongs to (<run_dir>/[kept/]epoch-NNNN/checkpoint.pt); without metrics the
    Training section says why.
    """
    latents_dir, out_dir = str(latents_dir), str(out_dir)
    if num_examples <= 0:
        raise ValueError(f"num_examples must be > 0, got {num_examples}")
    con = query.connect(latents_dir)
    lineage, checkpoint, shards_dir = _resolve_inputs(latents_dir, checkpoint, shards_dir)
    from_lineage = f" (named in {storage.join(latents_dir, schema.LINEAGE_FILE)}; give another explicitly)"
    try:
        model, cfg, state = load_model(checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{from_lineage if checkpoint == lineage.get('checkpoint') else ''}") from None
    try:
        manifest = data.read_manifest(shards_dir)
        shards_hash = data.manifest_hash(shards_dir)
    except data.DataError as e:
        raise data.DataError(f"{e}{from_lineage if shards_dir == lineage.get('shards_dir') else ''}") from None
    latent_dim = schema.latent_dim_of(query.run_sql(latents_dir, "SELECT mu FROM latents LIMIT 0", con=con).schema)
    if latent_dim != model.latent_dim:
        raise CheckpointError(f"checkpoint {checkpoint} has latent_dim {model.latent_dim} but latent table "
                              f"{latents_dir} has {latent_dim}: not the model the table was encoded with")
    if lineage.get("manifest_hash") and lineage["manifest_hash"] != shards_hash:
        raise data.DataError(f"shards {shards_dir} have manifest hash {shards_hash[:12]}…, but latent table "
                             f"{latents_dir} was encoded from {lineage['manifest_hash'][:12]}…; give the shards "
                             "it was encoded from")

    # The test split when the table has it (the held-out picture), else every row.
    counts = query.run_sql(latents_dir, "SELECT count(*) AS n, count(*) FILTER (WHERE split = 'test') AS n_test "
                           "FROM latents", con=con).to_pylist()[0]
    if counts["n"] == 0:
        raise query.QueryError(f"latent table {latents_dir} has no rows to report on")
    split = "test" if counts["n_test"] else None
    split_note = "test" if split else "train and test"
    rows = query.run_sql(latents_dir, "SELECT label, loss, mu FROM latents WHERE $split IS NULL OR split = $split "
                         "ORDER BY key", con=con, params={"split": split})
    labels = rows.column("label").to_numpy()
    loss = rows.column("loss").to_numpy()
    mu = rows.column("mu").combine_chunks().flatten().to_numpy().reshape(len(rows), latent_dim).astype(np.float64)

    run_dir, epochs, final, no_metrics = _training_inputs(run_dir, state["path"])

    storage.makedirs(out_dir)
    sections = []
    with matplotlib.style.context("default"):
        figures = {
            "reconstructions.png": _reconstructions(model, cfg.train.seed, shards_dir, manifest, num_examples, seed),
            "samples.png": _samples(model, num_examples, seed),
            "latent_space.png": _latent_space(labels, mu, split_note),
            "loss_by_digit.png": _loss_distribution(labels, loss, split_note),
            "worst_explained.png": _worst(con, latents_dir, shards_dir, num_examples, split, split_note),
        }
        for name, (fig, caption) in figures.items():
            _save(fig, storage.join(out_dir, name))
            sections.append((name, FIGURES[name], caption))
        training_figure = None
        if epochs:
            fig, caption = _training(epochs, final)
            _save(fig, storage.join(out_dir, TRAINING_FIGURE))
            training_figure = (TRAINING_FIGURE, caption)

    summary = query.loss_by_digit(latents_dir, split=split, con=con)
    inputs = {"latent table": latents_dir, "checkpoint": checkpoint, "shards": shards_dir,
              "run": run_dir if run_dir is not None else "none"}
    index = storage.join(out_dir, "index.html")
    storage.write_bytes(index, _index_html(sections, _html_table(summary), f"{split_note} datapoints, nats",
                                           inputs, lineage, _training_html(training_figure, final, no_metrics,
                                                                          run_dir)).encode())
    return index
