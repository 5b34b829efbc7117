"""A failed job told in one line: what was raised, where, and where Ray keeps the full traceback.

    root_cause(error)            # "ValueError: bad batch (in encode, /home/me/mymodel.py:14)"
    train_worker_log(error, t)   # the log file with a failed Ray Train worker's traceback
    original(error)              # the exception itself, found through Ray's wrappers
    ray_log_dir("train")         # this Ray session's log directory for Train ("ray-data": Ray Data)

Ray wraps what a worker or an actor raised, and its wrappers print the remote traceback (for Ray
Train: once per attempt) and retry advice. The wrappers, as Ray 2.60 builds them:
- RayTaskError (a task or actor; Ray Data's jobs): `.cause` is the original exception;
- Ray Train's WorkerGroupError: `.worker_failures`, rank -> the worker's exception, whose traceback
  travels only as text in the error's message, a snippet per group of ranks with the same error;
- Ray Train's ControllerError: `.controller_failure`;
- Ray Train's UserExceptionWithTraceback: `._base_exc`.
Nothing here imports Ray: the CLI and the API import this module on every failure.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import traceback

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_RANK_SNIPPET = re.compile(r"^\[Rank [\d,]+ Error Snippet\]:$", re.MULTILINE)
# Code that Ray's runtime environment shipped to a worker (a custom model's package: py_modules, or a
# working_dir) runs from Ray's copy: the part after the package's hash is the path beside sys.path.
_SHIPPED = re.compile(r"/runtime_resources/[a-z_]+_files/_ray_pkg_[0-9a-f]+/(.+)$")


class ToldError(RuntimeError):
    """A failure whose message already says, in one line, what was raised and where (a failed
    training run's TrainingError): root_cause gives its message as it is."""


def original(error: BaseException) -> BaseException:
    """The exception that the code Ray ran raised, unwrapped from Ray's errors (lowest rank first)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        failures = getattr(error, "worker_failures", None)
        inner = (failures[min(failures)] if failures else None) \
            or getattr(error, "controller_failure", None) or getattr(error, "_base_exc", None) \
            or getattr(error, "cause", None)
        if not isinstance(inner, BaseException):
            break
        error = inner
    return error


def _frames(error: BaseException, root: BaseException) -> list[tuple[str, str, str]]:
    """(file, line, function) of the failure, outermost first: from the remote traceback that Ray's
    message carries as text (the first rank snippet's, for Ray Train), else from root's own."""
    text = str(error)
    snippets = _RANK_SNIPPET.split(text)
    found = _FRAME.findall(snippets[1] if len(snippets) > 1 else text)
    return found or [(f.filename, str(f.lineno), f.name) for f in traceback.extract_tb(root.__traceback__)]


def _local(path: str) -> str:
    """The file here that Ray's copy of shipped code came from, where this process finds it."""
    shipped = _SHIPPED.search(path)
    if shipped:
        for entry in [os.getcwd(), *sys.path]:
            candidate = os.path.join(entry or os.getcwd(), shipped.group(1))
            if os.path.isfile(candidate):
                return os.path.abspath(candidate)
    return path


def _is_installed(path: str) -> bool:
    return "site-packages" in path or "/lib/python" in path or path.startswith("<")


def root_cause(error: BaseException) -> str:
    """What was raised, in one line: the original exception's type and first line, and where: the
    innermost frame outside the Python installation's packages (the user's model or vaedist) when
    there is one, else the innermost frame; for code Ray shipped to its workers, the file here."""
    root = original(error)
    if isinstance(root, ToldError):
        return str(root)
    frames = _frames(error, root)
    ours = [f for f in frames if not _is_installed(f[0])]
    where = (ours or frames)[-1:]
    message = (str(root).strip().splitlines() or [""])[0]
    text = f"{type(root).__name__}: {message}" if message else type(root).__name__
    if where:
        path, line, name = where[0]
        text += f" (in {name}, {_local(path)}:{line})"
    return text


def ray_log_dir(component: str) -> str | None:
    """`logs/<component>` of the Ray session this process is connected to (None without Ray here)."""
    worker = sys.modules.get("ray._private.worker")  # private to Ray: its absence must not hide an error
    node = getattr(worker, "_global_node", None)
    try:
        session = node.get_session_dir_path() if node is not None else None
    except Exception:
        return None
    return os.path.join(session, "logs", component) if session else None


def train_worker_log(error: BaseException, since: float) -> str | None:
    """The log file that holds a failed Ray Train worker's traceback as Python prints it: the newest
    worker stderr file of this session, written since `since` (a time.time()), that names the
    original error; else the Train controller's log (JSON records, on the driver's node); else the
    session's log directory. None without Ray here."""
    logs = ray_log_dir("")
    if logs is None:
        return None
    logs = logs.rstrip(os.sep)
    root = original(error)
    needle = f"{type(root).__name__}: {(str(root).strip().splitlines() or [''])[0]}"

    def newest(pattern: str) -> list[str]:
        paths = []
        for path in glob.glob(os.path.join(logs, pattern)):
            try:
                if os.path.getmtime(path) >= since - 1:
                    paths.append(path)
            except OSError:
                continue
        return sorted(paths, key=os.path.getmtime, reverse=True)

    for path in newest("worker-*.err"):
        try:
            with open(path, errors="replace") as f:
                if needle in f.read():
                    return path
        except OSError:
            continue
    controllers = newest(os.path.join("train", "ray-train-app-controller-*.log"))
    return controllers[0] if controllers else logs

