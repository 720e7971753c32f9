"""The server's fair turns at the worker threads (lwfc_host.serve.scheduler)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from lwfc_host.serve.scheduler import FairScheduler


def run(coro):
    return asyncio.run(coro)


def test_a_busy_owner_does_not_queue_ahead_of_a_quiet_one():
    started: list[str] = []
    gate = threading.Event()

    def job(name: str) -> str:
        started.append(name)
        gate.wait(5)
        return name

    async def main() -> list[str]:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            sched = FairScheduler(pool, slots=1)
            busy = [asyncio.create_task(sched.run("busy", job, f"busy{i}")) for i in range(8)]
            await asyncio.sleep(0.05)
            quiet = asyncio.create_task(sched.run("quiet", job, "quiet0"))
            await asyncio.sleep(0.05)
            assert sched.waiting() == 8  # busy1..7 and quiet0; busy0 runs
            gate.set()
            return await asyncio.gather(*busy, quiet)

    results = run(main())
    assert results == [f"busy{i}" for i in range(8)] + ["quiet0"]
    # the quiet owner's job waits for the running job and at most one more of the busy owner
    assert started.index("quiet0") <= 2, started
    assert [s for s in started if s.startswith("busy")] == [f"busy{i}" for i in range(8)]  # an owner's own order


def _record_jobs(slots: int) -> tuple[list[str], int]:
    """Owners a, b, c each queue four jobs at once; the order the jobs started in and the most at once."""
    running = 0
    peak = 0
    lock = threading.Lock()
    order: list[str] = []

    def job(name: str) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            order.append(name)
        threading.Event().wait(0.01)
        with lock:
            running -= 1

    async def main() -> None:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            sched = FairScheduler(pool, slots=slots)
            await asyncio.gather(*[asyncio.create_task(sched.run(o, job, f"{o}{i}")) for o in "abc" for i in range(4)])

    run(main())
    return order, peak


def test_owners_take_turns_in_round_robin():
    order, _ = _record_jobs(slots=1)
    # a0 found a free worker; from then on the owners take turns, not the order of arrival
    assert order == ["a0", "a1", "b0", "c0", "a2", "b1", "c1", "a3", "b2", "c2", "b3", "c3"], order


def test_at_most_slots_jobs_at_once():
    order, peak = _record_jobs(slots=2)
    assert peak == 2 and sorted(order) == sorted(f"{o}{i}" for o in "abc" for i in range(4))


def test_exceptions_reach_the_caller_and_cancelled_jobs_never_start():
    started: list[int] = []
    gate = threading.Event()

    def job(k: int) -> int:
        started.append(k)
        gate.wait(5)
        if k == 2:
            raise ValueError("bad frame 2")
        return k

    async def main() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            sched = FairScheduler(pool, slots=1)
            first = asyncio.create_task(sched.run("x", job, 0))
            await asyncio.sleep(0.02)
            dropped = asyncio.create_task(sched.run("x", job, 1))
            failing = asyncio.create_task(sched.run("x", job, 2))
            await asyncio.sleep(0.02)
            dropped.cancel()
            gate.set()
            assert await first == 0
            with pytest.raises(ValueError, match="bad frame 2"):
                await failing
            assert dropped.cancelled()
            assert sched.running == 0 and sched.waiting() == 0

    run(main())
    assert started == [0, 2]
