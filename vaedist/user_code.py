"""The user's model code on Ray's workers (`model.kind: custom`): the runtime environment that ships
the factory's top-level package, and a check on every node that it imports there, before any work.

    env = model_runtime_env(cfg.model)   # on a connected Ray; {} when there is nothing to ship
    TorchTrainer(..., run_config=RunConfig(worker_runtime_env=env))
    ds.map_batches(..., runtime_env=env or None)

The package's directory (vaedist/custom_model.py's code_location: found with the current directory
first, left out when installed in site-packages) is uploaded once from this driver to the cluster
(its GCS, where Ray keeps a job's packages), and its URI goes into the runtime environment's
`py_modules`, which Ray unpacks onto the workers' sys.path on every node, so nodes need only the
installed dependencies. Ray uploads local paths itself only for a job's own runtime environment
(ray.init's, or `ray job submit`'s), and the job may be connected before vaedist runs, so the upload
calls Ray's own function for it (`ray._private.runtime_env.py_modules.upload_py_modules_if_needed`;
pyproject.toml pins Ray to 2.60). The URI is added to the job's own py_modules (an actor's
py_modules replaces the job's), and a probe task on each alive node imports the factory with that
environment before any work.
"""

from __future__ import annotations

from vaedist.config import ModelConfig
from vaedist.custom_model import FactoryError, code_location, import_factory

PROBE_TIMEOUT_S = 300  # a fresh node may need to download the package and start a worker process


def _probe(factory: str) -> tuple[str, str | None]:
    """On a worker: (its node id, the import error or None)."""
    import ray

    try:
        import_factory(factory)
        error = None
    except FactoryError as e:
        error = str(e)
    return ray.get_runtime_context().get_node_id(), error


def _upload(factory: str, location: str) -> str:
    """The package at `location`, uploaded to the connected cluster (once per content): its URI."""
    import logging
    import os
    import tempfile

    from ray._private.runtime_env.py_modules import upload_py_modules_if_needed

    # As for a job's own py_modules: .gitignore'd files stay behind unless Ray is told otherwise.
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    try:
        with tempfile.TemporaryDirectory(prefix="vaedist-upload-") as scratch:
            env = upload_py_modules_if_needed({"py_modules": [location]}, include_gitignore=include_gitignore,
                                              scratch_dir=scratch, logger=logging.getLogger("vaedist.user_code"))
    except Exception as e:  # too large, unreadable, the cluster's storage full
        raise FactoryError(f"model.factory {factory!r}: uploading {location} to the Ray cluster failed: "
                           f"{type(e).__name__}: {e}") from None
    return env["py_modules"][0]


def model_runtime_env(model_cfg: ModelConfig) -> dict:
    """The runtime environment Ray's workers need for model_cfg, after checking on every alive node
    that the factory imports with it; {} for the built-in models. Raises FactoryError naming the
    factory and the nodes where it does not import."""
    if model_cfg.kind != "custom":
        return {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    factory = model_cfg.factory
    import_factory(factory)  # here first: the plainest error when it does not import at all
    location = code_location(factory)
    job_modules = list((ray.get_runtime_context().runtime_env or {}).get("py_modules") or [])
    env = {"py_modules": [*job_modules, _upload(factory, location)]} if location else {}
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    try:
        results = ray.get([probe.options(runtime_env=env or None,
                                         scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)
                                         ).remote(factory) for node in nodes], timeout=PROBE_TIMEOUT_S)
    except Exception as e:  # the runtime environment itself failed: upload, size, unpacking
        raise FactoryError(f"model.factory {factory!r}: shipping {location or 'nothing'} to Ray's workers failed: "
                           f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
    failed = [(node, error) for node, error in results if error]
    if failed:
        shipped = (f"vaedist shipped {location} (py_modules)" if location else
                   "it is installed here, so vaedist ships nothing: install it on every node")
        raise FactoryError(f"model.factory {factory!r} does not import on the Ray workers of "
                           f"{len(failed)} of {len(nodes)} node(s) ({', '.join(n[:12] for n, _ in failed)}); "
                           f"{shipped}. There: {failed[0][1]}")
    return env
