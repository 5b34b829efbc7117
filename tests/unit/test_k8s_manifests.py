"""KubeRay manifests in k8s/: valid against the KubeRay CRDs, and deployable the way the house wants.

    pytest tests/unit/test_k8s_manifests.py -q

Schema checks use the CRDs in <repo>/../shared/kuberay-crds (skipped when that directory is absent),
made as strict as the API server: an object that declares its properties takes no others (the API
server would silently prune a misspelt field), int-or-string means either, list-map keys are unique.
Policy checks: rayVersion, the installed Ray and the image tags agree; every container has requests
and limits; GPU groups ask for and tolerate GPUs; pods run as non-root; nothing is exposed outside
the cluster; the runtime env is one Ray accepts and names files and config keys that exist.
"""

import copy
import functools
import json
import re
import shlex
import tomllib
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
import yaml

from vaedist.config import load_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
RUNTIME_ENV_FILE = K8S / "runtime-env.yaml"  # a Ray runtime env for `ray job submit`, not a k8s object
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
# KubeRay requires DNS-1035 names short enough for "<name>-serve-svc" (RayCluster), and for the
# 6 characters it appends to a RayJob's name to name its cluster (ray-operator utils/constant.go).
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47}
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
GPU = "nvidia.com/gpu"
STORAGE_KEYS = ("data.shards_dir", "output.storage_path", "output.latents_dir")
PREPARE_HEAD_MEMORY = 2 * 2**30
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", re.IGNORECASE)
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML


def _load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_LOADER) if doc is not None]


MANIFEST_FILES = sorted(p for p in K8S.glob("*.yaml") if p != RUNTIME_ENV_FILE)
DOCS = [(p.name, doc) for p in MANIFEST_FILES for doc in _load_all(p)]
RAY_DOCS = [(name, doc) for name, doc in DOCS if doc.get("kind") in CRD_FILES]
RAY_JOBS = [(name, doc) for name, doc in RAY_DOCS if doc["kind"] == "RayJob"]


def _ids(items):
    return [f"{name}:{doc['kind']}/{doc['metadata'].get('name')}" for name, doc in items]


# ---------------------------------------------------------------------------------------------
# The CRD's structural schema as a JSON Schema that rejects what the API server would prune.

def _strict(schema: dict) -> dict:
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {name: _strict(sub) for name, sub in s["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = _strict(s[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_strict(sub) for sub in s[key]]
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("anyOf", None)
        s["type"] = ["integer", "string"]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [*([s["type"]] if isinstance(s["type"], str) else s["type"]), "null"]
    if s.get("format") == "int32":
        s.setdefault("minimum", -2**31)
        s.setdefault("maximum", 2**31 - 1)
    if "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
        s.setdefault("additionalProperties", False)
    return s


def _list_type(validator, list_type, instance, schema):
    """x-kubernetes-list-type: a set has no duplicates; a map has no two items with the same keys."""
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        names = schema.get("x-kubernetes-list-map-keys", [])
        props = schema.get("items", {}).get("properties", {})
        keys = [json.dumps([item.get(k, props.get(k, {}).get("default")) for k in names])
                for item in instance if isinstance(item, dict)]
    for key, count in Counter(keys).items():
        if count > 1:
            yield jsonschema.ValidationError(f"duplicate entry {key} in a list of type {list_type}")


_KubeValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                              {"x-kubernetes-list-type": _list_type})


@functools.cache
def _validator(kind: str):
    path = CRD_DIR / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (the shared checkout is absent)")
    crd = yaml.load(path.read_text(), Loader=_LOADER)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # The CRD says only `metadata: {type: object}`; apply KubeRay's own name rules instead.
    schema["properties"]["metadata"] = {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {
            "name": {"type": "string", "pattern": DNS_1035_LABEL, "maxLength": MAX_NAME_LENGTH[kind]},
            "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": kind}
    del schema["properties"]["status"]  # written by the operator, never by a manifest
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return _KubeValidator(schema)


def schema_errors(doc: dict) -> list[str]:
    errors = _validator(doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


# ---------------------------------------------------------------------------------------------
# Walking a RayCluster or RayJob.

def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def groups(doc: dict) -> list[tuple[str, dict]]:
    spec = cluster_spec(doc)
    return [("head", spec["headGroupSpec"])] + [
        (f"worker group {g['groupName']}", g) for g in spec.get("workerGroupSpecs", [])]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    templates = [(label, group["template"]) for label, group in groups(doc)]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        templates.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return templates


def containers(doc: dict) -> list[tuple[str, dict]]:
    """Every container of every pod, plus the autoscaler sidecar KubeRay adds to the head."""
    found = [(f"{label} container {c['name']}", c)
             for label, template in pod_templates(doc)
             for key in ("initContainers", "containers")
             for c in template["spec"].get(key, [])]
    spec = cluster_spec(doc)
    if spec.get("enableInTreeAutoscaling"):
        found.append(("autoscaler sidecar (autoscalerOptions)", spec.get("autoscalerOptions") or {}))
    return found


_SUFFIXES = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match and match[2] in _SUFFIXES, f"not a Kubernetes quantity: {value!r}"
    return float(match[1]) * _SUFFIXES[match[2]]


def wants_gpu(container: dict) -> bool:
    resources = container.get("resources", {})
    return any(GPU in resources.get(k, {}) for k in ("requests", "limits"))


def runtime_env(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"].get("runtimeEnvYAML") or "{}")


def overrides(env: dict) -> list[str]:
    return env.get("env_vars", {}).get("VAEDIST_SET", "").split()


def entrypoint_paths(doc: dict) -> tuple[str, str | None]:
    """(script, config) named by a RayJob's `python <script> --config <config>` entrypoint."""
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] in ("python", "python3") and argv[1].endswith(".py"), f"unexpected entrypoint {argv}"
    config = None
    for i, arg in enumerate(argv):
        if arg == "--config":
            config = argv[i + 1]
        elif arg.startswith("--config="):
            config = arg.split("=", 1)[1]
    return argv[1], config


RUNTIME_ENVS = [(f"{name}:{doc['metadata']['name']}", runtime_env(doc)) for name, doc in RAY_JOBS]
if RUNTIME_ENV_FILE.is_file():
    RUNTIME_ENVS.append((RUNTIME_ENV_FILE.name, yaml.safe_load(RUNTIME_ENV_FILE.read_text())))


# ---------------------------------------------------------------------------------------------
# Layout and schema.

def test_expected_manifests_exist():
    names = {p.name for p in K8S.iterdir()}
    expected = {"README.md", "ray-cluster.gpu.yaml", "ray-cluster.cpu.yaml", "ray-job.train.yaml",
                "ray-job.encode.yaml", "runtime-env.yaml"}
    assert expected <= names, f"missing from k8s/: {sorted(expected - names)}"
    for name, doc in DOCS:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), \
            f"k8s/{name}: every document needs apiVersion, kind and metadata.name"


def test_readme_mentions_every_manifest():
    readme = (K8S / "README.md").read_text()
    missing = [p.name for p in [*MANIFEST_FILES, RUNTIME_ENV_FILE] if p.name not in readme]
    assert not missing, f"k8s/README.md does not mention {missing}"


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=_ids(RAY_DOCS))
def test_matches_crd_schema(name, doc):
    assert schema_errors(doc) == []


def _set(doc: dict, path: str, value) -> dict:
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = functools.reduce(lambda n, key: n[key], parents, doc)
    node[last] = value
    return doc


def _rename(doc: dict, path: str, new: str) -> dict:
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = functools.reduce(lambda n, key: n[key], parents, doc)
    node[new] = node.pop(last)
    return doc


HEAD = "spec.rayClusterSpec.headGroupSpec"
WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: _rename(d, f"{HEAD}.rayStartParams", "rayStartParamz"),
     f"{HEAD}: Additional properties are not allowed ('rayStartParamz' was unexpected)"),
    (lambda d: _rename(d, f"{WORKER}.template.spec.containers.0.resources", "resource"),
     f"{WORKER}.template.spec.containers.0: Additional properties are not allowed ('resource' was"),
    (lambda d: _rename(d, "spec.shutdownAfterJobFinishes", "shutdownAfterJobFinished"),
     "spec: Additional properties are not allowed ('shutdownAfterJobFinished' was unexpected)"),
    (lambda d: _set(d, f"{WORKER}.replicas", "two"), f"{WORKER}.replicas: 'two' is not of type 'integer'"),
    (lambda d: _set(d, f"{HEAD}.rayStartParams.num-gpus", 0),
     f"{HEAD}.rayStartParams.num-gpus: 0 is not of type 'string'"),
    (lambda d: _set(d, "spec.shutdownAfterJobFinishes", "yes"),
     "spec.shutdownAfterJobFinishes: 'yes' is not of type 'boolean'"),
    (lambda d: _set(d, f"{WORKER}.template.spec.containers.0.resources.limits.cpu", 1.5),
     f"{WORKER}.template.spec.containers.0.resources.limits.cpu: 1.5 is not of type 'integer', 'string'"),
    (lambda d: _set(d, f"{WORKER}.maxReplicas", 2**31), f"{WORKER}.maxReplicas: 2147483648 is greater than"),
    (lambda d: _set(d, f"{WORKER}.template.spec.containers.0.env",
                    [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]),
     f"{WORKER}.template.spec.containers.0.env: duplicate entry [\"A\"] in a list of type map"),
    (lambda d: _set(d, "metadata", {"labels": {}}), "metadata: 'name' is a required property"),
    (lambda d: _set(d, "metadata.name", "Vaedist_Train"), "metadata.name: 'Vaedist_Train' does not match"),
    (lambda d: _set(d, "metadata.name", "v" * 48), "metadata.name: " + repr("v" * 48) + " is too long"),
    (lambda d: _set(d, "status", {}), "<root>: Additional properties are not allowed ('status' was"),
], ids=["misspelt-field", "misspelt-deep-field", "misspelt-spec-field", "int-as-string",
        "rayStartParams-not-string", "bool-as-string", "quantity-as-float", "int32-overflow",
        "duplicate-list-map-key", "no-name", "name-not-dns1035", "name-too-long", "status-set"])
def test_schema_rejects(mutate, expected):
    doc = mutate(copy.deepcopy(dict(RAY_JOBS)["ray-job.train.yaml"]))
    errors = schema_errors(doc)
    assert any(e.startswith(expected) for e in errors), f"expected {expected!r}, got {errors}"


def test_schema_accepts_int_or_string_quantities():
    doc = copy.deepcopy(dict(RAY_JOBS)["ray-job.train.yaml"])
    _set(doc, f"{WORKER}.template.spec.containers.0.resources.limits.cpu", 8)
    _set(doc, f"{WORKER}.template.spec.containers.0.resources.requests.memory", "32Gi")
    assert schema_errors(doc) == []


# ---------------------------------------------------------------------------------------------
# Policy.

@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=_ids(RAY_DOCS))
def test_ray_version_matches_installed_ray_and_images(name, doc):
    import ray

    version = cluster_spec(doc)["rayVersion"]
    assert version == ray.__version__, f"rayVersion {version} but this environment has Ray {ray.__version__}"
    tags = set()
    for label, c in containers(doc):
        if "image" not in c:
            continue  # the autoscaler sidecar defaults to the head's image
        repo, _, tag = c["image"].rpartition(":")
        assert repo == "rayproject/ray" and tag.startswith(ray.__version__ + "-"), \
            f"{label}: image {c['image']} is not rayproject/ray:{ray.__version__}-..."
        assert tag.endswith("-gpu") == wants_gpu(c), \
            f"{label}: use the -gpu image exactly where the container requests {GPU}"
        tags.add(tag.removesuffix("-gpu"))
    assert len(tags) == 1, f"one Ray and Python version across the cluster, got {sorted(tags)}"


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=_ids(RAY_DOCS))
def test_every_container_has_requests_and_limits(name, doc):
    for label, c in containers(doc):
        resources = c.get("resources", {})
        for resource in ("cpu", "memory"):
            request = resources.get("requests", {}).get(resource)
            limit = resources.get("limits", {}).get(resource)
            assert request is not None and limit is not None, f"{label}: needs {resource} requests and limits"
            assert quantity(request) <= quantity(limit), f"{label}: {resource} request exceeds its limit"
        if wants_gpu(c):
            gpus = [resources.get(k, {}).get(GPU) for k in ("requests", "limits")]
            assert None not in gpus and quantity(gpus[0]) == quantity(gpus[1]) >= 1, \
                f"{label}: {GPU} requests and limits must both be set, equal and >= 1, got {gpus}"


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=_ids(RAY_DOCS))
def test_head_is_cpu_only_and_gpu_groups_tolerate_gpu_nodes(name, doc):
    head = cluster_spec(doc)["headGroupSpec"]
    assert head.get("rayStartParams", {}).get("num-gpus") == "0", "head: set rayStartParams num-gpus: \"0\""
    assert not any(wants_gpu(c) for c in head["template"]["spec"]["containers"]), "head: no GPUs"
    for label, group in groups(doc)[1:]:
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], label
        spec = group["template"]["spec"]
        if any(wants_gpu(c) for c in spec["containers"]):
            assert any(t.get("key") == GPU and t.get("operator") in ("Exists", "Equal")
                       and t.get("effect") in (None, "NoSchedule") for t in spec.get("tolerations", [])), \
                f"{label}: tolerate {GPU}:NoSchedule, the taint GPU node pools carry"


@pytest.mark.parametrize("name, doc", RAY_DOCS, ids=_ids(RAY_DOCS))
def test_pods_run_as_non_root_without_privileges(name, doc):
    for label, template in pod_templates(doc):
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{label} pod: set securityContext.runAsNonRoot: true"
        assert pod.get("runAsUser", 1000) != 0, f"{label} pod: runAsUser 0 is root"
    for label, c in containers(doc):
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, f"{label}: allowPrivilegeEscalation: false"
        assert "ALL" in sc.get("capabilities", {}).get("drop", []), f"{label}: capabilities.drop: [ALL]"
        assert not sc.get("privileged") and sc.get("runAsUser", 1000) != 0, f"{label}: privileged or root"


def test_nothing_is_exposed_outside_the_cluster():
    problems = []
    for name, doc in DOCS:
        where = f"k8s/{name} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "Service" and doc.get("spec", {}).get("type") in ("LoadBalancer", "NodePort"):
            problems.append(f"{where}: Service of type {doc['spec']['type']}")
        if doc.get("kind") in ("Ingress", "Gateway", "HTTPRoute"):
            problems.append(f"{where}: {doc['kind']}")
        if doc.get("kind") in CRD_FILES:
            head = cluster_spec(doc)["headGroupSpec"]
            service_types = {head.get("serviceType"), head.get("headService", {}).get("spec", {}).get("type")}
            if service_types - {None, "ClusterIP"}:
                problems.append(f"{where}: head service type {sorted(service_types - {None})}")
            if head.get("enableIngress"):
                problems.append(f"{where}: headGroupSpec.enableIngress")
    assert not problems, "reach the dashboard with kubectl port-forward instead:\n" + "\n".join(problems)


def test_shared_volume_claims_are_read_write_many():
    claims = [(name, doc) for name, doc in DOCS if doc.get("kind") == "PersistentVolumeClaim"]
    for name, doc in claims:
        assert "ReadWriteMany" in doc["spec"]["accessModes"], f"k8s/{name}: all Ray pods mount it at once"


# ---------------------------------------------------------------------------------------------
# Runtime env: what KubeRay hands to `ray job submit`.

@pytest.mark.parametrize("where, env", RUNTIME_ENVS, ids=[w for w, _ in RUNTIME_ENVS])
def test_runtime_env_is_one_ray_accepts(where, env):
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    RuntimeEnv(**env)  # raises on a bad field, a non-string env var or a working_dir that is no archive
    # ...but only warns about (and ignores) a misspelt key, as the plugin mechanism allows any.
    unknown = set(env) - RuntimeEnv.known_fields
    assert not unknown, f"{where}: unknown keys {unknown}"
    unknown_config = set(env.get("config", {})) - RuntimeEnvConfig.known_fields
    assert not unknown_config, f"{where}: unknown config keys {unknown_config}"
    if where != RUNTIME_ENV_FILE.name:
        assert "://" in env.get("working_dir", ""), f"{where}: working_dir: a URL of the repository zip"


@pytest.mark.parametrize("where, env", RUNTIME_ENVS, ids=[w for w, _ in RUNTIME_ENVS])
def test_runtime_env_pip_is_pyproject_without_ray(where, env):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    # The image provides Ray; a second Ray in the job's virtualenv would not match the cluster's.
    expected = sorted(d for d in deps if not re.match(r"ray\b", d))
    assert sorted(env.get("pip", [])) == expected


def test_no_literal_credentials():
    literal = [f"{where}: env_vars.{k}" for where, env in RUNTIME_ENVS
               for k in env.get("env_vars", {}) if SECRET_NAME.search(k)]
    literal += [f"k8s/{name} {label}: env {e['name']}"
                for name, doc in RAY_DOCS for label, c in containers(doc)
                for e in c.get("env", []) if SECRET_NAME.search(e["name"]) and "valueFrom" not in e]
    assert not literal, "take credentials from a Secret (envFrom, valueFrom):\n" + "\n".join(literal)


def test_storage_locations_agree_and_are_shared():
    """Train writes where encode reads: one bucket edit must reach every manifest."""
    values: dict[str, set[str]] = {}
    for _, env in RUNTIME_ENVS:
        for item in overrides(env):
            key, _, value = item.partition("=")
            if key in STORAGE_KEYS:
                values.setdefault(key, set()).add(value)
    assert set(values) == set(STORAGE_KEYS), f"set {STORAGE_KEYS} in every VAEDIST_SET"
    for key, found in values.items():
        assert len(found) == 1, f"{key} differs between manifests: {sorted(found)}"
        value = found.pop()
        assert "://" in value or value.startswith("/"), \
            f"{key}={value}: every node must see it (a URI, or an absolute path on a shared volume)"


# ---------------------------------------------------------------------------------------------
# What the manifests name must exist in the repository, and the cluster must fit the job.

@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=_ids(RAY_JOBS))
def test_entrypoint_script_and_config_exist(name, doc):
    script, config = entrypoint_paths(doc)
    env_config = runtime_env(doc).get("env_vars", {}).get("VAEDIST_CONFIG")
    assert config or env_config, f"k8s/{name}: name a config with --config or VAEDIST_CONFIG"
    if config and env_config:
        assert config == env_config, f"k8s/{name}: --config {config} but VAEDIST_CONFIG={env_config}"
    missing = [p for p in (script, config or env_config) if not (REPO / p).is_file()]
    assert not missing, f"k8s/{name} names files that do not exist in the repository: {missing}"


def _job_config(doc: dict):
    """The config the job will run with: its file (defaults while it does not exist) + VAEDIST_SET."""
    _, config = entrypoint_paths(doc)
    env = runtime_env(doc)
    config = config or env.get("env_vars", {}).get("VAEDIST_CONFIG")
    path = REPO / config if config and (REPO / config).is_file() else None
    return load_config(path, overrides(env))


@pytest.mark.parametrize("where, env", RUNTIME_ENVS, ids=[w for w, _ in RUNTIME_ENVS])
def test_overrides_are_valid_config_keys(where, env):
    load_config(None, overrides(env))  # ConfigError names a misspelt key or a bad value


@pytest.mark.parametrize("name, doc", RAY_JOBS, ids=_ids(RAY_JOBS))
def test_cluster_fits_the_job(name, doc):
    cfg = _job_config(doc)
    script, _ = entrypoint_paths(doc)
    gpus = cpus = 0.0
    for _, group in groups(doc)[1:]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["maxReplicas"] * quantity(limits.get(GPU, 0))
        cpus += group["maxReplicas"] * quantity(group["rayStartParams"].get("num-cpus", limits["cpu"]))
    if Path(script).name == "train.py":  # Ray Train workers
        s = cfg.scaling
        workers, cpus_each, use_gpu = s.num_workers, s.cpus_per_worker, s.use_gpu
    elif Path(script).name == "encode.py":  # Ray Data encoder actors
        e = cfg.encode
        workers, cpus_each, use_gpu = e.concurrency, e.cpus_per_actor, e.use_gpu
    elif Path(script).name == "prepare.py" and cfg.data.source == "builtin":
        # The job's driver writes the shards itself, on the head pod: it needs a CPU and memory there
        # (its peak is ~0.2 GiB writing MNIST, measured) beside the head's own GCS and dashboard.
        head = groups(doc)[0][1]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert quantity(head["cpu"]) >= 1 and quantity(head["memory"]) >= PREPARE_HEAD_MEMORY, \
            f"k8s/{name}: the head writes the shards with {head}; give it >= 1 CPU and 2 GiB"
        return
    elif Path(script).name == "prepare.py":  # Ray Data decode tasks (vaedist/prepare.py: num_cpus=1)
        workers, cpus_each, use_gpu = 1, 1, False
    else:
        pytest.fail(f"k8s/{name}: no rule for what {script} asks of the cluster; add one here")
    assert workers * cpus_each <= cpus, f"k8s/{name}: {workers} x {cpus_each} CPUs > {cpus:g} in workers"
    if use_gpu:
        assert workers <= gpus, f"k8s/{name}: {workers} GPU workers > {gpus:g} GPUs in the worker groups"
