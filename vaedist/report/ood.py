"""ood.html (write_ood): one checkpoint's scores on data of its own kind (IN) and on data it was not
trained on (OUT): both distributions, AUROC, AUPR and FPR at 95% TPR (vaedist.analyses.ood), and the images on
which the scores mislead most."""

from __future__ import annotations

import html
import json

import matplotlib.style
import numpy as np
from matplotlib.figure import Figure

from vaedist import analyses, schema, storage
from vaedist.data import DatasetInfo
from vaedist.analyses.ood import SCORES, ood
from vaedist.report.figures import GRID_COLUMNS, _describe, _grid_label, _image_grid, _save
from vaedist.report.pages import _figure_html, _inputs_html, _page, _pm, _rows_html
from vaedist.report.shards import _images_of, _open_shards

OOD_PAGE = "ood.html"
OOD_FIGURES = {
    "ood_distributions.png": "Scores of IN and OUT",
    "ood_examples.png": "Where the score misleads",
}
# A score per test datapoint: l_i, or -log p(x) (the IW estimate); higher = more out of distribution.
SCORE_SQL = {"loss": "loss", "nll": "-log_px"}
# One table's test scores, for the histograms.
SCORES_SQL = "SELECT {score} AS s FROM {view} WHERE split = 'test' AND {score} IS NOT NULL ORDER BY key"
# The k test datapoints of one table at one end of a score: lowest ($descending false) or highest.
EXTREMES_SQL = """\
SELECT key, label, source, {score} AS s
FROM {view}
WHERE split = 'test' AND {score} IS NOT NULL
ORDER BY CASE WHEN $descending THEN -({score}) ELSE {score} END, key
LIMIT $k"""
HISTOGRAM_BINS = 60


def _distributions(scores: dict[str, tuple[np.ndarray, np.ndarray]], metrics: dict[str, dict]) -> tuple[Figure, str]:
    """One panel per score: IN's and OUT's histograms (densities) over shared bins."""
    fig = Figure(figsize=(5 * len(scores), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(scores)))
    for ax, (name, (s_in, s_out)) in zip(axes, scores.items()):
        both = np.concatenate([s_in, s_out])
        # The 0.1-99.9% range: a handful of extreme datapoints would otherwise squeeze the picture.
        low, high = np.percentile(both, [0.1, 99.9])
        bins = np.linspace(low, high if high > low else low + 1.0, HISTOGRAM_BINS + 1)
        m = metrics[name]
        ax.hist(np.clip(s_in, low, high), bins=bins, density=True, alpha=0.5, color="C0", label=f"IN (n={len(s_in)})")
        ax.hist(np.clip(s_out, low, high), bins=bins, density=True, alpha=0.5, color="C3",
                label=f"OUT (n={len(s_out)})")
        ax.set_xlabel(f"{SCORES[name]} (nats)")
        ax.set_ylabel("density")
        ax.set_title(f"AUROC {m['auroc']:.3f}, FPR at 95% TPR {m['fpr_at_95_tpr']:.3f}", fontsize=9)
        ax.legend(fontsize=8)
    caption = ("The test datapoints' scores, IN (the model's own kind of data) and OUT (data it was not trained "
               "on), as densities over shared bins spanning the 0.1-99.9th percentiles of both (the few beyond are "
               "counted in the outermost bins). A score that tells OUT from IN puts OUT to the right; AUROC below "
               "0.5 means the model finds OUT more likely than IN.")
    return fig, caption


def write_ood(latents_dir: str, against_dir: str, out_dir: str, *, num_examples: int = 8) -> str:
    """Write ood.html and its figures into out_dir: the test splits of two tables encoded by one
    checkpoint, IN (latents_dir: data of the kind it was trained on) and OUT (against_dir: other data),
    scored by l_i and -log p(x); returns the page's path. vaedist.analyses.ood refuses other pairs."""
    latents_dir, against_dir, out_dir = str(latents_dir), str(against_dir), str(out_dir)
    if num_examples <= 0:
        raise ValueError(f"num_examples must be > 0, got {num_examples}")
    con = analyses.connect_pair(latents_dir, against_dir)
    table = ood(latents_dir, against_dir, con=con)
    metrics = {r["score"]: r for r in table.to_pylist()}
    lineages = {"IN": analyses.read_lineage(latents_dir), "OUT": analyses.read_lineage(against_dir)}
    paths = {"IN": latents_dir, "OUT": against_dir}
    views = {"IN": analyses.VIEW_A, "OUT": analyses.VIEW_B}
    infos: dict[str, DatasetInfo] = {}
    shards: dict[str, str] = {}
    for side, lineage in lineages.items():
        lineage_path = storage.join(paths[side], schema.LINEAGE_FILE)
        if not lineage.shards_dir:
            raise analyses.QueryError(f"{lineage_path} names no shards_dir, so its images cannot be shown")
        shards[side] = str(lineage.shards_dir)
        _, infos[side] = _open_shards(shards[side], lineage, paths[side], f" (named in {lineage_path})")

    pair = f"{latents_dir} vs {against_dir}"
    scores = {name: tuple(analyses.run_sql(pair, SCORES_SQL.format(score=SCORE_SQL[name], view=views[side]),
                                           con=con).column("s").to_numpy() for side in ("IN", "OUT"))
              for name in metrics}
    # The examples by -log p(x) where both tables have it (the score Nalisnick et al. study), else l_i.
    shown = "nll" if "nll" in metrics else "loss"
    extremes = {side: analyses.run_sql(pair, EXTREMES_SQL.format(score=SCORE_SQL[shown], view=views[side]), con=con,
                                       params={"descending": side == "IN", "k": num_examples}).to_pylist()
                for side in ("OUT", "IN")}
    tiles, titles, row_labels = [], [], []
    for side, label in (("OUT", "OUT, lowest"), ("IN", "IN, highest")):
        rows = extremes[side]
        images = _images_of(con, paths[side], shards[side], [r["key"] for r in rows], infos[side], view=views[side])
        for start in range(0, max(len(rows), 1), GRID_COLUMNS):
            block = rows[start:start + GRID_COLUMNS]
            tiles += [images[r["key"]] for r in block] + [None] * (GRID_COLUMNS - len(block))
            titles += [f"{_grid_label(r)}\n{_describe(infos[side], r['label'])}\n{r['s']:.1f}" for r in block]
            titles += [""] * (GRID_COLUMNS - len(block))
            row_labels.append(label)
    figures = {
        "ood_distributions.png": _distributions(scores, metrics),
        "ood_examples.png": (
            _image_grid(tiles, titles, 255.0, infos["IN"].image_shape, row_labels, title_lines=3),
            (f"Top: the {len(extremes['OUT'])} OUT test datapoints with the lowest {SCORES[shown]}, the ones the "
             f"model takes most for its own; bottom: the {len(extremes['IN'])} IN test datapoints with the highest, "
             "the ones it would flag first. Original pixels, titled with source (key in older tables), class and "
             "score in nats.")),
    }
    storage.makedirs(out_dir)
    with matplotlib.style.context("default"):
        for name, (fig, _) in figures.items():
            _save(fig, storage.join(out_dir, name))

    def data_of(side: str) -> str:
        info = infos[side]
        return f"{info.name}, images {'x'.join(map(str, info.image_shape))}, shards {shards[side]}"

    header = ["score", "IN mean ± s.e.", "OUT mean ± s.e.", "AUROC", "AUPR", "FPR at 95% TPR", "IN count",
              "OUT count"]
    rows = [[SCORES[r["score"]], _pm(r["in_mean"], r["in_se"]), _pm(r["out_mean"], r["out_se"]),
             f"{r['auroc']:.4f}", f"{r['aupr']:.4f}", f"{r['fpr_at_95_tpr']:.4f}", r["in_count"], r["out_count"]]
            for r in metrics.values()]
    lineage_in = lineages["IN"]
    body = [_inputs_html({"IN": latents_dir, "OUT": against_dir, "checkpoint": str(lineage_in.checkpoint),
                          "trained on": str(lineage_in.train_dataset or "?"),
                          "IN data": data_of("IN"), "OUT data": data_of("OUT")}),
            ("<p>One checkpoint's per-datapoint scores on the test split of data of the kind it was trained on (IN) "
             "and of data it was not (OUT), in nats, higher = more out of distribution. AUROC, AUPR (average "
             "precision) and the false-positive rate at 95% true-positive rate treat OUT as the positive class; "
             "AUROC 0.5 is chance, below 0.5 the model finds OUT more likely than IN.</p>"),
            "<h2>Telling OUT from IN</h2>", _rows_html(header, rows, "ood")]
    if "nll" not in metrics:
        body.append('<p class="no-log-px">No -log p(x): a table has no importance-weighted estimates (encoded with '
                    "encode.num_samples_iw = 0); encode both again with num_samples_iw > 0.</p>")
    for name in OOD_FIGURES:
        body.append(_figure_html(name, OOD_FIGURES[name], figures[name][1]))
    for side in ("IN", "OUT"):
        body += [f"<h2>Lineage of {side}</h2>",
                 f"<pre>{html.escape(json.dumps(lineages[side].to_dict(), indent=2, sort_keys=True))}</pre>"]
    page = storage.join(out_dir, OOD_PAGE)
    storage.write_bytes(page, _page("vaedist out-of-distribution", body).encode())
    return page
