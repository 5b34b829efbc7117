"""Helpers for the tests that run vaedist on real Ray clusters rather than an embedded one: free
ports, the processes of a cluster found from /proc and killed exactly (`ray stop` would stop every Ray
on the machine), and `ray start --head` flags that keep a head on its own ports and temp dir.

The README's head-node block: test_cluster_readme.py; several nodes: test_cluster_multinode.py. No
cluster may be found by anyone else's `ray.init()`: each keeps its temp dir, and with it the
`ray_current_cluster` address file, under a directory of its own.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from contextlib import ExitStack
from pathlib import Path

from conftest import free_ports

MAX_PACKAGE_BYTES = 5 * 1024 * 1024
TRAIN_TIMEOUT_S = 600
HEAD_MARKER_ENV = "VAEDIST_TEST_HEAD"  # set to a head's temp dir in the environment it starts in


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


def _environment(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def own_processes(roots: set[int], marker: str | None = None) -> set[int]:
    """The live processes among `roots`, those whose command line or environment names `marker` (our
    temp dir), and all their descendants. The environment, for a head started with `ray start` and
    HEAD_MARKER_ENV set to the marker: its Ray client server names neither the temp dir nor a parent
    of ours (`ray start` has exited, it lives under pid 1)."""
    table = process_table()
    me, mine = os.getpid(), set()  # never this process or its ancestors, whatever they name
    while me in table and me not in mine:
        mine.add(me)
        me = table[me][0]
    found = {pid for pid in roots if pid in table}
    if marker:
        found |= {pid for pid, (_, cmd) in table.items()
                  if marker in cmd or f"{HEAD_MARKER_ENV}={marker}\0".encode() in _environment(pid)}
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


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
