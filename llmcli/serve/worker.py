"""The queue in front of the engine: one thread runs every job, in arrival order.

An engine holds one model and one KV cache and is not thread-safe, so jobs never overlap. The queue
is bounded: when it is full a request is refused at once (503 with Retry-After) instead of waiting
behind an ever-growing line. A job whose client has gone is skipped, or stopped at its next token.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable


class Busy(Exception):
    """The queue is full."""


class Cancelled(Exception):
    """The client went away before its job ran."""


Work = Callable[[Callable[[], bool]], Any]  # called with `cancelled()`, returns the job's result


class EngineWorker:
    def __init__(self, queue_size: int) -> None:
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self.run, name="llmcli-engine", daemon=True)
        self.thread.start()

    def enqueue(self, work: Work, cancelled: threading.Event) -> asyncio.Future:
        """A future for `work`'s result, run on the engine thread in turn; Busy when the queue is full.
        Called from the event loop, whose future it is."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        try:
            self.jobs.put_nowait((work, cancelled, future, loop))
        except queue.Full as exc:
            raise Busy from exc
        return future

    def run(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            work, cancelled, future, loop = item
            if cancelled.is_set():
                loop.call_soon_threadsafe(settle, future, None, Cancelled())
                continue
            try:
                result = work(cancelled.is_set)
            except BaseException as exc:  # handed to the request, which answers with the error
                loop.call_soon_threadsafe(settle, future, None, exc)
            else:
                loop.call_soon_threadsafe(settle, future, result, None)

    def close(self) -> None:
        self.jobs.put(None)


def settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
