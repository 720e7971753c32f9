"""Running independent tasks on several cores (``lwfc eval --jobs``), with the same results as in-process.

Workers are *spawned* fresh interpreters, never forked: by the time an evaluation runs, the process may hold
threads (JAX, imported by litert-torch during a conversion; onnxruntime's pools), and forking a multithreaded
process can deadlock the child. A spawned worker therefore inherits nothing: each task must be picklable (a
module-level function or a ``functools.partial`` of one), and state that every task reads (the evaluation's
edge outputs, its cloud-half session) is described by a :class:`Shared`, whose ``build`` rebuilds it once
per worker from small picklable arguments instead of pickling it with every task.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any, Callable

START_METHOD = "spawn"


@dataclass(frozen=True)
class Shared:
    """State every task of a run reads. ``value`` is this process's; a worker gets ``build(*args)``, which
    must give an equal value (``build`` a module-level function, ``args`` picklable)."""

    value: Any
    build: Callable[..., Any]
    args: tuple = field(default_factory=tuple)


class _Failed:
    """A worker whose shared state could not be built: its tasks raise the error instead of running."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


_NOTHING = object()
_worker_value: Any = _NOTHING  # a worker's Shared value, set once by _init_worker (never in the parent)


def _init_worker(build: Callable[..., Any] | None, args: tuple) -> None:
    global _worker_value
    try:
        _worker_value = build(*args) if build is not None else _NOTHING
    except Exception as exc:  # kept for the tasks to raise: a Pool whose initializer raises restarts it forever
        _worker_value = _Failed(exc)


def _call(task: Callable[..., Any], value: Any) -> tuple[Any, float]:
    if isinstance(value, _Failed):
        raise value.exc
    t0 = time.time()
    result = task() if value is _NOTHING else task(value)
    return result, time.time() - t0


def _run_in_worker(task: Callable[..., Any]) -> tuple[Any, float]:
    return _call(task, _worker_value)


def run_tasks(tasks: list[Callable[..., Any]], jobs: int = 1, desc: str = "", progress: bool = True,
              shared: Shared | None = None) -> list[tuple[Any, float]]:
    """(result, seconds) of each task, in order. Each task is called as ``task()``, or as ``task(value)``
    with the shared state's value when ``shared`` is given.

    With ``jobs`` > 1 the tasks run in that many spawned worker processes, handed out one at a time so that
    long and short ones balance; a task's exception is raised here. Each worker is single-threaded work on its
    own core, so per-tensor timings stay comparable with ``jobs`` = 1 as long as ``jobs`` does not exceed the
    free cores."""
    from tqdm import tqdm

    value = shared.value if shared is not None else _NOTHING
    if jobs <= 1 or len(tasks) < 2:
        return [_call(t, value) for t in tqdm(tasks, desc=desc, disable=not progress)]
    init = (shared.build, shared.args) if shared is not None else (None, ())
    with multiprocessing.get_context(START_METHOD).Pool(jobs, initializer=_init_worker, initargs=init) as pool:
        return list(tqdm(pool.imap(_run_in_worker, tasks, chunksize=1), total=len(tasks), desc=desc,
                         disable=not progress))
