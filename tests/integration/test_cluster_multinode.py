"""vaedist on several nodes: ray.cluster_utils.Cluster, a CPU-less head and two 1-CPU worker nodes in
this process tree; storage is a local directory that all "nodes" share, being one machine. A worker
node is removed mid-run and a replacement added. Its temp dir, and with it the
`ray_current_cluster` address file, stays under a directory of its own, so no one else's
`ray.init()` finds it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from vaedist import storage

from conftest import debug_config, free_ports
from clusters import TRAIN_TIMEOUT_S, kill_tree, own_processes, process_table

pytestmark = pytest.mark.integration
SCHEDULE_SECONDS = 50  # about how long this file takes in `make test` (conftest: longest first)


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
