"""Fair turns at the worker threads: connections take turns, so that one device sending as fast as it can
does not make every other device wait behind its frames.

A thread pool's own queue is first come, first served: with ``pipeline`` frames in work per connection, a
frame of a device that sends one frame now and then waits behind ``pipeline`` frames of every busy device.
``FairScheduler`` keeps each connection's jobs in a queue of its own and hands the pool at most one job per
free worker, taking the connections in turn (round robin); a connection's own jobs still start in order.
A device's frame therefore waits for at most one job of each other busy connection.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
from typing import Any, Callable, Hashable


class FairScheduler:
    """Runs blocking functions on ``executor``'s threads, at most ``slots`` at once, taking the owners' queues
    in turn. Use from one event loop."""

    def __init__(self, executor: concurrent.futures.Executor, slots: int):
        self.executor = executor
        self.slots = max(1, slots)
        self.running = 0
        # owner -> its waiting jobs; the order of the owners is the order of their next turns
        self.queues: collections.OrderedDict[Hashable, collections.deque[tuple[asyncio.Future[Any], Callable[..., Any],
                                                                             tuple[Any, ...]]]] = \
            collections.OrderedDict()

    async def run(self, owner: Hashable, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread, when ``owner``'s turn comes; its result or its exception.
        Cancelling the caller drops the job if it has not started (a started job runs to its end)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queues.setdefault(owner, collections.deque()).append((fut, fn, args))
        self._dispatch()
        return await fut

    def waiting(self) -> int:
        """Jobs not started yet, all owners together."""
        return sum(len(q) for q in self.queues.values())

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self.running < self.slots and self.queues:
            owner, queue = next(iter(self.queues.items()))
            fut, fn, args = queue.popleft()
            if queue:
                self.queues.move_to_end(owner)  # its next job waits for one turn of every other owner
            else:
                del self.queues[owner]
            if fut.cancelled():  # its connection has gone
                continue
            self.running += 1
            job = loop.run_in_executor(self.executor, fn, *args)
            job.add_done_callback(lambda done, fut=fut: self._finished(done, fut))

    def _finished(self, done: asyncio.Future[Any], fut: asyncio.Future[Any]) -> None:
        self.running -= 1
        if done.cancelled():  # the pool was shut down under it
            fut.cancel()
        elif not fut.cancelled():
            exc = done.exception()
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(done.result())
        self._dispatch()
