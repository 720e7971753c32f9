"""run_tasks: the evaluation's tasks give the same results, in order, in forked workers as in-process."""

import os

import numpy as np
import pytest

from lwfc_host.evaluate.core import run_tasks


def _task(i: int, data: np.ndarray):
    return i, float(data[i].sum()), os.getpid()


def test_run_tasks_in_workers_matches_in_process():
    data = np.arange(40.0).reshape(8, 5)  # inherited by the workers through fork, not pickled
    tasks = [lambda i=i: _task(i, data) for i in range(8)]
    serial = run_tasks(tasks, jobs=1, progress=False)
    parallel = run_tasks(tasks, jobs=2, progress=False)
    assert [r[:2] for r, _ in parallel] == [r[:2] for r, _ in serial] == [(i, float(data[i].sum())) for i in range(8)]
    assert all(r[2] == os.getpid() for r, _ in serial)
    assert all(r[2] != os.getpid() for r, _ in parallel)  # really ran in worker processes
    assert all(secs >= 0 for _, secs in parallel)


def test_run_tasks_propagates_a_failing_task():
    def boom():
        raise ValueError("task 1 failed")

    tasks = [lambda: 1, boom, lambda: 3]
    for jobs in (1, 2):
        with pytest.raises(ValueError, match="task 1 failed"):
            run_tasks(tasks, jobs=jobs, progress=False)
