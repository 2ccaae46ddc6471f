"""The queue in front of the engine: one thread runs every job, in arrival order.

An engine holds one model and one KV cache and is not thread-safe, so jobs never overlap. The queue
is bounded: when it is full a request is refused at once (503 with Retry-After) instead of waiting
behind an ever-growing line. A job whose client has gone is skipped, or stopped at its next token.
Jobs that can share forward passes (`Batchable`, same key) are taken from the queue together, up to
`max_batch`, and run as one batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Hashable


class Busy(Exception):
    """The queue is full."""


class Cancelled(Exception):
    """The client went away before its job ran."""


Work = Callable[[Callable[[], bool]], Any]  # called with `cancelled()`, returns the job's result


@dataclass
class Batchable:
    """A job that may run in one batch with queued jobs of the same `key`: `run_batch(items,
    cancelled)` returns one result per item, in order (an exception for an item that failed alone)."""

    key: Hashable
    item: Any
    run_batch: Callable[[list[Any], Callable[[], bool]], list[Any]]


@dataclass
class Job:
    work: Work
    cancelled: threading.Event
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    batchable: Batchable | None = None

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(settle, self.future, result, error)


class EngineWorker:
    def __init__(self, queue_size: int, max_batch: int = 1) -> None:
        self.size, self.max_batch = queue_size, max_batch
        self.waiting: deque[Job | None] = deque()
        self.busy = 0  # requests the engine is running now
        self.cut_at: float | None = None  # the server is stopping: at this time.monotonic() running jobs stop
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="llmcli-engine", daemon=True)
        self.thread.start()

    def enqueue(self, work: Work, cancelled: threading.Event, batchable: Batchable | None = None) -> asyncio.Future:
        """A future for the job's result, run on the engine thread in turn; Busy when the queue is
        full. Called from the event loop, whose future it is."""
        loop = asyncio.get_running_loop()
        job = Job(work, cancelled, loop.create_future(), loop, batchable)
        with self.changed:
            if len(self.waiting) >= self.size:
                raise Busy
            self.waiting.append(job)
            self.changed.notify()
        return job.future

    def drain(self, cut_at: float) -> None:
        """The server is stopping: a job still running at `cut_at` stops at its next token and answers
        with what it has."""
        self.cut_at = cut_at

    def cut(self) -> bool:
        return self.cut_at is not None and time.monotonic() >= self.cut_at

    def running_requests(self) -> int:
        return self.busy

    def waiting_requests(self) -> int:
        return len(self.waiting)

    def next_jobs(self) -> list[Job] | None:
        """The oldest waiting job, with the waiting jobs that can share its batch; None to stop."""
        with self.changed:
            while not self.waiting:
                self.changed.wait()
            first = self.waiting.popleft()
            if first is None:
                return None
            group = [first]
            if first.batchable is not None and self.max_batch > 1:
                for job in list(self.waiting):
                    if len(group) == self.max_batch:
                        break
                    if job is not None and job.batchable is not None and job.batchable.key == first.batchable.key:
                        self.waiting.remove(job)
                        group.append(job)
            return group

    def run(self) -> None:
        while (group := self.next_jobs()) is not None:
            live = []
            for job in group:
                if job.cancelled.is_set():
                    job.settle(error=Cancelled())
                else:
                    live.append(job)
            if not live:
                continue
            self.busy = len(live)
            try:
                if len(live) == 1:
                    results = [live[0].work(lambda: live[0].cancelled.is_set() or self.cut())]
                else:
                    everyone_gone = lambda: self.cut() or all(job.cancelled.is_set() for job in live)  # noqa: E731
                    results = live[0].batchable.run_batch([job.batchable.item for job in live], everyone_gone)
            except BaseException as exc:  # handed to the requests, which answer with the error
                for job in live:
                    job.settle(error=exc)
                continue
            finally:
                self.busy = 0
            for job, result in zip(live, results):  # a batch member's own failure comes as an exception
                job.settle(error=result) if isinstance(result, BaseException) else job.settle(result)

    def close(self) -> None:
        """Stop the engine thread once the requests in flight are done, and wait for it (10 s at most):
        a daemon thread still inside the engine while the interpreter tears the engine down makes the
        process abort (SIGABRT, seen once on SIGTERM under load)."""
        with self.changed:
            self.waiting.append(None)
            self.changed.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)


def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
        if isinstance(error, Cancelled):
            # its client has gone, so nothing may await it, and asyncio would log "Future exception was
            # never retrieved" with a traceback on the server's stderr; a waiter still gets the exception
            future.exception()
    else:
        future.set_result(result)
