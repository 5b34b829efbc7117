"""index.html (write_report): the table's checkpoint, shards and epoch resolved and checked, the
figures of every section drawn, and the page put together; dynamics.html beside it for a table of
several checkpoints."""

from __future__ import annotations

import html
from typing import Any

import matplotlib.style
import numpy as np

from vaedist import analyses, schema, storage
from vaedist.checkpoint import CheckpointError, check_data_compatible, load_model
from vaedist.lineage import Lineage
from vaedist.report.diagnostics import _diagnostics
from vaedist.report.dynamics import DYNAMICS_PAGE, _write_dynamics
from vaedist.report.figures import (_latent_space, _loss_distribution, _noun, _reconstructions, _samples,
                                    _samples_by_group, _save, _title, _worst)
from vaedist.report.pages import _figure_html, _format_epochs, _html_table, _inputs_html, _lineage_html, _page
from vaedist.report.shards import _open_shards
from vaedist.report.training import TRAINING_FIGURE, _training, _training_html, _training_inputs

# file name -> title ({noun}: "digit" or "class", {items}: "digits" or "images"); also the order
# of the sections in index.html.
FIGURES = {
    "reconstructions.png": "Reconstructions",
    "samples.png": "Samples from the prior",
    "latent_space.png": "Latent space",
    "loss_by_digit.png": "Loss per {noun}",
    "worst_explained.png": "Highest-loss {items}",
}
# Only for a model of several latent groups.
GROUP_FIGURES = {"samples_by_group.png": "Samples varying one latent group at a time"}


def _resolve_inputs(latents_dir: str, checkpoint: str | None, shards_dir: str | None) -> tuple[Lineage, str, str]:
    lineage_path = storage.join(latents_dir, schema.LINEAGE_FILE)
    try:
        lineage = analyses.read_lineage(latents_dir)
    except analyses.QueryError:
        if checkpoint is None or shards_dir is None:
            raise
        lineage = Lineage()
    for name, value in (("checkpoint", checkpoint), ("shards_dir", shards_dir)):
        if value is None and not getattr(lineage, name):
            raise analyses.QueryError(f"{lineage_path} names no {name}; give one explicitly")
    return lineage, checkpoint or lineage.checkpoint, shards_dir or lineage.shards_dir


def _pick_epoch(latents_dir: str, epochs: list[int], epoch: int | None) -> int | None:
    """The epoch index.html shows: the one asked for, else the table's last; None for a table
    without an epoch column (where asking for one is an error)."""
    if not epochs:
        if epoch is not None:
            raise analyses.QueryError(f"latent table {latents_dir} has no epoch column (it encodes one checkpoint); "
                                      f"leave out epoch={epoch} (vaedist report --epoch)")
        return None
    if epoch is None:
        return epochs[-1]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch not in epochs:
        raise analyses.QueryError(f"epoch {epoch!r} is not in latent table {latents_dir}; it holds epochs "
                                  f"{_format_epochs(epochs)}")
    return epoch


def _checkpoint_of_epoch(lineage: Lineage, lineage_path: str, epoch: int, last: int) -> str:
    """The checkpoint a table of several checkpoints names for `epoch`: its `checkpoints` entry,
    or the lineage's `checkpoint` (the last epoch's)."""
    listed = lineage.checkpoint_of_epoch(epoch)
    if listed:
        return listed
    if epoch == last and lineage.checkpoint:
        return lineage.checkpoint
    raise analyses.QueryError(f"{lineage_path} names no checkpoint of epoch {epoch}; give one explicitly "
                           "(vaedist report --checkpoint)")


def _rows_of(epoch: int | None) -> tuple[str, dict[str, Any]]:
    """(relation, params): the view `latents`, or one epoch's rows of a table of several checkpoints
    (as vaedist.analyses.core scopes its queries)."""
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
    con = analyses.connect(latents_dir)
    lineage, lineage_checkpoint, shards_dir = _resolve_inputs(latents_dir, checkpoint, shards_dir)
    lineage_path = storage.join(latents_dir, schema.LINEAGE_FILE)
    epochs = analyses.table_epochs(latents_dir, con=con)
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
    latent_dim = schema.latent_dim_of(analyses.run_sql(latents_dir, "SELECT mu FROM latents LIMIT 0", con=con).schema)
    if latent_dim != model.latent_dim:
        raise CheckpointError(f"checkpoint {checkpoint} has latent_dim {model.latent_dim} but latent table "
                              f"{latents_dir} has {latent_dim}: not the model the table was encoded with")

    # The test split when the table has it (the held-out picture), else every row.
    counts = analyses.run_sql(latents_dir, "SELECT count(*) AS n, count(*) FILTER (WHERE split = 'test') AS n_test "
                              f"FROM {relation}", con=con, params=epoch_params).to_pylist()[0]
    if counts["n"] == 0:
        raise analyses.QueryError(f"latent table {latents_dir} has no rows to report on")
    split = "test" if counts["n_test"] else None
    split_note = "test" if split else "train and test"
    rows = analyses.run_sql(latents_dir, f"SELECT label, loss, mu FROM {relation} "
                            "WHERE $split IS NULL OR split = $split ORDER BY key",
                            con=con, params={**epoch_params, "split": split})
    labels = rows.column("label").to_numpy()
    loss = rows.column("loss").to_numpy()
    mu = rows.column("mu").combine_chunks().flatten().to_numpy().reshape(len(rows), latent_dim).astype(np.float64)

    run_dir, training_epochs, final, no_metrics = _training_inputs(run_dir, state.path)

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
        if len(model.latent_groups) > 1:
            figures["samples_by_group.png"] = _samples_by_group(model, info, seed)
        diagnostics, diagnostics_html = _diagnostics(con, latents_dir, shards_dir, info, num_examples, split,
                                                     split_note, shown_epoch)
        for name, (fig, caption) in {**figures, **diagnostics}.items():
            _save(fig, storage.join(out_dir, name))
        sections = [_figure_html(name, _title({**FIGURES, **GROUP_FIGURES}[name], info), caption)
                    for name, (_, caption) in figures.items()]
        training_figure = None
        if training_epochs:
            fig, caption = _training(training_epochs, final)
            _save(fig, storage.join(out_dir, TRAINING_FIGURE))
            training_figure = (TRAINING_FIGURE, caption)
        dynamics = None
        if len(epochs) > 1:
            dynamics = _write_dynamics(con, latents_dir, shards_dir, info, split, split_note, epochs,
                                       shown_epoch, out_dir, {"latent table": latents_dir, "shards": shards_dir})

    summary = analyses.loss_by_digit(latents_dir, split=split, epoch=shown_epoch, con=con)
    inputs = {"latent table": latents_dir, "checkpoint": checkpoint, "shards": shards_dir,
              "dataset": f"{info.name}, images {'x'.join(map(str, info.image_shape))}",
              "run": run_dir if run_dir is not None else "none"}
    if lineage.same_data_as_training is False:  # a model shown data it was not trained on
        inputs["model trained on"] = (f"{lineage.train_dataset or '?'} (manifest "
                                      f"{str(lineage.train_manifest_hash or '?')[:12]}), not these shards")
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
             _html_table(summary, "loss-by-class")]
    if len(model.latent_groups) > 1:
        body += ["<h2>KL by latent group</h2>\n<p>Each group's KL term (z_1 next to x), its share of the total KL "
                 f"and the mean of its share per datapoint; {html.escape(split_note)} datapoints, nats. The "
                 "per-dimension KL under Diagnostics compares q with N(0, I), which is a group's prior only at the "
                 "top; these are the terms of the loss.</p>",
                 _html_table(analyses.kl_by_group(latents_dir, split=split, epoch=shown_epoch, con=con), "kl-by-group")]
    body += [*sections, *diagnostics_html,
             _training_html(training_figure, final, no_metrics, run_dir), *_lineage_html(lineage)]
    index = storage.join(out_dir, "index.html")
    storage.write_bytes(index, _page("vaedist report", body).encode())
    return index
