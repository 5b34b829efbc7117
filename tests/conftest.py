"""Shared fixtures: the real MNIST files, small real shards, one small local Ray cluster, and a
small real latent table (for the query and report tests)."""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from vaedist import schema
from vaedist.checkpoint import save_checkpoint
from vaedist.cluster import embedded_ray_settings
from vaedist.config import Config, ModelConfig
from vaedist.data import fixed_binarize, key_for, load_split_arrays, manifest_hash, prepare_shards, read_manifest
from vaedist.evaluate import evaluate_batch
from vaedist.model import VAE

REPO = Path(__file__).resolve().parents[1]

# `make test` runs two test processes (xdist workers) on a 2-core machine: torch's default OpenMP team
# of 2 threads in each spins at its barriers while the other process holds a core. One thread per
# test process: the unit tests' torch work took 36-37 s instead of 50-56 s (a dozen unit files, 2
# workers, measured on a 2-core machine). Tests about thread counts set their own; Ray's workers and
# subprocesses choose theirs.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Every process this test session starts (Ray's daemons and workers, subprocesses) inherits this
# mark, so that what outlives the session can be told from other sessions' processes and reaped.
SESSION_MARK = f"VAEDIST_TEST_SESSION={os.getpid()}-{os.urandom(4).hex()}"
os.environ["VAEDIST_TEST_SESSION"] = SESSION_MARK.split("=", 1)[1]
# Ray Train's controller polls its workers every 2 s: a test run of 1-2 s of training waits that long
# to be seen starting, reporting and finishing, over some 50 runs. Every Ray process this session
# starts (local clusters, `ray start`, the CLI in subprocesses) inherits the shorter interval.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# Two test workers share two cores, and any process of the session with a thread team (the
# determinism probes, plain-loop baselines, CLIs in subprocesses, Ray's workers and actors, which
# inherit it) would have its idle threads spin at OpenMP's barriers, taking a core from the other
# worker: they sleep instead. How threads wait, not what they compute: no number changes (the
# determinism probes alone: 18.9 CPU-seconds instead of 22.8).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def find_mnist_dir() -> str | None:
    """$VAEDIST_MNIST_DIR, else ../shared/data/mnist beside the checkout."""
    return find_idx_dir("VAEDIST_MNIST_DIR", "mnist")


def find_idx_dir(env_var: str, name: str) -> str | None:
    """$env_var, else ../shared/data/<name> beside the checkout: the first that holds IDX files."""
    candidates = [os.environ.get(env_var), str(REPO.parent / "shared" / "data" / name)]
    for c in filter(None, candidates):
        if any(Path(c, "train-images-idx3-ubyte" + ext).exists() for ext in (".gz", "")):
            return c
    return None


@pytest.fixture(scope="session")
def mnist_dir() -> str:
    found = find_mnist_dir()
    if found is None:
        pytest.skip("MNIST IDX files not found: set VAEDIST_MNIST_DIR or place them in ../shared/data/mnist "
                    "(tests never download)")
    return found


@pytest.fixture(scope="session")
def fashion_dir() -> str:
    found = find_idx_dir("VAEDIST_FASHION_MNIST_DIR", "fashion-mnist")
    if found is None:
        pytest.skip("Fashion-MNIST IDX files not found: set VAEDIST_FASHION_MNIST_DIR or place them in "
                    "../shared/data/fashion-mnist (tests never download)")
    return found


@pytest.fixture(scope="session")
def small_shards(mnist_dir, tmp_path_factory) -> str:
    """The first 4,000 datapoints of each split in 1,000-datapoint shards: 4 train and 4 test shards."""
    from vaedist.data import prepare_shards

    return str(built_once(tmp_path_factory, "small-shards", lambda d: prepare_shards(
        str(d / "shards"), source_dir=mnist_dir, samples_per_shard=1000, limit_per_split=4000, progress=False)) / "shards")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """build(directory), shared by the session's xdist workers: a worker that asks after another has
    built it gets the same directory; one that asks while another is building builds its own rather
    than wait idle. For session fixtures whose outputs the tests only read: each worker building
    its own would pay for it again (a training run costs some 13 CPU-seconds)."""
    from filelock import FileLock, Timeout  # torch's dependency

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # this session's, common to its workers
    target = root / f"once-{name}"
    try:
        with FileLock(f"{target}.lock", timeout=0):
            if not (target / ".built").exists():
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
                build(target)
                (target / ".built").touch()
            return target
    except Timeout:
        own = tmp_path_factory.mktemp(name)
        build(own)
        return own


def start_local_ray():
    """A fresh 2-CPU local Ray in this process; any earlier connection is shut down first.
    address="local": never join a cluster that `ray start` left in /tmp/ray/ray_current_cluster."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # No dashboard: no test of this cluster reads it, and it costs a few CPU-seconds to start and a
    # steady share of a core while up (the CLI's embedded Ray and `ray start` keep theirs). A GPU
    # machine's wheelhouse Ray (README, "Proving the GPU paths ...") is found on the driver's
    # PYTHONPATH, so the workers keep that too.
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # As vaedist's own embedded Ray: no preemption watcher, no Ray Data telemetry, spare workers.
    for name, value in embedded_ray_settings(2).items():
        os.environ.setdefault(name, value)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    return ray


def session_leftovers() -> dict[int, str]:
    """{pid: command} of the processes other than this one that carry SESSION_MARK."""
    found = {}
    mark = SESSION_MARK.encode() + b"\0"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read() + b"\0":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def pytest_collection_modifyitems(items):
    """The order in which `make test` hands whole files to its two workers (the Makefile turns
    xdist's own order off): the files that declare SCHEDULE_SECONDS, longest first, then the others,
    those of the most tests first (xdist's order). A worker is handed its next files before it needs
    them, up to three of one test each, so with the long files last one worker ran the last 69 s
    alone; with them first, the last files are short."""
    tests = collections.Counter(item.nodeid.split("::", 1)[0] for item in items)

    def key(item):
        seconds = getattr(item.module, "SCHEDULE_SECONDS", 0)
        return (0, -seconds) if seconds else (1, -tests[item.nodeid.split("::", 1)[0]])

    items.sort(key=key)  # stable: a file's tests keep their order


@pytest.fixture(scope="session", autouse=True)
def _no_processes_left():
    """Set up first, so torn down last: once every cluster is shut down, nothing of this session may
    remain. Ray has left a worker behind (a `ray::TrainController` orphaned under pid 1 when its
    cluster was shut down as the run ended); such a process is killed here and named in a warning."""
    import signal
    import time
    import warnings

    yield
    deadline = time.monotonic() + 10  # workers exit on their own once their raylet is gone
    while (left := session_leftovers()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        warnings.warn(f"killed {len(left)} process(es) this test session left behind: {sorted(left.values())}")


@pytest.fixture(scope="session")
def ray_cluster():
    """One 2-CPU local Ray for the whole session (started lazily, shut down at the end)."""
    ray = start_local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _ray_cluster_alive(request):
    """Modules with a cluster of their own (test_s3, test_cluster_multinode) shut the shared Ray down: a later
    test that uses it gets it started again."""
    if "ray_cluster" in request.fixturenames:
        ray = request.getfixturevalue("ray_cluster")
        if not ray.is_initialized() or not _cpus_free(ray):
            start_local_ray()


def _cpus_free(ray, wait_s: float = 10) -> bool:
    """Whether every CPU of the Ray is free (within wait_s: a run that just ended may still be
    releasing them). A placement group left reserved by an earlier test (Ray Tune can kill a finished
    trial's Train controller before it removes its group) would leave the next run waiting for ever."""
    import time

    deadline = time.monotonic() + wait_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def debug_config(shards: str, storage_path, run_name: str, *extra: str):
    """configs/debug.yaml pointed at test shards and a test storage path."""
    from vaedist.config import load_config

    return load_config(REPO / "configs" / "debug.yaml", [
        f"data.shards_dir={shards}", "data.max_train_shards=0", "data.max_test_shards=0",
        f"output.storage_path={storage_path}", f"output.run_name={run_name}",
        "train.batch_size_per_worker=50", "output.checkpoints_to_keep=2", *extra])


@pytest.fixture(scope="session")
def trained_run(ray_cluster, small_shards, tmp_path_factory):
    """One debug training run (2 epochs, 1 worker) over small_shards, with the final importance-weighted
    test NLL (K = 8) that the report shows: (config, TrainResult). Read by many tests: never change it."""
    from vaedist.train import train, train_result

    def build(directory: Path) -> None:
        train(config(directory))

    def config(directory: Path):
        return debug_config(small_shards, directory / "runs", "trained", "train.num_samples_iw_final=8")

    cfg = config(built_once(tmp_path_factory, "trained-run", build))
    return cfg, train_result(cfg)


# ---------------------------------------------------------------------------------------------
# A latent table without Ray: an untrained model's rows for real MNIST shards, laid out as the
# encode job writes them.

LATENT_DIM = 4
NUM_ROWS = 2000  # 1,000 per split


def build_tables(root: Path, mnist_dir: str) -> dict[str, str]:
    """Shards, a checkpoint, and two published tables: `latents` (K = 8) and `latents_k0` (K = 0).

    Both hold a `.staging` directory of valid Parquet that a reader must skip, and `latents` also a
    `_leak.parquet`; they duplicate rows, so any leak shows up in the row count.
    """
    shards = str(root / "shards")
    prepare_shards(shards, source_dir=mnist_dir, samples_per_shard=500, limit_per_split=1000, progress=False)
    torch.manual_seed(0)
    cfg = Config(model=ModelConfig(latent_dim=LATENT_DIM, hidden_dims=[32]))
    model = VAE(cfg.model).eval()
    checkpoint = str(root / "checkpoint")
    save_checkpoint(checkpoint, model_state=model.state_dict(), optimizer_state=None, epoch=1, global_step=0,
                    config=cfg, manifest_hash=manifest_hash(shards), history=[])
    lineage = {"checkpoint": checkpoint, "shards_dir": shards, "latent_dim": LATENT_DIM, "num_samples_mc": 2,
               "num_samples_iw": 8, "seed": 0, "manifest_hash": manifest_hash(shards),
               "vaedist_version": "test", "config": cfg.to_dict(), "an_unknown_key": [1, 2]}
    out = {"shards": shards, "checkpoint": checkpoint}
    for name, k in (("latents", 8), ("latents_k0", 0)):
        table_dir = root / name
        (table_dir / ".staging-0").mkdir(parents=True)
        for split, entry in read_manifest(shards).splits.items():
            for i, shard in enumerate(entry.shards):
                indices, images, labels = load_split_arrays([str(Path(shards, shard.path))])
                x = fixed_binarize(images, indices, split, seed=cfg.train.seed)
                rows = evaluate_batch(model, x, indices, split, seed=0, num_samples_mc=2, num_samples_iw=k)
                columns = {name: value.numpy() for name, value in rows.items()}
                columns.update(key=[key_for(split, int(j)) for j in indices], split=[split] * len(indices),
                               index=indices, label=labels, shard=[shard.path] * len(indices))
                table = schema.to_table(columns, LATENT_DIM, lineage={**lineage, "num_samples_iw": k})
                pq.write_table(table, table_dir / f"{split}_{i:06d}_000000.parquet")
        pq.write_table(table, table_dir / ".staging-0" / "leak.parquet")
        if k:
            pq.write_table(table, table_dir / "_leak.parquet")
        (table_dir / schema.LINEAGE_FILE).write_text(json.dumps({**lineage, "num_samples_iw": k}))
        (table_dir / schema.SUCCESS_FILE).write_text("")
        out[name] = str(table_dir)
    return out


@pytest.fixture(scope="session")
def latent_tables(tmp_path_factory, mnist_dir) -> dict[str, str]:
    return build_tables(tmp_path_factory.mktemp("latent-table"), mnist_dir)


def write_latent_table(table_dir: Path, shards: str, models: dict, lineage: dict, num_samples_iw: int = 8,
                       splits: tuple[str, ...] = ("train", "test"), sources: bool = False) -> str:
    """Publish a latent table of `models` over `shards` without Ray, laid out as the encode job writes
    it. models maps epoch -> VAE: the single key None gives a one-checkpoint table; otherwise every row
    carries its checkpoint's `epoch`, with the same per-key noise at every epoch. sources: with the
    `source` column (read_sources), as encode writes it now; without, as it did before."""
    from vaedist.data import read_sources

    binarize_seed = Config().train.seed
    lineage = {**lineage, "splits": list(splits), "num_samples_iw": num_samples_iw}
    if None not in models:
        lineage["epochs"] = sorted(models)  # as the encode job writes it
    table_dir.mkdir(parents=True)
    for epoch, model in models.items():
        for split in splits:
            for i, shard in enumerate(read_manifest(shards).split(split).shards):
                indices, images, labels = load_split_arrays([str(Path(shards, shard.path))])
                x = fixed_binarize(images, indices, split, seed=binarize_seed)
                with torch.no_grad():
                    rows = evaluate_batch(model.eval(), x, indices, split, seed=0, num_samples_mc=2,
                                          num_samples_iw=num_samples_iw)
                columns = {name: value.numpy() for name, value in rows.items()}
                columns.update(key=[key_for(split, int(j)) for j in indices], split=[split] * len(indices),
                               index=indices, label=labels, shard=[shard.path] * len(indices))
                if sources:
                    columns["source"] = read_sources(shards, read_manifest(shards), split, indices)
                if epoch is not None:
                    columns["epoch"] = [epoch] * len(indices)
                name = f"{split}_{i:06d}" if epoch is None else f"epoch{epoch:04d}_{split}_{i:06d}"
                table = schema.to_table(columns, model.latent_dim, lineage=lineage)
                pq.write_table(table, table_dir / f"{name}.parquet")
    (table_dir / schema.LINEAGE_FILE).write_text(json.dumps(lineage))
    (table_dir / schema.SUCCESS_FILE).write_text("")
    return str(table_dir)


# ---------------------------------------------------------------------------------------------
# The out-of-distribution readout's reference (vaedist.analyses.ood): its definitions, computed directly.

def ood_reference(s_in: np.ndarray, s_out: np.ndarray) -> dict[str, float]:
    """AUROC as P(out > in) + P(out = in)/2 over all pairs; AUPR as the mean over OUT points of the
    precision among points scoring at least as high; FPR at the highest threshold with TPR >= 95%."""
    greater = (s_out[:, None] > s_in[None, :]).mean()
    equal = (s_out[:, None] == s_in[None, :]).mean()
    every = np.concatenate([s_in, s_out])
    is_out = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    precision = [is_out[every >= s].mean() for s in s_out]
    thresholds = np.unique(every)
    tpr = np.array([(s_out >= t).mean() for t in thresholds])
    fpr = np.array([(s_in >= t).mean() for t in thresholds])
    return {"auroc": greater + 0.5 * equal, "aupr": float(np.mean(precision)), "fpr_at_95_tpr": fpr[tpr >= 0.95].min(),
            "in_mean": s_in.mean(), "in_se": s_in.std(ddof=1) / np.sqrt(len(s_in)),
            "out_mean": s_out.mean(), "out_se": s_out.std(ddof=1) / np.sqrt(len(s_out))}


# ---------------------------------------------------------------------------------------------
# The README's commands, as written.

def command_blocks(text: str) -> list[list[str]]:
    """The commands of each ```bash block (not ```bash {.no-run}), continuation lines joined,
    comments and blank lines dropped."""
    blocks = []
    for block in (b.split("```", 1)[0] for b in text.split("```bash\n")[1:]):
        commands, pending = [], []
        for line in block.splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line).rstrip()
            if line:
                pending.append(line.removesuffix("\\").strip())
                if not line.endswith("\\"):
                    commands.append(" ".join(pending))
                    pending = []
        blocks.append(commands)
    return blocks


def readme_commands(containing: str) -> list[str]:
    """The commands of the README's ```bash block that has a command containing `containing`."""
    found = [block for block in command_blocks((REPO / "README.md").read_text())
             if any(containing in command for command in block)]
    assert len(found) == 1, f"{len(found)} README bash blocks contain {containing!r}"
    return found[0]


def repo_copy(dest: Path) -> Path:
    """The tracked files of this checkout (what a fresh clone has), with .venv a link to the environment
    of the interpreter running the tests (wherever that lives)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / ".venv").symlink_to(sys.prefix)
    return dest


# ---------------------------------------------------------------------------------------------
# Object storage: moto's S3 server.

def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (all held open together while choosing)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@contextlib.contextmanager
def moto_s3(bucket: str):
    """moto's S3 server on 127.0.0.1 with `bucket` created; the AWS variables point at it meanwhile
    and are restored afterwards. Yields a boto3 S3 client."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port, = free_ports(1)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "AWS_EC2_METADATA_DISABLED": "true"}  # no instance-metadata lookups (offline, slow timeouts)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        client.create_bucket(Bucket=bucket)
        yield client
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
