"""run_tasks: the evaluation's tasks give the same results, in order, in spawned workers as in-process."""

import os
import warnings
from functools import partial

import numpy as np
import pytest

from lwfc_host.evaluate.pool import Shared, run_tasks


def _task(i: int, data: np.ndarray):
    return i, float(data[i].sum()), os.getpid()


def _boom():
    raise ValueError("task 1 failed")


def _one():
    return 1


def test_run_tasks_in_workers_matches_in_process():
    data = np.arange(40.0).reshape(8, 5)  # pickled with each task: spawned workers inherit nothing
    tasks = [partial(_task, i, data) for i in range(8)]
    serial = run_tasks(tasks, jobs=1, progress=False)
    parallel = run_tasks(tasks, jobs=2, progress=False)
    assert [r[:2] for r, _ in parallel] == [r[:2] for r, _ in serial] == [(i, float(data[i].sum())) for i in range(8)]
    assert all(r[2] == os.getpid() for r, _ in serial)
    assert all(r[2] != os.getpid() for r, _ in parallel)  # really ran in worker processes
    assert all(secs >= 0 for _, secs in parallel)


def test_run_tasks_propagates_a_failing_task():
    tasks = [_one, _boom, _one]
    for jobs in (1, 2):
        with pytest.raises(ValueError, match="task 1 failed"):
            run_tasks(tasks, jobs=jobs, progress=False)


def _arange(n: int) -> np.ndarray:
    return np.arange(float(n))


def _read_shared(i: int, values: np.ndarray):
    return float(values[i]), os.getpid()


def test_shared_state_is_rebuilt_once_per_worker():
    shared = Shared(_arange(6), _arange, (6,))
    tasks = [partial(_read_shared, i) for i in range(6)]
    serial = run_tasks(tasks, jobs=1, progress=False, shared=shared)
    parallel = run_tasks(tasks, jobs=2, progress=False, shared=shared)
    assert [r[0] for r, _ in parallel] == [r[0] for r, _ in serial] == [float(i) for i in range(6)]
    assert all(r[1] != os.getpid() for r, _ in parallel)


def _cannot_build():
    raise RuntimeError("no shared state here")


def test_a_worker_without_its_shared_state_fails_its_tasks_instead_of_hanging():
    shared = Shared(None, _cannot_build)
    with pytest.raises(RuntimeError, match="no shared state here"):
        run_tasks([_one, _one], jobs=2, progress=False, shared=shared)


def test_workers_do_not_fork_a_process_running_jax():
    """JAX (imported by litert-torch) warns that forking its threads may deadlock: workers must not fork."""
    jax = pytest.importorskip("jax")
    jax.devices()  # starts JAX's backend, which installs its at-fork warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_tasks([_one, _one], jobs=2, progress=False)
    assert not [w for w in caught if "os.fork" in str(w.message)]
