"""vaedist on real Ray clusters rather than an embedded one.

test_ray_job_submit_*: a head started with the `ray start` CLI on its own ports and temp dir, the
jobs sent with the `ray job submit` CLI (the working directory uploaded the way users send it),
and the head stopped by killing exactly its own processes: `ray stop` would stop every Ray on
the machine.

The README's head-node block: test_cluster_readme.py; several nodes: test_cluster_multinode.py (both
use the helpers here). No cluster may be found by anyone else's `ray.init()`: each keeps its temp
dir, and with it the `ray_current_cluster` address file, under a directory of its own.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from conftest import REPO, free_ports

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
