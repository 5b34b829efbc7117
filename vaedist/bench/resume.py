"""`vaedist bench resume`: a rerun of a killed encode against an uninterrupted one, on mnist8m's
1,210,000 datapoints.

    vaedist bench resume --config configs/debug.yaml --work /tmp/vaedist-bench-resume --kill-at 0.5

Inputs, made under --work unless given and reused by a later run: mnist8m shards (`vaedist data
prepare --set data.dataset=mnist8m --set data.mnist8m_variants=20`) and the checkpoint of a one-epoch
training run of --config on them (the debug config trains on its first shards only). Then three
`vaedist encode` commands, each a process of its own that starts its own embedded Ray, as a user
runs them, with ENCODE_DEFAULTS before the --set overrides:

(a) the encode, whole, timed;
(b) the same encode to another path, killed once --kill-at of the table's files are finished in its
    staging directory: the driver and every process it started (its process group, its Ray's GCS,
    raylet and workers, however deep) are stopped together with SIGSTOP, so that none forks or
    exits on its own meanwhile, then killed with SIGKILL, as when the driver's node dies;
(c) (b)'s command again, timed: it keeps the files (b) finished and encodes the rest.

(c)'s table must be byte-identical to (a)'s, file by file, or the benchmark fails. Each timed run is
split from outside its process, by what appears (phases): the driver's own start (Python, imports,
the checks before any work; for (c), reading the kept files' footers too) until its Ray's GCS
process starts; the cluster's start until the first encode actor's process; the actors' start and
model load until their first rows, extrapolated back from the steady rate at which the files
appear; the encoding; the verification and publish after the last file, until the table's
_SUCCESS is at its path; and the exit (Ray's shutdown).
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from vaedist.schema import SUCCESS_FILE

# An encode that fits the benchmark: no importance sampling (log p(x) estimates cost K decoder
# passes a datapoint), one actor per core of a 2-core machine.
ENCODE_DEFAULTS = ("encode.num_samples_iw=0", "encode.concurrency=2", "encode.cpus_per_actor=1")
ACTOR_MARK = "TableFileWriter"  # in an encode actor's process title (ray::MapWorker(MapBatches(...)))
GCS_MARK = "gcs_server"
RAY_START_TIMEOUT = "timed out during startup"  # Ray's error when its raylet misses a fixed 30 s
POLL_S = 0.1  # the staging directory's listing
SCAN_S = 0.25  # the processes', until the GCS and an actor are seen


def vaedist_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "vaedist.cli", *args]


def child_env() -> dict[str, str]:
    """The children start Ray of their own: never join a cluster RAY_ADDRESS names."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def finished_files(staging: Path, since: float = 0.0) -> dict[str, float]:
    """The table files finished in `staging` (a file appears there whole, by a rename; a hidden one
    is a temporary still being written) whose modification time is `since` or later: name -> mtime."""
    found = {}
    try:
        entries = list(os.scandir(staging))
    except FileNotFoundError:
        return found
    for entry in entries:
        if entry.name.endswith(".parquet") and not entry.name.startswith("."):
            try:
                mtime = entry.stat().st_mtime
            except FileNotFoundError:  # moved away by a publish
                continue
            if mtime >= since:
                found[entry.name] = mtime
    return found


def staging_dir(out: Path) -> Path | None:
    """The staging directory beside `out` (the job's; the bench clears the others beforehand)."""
    found = sorted(out.parent.glob(f".{out.name}.staging-*"))
    return found[0] if found else None


def clear_table(out: Path) -> None:
    """Remove a table and its hidden siblings (staging, old), so that a run starts from nothing."""
    import shutil

    for path in [out, *out.parent.glob(f".{out.name}.*")]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def processes() -> dict[int, tuple[int, int, str]]:
    """Every process on the machine: pid -> (parent pid, process group, state), from one pass over
    /proc (psutil's children() makes a pass per call)."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            table[int(entry)] = (int(fields[1]), int(fields[2]), fields[0].decode())
    return table


def descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for child, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_tree(pid: int) -> list[str]:
    """Stop the process `pid`, its process group and all their descendants, then kill them all with
    SIGKILL, and wait until they are gone; returns their command lines, `pid`'s first. Stopped first, repeatedly until
    no new process appears, so that none forks (a raylet starting a worker) or escapes meanwhile."""
    stopped: set[int] = set()
    while True:
        table = processes()
        tree = {pid} | {p for p, (_, group, _) in table.items() if group == pid}
        for known in {pid, *stopped}:
            tree |= descendants(known, table)
        new = tree - stopped
        if not new:
            break
        for p in new:
            stopped.add(p)
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
    # Read before any is killed: a raylet or GCS dies with its driver (Ray makes them share its fate).
    lines = [command_line(p) for p in sorted(stopped, key=lambda p: p != pid)]
    for p in stopped:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    # The root is the caller's child, for it to reap; the others count as gone once only a zombie
    # (an exit status nobody has collected yet) is left of them.
    deadline = time.monotonic() + 30
    alive = stopped - {pid}
    while alive and time.monotonic() < deadline:
        table = processes()
        alive = {p for p in alive if p in table and table[p][2] != "Z"}
        time.sleep(0.05)
    if alive:
        raise RuntimeError(f"processes {sorted(alive)} survived SIGKILL for 30 s")
    return lines


def describe_killed(lines: list[str]) -> str:
    """What kill_tree killed, in a few words: the driver, its Ray's GCS and raylet, the encode
    actors and the rest of Ray's processes."""
    kinds = {"GCS": GCS_MARK, "raylet": "/raylet", "encode actor": ACTOR_MARK}
    counts = {kind: sum(1 for line in lines[1:] if mark in line) for kind, mark in kinds.items()}
    others = len(lines) - 1 - sum(counts.values())
    parts = ["the driver"] + [f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items() if n]
    return f"{len(lines)} processes: " + ", ".join(parts + [f"{others} other Ray processes"])


@dataclass
class Run:
    """What was seen of one `vaedist encode` from outside: seconds after its launch."""
    name: str
    seconds: float = 0.0
    returncode: int | None = None
    gcs_s: float | None = None  # its Ray's GCS process appeared
    actor_s: float | None = None  # the first encode actor's process title appeared
    published_s: float | None = None  # the table's _SUCCESS appeared at its path
    kept: int = 0  # files a killed run had finished, found in staging at the launch
    files: dict[str, float] = field(default_factory=dict)  # file finished by this run -> seconds
    killed: list[str] = field(default_factory=list)

    def rows(self, rows_of: dict[str, int]) -> int:
        return sum(rows_of[name] for name in self.files)

    def phases(self, rows_of: dict[str, int]) -> dict[str, float]:
        """Seconds of each phase (module docstring): the extrapolated start of the rows splits the
        actors' start from the encoding."""
        from vaedist.bench.encode import fixed_cost

        written, rows = [], 0
        for name, t in sorted(self.files.items(), key=lambda item: item[1]):
            rows += rows_of[name]
            written.append((t, rows))
        first_rows, rate = fixed_cost(written)
        last = written[-1][0] if written else self.seconds
        if rate is None:  # one file: no rate to extrapolate by
            first_rows = written[0][0] if written else self.seconds
        gcs = self.gcs_s if self.gcs_s is not None else 0.0
        actor = self.actor_s if self.actor_s is not None else gcs
        published = self.published_s if self.published_s is not None else self.seconds
        return {"driver start": gcs, "cluster start": actor - gcs,
                "actors' start, model load": max(first_rows - actor, 0.0),
                "encoding": last - max(first_rows, actor), "verify, publish": published - last,
                "exit": self.seconds - published}


def watch(run: Run, command: list[str], out: Path, log: Path, rows_of: dict[str, int],
          echo: Callable[[str], None], kill_after_files: int | None = None, every_s: float = 10.0) -> Run:
    """Run `command` in a session of its own, following its processes and the files finished in its
    staging directory; kill it all (kill_tree) once kill_after_files are finished."""
    with open(log, "w") as sink:
        launched = time.time()
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)
        next_line, next_scan = every_s, 0.0
        staging = staging_dir(out)
        run.kept = len(finished_files(staging)) if staging is not None else 0
        while True:
            now = time.time() - launched
            if (run.gcs_s is None or run.actor_s is None) and now >= next_scan:
                next_scan = now + SCAN_S
                for child in descendants(proc.pid, processes()):
                    line = command_line(child)
                    if run.gcs_s is None and GCS_MARK in line:
                        run.gcs_s = now
                    if run.actor_s is None and ACTOR_MARK in line:
                        run.actor_s = now
            staging = staging_dir(out)
            if run.published_s is None and (out / SUCCESS_FILE).exists():
                run.published_s = now
            if staging is not None:
                run.files.update({n: t - launched for n, t in finished_files(staging, since=launched).items()})
            if kill_after_files is not None and len(run.files) >= kill_after_files:
                run.killed = kill_tree(proc.pid)
                run.seconds = time.time() - launched
                proc.wait()
                run.returncode = proc.returncode
                # Files finished between the last look and the kill count as finished by it.
                run.files.update({n: t - launched for n, t in finished_files(staging, since=launched).items()})
                return run
            if proc.poll() is not None:
                run.seconds = time.time() - launched
                run.returncode = proc.returncode
                # The last files, if the publish moved them before a look found them in staging.
                run.files.update({n: t - launched for n, t in finished_files(out, since=launched).items()})
                return run
            if now >= next_line:
                seen = [f"its Ray's GCS at {run.gcs_s:.0f} s" if run.gcs_s is not None else "no Ray yet"]
                seen += [f"an encode actor at {run.actor_s:.0f} s"] if run.actor_s is not None else []
                echo(f"    {run.name} {now:.0f} s: {', '.join(seen)}; {len(run.files)} of {len(rows_of) - run.kept} "
                     f"files to encode finished, {run.rows(rows_of):,} rows")
                next_line += every_s
            time.sleep(POLL_S)


def identical_tables(a: Path, b: Path) -> tuple[int, int, list[str]]:
    """(files, bytes, names that differ or are missing on one side) of two tables' Parquet files."""
    names_a = {p.name for p in a.glob("*.parquet")}
    names_b = {p.name for p in b.glob("*.parquet")}
    differ = sorted(names_a ^ names_b)
    differ += sorted(n for n in names_a & names_b if not filecmp.cmp(a / n, b / n, shallow=False))
    return len(names_a), sum((a / n).stat().st_size for n in names_a), differ


def _check(run: Run, log: Path, expect_success: bool = True) -> None:
    if expect_success and run.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{run.name} failed (exit {run.returncode}); the end of {log}:\n" + "\n".join(tail))


def prepare_shards(work: Path, variants: int, mnist_dir: str | None, echo: Callable[[str], None]) -> Path:
    shards = work / f"shards-mnist8m-{variants}"
    if (shards / "manifest.json").exists():
        echo(f"shards: reusing {shards}")
        return shards
    echo(f"shards: preparing mnist8m with {variants} variants in {shards} (a core for ~10 minutes at 20)")
    start = time.perf_counter()
    args = ["data", "prepare", "--set", "data.dataset=mnist8m", "--set", f"data.mnist8m_variants={variants}",
            "--out", str(shards)] + (["--mnist-dir", mnist_dir] if mnist_dir else [])
    subprocess.run(vaedist_command(*args), env=child_env(), check=True, stdout=subprocess.DEVNULL)
    echo(f"shards: prepared in {time.perf_counter() - start:.0f} s")
    return shards


def train_checkpoint(work: Path, config: str, overrides: list[str], shards: Path, dataset: str,
                     echo: Callable[[str], None], attempts: int = 3) -> str:
    from vaedist.checkpoint import best_checkpoint_dir

    run_dir = work / "runs" / "bench-resume"
    found = best_checkpoint_dir(str(run_dir))
    if found:
        echo(f"checkpoint: reusing {found}")
        return found
    echo(f"checkpoint: training {config} for one epoch into {run_dir}")
    args = ["train", "--config", config, *[a for o in overrides for a in ("--set", o)],
            "--set", f"data.shards_dir={shards}", "--set", f"data.dataset={dataset}",
            "--set", f"output.storage_path={run_dir.parent}", "--set", "output.run_name=bench-resume",
            "--set", "train.epochs=1", "--set", "tracking.enabled=false"]
    for attempt in range(attempts):
        # A busy machine's raylet can miss Ray's fixed 30 s to register: untimed, so tried again.
        done = subprocess.run(vaedist_command(*args), env=child_env(), capture_output=True, text=True)
        if done.returncode == 0:
            break
        if attempt == attempts - 1 or RAY_START_TIMEOUT not in done.stdout + done.stderr:
            raise RuntimeError(f"training the checkpoint failed:\n{(done.stdout + done.stderr)[-2000:]}")
    found = best_checkpoint_dir(str(run_dir))
    if not found:
        raise RuntimeError(f"training into {run_dir} left no checkpoint")
    return found


def bench_resume(config: str, overrides: list[str], work: str, shards: str | None = None,
                 checkpoint: str | None = None, variants: int = 20, kill_at: float = 0.5,
                 mnist_dir: str | None = None, echo: Callable[[str], None] = print) -> dict:
    from vaedist.config import ConfigError, load_config
    from vaedist.data import read_manifest
    from vaedist.encode import ROWS_PER_FILE, file_plan

    overrides = [*ENCODE_DEFAULTS, *overrides]
    cfg = load_config(config, overrides)
    if cfg.scaling.address or os.environ.get("RAY_ADDRESS"):
        raise ConfigError("bench resume kills each encode's own embedded Ray; leave scaling.address and "
                          "RAY_ADDRESS unset")
    work_dir = Path(work).absolute()
    (work_dir / "logs").mkdir(parents=True, exist_ok=True)
    shards_dir = Path(shards).absolute() if shards else prepare_shards(work_dir, variants, mnist_dir, echo)
    manifest = read_manifest(str(shards_dir))
    plan = file_plan(manifest, list(cfg.encode.splits), ROWS_PER_FILE)
    rows_of = {f["file"]: f["datapoints"] for f in plan}
    total = sum(rows_of.values())
    checkpoint = checkpoint or train_checkpoint(work_dir, config, overrides, shards_dir, manifest.dataset.name, echo)

    full, resumed = work_dir / "latents-full", work_dir / "latents-resumed"
    for out in (full, resumed):
        clear_table(out)

    def command(out: Path) -> list[str]:
        return vaedist_command("encode", "--config", config, *[a for o in overrides for a in ("--set", o)],
                               "--set", "tracking.enabled=false", "--checkpoint", checkpoint,
                               "--shards", str(shards_dir), "--out", str(out))

    kill_files = max(1, min(len(plan) - 1, math.ceil(kill_at * len(plan))))
    ec = cfg.encode
    echo(f"encode: {total:,} datapoints of {shards_dir} in {len(plan)} files, checkpoint {checkpoint}; "
         f"S={ec.num_samples_mc}, K={ec.num_samples_iw}, {ec.concurrency} actor(s) x {ec.cpus_per_actor:g} CPU")
    echo(f"command: {' '.join(command(full)[2:]).replace('vaedist.cli', 'vaedist', 1)}")

    def attempt(name: str, out: Path, log: Path, kill_after_files: int | None = None) -> Run:
        for tries_left in (2, 1, 0):
            run = watch(Run(name), command(out), out, log, rows_of, echo, kill_after_files=kill_after_files)
            if run.killed or run.returncode == 0 or not tries_left or RAY_START_TIMEOUT not in log.read_text():
                return run
            echo(f"{name}: its Ray missed Ray's fixed 30 s to start (a busy machine); again")

    echo("(a) the whole encode")
    a = attempt("(a)", full, work_dir / "logs" / "a-full.log")
    _check(a, work_dir / "logs" / "a-full.log")
    echo(f"(a) {a.rows(rows_of):,} rows in {a.seconds:.1f} s")

    echo(f"(b) the same encode to another path, killed at {kill_files} of {len(plan)} files")
    b = attempt("(b)", resumed, work_dir / "logs" / "b-killed.log", kill_after_files=kill_files)
    if not b.killed:
        _check(b, work_dir / "logs" / "b-killed.log")
        raise RuntimeError("(b) finished before it could be killed; give a smaller --kill-at")
    echo(f"(b) killed {b.seconds:.1f} s after its start with {len(b.files)} of {len(plan)} files finished "
         f"({b.rows(rows_of):,} rows): {describe_killed(b.killed)}")
    # Nothing of (b) may remain, and the staging it left is the rerun's to find.
    if staging_dir(resumed) is None or (resumed.exists() and any(resumed.iterdir())):
        raise RuntimeError(f"(b) left no staging directory beside {resumed}, or published a table")

    echo("(c) (b)'s command again")
    c = attempt("(c)", resumed, work_dir / "logs" / "c-rerun.log")
    _check(c, work_dir / "logs" / "c-rerun.log")
    said = [line for line in (work_dir / "logs" / "c-rerun.log").read_text().splitlines()
            if line.startswith("resuming:")]
    echo(f"(c) {said[0].split(' (')[0] if said else 'resumed nothing'}; {c.rows(rows_of):,} rows encoded in "
         f"{c.seconds:.1f} s")

    files, size, differ = identical_tables(full, resumed)
    if differ:
        raise RuntimeError(f"(c)'s table differs from (a)'s in {len(differ)} files: {differ[:5]}")
    echo(f"byte-identical: (c)'s {files} Parquet files ({size / 2**20:,.0f} MiB) are (a)'s")

    results = {"datapoints": total, "files": len(plan), "checkpoint": checkpoint, "shards": str(shards_dir),
               "overrides": overrides, "kill_at_files": kill_files, "identical_files": files,
               "runs": {}}
    for run in (a, c):
        phases = run.phases(rows_of)
        encoded = run.rows(rows_of)
        results["runs"][run.name] = {**asdict(run), "rows_encoded": encoded, "phases_s": phases}
        echo(f"{run.name} {run.seconds:.1f} s, {encoded:,} rows: " + "; ".join(
            f"{name} {seconds:.1f} s" for name, seconds in phases.items())
            + f" ({encoded / max(phases['encoding'], 1e-9):,.0f} rows/s while encoding)")
    results["runs"]["(b)"] = {**asdict(b), "rows_encoded": b.rows(rows_of)}
    results["rerun_over_full"] = c.seconds / a.seconds
    results["rows_rerun_over_full"] = c.rows(rows_of) / a.rows(rows_of)
    echo(f"rerun / full: {c.seconds:.1f} s / {a.seconds:.1f} s = {results['rerun_over_full']:.2f}; rows encoded "
         f"{c.rows(rows_of):,} / {a.rows(rows_of):,} = {results['rows_rerun_over_full']:.2f}")
    (work_dir / "results.json").write_text(json.dumps(results, indent=2))
    echo(f"wrote {work_dir / 'results.json'}")
    return results
