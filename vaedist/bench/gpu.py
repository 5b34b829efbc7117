"""`vaedist bench gpu`: every GPU figure in one command under one wall-clock budget, for a borrowed GPU
machine that has no package index (README, "Proving the GPU paths on a machine without a package index").

    vaedist bench gpu --out outputs/bench-gpu --budget-s 480 --mnist-dir ../shared/data/mnist

It prepares MNIST shards from the IDX files in a scratch directory, then runs the parts in order. Each
part has a share of the budget, and a part's deadline is the sum of the shares up to it, so the time one
leaves unspent passes on to the next; a part, or a step within one, whose time is spent is skipped with
a line saying so (a step starts only when the time left is at least what the last step of its kind took):

  facts        GPU name and memory, driver, torch and CUDA versions, CPU count
  batch_sweep  the plain loop at batch 128 ... 8192, each batch with the step eager and as a CUDA
               graph (train.step_mode, vaedist/step.py): samples/s, the graph's speed-up over eager,
               and the test negative ELBO after a fixed number of samples (constant learning rate),
               so the speed/quality trade shows
  quality      the default quality run: configs/mnist.yaml (its model, batch 128, its schedules) in
               the plain loop with train.step_mode=auto, for as many of its 200 epochs as the part's
               time allows (planned from the sweep's batch-128 rate), timed end to end, with the test
               set's negative ELBO and its NLL (importance-weighted, K = its num_samples_iw_final)
  encode       the Ray Data encode job on the GPU vs the plain loop (bench encode's), S=16 K=0 and S=1
               K=1000, over all 70,000 images
  gpu_tests    `pytest -m gpu` in a subprocess (stopped at the part's deadline): pass/fail/skip counts
  train        Ray Train on 1 GPU vs the plain CUDA loop (bench train's), the default MLP, bf16 and fp32
  cpu_scaling  Ray Train with 1, 2, 4, 8 CPU workers (DDP over gloo) and encode with 1 ... 14 CPU actors:
               speed-up and efficiency per worker, short runs, capped to the cores present

Without CUDA the same parts run on the CPU at tiny sizes (so the command is exercised anywhere), and
what needs CUDA (bf16, the GPU tier's tests) is skipped with a line. Every figure goes to
`<out>/results.json` and `<out>/results.md` (rewritten after each part, so a run cut short keeps what
it measured), pytest's output to `<out>/gpu-tests.log`; the table prints last.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vaedist import __version__, storage
from vaedist.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
# Shares of the budget, in order (on the GPU machine's 480 s: shards ~5 s, tests ~80 s, ...).
# Measured on the H200 (480 s, before the step modes): shards 1 s, facts 1, tests 121, train 61 per
# precision, batch sweep 34 (eager only), encode 18, CPU scaling 136; a part's unused time passes to
# the next. The quality run takes the largest share: 200 epochs of batch 128 are 12M samples.
SHARES = {"shards": 0.01, "facts": 0.01, "batch_sweep": 0.14, "quality": 0.30, "encode": 0.08, "gpu_tests": 0.24,
          "train": 0.12, "cpu_scaling": 0.10}
QUALITY_CONFIG = REPO / "configs" / "mnist.yaml"
QUALITY_EVAL_SHARE = 0.2  # of the quality part's time kept for the test set's evaluation (IW K = 1000)
# configs/mnist.yaml's model, the README's scale model's: MLP 784-512-512-50.
DEFAULT_MLP = ["model.kind=mlp", "model.latent_dim=50", "model.hidden_dims=[512, 512]", "model.activation=elu"]
OPTIONAL_MODULES = ("duckdb", "mlflow")
RAY_START_TIMEOUT = "timed out during startup"  # ray.init's error when its node does not come up in time


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU machine's sizes, or tiny ones on a CPU."""
    limit_per_split: int | None  # None: all of MNIST
    samples_per_shard: int
    model: tuple[str, ...]
    train_epochs: int
    train_max_steps: int  # per epoch; 0: the whole split
    sweep_batches: tuple[int, ...]
    sweep_samples: int
    encode_settings: tuple[tuple[int, int, tuple[str, ...]], ...]  # (S, K, splits)
    encode_batch: int
    scale_workers: tuple[int, ...]
    scale_actors: tuple[int, ...]
    scale_epochs: int
    scale_max_steps: int
    sweep_modes: tuple[str, ...] = ("eager",)  # train.step_mode values the batch sweep compares
    quality_max_epochs: int = 200
    quality_max_steps: int = 0  # per epoch; 0: the whole split
    quality_iw: int | None = None  # None: the config's num_samples_iw_final


GPU_SIZES = Sizes(limit_per_split=None, samples_per_shard=2500, model=tuple(DEFAULT_MLP), train_epochs=4,
                  train_max_steps=0, sweep_batches=(128, 256, 512, 1024, 2048, 4096, 8192), sweep_samples=600_000,
                  encode_settings=((16, 0, ("train", "test")), (1, 1000, ("train", "test"))), encode_batch=2048,
                  scale_workers=(1, 2, 4, 8), scale_actors=(1, 2, 4, 8, 14), scale_epochs=3, scale_max_steps=50,
                  sweep_modes=("eager", "cuda_graph"))
# On a CPU one worker, one actor and one encode setting (the importance-sampled one): the mode proves
# each part runs to its end, not how it scales.
CPU_SIZES = Sizes(limit_per_split=2000, samples_per_shard=500,
                  model=("model.kind=mlp", "model.latent_dim=8", "model.hidden_dims=[128]"), train_epochs=2,
                  train_max_steps=10, sweep_batches=(128, 512), sweep_samples=2048,
                  encode_settings=((1, 100, ("test",)),), encode_batch=500,
                  scale_workers=(1,), scale_actors=(1,), scale_epochs=2, scale_max_steps=5,
                  quality_max_epochs=2, quality_max_steps=5, quality_iw=10)


class Budget:
    """Deadlines from shares of one wall-clock budget; see the module docstring."""

    def __init__(self, total_s: float, shares: dict[str, float]):
        self.start, self.total_s = time.monotonic(), total_s
        weight = sum(shares.values())
        self.ends, running = {}, 0.0
        for name, share in shares.items():
            running += share / weight
            self.ends[name] = self.start + total_s * running
        self.part = next(iter(shares))

    def left(self, part: str | None = None) -> float:
        return self.ends[part or self.part] - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


@dataclass
class Setup:
    gpu: bool
    sizes: Sizes
    cpus: int
    mnist_dir: str
    work: str
    shards: str = ""
    checkpoint: str | None = None  # the batch sweep's batch-128 model, for encode
    batch128_samples_per_s: float | None = None  # the sweep's fastest mode at its first batch: plans quality


class Results:
    """The JSON document and the Markdown table, written again after every part."""

    def __init__(self, out: str, echo: Callable[[str], None], **head: Any):
        self.out, self.echo = out, echo
        self.doc: dict[str, Any] = {"vaedist_version": __version__, **head, "parts": {}}
        self.rows: list[tuple[str, str, str]] = []
        os.makedirs(out, exist_ok=True)

    def row(self, part: str, what: str, value: str) -> None:
        self.rows.append((part, what, value))

    def skip(self, part: str, what: str, why: str) -> None:
        line = f"{part}: {what} skipped: {why}"
        self.echo(line)
        self.doc["parts"].setdefault(part, {}).setdefault("skipped_steps", []).append(f"{what}: {why}")
        self.row(part, what, f"skipped: {why}")

    def markdown(self) -> str:
        head = self.doc
        title = head.get("facts", {}).get("gpu_name") or "no CUDA: CPU mode, tiny sizes"
        lines = [f"## vaedist bench gpu: {title}", "",
                 f"{head.get('started', '')}, budget {head.get('budget_s', 0):.0f} s, "
                 f"wall {head.get('wall_s', 0):.0f} s", "", "| part | what | value |", "| --- | --- | --- |"]
        lines += [f"| {p} | {w} | {v} |" for p, w, v in self.rows]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(self.doc, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(self.markdown())


# ---------------------------------------------------------------------------------------------
# The parts. Each takes (setup, budget, results) and returns its figures.

def part_shards(setup: Setup, budget: Budget, res: Results) -> dict[str, Any]:
    from vaedist.data import prepare_shards

    s = setup.sizes
    setup.shards = os.path.join(setup.work, "shards")
    manifest = prepare_shards(setup.shards, "mnist", source_dir=setup.mnist_dir, samples_per_shard=s.samples_per_shard,
                              limit_per_split=s.limit_per_split, progress=False)
    counts = {split: entry.num_samples for split, entry in manifest.splits.items()}
    res.row("shards", "MNIST shards", ", ".join(f"{k} {v:,}" for k, v in counts.items()) +
            f" ({s.samples_per_shard:,} per shard)")
    return {"rows": counts, "samples_per_shard": s.samples_per_shard}


def part_facts(setup: Setup, budget: Budget, res: Results) -> dict[str, Any]:
    from vaedist.devices import nvidia_driver_version

    facts: dict[str, Any] = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "driver": nvidia_driver_version(), "cpu_count": os.cpu_count(), "cpus_usable": setup.cpus,
        "python": platform.python_version(), "platform": platform.platform(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    try:
        import ray

        facts["ray"] = ray.__version__
    except ImportError:
        facts["ray"] = None
    if setup.gpu:
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     gpu_count=torch.cuda.device_count(), gpu_sms=props.multi_processor_count,
                     gpu_capability=f"{props.major}.{props.minor}")
        res.row("facts", "GPU", f"{props.name}, {facts['gpu_memory_gib']} GiB, driver {facts['driver']}")
    else:
        res.row("facts", "GPU", "none (torch.cuda.is_available() is false)")
    res.row("facts", "software", f"torch {facts['torch']} (CUDA {facts['cuda']}), Ray {facts['ray']}, "
                                 f"Python {facts['python']}")
    res.row("facts", "CPUs", f"{facts['cpu_count']} ({setup.cpus} usable), {facts['memory_gib']} GiB memory")
    res.doc["facts"] = facts
    return facts


def part_gpu_tests(setup: Setup, budget: Budget, res: Results) -> dict[str, Any]:
    """The GPU tier in its own process; its deadline is the part's (the process group is killed then)."""
    if not (REPO / "tests" / "gpu").is_dir():
        res.skip("gpu_tests", "pytest -m gpu", f"no tests/gpu beside the vaedist package ({REPO})")
        return {}
    xml = os.path.join(setup.work, "gpu-tests.xml")
    env = {**os.environ, "VAEDIST_MNIST_DIR": setup.mnist_dir, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # tests/unit/test_rng.py holds one GPU test; the rest of tests/unit is not collected (its query
    # tests import DuckDB, which a GPU machine without a package index lacks).
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "tests/unit/test_rng.py", "-q", "-rfEs",
               "-p", "no:cacheprovider", f"--junitxml={xml}"]
    log_path = os.path.join(res.out, "gpu-tests.log")
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=max(budget.left(), 1))
        except subprocess.TimeoutExpired:
            # Interrupted, pytest still reports what ran and writes its XML; killed if it will not stop.
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
    seconds = time.monotonic() - start
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if os.path.exists(xml):
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    tail = Path(log_path).read_text(errors="replace").splitlines()[-30:]
    figures = {"command": " ".join(command[1:]), "exit_code": code, "seconds": round(seconds, 1), "passed": passed,
               "failed": counts["failures"], "errors": counts["errors"], "skipped": counts["skipped"],
               "log_tail": tail}
    if code is None:
        res.skip("gpu_tests", "the rest of pytest -m gpu", f"stopped at the part's deadline after {seconds:.0f} s")
    summary = (f"{passed} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped "
               f"({seconds:.0f} s, exit {code})")
    res.echo(f"gpu_tests: {summary}")
    res.row("gpu_tests", "pytest -m gpu", summary)
    return figures


def _base(setup: Setup, *overrides: str) -> Config:
    return load_config(None, [f"data.shards_dir={setup.shards}", f"output.storage_path={setup.work}/runs",
                              *setup.sizes.model, "train.lr=1e-3", "train.lr_schedule=constant",
                              "train.eval_every_epochs=1000", "output.checkpoint_every_epochs=1000",
                              "train.num_samples_iw_final=0", *overrides])


def _shutdown_ray() -> None:
    """Stop our embedded Ray (also the processes of one whose start failed: ray.shutdown is safe either way)."""
    import ray

    ray.shutdown()


def _end_ray_children() -> None:
    """The processes of a Ray start that failed stay up (ray.shutdown knows no node to stop): end those
    that are this process's own children (their children share their fate)."""
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = stat.read_text().rsplit(")", 1)[1].split()[1]
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
        if ppid == me and "/ray/" in command:
            try:
                os.kill(int(stat.parent.name), signal.SIGTERM)
            except OSError:
                pass


def _prefixed(res: Results, prefix: str) -> Callable[[str], None]:
    return lambda line: res.echo(f"{prefix}{line}")


class Steps:
    """Steps of one part: each starts only when the part's time left is at least what the last step of
    its kind took."""

    def __init__(self, part: str, budget: Budget, res: Results):
        self.part, self.budget, self.res, self.last_s = part, budget, res, {}

    def run(self, what: str, fn: Callable[[], Any], kind: str = "") -> Any:
        left, last = self.budget.left(), self.last_s.get(kind, 0.0)
        if left <= 0 or left < last:
            self.res.skip(self.part, what, f"{max(left, 0):.0f} s of the part's time left, the last such step took "
                                           f"{last:.0f} s")
            return None
        start = time.monotonic()
        try:
            try:
                return fn()
            except Exception as e:
                # An embedded Ray whose node misses its start-up deadline (its agent imports too slowly on a
                # busy machine) gets one more try; anything else is the part's error.
                if RAY_START_TIMEOUT not in str(e) or self.budget.left() <= 0:
                    raise
                self.res.echo(f"{self.part}: {what}: Ray did not start in time ({e}); once more")
                _shutdown_ray()
                _end_ray_children()
                return fn()
        finally:
            self.last_s[kind] = time.monotonic() - start


def part_train(setup: Setup, budget: Budget, res: Results) -> dict[str, Any]:
    """bench train's (a) Ray Train, 1 worker, vs (b) the plain loop either side of it, per precision."""
    from vaedist.bench.train import bench_train

    s, steps, figures = setup.sizes, Steps("train", budget, res), {}
    precisions = ("bf16", "no") if setup.gpu else ("no",)
    if not setup.gpu:
        res.skip("train", "bf16", "needs CUDA (autocast to bf16 is a no-op on the CPU)")
    for precision in precisions:
        name = "bf16" if precision == "bf16" else "fp32"
        cfg = _base(setup, f"train.mixed_precision='{precision}'", f"scaling.use_gpu={str(setup.gpu).lower()}",
                    f"scaling.cpus_per_worker={4 if setup.gpu else 1}", "data.ingest=memory",
                    f"train.max_steps_per_epoch={s.train_max_steps}", f"output.run_name=train-{name}")
        out = steps.run(name, lambda: bench_train(cfg, s.train_epochs, repeats=1, echo=_prefixed(res, f"train {name}: ")))
        if out is None:
            continue
        figures[name] = {k: out[k] for k in ("ray_samples_per_s", "plain_samples_per_s", "ratio",
                                             "end_to_end_samples_per_s")}
        where = "1 GPU" if setup.gpu else "1 CPU worker"
        res.row("train", f"{name}: Ray Train {where} / plain loop, batch 128",
                f"{out['ray_samples_per_s']:,.0f} / {out['plain_samples_per_s']:,.0f} samples/s, "
                f"**ratio {out['ratio']:.3f}**")
    figures["epochs"], figures["max_steps_per_epoch"] = s.train_epochs, s.train_max_steps
    return figures


def _test_arrays(setup: Setup):
    from vaedist.data import load_split_arrays, read_manifest

    manifest = read_manifest(setup.shards)
    info = manifest.dataset
    test = manifest.split("test").shards
    test_idx, test_images, _ = load_split_arrays([storage.join(setup.shards, t.path) for t in test],
                                                 [t.num_samples for t in test], info)
    return info, test_idx, test_images


def part_batch_sweep(setup: Setup, budget: Budget, res: Results) -> dict[str, Any]:
    """The plain loop (engine.train_epoch, no Ray) at each batch size for the same number of samples,
    from the same initial weights at a constant learning rate, with each step mode of the sizes (eager,
    and the CUDA graph on a GPU); then the test split's mean l_i."""
    from vaedist.bench.train import train_images
    from vaedist.checkpoint import save_checkpoint
    from vaedist.data import manifest_hash
    from vaedist.engine import evaluate_sums, make_grad_scaler, make_optimizer, train_epoch
    from vaedist.model import build_model

    s = setup.sizes
    device = torch.device("cuda") if setup.gpu else torch.device("cpu")
    precision = "bf16" if setup.gpu else "no"
    base = _base(setup, f"train.mixed_precision='{precision}'", "scaling.cpus_per_worker=1")
    info, test_idx, test_images = _test_arrays(setup)
    images = train_images(base).to(device)
    if not setup.gpu:
        res.skip("batch_sweep", "train.step_mode=cuda_graph", "needs CUDA")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny sizes: a thread team only waits at its barriers on a busy machine
    label = "bf16" if precision == "bf16" else "fp32"
    res.echo(f"batch_sweep: {s.sweep_samples:,} samples per batch size, {label}, lr 1e-3 constant, on {device}")

    def run(batch: int, samples: int, mode: str = "eager") -> dict[str, Any]:
        cfg = config_from_dict(base.to_dict(), [f"train.batch_size_per_worker={batch}", f"train.step_mode={mode}"])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, info.image_shape).to(device)
        optimizer = make_optimizer(model, cfg.train, device)
        scaler = make_grad_scaler(device, precision)
        per_epoch = images.shape[0] // batch
        total_steps, done, seconds, epoch = max(1, samples // batch), 0, 0.0, 0
        while done < total_steps:
            n = min(per_epoch, total_steps - done)
            r = train_epoch(model, optimizer, images, cfg.train, epoch=epoch, rank=0, num_steps=n,
                            steps_per_epoch=per_epoch, start_step=done, device=device, mixed_precision=precision,
                            scaler=scaler)
            seconds += r["seconds"]
            done, epoch = done + n, epoch + 1
        sums = evaluate_sums(model, test_images, test_idx, "test", cfg.train.seed, device)
        return {"model": model, "cfg": cfg, "samples": total_steps * batch, "seconds": seconds,
                "samples_per_s": total_steps * batch / seconds, "test_loss": sums["loss"] / sums["count"]}

    for mode in s.sweep_modes:  # warm-up: CUDA context, cuBLAS, the allocator, a first capture
        run(s.sweep_batches[0], s.sweep_batches[0] * 20, mode)
    steps, figures = Steps("batch_sweep", budget, res), {"samples": s.sweep_samples, "precision": label,
                                                         "device": device.type, "modes": list(s.sweep_modes),
                                                         "batches": {}}
    for batch in s.sweep_batches:
        by_mode = {}
        for mode in s.sweep_modes:
            out = steps.run(f"batch {batch} {mode}", lambda: run(batch, s.sweep_samples, mode), kind=mode)
            if out is None:
                continue
            by_mode[mode] = out
            line = (f"{out['samples_per_s']:,.0f} samples/s, test -ELBO {out['test_loss']:.2f} nats after "
                    f"{out['samples']:,} samples ({label}, step {mode})")
            res.echo(f"batch_sweep: batch {batch}: {line}")
            res.row("batch_sweep", f"batch {batch}, {mode}", line)
        if not by_mode:
            continue
        fastest = max(by_mode.values(), key=lambda o: o["samples_per_s"])
        if setup.batch128_samples_per_s is None:
            setup.batch128_samples_per_s = fastest["samples_per_s"]
        out = fastest
        if setup.checkpoint is None:  # the first (smallest) batch's model: encode's checkpoint
            ckpt = os.path.join(setup.work, "checkpoint-sweep")
            save_checkpoint(ckpt, model_state=out["model"].state_dict(), optimizer_state=None, epoch=0,
                            global_step=out["samples"] // batch, config=out["cfg"],
                            manifest_hash=manifest_hash(setup.shards), history=[], dataset=info.name,
                            image_shape=info.image_shape)
            setup.checkpoint = ckpt
        entry = {mode: {k: o[k] for k in ("samples", "seconds", "samples_per_s", "test_loss")}
                 for mode, o in by_mode.items()}
        if "eager" in by_mode and "cuda_graph" in by_mode:
            entry["graph_speedup"] = by_mode["cuda_graph"]["samples_per_s"] / by_mode["eager"]["samples_per_s"]
            res.row("batch_sweep", f"batch {batch}: CUDA graph / eager", f"**{entry['graph_speedup']:.2f}x**")
        figures["batches"][str(batch)] = entry
    return figures


def part_quality(setup: Setup, budget: Budget, res: Results) -> dict[str, Any]:
    """configs/mnist.yaml's run in the plain loop (train.step_mode=auto: the CUDA graph on a GPU), its
    epochs planned to fit the part's time at the sweep's batch-128 rate (at most its 200; the cosine
    schedule and KL warm-up are those of a run of that many epochs), stopped early at the deadline;
    then the test set's -ELBO and IW NLL. End to end: from building the model to the NLL."""
    from vaedist.bench.train import train_images
    from vaedist.engine import evaluate_sums, make_grad_scaler, make_optimizer, train_epoch
    from vaedist.model import build_model
    from vaedist.step import resolve_step_mode

    s = setup.sizes
    device = torch.device("cuda") if setup.gpu else torch.device("cpu")
    overrides = [f"data.shards_dir={setup.shards}", f"output.storage_path={setup.work}/runs",
                 f"train.max_steps_per_epoch={s.quality_max_steps}"]
    if not setup.gpu:
        overrides += list(s.model)
    cfg = load_config(QUALITY_CONFIG, overrides)
    iw = s.quality_iw if s.quality_iw is not None else cfg.train.num_samples_iw_final
    info, test_idx, test_images = _test_arrays(setup)
    start = time.monotonic()
    images = train_images(cfg).to(device)
    batch = cfg.train.batch_size_per_worker
    per_epoch = images.shape[0] // batch
    steps_per_epoch = min(per_epoch, s.quality_max_steps) if s.quality_max_steps else per_epoch
    rate = setup.batch128_samples_per_s
    train_time = budget.left() * (1 - QUALITY_EVAL_SHARE)
    train_deadline = time.monotonic() + train_time
    epochs = s.quality_max_epochs
    if rate:
        epochs = max(1, min(epochs, int(train_time * rate / (steps_per_epoch * batch))))
    cfg = config_from_dict(cfg.to_dict(), [f"train.epochs={epochs}"])
    res.echo(f"quality: {QUALITY_CONFIG.name}, {epochs} epochs of {steps_per_epoch} steps planned "
             f"({'from ' + format(rate, ',.0f') + ' samples/s' if rate else 'no sweep rate: the most'}), "
             f"step mode {cfg.train.step_mode}, on {device}")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, info.image_shape).to(device)
    optimizer = make_optimizer(model, cfg.train, device)
    scaler = make_grad_scaler(device, cfg.train.mixed_precision)
    mode = resolve_step_mode(cfg.train, device, model, cfg.train.mixed_precision)
    train_start, done, history = time.monotonic(), 0, []
    for epoch in range(epochs):
        if epoch and time.monotonic() > train_deadline:
            res.skip("quality", f"epochs {epoch + 1}-{epochs}", "the part's training time is spent")
            break
        r = train_epoch(model, optimizer, images, cfg.train, epoch=epoch, rank=0, num_steps=steps_per_epoch,
                        steps_per_epoch=steps_per_epoch, start_step=done, device=device,
                        mixed_precision=cfg.train.mixed_precision, scaler=scaler)
        done += steps_per_epoch
        history.append(r["loss"] / r["count"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.monotonic() - train_start
    sums = evaluate_sums(model, test_images, test_idx, "test", cfg.train.seed, device, batch_size=1000,
                         num_samples_iw=iw, iw_chunk_size=cfg.encode.iw_chunk_size)
    end_to_end_s = time.monotonic() - start
    count = sums["count"]
    figures = {"config": QUALITY_CONFIG.name, "step_mode": mode, "epochs_planned": epochs,
               "epochs_run": len(history), "steps_per_epoch": steps_per_epoch, "batch": batch,
               "train_seconds": train_s, "end_to_end_seconds": end_to_end_s,
               "samples_per_s": len(history) * steps_per_epoch * batch / train_s,
               "train_loss_last_epoch": history[-1], "test_neg_elbo": sums["loss"] / count,
               "test_nll_iw": -sums["log_px"] / count, "num_samples_iw": iw}
    line = (f"{len(history)} epochs ({cfg.train.step_mode} -> {mode}) in **{train_s:.1f} s** of training "
            f"({figures['samples_per_s']:,.0f} samples/s), {end_to_end_s:.1f} s end to end; test -ELBO "
            f"{figures['test_neg_elbo']:.2f}, **test NLL {figures['test_nll_iw']:.2f} nats** (K = {iw})")
    res.echo(f"quality: {line}")
    res.row("quality", f"{QUALITY_CONFIG.name}, batch {batch}", line)
    return figures


def _checkpoint(setup: Setup) -> str:
    """The batch sweep's model, else an untrained one (encode's rows/s do not depend on the weights)."""
    if setup.checkpoint:
        return setup.checkpoint
    from vaedist.checkpoint import save_checkpoint
    from vaedist.data import manifest_hash, read_manifest
    from vaedist.model import build_model

    cfg = _base(setup)
    info = read_manifest(setup.shards).dataset
    torch.manual_seed(0)
    setup.checkpoint = os.path.join(setup.work, "checkpoint-untrained")
    save_checkpoint(setup.checkpoint, model_state=build_model(cfg.model, info.image_shape).state_dict(), optimizer_state=None,
                    epoch=0, global_step=0, config=cfg, manifest_hash=manifest_hash(setup.shards), history=[],
                    dataset=info.name, image_shape=info.image_shape)
    return setup.checkpoint


def _plain_encode(cfg: Config, checkpoint: str, work: str) -> float:
    """bench encode's (b), the plain loop: rows/s."""
    from vaedist.bench.encode import plain_encode

    with tempfile.TemporaryDirectory(dir=work) as tmp:
        start = time.perf_counter()
        rows = plain_encode(cfg, checkpoint, tmp)
        return sum(rows.values()) / (time.perf_counter() - start)


def _ray_encode(cfg: Config, checkpoint: str, work: str, rows_per_file: int) -> dict[str, Any]:
    """bench encode's (a), the Ray Data job on the embedded Ray (started first, outside the timing: a
    job is normally submitted to a running cluster): rows/s, and its fixed cost and steady rate."""
    from vaedist.bench.encode import fixed_cost
    from vaedist.cluster import init_ray
    from vaedist.encode import encode

    init_ray(cfg.scaling.address)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        start = time.perf_counter()
        # Files of a shard each, so that even a GPU's one-second job shows its progress (fixed_cost).
        result = encode(cfg, checkpoint=checkpoint, out=f"{tmp}/latents", rows_per_file=rows_per_file)
        seconds = time.perf_counter() - start
    total = sum(result.rows.values())
    fixed, steady = fixed_cost(result.written)
    return {"rows": total, "ray_seconds": seconds, "ray_rows_per_s": total / seconds, "fixed_s": fixed,
            "steady_rows_per_s": steady}


def part_encode(setup: Setup, budget: Budget, res: Results) -> dict[str, Any]:
    """Every setting's plain loop first, with no Ray on the machine, then every setting's job on one Ray
    (left running for cpu_scaling: each start costs seconds)."""
    s, steps, figures = setup.sizes, Steps("encode", budget, res), {}
    checkpoint = _checkpoint(setup)
    settings = {}
    for mc, iw, splits in s.encode_settings:
        settings[f"S={mc} K={iw}"] = (splits, _base(
            setup, f"encode.use_gpu={str(setup.gpu).lower()}", "encode.concurrency=1",
            f"encode.cpus_per_actor={2 if setup.gpu else 1}", f"encode.batch_size={s.encode_batch}",
            f"encode.num_samples_mc={mc}", f"encode.num_samples_iw={iw}", f"encode.splits={list(splits)}"))
    _shutdown_ray()
    plain = {}
    for name, (splits, cfg) in settings.items():
        rate = steps.run(f"{name} plain loop", lambda: _plain_encode(cfg, checkpoint, setup.work), kind="plain")
        if rate is not None:
            plain[name] = rate
            res.echo(f"encode {name}: plain loop {rate:,.0f} rows/s")
    where = "1 GPU actor" if setup.gpu else "1 CPU actor"
    for name, (splits, cfg) in settings.items():
        if name not in plain:
            continue
        out = steps.run(f"{name} Ray Data job", lambda: _ray_encode(cfg, checkpoint, setup.work, s.samples_per_shard),
                        kind="ray")
        if out is None:
            continue
        steady = out["steady_rows_per_s"]
        out.update(splits=list(splits), plain_rows_per_s=plain[name], ratio=out["ray_rows_per_s"] / plain[name],
                   steady_ratio=steady / plain[name] if steady else None)
        figures[name] = out
        # End to end, a job this short is mostly its fixed cost (actor start, imports, CUDA): the steady
        # rate, between its first file and its last, is what a large table runs at.
        line = (f"{out['ray_rows_per_s']:,.0f} / {out['plain_rows_per_s']:,.0f} rows/s, **ratio {out['ratio']:.3f}** "
                f"({out['rows']:,} rows of {'+'.join(splits)}); steady "
                + (f"{steady:,.0f} rows/s, **ratio {out['steady_ratio']:.3f}**" if steady
                   else "not measured (one file)")
                + f" after a fixed cost of {out['fixed_s']:.1f} s")
        res.echo(f"encode {name}: Ray Data job / plain loop: {line}")
        res.row("encode", f"{name}: Ray Data, {where} / plain loop", line)
    figures["checkpoint"] = os.path.basename(checkpoint)
    return figures


def part_cpu_scaling(setup: Setup, budget: Budget, res: Results) -> dict[str, Any]:
    """Weak scaling on CPU workers: every worker takes the same steps of batch 128 per epoch, so n
    workers do n times the work; speed-up = samples/s(n) / samples/s(1), efficiency = speed-up / n.
    Encode: the same rows with n actors of 1 CPU each, S=1 K=0 (the data path, not the model)."""
    from vaedist.bench.train import _steady
    from vaedist.cluster import init_ray
    from vaedist.data import read_manifest
    from vaedist.train import train

    s, figures = setup.sizes, {"train": {}, "encode": {}}
    train_shards = len(read_manifest(setup.shards).split("train").shards)
    workers = [n for n in s.scale_workers if n <= min(setup.cpus, train_shards)]
    actors = [n for n in s.scale_actors if n <= setup.cpus]
    for what, wanted, kept in (("train", s.scale_workers, workers), ("encode", s.scale_actors, actors)):
        over = sorted(set(wanted) - set(kept))
        if over:
            res.skip("cpu_scaling", f"{what} with {', '.join(map(str, over))} workers",
                     f"{setup.cpus} CPUs here" + (f", {train_shards} training shards" if what == "train" else ""))
    rows_per_rank = read_manifest(setup.shards).split("train").num_samples // max(workers)
    max_steps = max(1, min(s.scale_max_steps, rows_per_rank // 128))
    steps = Steps("cpu_scaling", budget, res)
    steps.run("Ray start", lambda: init_ray(None))  # one cluster for every run below (encode's, if running)
    res.echo(f"cpu_scaling: Ray Train, {max_steps} steps of batch 128 per worker per epoch, {s.scale_epochs} epochs, "
             "1 CPU per worker, gloo")
    for n in workers:
        cfg = _base(setup, f"scaling.num_workers={n}", "scaling.cpus_per_worker=1", "scaling.use_gpu=false",
                    "data.ingest=memory", f"train.epochs={s.scale_epochs}", f"train.max_steps_per_epoch={max_steps}",
                    "train.batch_size_per_worker=128", f"output.run_name=scale-{n}")
        result = steps.run(f"train {n} workers", lambda: train(cfg), kind="train")
        if result is None:
            continue
        rate = _steady([r["samples_per_s"] for r in result.epochs])
        figures["train"][str(n)] = {"samples_per_s": rate, **_speedup(figures["train"], "samples_per_s", n, rate)}
        line = f"{rate:,.0f} samples/s, {_speedup_text(figures['train'][str(n)])}"
        res.echo(f"cpu_scaling: train {n} workers: {line}")
        res.row("cpu_scaling", f"train, {n} CPU worker{'s' if n > 1 else ''}", line)
    splits = ("train", "test")
    for n in actors:
        cfg = _base(setup, "encode.use_gpu=false", f"encode.concurrency={n}", "encode.cpus_per_actor=1",
                    "encode.num_samples_mc=1", "encode.num_samples_iw=0", f"encode.splits={list(splits)}",
                    f"encode.batch_size={setup.sizes.encode_batch}")
        out = steps.run(f"encode {n} actors",
                        lambda: _ray_encode(cfg, _checkpoint(setup), setup.work, s.samples_per_shard), kind="encode")
        if out is None:
            continue
        # The steady rate, not end to end: 70,000 rows of S=1 K=0 take about as long as the job's start.
        rate, steady = out["ray_rows_per_s"], out["steady_rows_per_s"]
        figures["encode"][str(n)] = {"rows": out["rows"], "rows_per_s": rate, "steady_rows_per_s": steady,
                                     "fixed_s": out["fixed_s"],
                                     **_speedup(figures["encode"], "steady_rows_per_s", n, steady or 0.0)}
        line = (f"steady {steady or 0:,.0f} rows/s after {out['fixed_s']:.1f} s, end to end {rate:,.0f} "
                f"({out['rows']:,} rows, S=1 K=0), {_speedup_text(figures['encode'][str(n)])}")
        res.echo(f"cpu_scaling: encode {n} actors: {line}")
        res.row("cpu_scaling", f"encode, {n} CPU actor{'s' if n > 1 else ''}", line)
    _shutdown_ray()
    figures["train_steps_per_epoch"], figures["train_epochs"] = max_steps, s.scale_epochs
    return figures


def _speedup(measured: dict[str, dict], key: str, n: int, rate: float) -> dict[str, float | None]:
    """Speed-up over the 1-worker run and efficiency per worker (None when that run was skipped)."""
    base = rate if n == 1 else measured.get("1", {}).get(key)
    return {"speedup": rate / base if base else None, "efficiency": rate / base / n if base else None}


def _speedup_text(figures: dict) -> str:
    if figures["speedup"] is None:
        return "no 1-worker run to compare with"
    return f"speed-up {figures['speedup']:.2f}, efficiency {figures['efficiency']:.2f}"


# In the order they run: what the step modes are measured by first, so that a run cut short keeps it.
PARTS: dict[str, Callable[[Setup, Budget, Results], dict[str, Any]]] = {
    "shards": part_shards, "facts": part_facts, "batch_sweep": part_batch_sweep, "quality": part_quality,
    "encode": part_encode, "gpu_tests": part_gpu_tests, "train": part_train, "cpu_scaling": part_cpu_scaling}


def find_mnist_dir(given: str | None) -> str:
    """--mnist-dir, else $VAEDIST_MNIST_DIR, else ../shared/data/mnist beside the checkout: the first
    named must hold the IDX files (a machine without a package index cannot download them)."""
    chosen = given or os.environ.get("VAEDIST_MNIST_DIR") or str(REPO.parent / "shared" / "data" / "mnist")
    if any(Path(chosen, "train-images-idx3-ubyte" + ext).exists() for ext in (".gz", "")):
        return os.path.abspath(chosen)
    raise ConfigError(f"bench gpu needs MNIST's IDX files (train-images-idx3-ubyte[.gz] and the other three); "
                      f"{chosen} has none: pass --mnist-dir or set VAEDIST_MNIST_DIR")


def bench_gpu(out: str, budget_s: float = 480, mnist_dir: str | None = None, parts: list[str] | None = None,
              work_dir: str | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the parts (all by default) under one budget; returns the results document (also in `out`)."""
    unknown = sorted(set(parts or []) - set(PARTS))
    if unknown:
        raise ConfigError(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if budget_s <= 0:
        raise ConfigError(f"--budget-s: must be > 0, got {budget_s:g}")
    chosen = [p for p in PARTS if not parts or p in parts or p == "shards"]
    mnist = find_mnist_dir(mnist_dir)
    gpu = torch.cuda.is_available()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    own_work = work_dir is None
    work = tempfile.mkdtemp(prefix="vaedist-bench-gpu-") if own_work else os.path.abspath(work_dir)
    os.makedirs(work, exist_ok=True)
    setup = Setup(gpu=gpu, sizes=GPU_SIZES if gpu else CPU_SIZES, cpus=cpus, mnist_dir=mnist, work=work)
    res = Results(out, echo, mode="gpu" if gpu else "cpu", budget_s=budget_s, parts_run=chosen,
                  started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), command=" ".join(sys.argv))
    budget = Budget(budget_s, {p: SHARES[p] for p in chosen})
    echo(f"bench gpu: {'CUDA: ' + torch.cuda.get_device_name(0) if gpu else 'no CUDA: CPU mode at tiny sizes'}; "
         f"budget {budget_s:.0f} s over {', '.join(chosen)}; scratch {work}")
    try:
        for name in chosen:
            budget.part = name
            start = time.monotonic()
            if budget.left() <= 0:
                res.skip(name, "the whole part", f"its time is spent ({budget.elapsed():.0f} s of {budget_s:.0f} used)")
                res.doc["parts"][name]["status"] = "skipped"
            else:
                echo(f"--- {name} ({budget.left():.0f} s)")
                entry = res.doc["parts"].setdefault(name, {})
                try:
                    entry.update(PARTS[name](setup, budget, res))
                    entry["status"] = "partial" if entry.get("skipped_steps") else "ok"
                except Exception as e:  # one part failing must not cost the others their figures
                    entry.update(status="error", error=f"{type(e).__name__}: {e}",
                                 traceback=traceback.format_exc().splitlines()[-12:])
                    echo(f"{name}: ERROR {type(e).__name__}: {e}")
                    res.row(name, "error", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                    _shutdown_ray()
                    if name == "shards":
                        raise
                entry["seconds"] = round(time.monotonic() - start, 1)
            res.doc["wall_s"] = budget.elapsed()
            res.write()
    finally:
        if "ray" in sys.modules:
            _shutdown_ray()
        res.doc["wall_s"] = budget.elapsed()
        # Proof for the GPU machine, which has neither: nothing this run did imported them.
        res.doc["optional_modules_imported"] = [m for m in OPTIONAL_MODULES if m in sys.modules]
        res.write()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    echo(f"wrote {os.path.join(out, 'results.json')} and results.md")
    echo(res.markdown())
    return res.doc
