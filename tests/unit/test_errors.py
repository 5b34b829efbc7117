"""root_cause on the exceptions Ray really raises for a failed worker or actor, built here with Ray's
own classes and helpers (no cluster): what was raised, and the user's file and line."""

from __future__ import annotations

import importlib.util
import pickle
import traceback

import pytest

from vaedist.errors import ToldError, original, root_cause

USER_MODEL = '''
import json


def encode(x):
    if x > 8:
        raise ValueError(f"a batch of {x} is more than this model takes\\nsecond line")
    return json.loads("{")  # raises inside the standard library
'''


@pytest.fixture
def user_model(tmp_path):
    """A module outside the Python installation, as a user's model is."""
    path = tmp_path / "mymodel.py"
    path.write_text(USER_MODEL)
    spec = importlib.util.spec_from_file_location("mymodel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines = USER_MODEL.splitlines()
    raise_line = next(i for i, text in enumerate(lines, 1) if "raise ValueError" in text)
    json_line = next(i for i, text in enumerate(lines, 1) if "json.loads" in text)
    return module, str(path), raise_line, json_line


def _raised(fn, *args) -> BaseException:
    try:
        fn(*args)
    except Exception as e:
        return e
    raise AssertionError("did not raise")


def _train_workers_failed(*errors: BaseException):
    """The WorkerGroupError that trainer.fit() raises on the driver: each worker's exception wrapped
    with its traceback as text (Ray's helper), polled, then pickled back as Ray does (the workers'
    exceptions lose their tracebacks on the way)."""
    from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus
    from ray.train.v2._internal.util import construct_user_exception_with_traceback

    statuses = {}
    for rank, error in enumerate(errors):
        try:
            raise error
        except Exception as e:
            statuses[rank] = WorkerStatus(running=False, error=construct_user_exception_with_traceback(e))
    return pickle.loads(pickle.dumps(WorkerGroupPollStatus(worker_statuses=statuses).get_worker_group_error()))


def test_a_train_workers_error_is_told_as_what_the_users_model_raised_and_where(user_model):
    module, path, raise_line, _ = user_model
    failed = _train_workers_failed(_raised(module.encode, 100), _raised(module.encode, 100))
    assert "Training failed due to worker errors" in str(failed) and "Traceback" in str(failed)
    assert root_cause(failed) == f"ValueError: a batch of 100 is more than this model takes (in encode, {path}:{raise_line})"
    assert type(original(failed)) is ValueError and original(failed).__traceback__ is None


def test_the_innermost_frame_outside_the_installation_is_named(user_model):
    """json.loads raises inside the standard library: the line that called it is the user's."""
    module, path, _, json_line = user_model
    failed = _train_workers_failed(_raised(module.encode, 1))
    assert root_cause(failed).startswith("JSONDecodeError: Expecting property name enclosed in double quotes")
    assert root_cause(failed).endswith(f"(in encode, {path}:{json_line})")


def test_ranks_with_different_errors_are_told_by_the_lowest_ranks(user_model):
    module, path, raise_line, _ = user_model
    failed = _train_workers_failed(_raised(module.encode, 100), _raised(module.encode, 1))
    assert root_cause(failed).startswith(f"ValueError: a batch of 100 is more than this model takes "
                                         f"(in encode, {path}:{raise_line})")


def test_a_train_controllers_error_is_unwrapped():
    from ray.train import ControllerError

    assert root_cause(ControllerError(KeyError("no such worker"))).startswith("KeyError: 'no such worker'")


def test_an_actors_error_is_told_as_the_original_exception_and_its_frame(user_model):
    """Ray Data's actor errors: RayTaskError, its message the remote traceback (and Ray's advice), its
    cause the original exception."""
    from ray.exceptions import RayTaskError

    module, path, raise_line, _ = user_model
    error = _raised(module.encode, 100)
    remote = "".join(traceback.format_exception(error))
    failed = RayTaskError("MapBatches(TableFileWriter)", remote, error).as_instanceof_cause()
    assert isinstance(failed, ValueError) and isinstance(failed, RayTaskError)
    assert root_cause(failed) == f"ValueError: a batch of 100 is more than this model takes (in encode, {path}:{raise_line})"


def test_an_error_already_told_in_one_line_is_kept_as_it_is():
    """A sweep trial's TrainingError comes back to the driver wrapped in the trial actor's RayTaskError."""
    from ray.exceptions import RayTaskError

    told = ToldError("training failed: ValueError: bad (in encode, /home/me/mymodel.py:4)")
    failed = RayTaskError("trial", "Traceback ...\nvaedist.train.TrainingError: ...", told).as_instanceof_cause()
    assert root_cause(failed) == str(told)


def test_an_exception_raised_here_is_told_with_its_own_frame():
    try:
        raise ValueError("bad input\nsecond line")
    except ValueError as plain:
        assert root_cause(plain).startswith("ValueError: bad input (in test_an_exception_raised_here_is_told")
        assert original(plain) is plain


class _FailedTrainer:
    """What fit() uses of a TorchTrainer whose workers failed: fit() raises Ray's WorkerGroupError
    (built above as Ray builds it), and the run's FailureConfig."""

    def __init__(self, error: BaseException, max_failures: int):
        from ray.train import FailureConfig, RunConfig

        self.error, self.run_config = error, RunConfig(failure_config=FailureConfig(max_failures=max_failures))

    def fit(self):
        raise self.error


def test_the_api_raises_a_training_error_with_the_workers_exception_as_its_cause(user_model):
    from vaedist.train import TrainingError, fit

    module, path, raise_line, _ = user_model
    with pytest.raises(TrainingError) as failed:
        fit(_FailedTrainer(_train_workers_failed(_raised(module.encode, 100)), max_failures=2))
    assert str(failed.value).startswith(f"training failed after 3 attempts (output.max_failures = 2): ValueError: a "
                                        f"batch of 100 is more than this model takes (in encode, {path}:{raise_line})")
    assert type(failed.value.__cause__) is ValueError and "a batch of 100" in str(failed.value.__cause__)


def test_the_cli_ends_a_failed_run_in_its_one_line_and_exit_code_1():
    import click
    from click.testing import CliRunner

    from vaedist.cli import guarded

    @click.command()
    @guarded
    def fails():
        raise ToldError("training failed: ValueError: bad (in encode, /home/me/mymodel.py:4)")

    result = CliRunner().invoke(fails, [])
    assert result.exit_code == 1
    assert result.output == "Error: training failed: ValueError: bad (in encode, /home/me/mymodel.py:4)\n"


def test_code_that_ray_shipped_to_its_workers_is_named_by_the_file_here(user_model, monkeypatch):
    """A custom model's package runs on the workers from Ray's copy (runtime_env py_modules): the
    line names the file this process imported it from."""
    from ray.exceptions import RayTaskError

    module, path, raise_line, _ = user_model
    monkeypatch.chdir(path.rsplit("/", 1)[0])
    remote = ("Traceback (most recent call last):\n"
              '  File "/tmp/ray/session_1/runtime_resources/py_modules_files/_ray_pkg_0f3a9c/mymodel.py", '
              f"line {raise_line}, in encode\nValueError: a batch of 100 is more than this model takes\n")
    failed = RayTaskError("RayTrainWorker", remote, _raised(module.encode, 100)).as_instanceof_cause()
    assert root_cause(failed).endswith(f"(in encode, {path}:{raise_line})")
