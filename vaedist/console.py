"""What vaedist shows while it works: one live display per command, quiet about Ray's internals.

    set_verbose(False)                 # the default: Ray's INFO chatter and Ray Data's progress off
    with EpochDisplay(total=5) as show: ...  # the training driver: a line (or a bar) per epoch

Ray keeps everything in its log files (/tmp/ray/session_latest/logs); `--verbose` (or
VAEDIST_VERBOSE=1) also shows it here. On a terminal the displays are tqdm bars; piped (CI,
`ray job logs`) each is one plain line per epoch, or per ~10% of the rows.

The epoch display is fed by Ray Train's reported metrics: a UserCallback in the Train controller,
which Ray runs on the driver's node, appends each report to a local file that the driver follows.
That costs no extra process (an idle Ray actor wakes every 10 ms, which a 2-core machine feels) and
no write to the run's storage.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable

VERBOSE_ENV = "VAEDIST_VERBOSE"
log = logging.getLogger("vaedist")

# Ray ranks checkpoints by the reported test_loss and needs a number for an epoch without a test
# evaluation: the largest float ranks it last, so it is kept only while it is the latest. Not NaN or
# inf: Ray's checkpoint-manager snapshot stores those as null, and a rerun that restores it fails.
UNEVALUATED_TEST_LOSS = sys.float_info.max


def score_for_ray(test_loss: float | None) -> float:
    """What an epoch reports to Ray as its test_loss."""
    return UNEVALUATED_TEST_LOSS if test_loss is None else test_loss


def loss_from_ray_score(value: Any) -> float | None:
    """The test loss a Ray report carries, None for an epoch without a test evaluation."""
    return None if value is None or value != value or value >= UNEVALUATED_TEST_LOSS else value


def set_verbose(verbose: bool) -> None:
    """Choose for this process and the Ray it starts; vaedist's own INFO lines always show."""
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def interactive() -> bool:
    return sys.stderr.isatty()


def quiet_ray_data() -> None:
    """Ray Data's progress bars, its periodic progress blocks when not on a terminal, and its INFO
    lines, off unless verbose. Set in the process that runs the plan (it travels with the datasets
    built afterwards, as Train's split coordinator runs them)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    verbose = is_verbose()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose else logging.WARNING)
    # With the bars off, Ray Data warns once per process that they are off ("Progress bars
    # disabled..."): that is this function's doing, not the user's to act on.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)


def ray_logging_level() -> int:
    return logging.INFO if is_verbose() else logging.WARNING


class LineProgress:
    """A progress display for work counted in units: a tqdm bar on a terminal, else a plain line
    at every ~10% (CI logs and `ray job logs` stay readable); nothing when disabled."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done, self.next_line, self.bar = 0, max(total // 10, 1), None
        self.start = time.perf_counter()

    def __enter__(self) -> "LineProgress":
        if self.enabled and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit=self.unit, desc=self.desc, dynamic_ncols=True)
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (self.done >= self.next_line or self.done == self.total):
            self.next_line = self.done + max(self.total // 10, 1)
            print(f"{self.desc}: {self.done:,} of {self.total:,} {self.unit}s "
                  f"({time.perf_counter() - self.start:.0f} s)", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# Training: epochs as they end.

def format_epoch(row: dict) -> str:
    test = f"{row['test_loss']:8.3f}" if row.get("test_loss") is not None else "       -"
    return (f"epoch {row['epoch']:3d}  train l_i {row['train_loss']:8.3f}  test l_i {test}  "
            f"{row['samples_per_s']:8,.0f} samples/s")


def format_final(row: dict) -> str:
    return (f"final  test NLL (IW, K={row['num_samples_iw']}) {row['test_nll_iw']:.3f} nats   "
            f"test negative ELBO {row['test_loss']:.3f} nats")


def _progress_callback_class():
    """ProgressCallback subclasses Ray Train's UserCallback, imported only where Ray Train is."""
    from ray.train.v2.api.callback import UserCallback

    class ProgressCallback(UserCallback):
        """In the Train controller: append rank 0's report to a file on the driver's node."""

        def __init__(self, path: str):
            self.path = path

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            row = metrics[0] if metrics else {}
            if row.get("kind") in ("epoch", "final"):
                keep = {k: row.get(k) for k in ("kind", "epoch", "train_loss", "test_loss", "samples_per_s",
                                                 "num_samples_iw", "test_nll_iw", "restored_from_epoch")}
                keep["test_loss"] = loss_from_ray_score(keep.get("test_loss"))
                with open(self.path, "a") as f:
                    f.write(json.dumps(keep) + "\n")

    return ProgressCallback


class EpochDisplay:
    """Follows the progress file that ProgressCallback writes and shows each epoch as it ends."""

    def __init__(self, path: str, total_epochs: int, echo: Callable[[str], None] | None = None):
        self.path, self.total = path, total_epochs
        self.echo = echo or (lambda line: print(line, flush=True))
        self.seen = 0
        self.bar = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="vaedist-epochs", daemon=True)

    def callback(self):
        return _progress_callback_class()(self.path)

    def __enter__(self) -> "EpochDisplay":
        open(self.path, "w").close()
        if interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="epoch", desc="train", dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._drain()
        if self.bar is not None:
            self.bar.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _follow(self) -> None:
        while not self._stop.wait(0.5):
            self._drain()

    def _drain(self) -> None:
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except OSError:
            return
        for line in lines[self.seen:]:
            self.seen += 1
            try:
                row = json.loads(line)
            except ValueError:  # a line half written: read it whole next time
                self.seen -= 1
                break
            self._show(row)

    def _show(self, row: dict) -> None:
        text = format_epoch(row) if row["kind"] == "epoch" else format_final(row)
        if self.bar is not None:
            if row["kind"] == "epoch":
                self.bar.n = row["epoch"] + 1
                self.bar.set_postfix_str(text.split("  ", 1)[1].strip(), refresh=False)
                self.bar.refresh()
            self.bar.write(text)
        else:
            self.echo(text)


# ---------------------------------------------------------------------------------------------
# Encoding: rows as the job writes them.

class RowsDisplay:
    """Counts the rows of the Parquet files that appear in the encode job's staging directory (their
    footers only), until the job ends: a bar on a terminal, else a line every ~10%."""

    def __init__(self, staging: str, total_rows: int, echo: Callable[[str], None] | None = None):
        self.staging, self.total = staging, total_rows
        self.echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
        self.counted: dict[str, tuple[float, int]] = {}  # file -> (seconds after the start it was finished, rows)
        self.bar = None
        self.last_reported = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="vaedist-rows", daemon=True)
        self.start, self.wall_start = time.perf_counter(), time.time()

    @property
    def history(self) -> list[tuple[float, int]]:
        """(seconds after the start, rows in finished files by then), a point per file. A file's time is
        its modification time where the storage gives one (a poll each second would blur a fast job's
        whole run: a GPU encodes 70,000 rows in about one), else when the poll found it."""
        points, rows = [], 0
        for seconds, n in sorted(self.counted.values()):
            rows += n
            points.append((seconds, rows))
        return points

    def __enter__(self) -> "RowsDisplay":
        if interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, unit="row", unit_scale=True, desc="encode", dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if exc[0] is None:
            self._count()
        if self.bar is not None:
            self.bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(1.0):
            self._count()

    def _count(self) -> None:
        import pyarrow.parquet as pq

        from vaedist import storage

        fs, root = storage.resolve(self.staging)
        for name in storage.listdir(self.staging):
            if not name.endswith(".parquet") or name in self.counted:
                continue
            path = f"{root.rstrip('/')}/{name}"
            try:
                with fs.open_input_file(path) as f:
                    rows = pq.ParquetFile(f).metadata.num_rows
                mtime = fs.get_file_info(path).mtime
            except Exception:  # still being written: no footer yet
                continue
            seen = time.perf_counter() - self.start  # no later than seen: another node's clock may differ
            self.counted[name] = (min(mtime.timestamp() - self.wall_start, seen) if mtime else seen, rows)
        done = sum(rows for _, rows in self.counted.values())
        if self.bar is not None:
            self.bar.n = done
            self.bar.refresh()
        elif done >= self.last_reported + max(self.total // 10, 1) or (done == self.total and done > self.last_reported):
            self.last_reported = done
            rate = done / max(time.perf_counter() - self.start, 1e-9)
            self.echo(f"encode: {done:,} of {self.total:,} rows written ({rate:,.0f} rows/s)")
