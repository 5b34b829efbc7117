"""index.html's Training section: the metrics.jsonl of the checkpoint's run, checked field by field,
drawn as training curves, with the final importance-weighted test NLL."""

from __future__ import annotations

import html
import math
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vaedist import storage
from vaedist.checkpoint import METRICS_FILE, CheckpointError, read_metrics, run_dir_of_checkpoint

# Written only when the checkpoint's run has metrics; its section comes after the diagnostics.
TRAINING_FIGURE = "training.png"


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
        run_dir = run_dir_of_checkpoint(checkpoint_file)
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
