"""The Ray connection: which cluster a job joins, starting an embedded one when none is named, and
checking before any work that the cluster can hold the job. Training, encoding, the pipeline and
the benchmarks all connect through here (none needs the trainer to reach Ray).

    init_ray(cfg.scaling.address)            # RAY_ADDRESS / the address, else an embedded local Ray
    check_resources("training", cpus=4, gpus=0, keys="scaling.num_workers x ...", address=...)
"""

from __future__ import annotations

import logging
import os

from vaedist.config import ConfigError

log = logging.getLogger("vaedist.cluster")

AUTH_HINT = ("the cluster uses token authentication (Ray 2.60's `ray start` turns it on): export "
             "RAY_AUTH_MODE=token, and on a machine other than the head also RAY_AUTH_TOKEN=<the output of "
             "`ray get-auth-token` on the head>")


class ClusterError(ConfigError):
    """The Ray cluster cannot be reached or cannot hold the job; the message says what to do."""


def ray_address(address: str | None = None) -> str | None:
    """The cluster to join: the given address, else $RAY_ADDRESS; None means an embedded local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def is_embedded(address: str | None = None) -> bool:
    return ray_address(address) is None


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join RAY_ADDRESS / the given address, or start an embedded local Ray. Its dashboard listens on
    127.0.0.1 only; Ray Train's placement-group cleaner polls the State API it serves."""
    import ray

    from vaedist.console import quiet_ray_data, ray_logging_level, is_verbose

    if ray.is_initialized():
        quiet_ray_data()
        return
    address = ray_address(address)
    # Ray starts workers at nice 15. On a small machine every wake-up of Ray's own processes then
    # preempts one thread of the worker's 2-thread OpenMP team and stalls the other at its barrier:
    # measured here, 0.77 of plain-PyTorch throughput at nice 15 vs 0.96 at nice 0 (README,
    # Performance). An embedded Ray is ours alone, so its workers run at normal priority; set
    # RAY_worker_niceness yourself to choose otherwise.
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Quiet unless --verbose: the workers' output stays in Ray's log files instead of interleaving
    # with the live display (Ray Train's workers print every report they make).
    quiet = {"log_to_driver": is_verbose(), "logging_level": ray_logging_level()}
    if address:
        try:
            ray.init(address=address, **quiet)
        except Exception as e:
            if _is_auth_error(e):
                raise ClusterError(f"cannot join the Ray cluster at {address}: {type(e).__name__}; "
                                   f"{AUTH_HINT}") from None
            if isinstance(e, ConnectionError) and os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                # A cluster that wants a token turns a client without one away as a failed connection
                # (Ray logs "Unauthenticated" from C++ and raises only ConnectionError).
                raise ClusterError(f"cannot join the Ray cluster at {address} ({e}). If the address is right, "
                                   f"{AUTH_HINT}") from None
            raise
    else:
        for name, value in embedded_ray_settings(num_cpus).items():
            os.environ.setdefault(name, value)
        # Ray 2.60 turns token auth on for a new local cluster and warns that it did, at every start.
        # Setting RAY_AUTH_MODE here instead would come too late (ray's import has cached the mode),
        # so the one logger that says it is quieted unless verbose.
        if not is_verbose():
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # "local": a new instance of our own; a bare ray.init() would join whatever cluster
        # /tmp/ray last recorded, which is not "embedded".
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", **quiet)
    quiet_ray_data()


def embedded_ray_settings(num_cpus: int | None = None) -> dict[str, str]:
    """The Ray variables an embedded Ray of num_cpus CPUs starts with (unless already set)."""
    return {
        # One machine has no node to be preempted; Ray Train's watcher for that is one more idle
        # actor process waking up beside the training worker.
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        # Ray Data's usage telemetry polls a Prometheus server on localhost:9090 every 10 s from a
        # driver thread; none runs beside an embedded Ray, and the failed poll it logs after pytest
        # (or any host of logging) has closed its stream is the ConnectionRefusedError traceback
        # that ended test sessions. It also starts one more per-cluster actor.
        "RAY_DATA_USAGE_DISABLED": "1",
        # Ray keeps at most num_cpus idle worker processes and kills the rest after a second idle.
        # With the training workers holding every CPU, `stream`'s zero-CPU decode tasks then lose
        # their processes between epochs and pay ~1 s of process start at each (measured here:
        # first batch after 1.1-1.2 s instead of 0.14 s); a few spare processes avoid it.
        "RAY_num_workers_soft_limit": str((num_cpus or os.cpu_count() or 1) + 4),
    }


def _is_auth_error(error: BaseException) -> bool:
    from ray.exceptions import AuthenticationError

    text = str(error)
    return isinstance(error, AuthenticationError) or "authentication token" in text.lower()


def check_resources(job: str, demands: list[tuple[str, float, str, str]], address: str | None = None) -> None:
    """Refuse, before any work, a job the embedded Ray cannot hold; on a remote cluster only warn.

    demands: (resource, amount, the config keys that set it, how to fix it), e.g.
    ("GPU", 4, "scaling.num_workers = 4 with scaling.use_gpu", "set scaling.use_gpu=false").
    Ray Train and Ray Data wait for resources without limit: right on an autoscaling cluster (the
    KubeRay ones in k8s/ start with 0 GPU workers and add them on demand), a hang on one machine."""
    import ray

    have = ray.cluster_resources()
    embedded = is_embedded(address)
    where = "the embedded local Ray" if embedded else "the Ray cluster"
    for resource, need, keys, fix in demands:
        got = have.get(resource, 0)
        if need <= got:
            continue
        message = f"{keys}: {job} needs {need:g} {resource}(s), but {where} has {got:g}"
        if embedded:
            raise ClusterError(f"{message}; {fix}")
        log.warning("%s now; the job waits until the cluster (its autoscaler) provides them", message)
