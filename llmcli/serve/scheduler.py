"""Continuous batching for a llama.cpp server: the only loop that steps the engine.

One thread owns the engine. Between steps it admits waiting requests into the live set (up to
`parallel` sequences, llama-server's `-np`, and as many KV cells as their prompts and max_tokens can
take), drops the sequences of clients that went away, and runs any job that needs the engine alone
(log-probabilities); each step is one llama_decode over every live sequence (`SequenceSet.step`). A
request's sequences are its choices (`n`, and each prompt of a completions list); the samples of one
prompt share its prefill, and a prompt that starts with tokens the cache still holds (a chat's earlier
turns, a shared system prompt) decodes only the rest. Text comes out through the same per-sequence
logic as `llmcli generate` (`TokenStreamer`: stop strings, EOS, UTF-8-safe pieces; `generation_of`).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from llmcli.data import Prompt
from llmcli.serve.worker import Busy, Cancelled, Job, Work, settle
from llmcli.tasks.generate import Generation, GenerateOptions, TokenStreamer, generation_of


@dataclass
class Choice:
    """One sequence to decode: a prompt's ids, its options, its own seed and where its text goes."""

    prompt: Prompt
    ids: list[int]
    options: GenerateOptions
    index: int  # which of its prompt's samples this is
    seed: int | None = None
    on_text: Callable[[str], None] | None = None
    on_reasoning: Callable[[str], None] | None = None  # a thinking model's thinking, streamed apart


@dataclass
class SequenceJob:
    """A request's choices; `answer(results, cached_tokens)` makes its response from their results."""

    choices: list[Choice]
    answer: Callable[[list[Generation], int], dict[str, Any]]
    cancelled: threading.Event
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    admitted: int = 0  # choices in the live set or done
    results: dict[int, Generation] = field(default_factory=dict)
    cached_tokens: int = 0
    first_token_at: float | None = None
    widest: int = 0  # the most sequences decoded together in one step while it ran (the access log's batch)

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(settle, self.future, result, error)


@dataclass
class Running:
    """A live sequence's request, choice and text so far."""

    job: SequenceJob
    number: int  # the choice's place in job.choices
    streamer: TokenStreamer
    began: float


class Scheduler:
    def __init__(self, engine: Any, parallel: int, queue_size: int, cells: int, prefix_cache: bool = True,
                 speculative: str = "off", draft_max: int = 12) -> None:
        from llmcli.engines.llamacpp import BATCH
        from llmcli.engines.llama_sequences import SequenceSet

        self.engine, self.parallel, self.size, self.cells = engine, parallel, queue_size, cells
        self.prefix_cache = prefix_cache
        self.speculative, self.draft_max = speculative, draft_max  # every sequence's, as llama-server's --draft
        # as many idle prefix entries as slots, as llama-server keeps each slot's last prompt
        self.sequences = SequenceSet(engine, cells, parallel, BATCH, keep_idle=parallel if prefix_cache else 0)
        self.waiting: deque[SequenceJob | Job | None] = deque()
        self.running: dict[Any, Running] = {}  # Live -> its request
        self.reserved = 0  # KV cells the live sequences may grow to
        self.cut_at: float | None = None  # the server is stopping: at this time.monotonic() running requests end
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="llmcli-scheduler", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ called from the event loop

    def submit(self, choices: list[Choice], answer: Callable[[list[Generation], int], dict[str, Any]],
               cancelled: threading.Event) -> asyncio.Future:
        """A future for the request's response; Busy when the queue is full."""
        loop = asyncio.get_running_loop()
        job = SequenceJob(choices, answer, cancelled, loop.create_future(), loop)
        self.put(job)
        return job.future

    def enqueue(self, work: Work, cancelled: threading.Event, batchable: Any = None) -> asyncio.Future:
        """A job that needs the engine alone (log-probabilities), run between two steps."""
        loop = asyncio.get_running_loop()
        job = Job(work, cancelled, loop.create_future(), loop)
        self.put(job)
        return job.future

    def put(self, job: SequenceJob | Job) -> None:
        with self.changed:
            if len(self.waiting) >= self.size:
                raise Busy
            self.waiting.append(job)
            self.changed.notify()

    def need(self, choice: Choice) -> int:
        """The KV cells a choice may fill: its prompt and every token it may generate."""
        return len(choice.ids) + choice.options.max_new_tokens

    def running_requests(self) -> int:
        return len({id(running.job) for running in self.running.values()})

    def waiting_requests(self) -> int:
        return len(self.waiting)

    def drain(self, cut_at: float) -> None:
        """The server is stopping: requests still running at `cut_at` end there with what they have."""
        with self.changed:
            self.cut_at = cut_at
            self.changed.notify()

    def close(self) -> None:
        """Stop the engine thread once the requests in flight are done, and wait for it (10 s at most):
        a daemon thread still inside the engine while the interpreter tears the engine down makes the
        process abort (SIGABRT, seen once on SIGTERM under load)."""
        with self.changed:
            self.waiting.append(None)
            self.changed.notify()
        if self.thread.is_alive() and threading.current_thread() is not self.thread:
            self.thread.join(timeout=10)

    # ------------------------------------------------------------ the engine thread

    def run(self) -> None:
        try:
            while self.admit():
                self.drop_cancelled()
                if self.cut_at is not None and time.monotonic() >= self.cut_at:
                    self.cut_all()
                if self.sequences.live:
                    self.step()
        finally:
            self.sequences.close()

    def step(self) -> None:
        try:
            self.decode_and_sample()
        except Exception as exc:  # a failed decode, or a bug: every live request gets the error, the server goes on
            for job in {id(running.job): running.job for running in self.running.values()}.values():
                self.fail(job, exc)

    def fail(self, job: SequenceJob, error: BaseException) -> None:
        """The request's sequences leave the live set and it is answered with `error`."""
        for live, running in list(self.running.items()):
            if running.job is job:
                self.sequences.cancel(live)
                self.end(live, running)
        job.settle(error=error)

    def admit(self) -> bool:
        """Moves waiting requests into the live set while there is room, oldest first (a request's
        choices may enter over several steps); runs jobs that need the engine alone. False to stop."""
        while True:
            with self.changed:
                while not self.waiting and not self.running:
                    self.changed.wait()
                if not self.waiting:
                    return True
                head = self.waiting[0]
                if head is None:
                    if self.running:
                        return True  # the requests in flight finish first
                    return False
                if isinstance(head, Job):
                    self.waiting.popleft()
            if isinstance(head, Job):
                self.run_alone(head)
                continue
            if head.cancelled.is_set():
                with self.changed:
                    self.waiting.popleft()
                head.settle(error=Cancelled())
                continue
            try:
                while head.admitted < len(head.choices) and self.has_room(head.choices[head.admitted]):
                    self.start(head, head.admitted)
                    head.admitted += 1
            except Exception as exc:  # answered with the error (500), and the server goes on
                head.admitted = len(head.choices)
                self.fail(head, exc)
            if head.admitted < len(head.choices):
                return True  # the rest waits for sequences to finish
            with self.changed:
                self.waiting.popleft()

    def has_room(self, choice: Choice) -> bool:
        return len(self.sequences.live) < self.parallel and self.reserved + self.need(choice) <= self.cells

    def start(self, job: SequenceJob, number: int) -> None:
        choice = job.choices[number]
        previous = job.choices[number - 1] if number else None
        leader = None
        if previous is not None and previous.ids is choice.ids:  # another sample of the same prompt
            leader = next((live for live, running in self.running.items()
                           if running.job is job and running.number == number - 1), None)
        chain = self.engine.sampler(choice.options, choice.ids, seed=choice.seed)
        # A seeded sample repeats only from the same logits. Cells reused from another prompt were computed
        # in another batch shape, and where the cells lie in the cache changes how attention sums them
        # (SequenceSet), either enough to move a draw: a seeded request decodes its whole prompt, and one
        # that starts on an idle server starts from an emptied cache. Greedy reuses.
        seeded = choice.seed is not None and choice.options.temperature > 0
        live = self.sequences.add(choice.ids, chain, choice.options.max_new_tokens, share_prefill_of=leader,
                                  reuse_prefix=self.prefix_cache and not seeded,
                                  matcher=self.engine.matcher(choice.options), speculative=self.speculative,
                                  draft_max=self.draft_max, afresh=seeded,
                                  adapter=choice.prompt.adapter or self.engine.adapter)
        if choice.index == 0:  # the prompt's first sample: later ones reuse what it decoded
            job.cached_tokens += live.reused
        streamer = TokenStreamer(self.engine.decode, choice.on_text, choice.options.stop, self.engine.eos_ids,
                                 thinking=choice.options.reasoning, on_reasoning=choice.on_reasoning)
        self.running[live] = Running(job, number, streamer, time.perf_counter())
        self.reserved += self.need(choice)

    def cut_all(self) -> None:
        """Every running sequence ends now, its request answered with the text so far (finish_reason
        "length"), as when it reaches max_tokens."""
        now = time.perf_counter()
        for live, running in list(self.running.items()):
            self.sequences.cancel(live)
            self.finish(live, running, now)

    def drop_cancelled(self) -> None:
        """The sequences of clients that went away leave the live set now; the others are untouched."""
        for running in list(self.running.values()):
            if running.job.cancelled.is_set():
                self.fail(running.job, Cancelled())

    def decode_and_sample(self) -> None:
        width = len(self.sequences.live)
        for running in self.running.values():
            running.job.widest = max(running.job.widest, width)
        sampled = self.sequences.step(self.engine.eos_ids)
        now = time.perf_counter()
        for live, tokens in sampled:
            running = self.running[live]
            job = running.job
            if job.first_token_at is None:
                job.first_token_at = now
            running.streamer.add(tokens)
            if running.streamer.done and not live.done:  # a stop string: it ends here
                self.sequences.cancel(live)
            if live.done:
                self.finish(live, running, now)

    def finish(self, live: Any, running: Running, now: float) -> None:
        running.streamer.end()
        job, choice = running.job, running.job.choices[running.number]
        ttft = running.streamer.first_token_at - running.began if running.streamer.first_token_at else None
        result = generation_of(self.engine, choice.prompt, choice.index, live.new, choice.options.stop,
                               len(choice.ids), now - running.began, ttft,
                               constrained=choice.options.constraint is not None,
                               thinking=choice.options.reasoning)
        if live.speculation is not None:
            result = replace(result, drafted=live.speculation.drafted, accepted=live.speculation.accepted)
        job.results[running.number] = result
        self.end(live, running)
        if len(job.results) == len(job.choices):
            try:
                response = job.answer([job.results[n] for n in range(len(job.choices))], job.cached_tokens)
            except Exception as exc:  # handed to the request, which answers 500
                job.settle(error=exc)
                return
            response["first_token_at"], response["batch"] = job.first_token_at, job.widest
            job.settle(response)

    def end(self, live: Any, running: Running) -> None:
        del self.running[live]
        self.reserved -= self.need(running.job.choices[running.number])

    def run_alone(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.settle(error=Cancelled())
            return
        try:
            job.settle(job.work(job.cancelled.is_set))
        except BaseException as exc:  # handed to the request, which answers with the error
            job.settle(error=exc)
