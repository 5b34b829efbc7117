"""vaedist on real Ray clusters rather than an embedded one.

test_ray_job_submit_*: a head started with the `ray start` CLI on its own ports and temp dir, the
jobs sent with the `ray job submit` CLI (the working directory uploaded the way users send it),
and the head stopped by killing exactly its own processes: `ray stop` would stop every Ray on
the machine.

test_multinode_*: ray.cluster_utils.Cluster, a CPU-less head and two 1-CPU worker nodes in this
process tree; storage is a local directory that all "nodes" share, being one machine. A worker
node is removed mid-run and a replacement added.

Neither cluster may be found by anyone else's `ray.init()`: both keep their temp dir, and with
it the `ray_current_cluster` address file, under a directory of their own.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from vaedist import schema, storage

from conftest import REPO, debug_config, free_ports, readme_commands, repo_copy

pytestmark = pytest.mark.integration

RAY = str(Path(sys.executable).with_name("ray"))
MAX_PACKAGE_BYTES = 5 * 1024 * 1024
TRAIN_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------
# Ports and processes.

def free_port_range(size: int) -> tuple[int, int]:
    """A run of `size` consecutive free ports below the ephemeral range, for Ray's workers."""
    for _ in range(50):
        low = random.randrange(20000, 30000 - size)
        try:
            with ExitStack() as stack:
                for port in range(low, low + size):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            return low, low + size - 1
        except OSError:
            continue
    raise RuntimeError("no free port range for Ray workers")


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live, non-zombie process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            table[int(entry)] = (int(ppid), cmdline)
    return table


def own_processes(roots: set[int], marker: str | None = None) -> set[int]:
    """The live processes among `roots`, those whose command line names `marker` (our temp dir),
    and all their descendants."""
    table = process_table()
    me, mine = os.getpid(), set()  # never this process or its ancestors, whatever they name
    while me in table and me not in mine:
        mine.add(me)
        me = table[me][0]
    found = {pid for pid in roots if pid in table}
    if marker:
        found |= {pid for pid, (_, cmd) in table.items() if marker in cmd}
    found -= mine
    while children := {pid for pid, (ppid, _) in table.items() if ppid in found} - found - mine:
        found |= children
    return found


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(roots: set[int], marker: str | None = None, timeout_s: float = 30) -> set[int]:
    """Kill `roots`, the processes naming `marker` and all their descendants; returns survivors.

    Everything is frozen (SIGSTOP) before anything dies, until no new process appears: a raylet
    killed first would leave its just-started agents orphaned under pid 1, named only
    `ray::DashboardAgent`, where nothing could tell them from another cluster's."""
    frozen: set[int] = set()
    while fresh := own_processes(roots | frozen, marker) - frozen:
        _signal(fresh, signal.SIGSTOP)
        frozen |= fresh
    _signal(frozen, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    while (alive := frozen & set(process_table())) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


# ---------------------------------------------------------------------------------------------
# A head started with the CLI, jobs sent with the CLI.

def head_flags(temp_dir: str) -> tuple[list[str], int, int]:
    """`ray start --head` flags that put every port of the head on a free one and its files under
    temp_dir (unix socket paths must stay under 107 bytes): (flags, GCS port, dashboard port)."""
    (gcs, dashboard, client, node_manager, object_manager, agent_listen, agent_grpc, runtime_env,
     metrics) = free_ports(9)
    low, high = free_port_range(100)
    flags = ["--node-ip-address=127.0.0.1", f"--port={gcs}", f"--dashboard-port={dashboard}",
             f"--ray-client-server-port={client}", f"--node-manager-port={node_manager}",
             f"--object-manager-port={object_manager}", f"--dashboard-agent-listen-port={agent_listen}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
             f"--metrics-export-port={metrics}", f"--min-worker-port={low}", f"--max-worker-port={high}",
             f"--temp-dir={temp_dir}", "--object-store-memory=200000000", "--disable-usage-stats"]
    return flags, gcs, dashboard


class Head:
    """`ray start --head --block` on free ports and a short private temp dir (unix socket paths
    must stay under 107 bytes). Its processes are children of the blocking `ray start`."""

    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="vdh-", dir="/tmp")
        flags, gcs, self.dashboard_port = head_flags(self.temp_dir)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
        self.env["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"  # jobs' `python`
        # Ray 2.60 turns token auth on for `ray start`; the CLI clients send the token only when
        # RAY_AUTH_MODE=token. A token of our own, not the user's ~/.ray/auth_token.
        self.token = secrets.token_hex(32)
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        self.log = open(os.path.join(self.temp_dir, "ray-start.log"), "wb")
        self.process = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--num-cpus=2", "--dashboard-host=127.0.0.1", *flags],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})

    def wait_ready(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.start_log()}")
            # The dashboard can answer before the raylet has started: `ray start` logs this line
            # once every process of the head is up.
            if "Ray runtime started" in self.start_log():
                try:
                    self.client()
                    return
                except ConnectionError:
                    pass
            time.sleep(1)
        raise TimeoutError(f"the head's dashboard at {self.url} did not answer in {timeout_s} s:\n{self.start_log()}")

    def start_log(self) -> str:
        return Path(self.temp_dir, "ray-start.log").read_text(errors="replace")[-4000:]

    def processes(self) -> set[int]:
        return own_processes({self.process.pid}, self.temp_dir)

    def stop(self) -> set[int]:
        """Kill exactly this head's processes; returns any that survived."""
        left = kill_tree({self.process.pid}, self.temp_dir)
        self.process.wait(timeout=10)
        self.log.close()
        return left | self.processes()

    def submit(self, *entrypoint: str) -> tuple[str, str]:
        """`ray job submit --working-dir <repo>`; returns (submission id, the CLI's output)."""
        submission_id = f"vaedist-test-{os.getpid()}-{time.monotonic_ns()}"
        done = subprocess.run(
            [RAY, "job", "submit", "--address", self.url, "--working-dir", str(REPO),
             "--submission-id", submission_id, "--no-wait", "--", *entrypoint],
            env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return submission_id, done.stdout + done.stderr

    def wait_job(self, submission_id: str, timeout_s: float = 600):
        client = self.client()
        deadline = time.monotonic() + timeout_s
        while not (status := client.get_job_status(submission_id)).is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(submission_id)
                raise TimeoutError(f"job {submission_id} still {status} after {timeout_s} s:\n"
                                   f"{client.get_job_logs(submission_id)[-4000:]}")
            time.sleep(2)
        return status, client.get_job_info(submission_id), client.get_job_logs(submission_id)


@pytest.fixture(scope="module")
def head():
    for attempt in (1, 2):  # a loaded machine can miss `ray start`'s fixed 30 s raylet deadline
        head = Head()
        try:
            head.wait_ready()
            break
        except (RuntimeError, TimeoutError):
            left = head.stop()
            shutil.rmtree(head.temp_dir, ignore_errors=True)
            assert not left, f"processes of the test head survived: {sorted(left)}"
            if attempt == 2:
                raise
    try:
        yield head
    finally:
        left = head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        assert not left, f"processes of the test head survived: {sorted(left)}"


def unpacked_working_dir(head: Head, job_info) -> Path:
    """Where the head unpacked the job's uploaded working directory (gcs://_ray_pkg_<hash>.zip)."""
    uri = job_info.runtime_env["working_dir"]
    assert uri.startswith("gcs://_ray_pkg_") and uri.endswith(".zip"), uri
    name = uri.removeprefix("gcs://").removesuffix(".zip")
    found = list(Path(head.temp_dir).glob(f"session_2*/runtime_resources/working_dir_files/{name}"))
    assert len(found) == 1, f"{name} not unpacked under {head.temp_dir}"
    return found[0]


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_readme_head_node_commands_work_as_written(tmp_path, mnist_dir):
    """The README's "A head node on this machine" block, typed as written into a shell, in a copy of
    the repository and a home directory of its own. The home holds ~/.ray/auth_token, as after
    `make run` (any ray.init() writes it): with it there, `ray start` turns token auth on, which is
    what broke the README's commands before they exported RAY_AUTH_MODE=token. Only what must
    differ on a shared test machine is changed: the head's ports and temp dir (`ray start` gets flags
    appended, the job address follows the dashboard port), and the final `ray stop`, which would
    stop every Ray on the machine, becomes killing this head's processes."""
    from vaedist.checkpoint import checkpoint_dirs, read_metrics

    commands = readme_commands("ray start --head")
    assert commands[-1] == "ray stop", commands
    assert any(c.startswith("export RAY_AUTH_MODE=token") for c in commands), commands
    temp_dir = tempfile.mkdtemp(prefix="vdr-", dir="/tmp")
    flags, _, dashboard_port = head_flags(temp_dir)
    script = []
    for command in commands[:-1]:
        if command.startswith("ray start --head"):
            command = " ".join([command, *flags])
        script.append(command.replace("127.0.0.1:8265", f"127.0.0.1:{dashboard_port}"))
    repo = repo_copy(tmp_path / "repo")
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text(secrets.token_hex(32))  # as ray.init() writes it
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "VIRTUAL_ENV")) and k not in ("PYTHONPATH", "VAEDIST_CONFIG", "VAEDIST_SET")}
    env.update(HOME=str(tmp_path / "home"), VAEDIST_MNIST_DIR=mnist_dir)
    try:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", "\n".join(script)], cwd=repo, env=env,
                              capture_output=True, text=True, timeout=1200)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-6000:]
        package_dirs = [p for p in Path(temp_dir).glob("session_2*/runtime_resources/working_dir_files/_ray_pkg_*")
                        if p.is_dir()]
        package_sizes = [tree_bytes(p) for p in package_dirs]
        uploaded = {p.name: sorted(c.name for c in p.iterdir()) for p in package_dirs}
    finally:
        left = kill_tree(set(), temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"processes of the README's head survived: {sorted(left)}"
    assert "Job 'raysubmit_" in output and output.count("succeeded") >= 2, output[-6000:]

    # The CLI packed and uploaded the repo; Ray left out its default excludes (.git, .venv,
    # __pycache__) and everything .gitignore names (outputs/ with its shards and runs, caches).
    assert package_dirs and all(size < MAX_PACKAGE_BYTES for size in package_sizes), package_sizes
    for names in uploaded.values():
        assert "vaedist" in names and "jobs" in names
        assert not {".venv", "outputs", ".git"} & set(names), names

    run_dir = str(repo / "outputs" / "runs" / "debug")
    rows = [r for r in read_metrics(run_dir) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert [e for e, _ in checkpoint_dirs(run_dir)] == [1]  # debug config keeps 1 (+ the latest)
    out = repo / "outputs" / "latents-debug"
    lineage = json.loads((out / schema.LINEAGE_FILE).read_text())
    assert lineage["rows"] == {"train": 60000, "test": 10000}
    assert lineage["checkpoint"] == f"{run_dir}/epoch-0001/checkpoint.pt"
    # The last command printed the loss-by-digit table of the published table: ten digits.
    assert "loss_mean" in output and "(10 rows)" in output, output[-3000:]


def test_vaedist_address_without_the_token_says_how_to_send_it(head, small_shards, tmp_path):
    """A client that joins a token-auth cluster without RAY_AUTH_MODE=token gets the fix, not Ray's
    traceback. (Before the next test, which stops the shared head.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "VAEDIST_VERBOSE"))}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    done = subprocess.run([str(Path(sys.executable).with_name("vaedist")), "train", "--config", "configs/debug.yaml",
                           "--address", head.gcs_address, "--set", f"data.shards_dir={small_shards}",
                           "--set", f"output.storage_path={tmp_path}/runs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"cannot join the Ray cluster at {head.gcs_address}" in done.stderr, done.stderr[-3000:]
    assert "export RAY_AUTH_MODE=token" in done.stderr and "ray get-auth-token" in done.stderr
    assert "Traceback" not in done.stderr


def test_ray_job_submit_head_stops_alone(head):
    """Stopping the head ends its own processes (GCS, raylet, dashboard, workers) and nothing else:
    a bystander whose command line looks like Ray's survives."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "raylet", "gcs_server"])
    try:
        commands = [cmd for pid, (_, cmd) in process_table().items() if pid in head.processes()]
        for part in ("gcs_server", "raylet", "dashboard.py"):
            assert any(part in c for c in commands), f"no {part} among the head's processes"
        assert bystander.pid not in head.processes()
        assert head.stop() == set()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", int(head.gcs_address.rsplit(":", 1)[1]))) != 0, "GCS still listening"
        assert bystander.poll() is None, "the bystander was killed"
    finally:
        bystander.kill()
        bystander.wait()


# ---------------------------------------------------------------------------------------------
# Several nodes: ray.cluster_utils.Cluster.

@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs: it only runs the driver, the Train controller and the dashboard) plus two
    1-CPU worker nodes; the driver in this process is connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the shared session Ray, if any: one connection per process
    root = tempfile.mkdtemp(prefix="vdc-", dir="/tmp")
    saved_tmpdir = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = root  # session dirs and the address file Cluster writes go here
    cluster = None
    try:
        (dashboard_port,) = free_ports(1)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": dashboard_port,
            # Notice a dead node in seconds, not the default half minute.
            "_system_config": {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                               "health_check_failure_threshold": 3}})
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        ours = own_processes(set(), root)  # before shutdown: workers are still children of raylets
        if cluster is not None:
            cluster.shutdown()
        if saved_tmpdir is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved_tmpdir
        left = kill_tree(wait_gone(ours), root)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test cluster survived: {sorted(left)}"


def wait_gone(pids: set[int], timeout_s: float = 30) -> set[int]:
    """Those of pids still alive after up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    while (alive := pids & set(process_table())) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def node_processes(node) -> set[int]:
    """A cluster_utils node's processes (raylet, agents, workers, ...) and their descendants."""
    return own_processes({info.process.pid for infos in node.all_processes.values() for info in infos})


def registered_checkpoint(run_dir: Path) -> str | None:
    """The latest checkpoint Ray Train's controller has registered (what a restart resumes from)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or mid-write
        return None


def worker_node_ids(cluster) -> set[str]:
    return {node.node_id for node in cluster.worker_nodes}


@pytest.fixture(scope="module")
def node_loss_run(cluster, small_shards, tmp_path_factory):
    """Two workers, one per worker node; once epoch 1's checkpoint is registered, one worker node is
    removed and a replacement added. Returns (config, result, node ids before, removed, added)."""
    from vaedist.train import train

    storage_path = tmp_path_factory.mktemp("multinode-runs")
    cfg = debug_config(small_shards, storage_path, "multinode", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
                       "train.epochs=10", "model.hidden_dims=[256]", "output.max_failures=2")
    run_dir = storage_path / "multinode"
    before = worker_node_ids(cluster)
    victim = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
    outcome: dict = {}

    def run():  # training in a thread; Cluster's node handling stays in the main thread
        try:
            outcome["result"] = train(cfg)
        except BaseException as e:
            outcome["error"] = e

    # The controller registers reported checkpoints when it polls the workers (every 2 s by
    # default); a worker lost before that takes its unregistered reports with it. Poll often, and
    # pull the node only once epoch 1's checkpoint is registered, not merely written.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # propagated to the Train controller
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        while (registered_checkpoint(run_dir) or "") < "epoch-0001":
            assert thread.is_alive(), f"training ended before epoch 1's checkpoint was registered: {outcome}"
            assert time.monotonic() < deadline, "epoch 1's checkpoint was not registered in time"
            time.sleep(0.1)
    victim_pids = node_processes(victim)
    cluster.remove_node(victim)
    added = cluster.add_node(num_cpus=1).node_id
    # The node's workers and agents go with its raylet; any that linger are killed, and fail the test.
    survivors = wait_gone(victim_pids)
    kill_tree(survivors)
    # A Train controller error (e.g. a worker group that cannot start) is retried forever: bound it.
    thread.join(timeout=max(deadline - time.monotonic(), 1))
    assert not thread.is_alive(), f"training did not finish within {TRAIN_TIMEOUT_S} s of starting"
    assert "error" not in outcome, outcome.get("error")
    assert not survivors, f"processes of the removed node outlived it: {sorted(survivors)}"
    return cfg, outcome["result"], before, victim.node_id, added


def test_multinode_training_places_one_worker_per_node(node_loss_run):
    cfg, result, before, removed, added = node_loss_run
    epochs = result.epochs
    assert [r["epoch"] for r in epochs] == list(range(cfg.train.epochs))
    for r in epochs:
        assert r["world_size"] == 2 and len(r["rank_node_ids"]) == 2
        assert len(set(r["rank_node_ids"])) == 2, f"both ranks on one node: {r['rank_node_ids']}"
        assert len(set(r["rank_param_sums"])) == 1  # DDP in sync across nodes
    first = epochs[0]
    assert set(first["rank_node_ids"]) == before  # the two worker nodes, never the CPU-less head
    assert epochs[-1]["test_loss"] < epochs[0]["test_loss"]


def test_multinode_training_survives_losing_a_node(node_loss_run):
    cfg, result, before, removed, added = node_loss_run
    epochs = result.epochs
    restored = sorted({r["restored_from_epoch"] for r in epochs} - {-1})
    assert len(restored) == 1, [(r["epoch"], r["restored_from_epoch"]) for r in epochs]
    resumed_after = restored[0]
    assert resumed_after >= 1  # the node went only after epoch 1's checkpoint was registered
    # Epochs up to the checkpoint ran once, in the first worker group; the rest after the restart.
    for r in epochs:
        if r["epoch"] <= resumed_after:
            assert r["restored_from_epoch"] == -1 and removed in r["rank_node_ids"]
        else:
            assert r["restored_from_epoch"] == resumed_after
            assert set(r["rank_node_ids"]) == (before - {removed}) | {added}
    assert resumed_after < cfg.train.epochs - 1, "the restart trained nothing"


def test_multinode_encode_spreads_over_nodes_one_row_per_datapoint(cluster, node_loss_run, tmp_path):
    import pyarrow.dataset as pads
    from ray.util.state import list_actors

    from vaedist.config import config_from_dict
    from vaedist.encode import encode

    cfg, result, *_ = node_loss_run
    enc_cfg = config_from_dict(cfg.to_dict(), ["encode.concurrency=2", "encode.cpus_per_actor=1",
                                               "encode.num_samples_iw=0", "encode.num_samples_mc=1"])
    enc = encode(enc_cfg, checkpoint=result.latest_checkpoint, out=str(tmp_path / "latents"))
    assert enc.rows == {"train": 4000, "test": 4000}
    files = [storage.join(enc.path, f) for f in storage.listdir(enc.path) if f.endswith(".parquet")]
    keys = pads.dataset(files, format="parquet").to_table(columns=["key"])["key"].to_pylist()
    assert len(keys) == 8000 and len(set(keys)) == 8000
    encoders = [a for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False)
                if "TableFileWriter" in a.class_name]  # the encode job's actors (vaedist.encode)
    assert {a.node_id for a in encoders} == worker_node_ids(cluster), [(a.class_name, a.node_id) for a in encoders]
