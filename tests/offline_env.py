"""Python environments holding only some of this interpreter's packages, built as venvs of links:

- build(): shaped like the borrowed GPU machine's (used by tests/integration/test_gpu_proof.py);
- build_minimal(): vaedist's required dependencies (pyproject's `dependencies`) and pytest, none of
  its extras (used by tests/integration/test_minimal_install.py: `pip install vaedist` without
  `[mlflow]` or `[test]`).

Both are runnable by hand to poke at them:

    python tests/offline_env.py /tmp/gpu-like                # -> /tmp/gpu-like/{venv,site,wheels}
    /tmp/gpu-like/venv/bin/python ...                        # with PYTHONPATH=$PWD:/tmp/gpu-like/site
    python tests/offline_env.py --minimal /tmp/min           # -> /tmp/min/venv
    /tmp/min/venv/bin/python -m vaedist.cli ...              # with PYTHONPATH=$PWD

The GPU machine (issue 19; /work/.library/device/KINDS.md lists its image) has PyTorch, torchvision,
NumPy, pandas, PyArrow, click, PyYAML, tqdm, matplotlib and pytest (and, among much else, the attrs,
msgpack, protobuf and requests that the wheelhouse's packages need), but no package index, and no Ray,
DuckDB, MLflow or Ray's dashboard extras: Ray comes from `../shared/offline-wheels/build.sh`'s wheelhouse through
`pip install --no-index --no-deps --target`, and vaedist from PYTHONPATH.

Why symlinks rather than a fresh venv with torch from PyPI: a CUDA torch and its NVIDIA libraries are
gigabytes to download and minutes to install on every CI run, and a different torch than the one the
rest of the suite tests. What the test must be faithful to is which packages can be imported, and a
venv (no system site-packages) whose site-packages holds links to exactly the allowed distributions of
this interpreter's environment (and their own requirements, nothing else) gives that: importing DuckDB,
MLflow or a dashboard package fails there as it does on the GPU machine, while the allowed packages are
the very files the rest of the suite runs. Top-level directories shared by several distributions (`google/`: protobuf
beside the google-* packages MLflow brings) become real directories holding links to the allowed
parts only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
WHEELHOUSE_SCRIPT = REPO.parent / "shared" / "offline-wheels" / "build.sh"
# The packages issue 19 lists for that machine: what vaedist itself imports there.
LISTED = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "click", "pyyaml", "tqdm", "matplotlib", "pytest")
# Its image's Python packages (KINDS.md, as read on 2026-11-17): what the wheelhouse may rely on.
IMAGE = frozenset("""
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
    pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
    sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
    tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
    toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
    triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
    xxhash yarl zipp
""".split())
# What the GPU machine lacks and a faithful environment must lack too.
FORBIDDEN = ("duckdb", "mlflow", "mlflow-skinny", "ray", "aiohttp-cors", "opencensus", "py-spy", "colorful",
             "smart-open", "webdataset", "jsonschema", "pydantic")


def wheelhouse_needs(wheelhouse: Path) -> list[str]:
    """What the wheelhouse's wheels require (no extras) beyond one another: the GPU image must have each."""
    env = {**default_environment(), "extra": ""}
    names, needs = set(), set()
    for wheel in wheelhouse.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            meta = Parser().parsestr(z.read(next(n for n in z.namelist()
                                                  if n.endswith(".dist-info/METADATA"))).decode())
        names.add(canonicalize_name(meta["Name"]))
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate(env):
                needs.add(canonicalize_name(req.name))
    missing = sorted(needs - names - IMAGE)
    if missing:
        raise RuntimeError(f"{wheelhouse}'s wheels need {missing}, which are neither in it nor on the GPU machine")
    return sorted(needs - names)


def _dists(site: Path) -> dict[str, metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions(path=[str(site)])}


def closure(site: Path, roots, forbidden=FORBIDDEN) -> dict[str, metadata.Distribution]:
    """The installed distributions `roots` need on this platform: requirement strings, whose extras
    count (`ray[data]`), and whose dependencies' requirements count without theirs unless named so.
    Raises if one of them is in `forbidden`."""
    dists = _dists(site)
    todo, found, seen = [Requirement(r) for r in roots], {}, set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name not in dists:
            continue
        found[name] = dists[name]
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            env = {**default_environment(), "extra": extra}
            for line in dists[name].requires or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate(env):
                    todo.append(sub)
    bad = sorted(set(found) & {canonicalize_name(f) for f in forbidden})
    if bad:
        raise RuntimeError(f"the allowed packages require {bad}, which the environment must not have")
    return found


def _top_paths(dist: metadata.Distribution) -> list[tuple[str, ...]]:
    """The distribution's files as path parts relative to site-packages (scripts outside it left out)."""
    return [tuple(Path(str(f)).parts) for f in dist.files or [] if not str(f).startswith("..")]


def link_site_packages(source: Path, target: Path, dists: dict[str, metadata.Distribution]) -> None:
    """Links in `target` to the files of `dists` in `source`: a whole directory where only allowed
    distributions own files in it, else a real directory and links one level further down."""
    owners: dict[tuple[str, ...], set[str]] = {}
    for name, dist in _dists(source).items():
        for parts in _top_paths(dist):
            for depth in range(1, len(parts) + 1):
                owners.setdefault(parts[:depth], set()).add(name)
    allowed = set(dists)
    wanted = {parts for dist in dists.values() for parts in _top_paths(dist)}

    def place(prefix: tuple[str, ...]) -> None:
        children = {p[len(prefix)] for p in wanted if len(p) > len(prefix) and p[:len(prefix)] == prefix}
        for child in sorted(children):
            here = prefix + (child,)
            dest = target.joinpath(*here)
            if owners.get(here, set()) <= allowed or here in wanted:
                if not dest.exists():
                    dest.symlink_to(source.joinpath(*here))
            else:
                dest.mkdir(parents=True, exist_ok=True)
                place(here)

    target.mkdir(parents=True, exist_ok=True)
    place(())


def build_wheelhouse(dest: Path) -> Path:
    """../shared/offline-wheels/build.sh for this Python (kept: a second call reuses it)."""
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not any(dest.glob("ray-*.whl")):
        env = {**os.environ, "PYVER": pyver, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        subprocess.run(["bash", str(WHEELHOUSE_SCRIPT), str(dest)], check=True, env=env, capture_output=True)
    return dest


def _linked_venv(venv: Path, dists: dict[str, metadata.Distribution]) -> Path:
    """A venv (no pip, no system site-packages) whose site-packages links to `dists` of this
    interpreter's; kept where it exists. Returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        link_site_packages(Path(sysconfig.get_paths()["purelib"]), Path(purelib), dists)
    return python


def build(root: Path, wheelhouse: Path) -> dict[str, Path]:
    """venv (the allowed packages only) + site (the wheelhouse, installed as on the GPU machine)."""
    source = Path(sysconfig.get_paths()["purelib"])
    python = _linked_venv(root / "venv", closure(source, [*LISTED, *wheelhouse_needs(wheelhouse)]))
    site = root / "site"
    if not site.exists():
        # The GPU machine's exact install: no index, no dependency resolution, into a directory. Compiled
        # here, once: where PYTHONDONTWRITEBYTECODE is set (as on this machine), every process of Ray's
        # would otherwise compile Ray anew and its node miss its 30 s start-up deadline on a busy machine.
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--target", str(site), *map(str, sorted(wheelhouse.glob("*.whl")))], check=True)
    return {"python": python, "site": site}


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> tuple[list[str], dict[str, list[str]]]:
    """(pyproject's required dependencies, {extra: its requirements})."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return list(project["dependencies"]), dict(project.get("optional-dependencies", {}))


def extras_only(source: Path | None = None) -> list[str]:
    """The distributions that only vaedist's extras bring (mlflow, boto3, ...): what a plain
    `pip install vaedist` lacks. Those the required dependencies also need (jsonschema: Ray's) are not.
    An extra's package missing from this interpreter counts, without what it would have brought."""
    source = source or Path(sysconfig.get_paths()["purelib"])
    required, extras = project_requirements()
    needed = set(closure(source, [*required, "pytest"], forbidden=()))
    wanted = {canonicalize_name(Requirement(r).name) for reqs in extras.values() for r in reqs}
    wanted |= set(closure(source, [r for reqs in extras.values() for r in reqs], forbidden=()))
    return sorted(wanted - needed)


def build_minimal(root: Path) -> Path:
    """A venv with vaedist's required dependencies and pytest, and none of what only its extras bring;
    vaedist itself comes from PYTHONPATH. Returns its python."""
    source = Path(sysconfig.get_paths()["purelib"])
    required, _ = project_requirements()
    missing = sorted(Requirement(r).name for r in required if canonicalize_name(Requirement(r).name) not in _dists(source))
    if missing:
        raise RuntimeError(f"this interpreter lacks vaedist's required {missing}")
    return _linked_venv(root / "venv", closure(source, [*required, "pytest"], forbidden=extras_only(source)))


if __name__ == "__main__":
    if sys.argv[1] == "--minimal":
        print(f"{build_minimal(Path(sys.argv[2]).resolve())} with PYTHONPATH={REPO}")
    else:
        root = Path(sys.argv[1]).resolve()
        paths = build(root, build_wheelhouse(root / "wheels"))
        print(f"{paths['python']} with PYTHONPATH={REPO}:{paths['site']}")
