"""`vaedist bench analyses`: each ready-made analysis of vaedist.analyses, warm, on one connection,
against analyses.loss_by_digit on the same table as the baseline (the analysis the README's ≤ 50 ms
target is for). Target: ≤ 100 ms per analysis on a 70,000-row table.

    vaedist bench analyses --latents outputs/latents --repeats 20

A table with an epoch column also gets the training-dynamics analyses; its one-table analyses, the
baseline and the comparison run on its last epoch (compared with its first).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

TARGET_MS = 100.0


def bench_analyses(latents_dir: str, repeats: int = 20, echo: Callable[[str], None] = print) -> dict[str, float]:
    """Median wall time in ms of each analysis over `repeats` warm runs (after one warm-up run). The
    CPU time (all of DuckDB's threads) is printed beside it: on a shared machine it moves less."""
    from vaedist import analyses as a
    from vaedist.analyses import connect, loss_by_digit, run_sql

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    latents_dir = str(latents_dir)
    con = a.connect_pair(latents_dir, latents_dir, con=connect(latents_dir))
    rows = run_sql(latents_dir, "SELECT count(*) AS n FROM latents", con=con).column("n")[0].as_py()
    epochs = a.table_epochs(latents_dir, con=con)
    multi = bool(epochs)
    first, last = (epochs[0], epochs[-1]) if multi else (None, None)
    on = {"epoch": last}
    calls: dict[str, Callable[[], object]] = {
        "loss-by-digit (baseline)": lambda: loss_by_digit(latents_dir, **on, con=con),
        "active-units": lambda: a.active_units(latents_dir, **on, con=con),
        "kl-per-dim": lambda: a.kl_per_dim(latents_dir, **on, con=con),
        "totals": lambda: a.totals(latents_dir, **on, con=con),
        "outliers": lambda: a.outliers(latents_dir, **on, con=con),
        "compare": lambda: a.compare_by_digit(latents_dir, latents_dir, **on, against_epoch=first, con=con),
        "compare-top": lambda: a.compare_top(latents_dir, latents_dir, **on, against_epoch=first, con=con),
    }
    if run_sql(latents_dir, "SELECT count(log_px) AS n FROM latents", con=con).column("n")[0].as_py():
        calls["gap-by-digit"] = lambda: a.gap_by_digit(latents_dir, **on, con=con)
    if multi:
        calls.update({
            "curves": lambda: a.curves(latents_dir, con=con),
            "digit-curves": lambda: a.digit_curves(latents_dir, con=con),
            "learned-late": lambda: a.learned_late(latents_dir, within=1.0, after=first, con=con),
            "forgotten": lambda: a.forgotten(latents_dir, by=2.0, con=con),
            "forgotten (pair)": lambda: a.forgotten(latents_dir, by=2.0, from_epoch=first, to_epoch=last, con=con),
        })
    echo(f"{latents_dir}: {rows:,} rows" + (f", epochs {epochs[0]}..{epochs[-1]} ({len(epochs)})" if multi else "")
         + f"; median of {repeats} warm runs, one connection")
    medians: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for name, call in calls.items():
        call()  # warm-up: OS cache, Parquet metadata
        times, cpu_times = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            call()
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - start_cpu)
        medians[name] = statistics.median(times) * 1000
        cpu[name] = statistics.median(cpu_times) * 1000
    baseline = medians["loss-by-digit (baseline)"]
    width = max(map(len, medians))
    echo(f"{'analysis':<{width}}  {'median ms':>9}  {'/ baseline':>10}  {'CPU ms':>7}  target ≤ {TARGET_MS:g} ms")
    for name, ms in medians.items():
        echo(f"{name:<{width}}  {ms:9.1f}  {ms / baseline:10.2f}  {cpu[name]:7.1f}  "
             f"{'ok' if ms <= TARGET_MS else 'MISSED'}")
    return medians
