"""Which offered models are loaded, and for how long: the router owns every engine's lifetime.

An endpoint asks `Router.use(name)` for a model, runs its request on what it gets (a `Served`: the
engine, its settings and where its jobs run) and never keeps it. The first request naming a model loads
it (on a thread: the event loop and the other models go on; later requests for it wait for that load).
`--max-loaded N` makes room by unloading the least recently used idle model; when every loaded model
is busy the load waits (past --queue-size such waits are 503s). A model idle for its keep-alive is
unloaded. A model is busy from the router's answer until its request's job has ended, so an unload
never cuts a request: only idle models are unloaded.

Unloading closes the model's worker (its thread ends, llama.cpp frees its context), drops the engine,
collects garbage and hands freed heap pages back to the OS (glibc's malloc_trim): see
benchmarks/router_memory.py for what comes back on each engine.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from llmcli.errors import LlmcliError
from llmcli.serve.errors import ApiError, busy, log_internal_error
from llmcli.serve.offers import FOREVER, Offer
from llmcli.serve.scheduler import Scheduler
from llmcli.serve.settings import Settings, kv_cells, system_fingerprint
from llmcli.serve.worker import EngineWorker

EXPIRY_CHECK_SECONDS = 0.2  # how often idle models are checked against their keep-alive


@dataclass
class Served:
    """A loaded model: its engine, its settings (its name in answers, its --parallel...) and where its
    jobs run (the scheduler on llama.cpp, the engine thread on hf)."""

    offer: Offer
    engine: Any
    settings: Settings
    worker: Any  # EngineWorker or Scheduler
    scheduler: Scheduler | None
    busy: int = 0  # requests using it now, from the router's answer to their job's end
    last_used: float = 0.0  # time.monotonic() of the last request's end (or its load)
    keep_alive: float = FOREVER  # seconds it stays loaded once idle (the last request's keep_alive)
    idle_until: float = FOREVER  # time.monotonic() at which an idle model unloads


def start_model(offer: Offer, engine: Any, base: Settings) -> Served:
    """The engine with its own settings and the worker that runs its requests."""
    settings = replace(base, model_name=offer.name, model_aliases=offer.aliases | {offer.name},
                       parallel=offer.parallel or base.parallel, ctx_size=offer.ctx_size or base.ctx_size,
                       fingerprint=base.fingerprint or system_fingerprint(engine))
    scheduler = None
    if engine.name == "llama.cpp":
        worker = scheduler = Scheduler(engine, settings.parallel, settings.queue_size, kv_cells(engine, settings),
                                       settings.prefix_cache, settings.speculative, settings.draft_max)
    else:
        worker = EngineWorker(settings.queue_size, settings.max_batch)
    return Served(offer, engine, settings, worker, scheduler)


def stop_model(served: Served) -> None:
    """Its worker stopped (after its requests), its engine dropped, and the memory handed back."""
    worker = served.worker
    served.engine = served.worker = served.scheduler = None
    worker.close()
    del worker
    release_memory()


def release_memory() -> None:
    """Collect what only cycles still hold (a model's modules refer to each other), then give the heap's
    free pages back to the OS: glibc keeps them for later mallocs otherwise, and RSS stays up."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator decides
        pass


class Router:
    def __init__(self, offers: list[Offer], load_engine: Callable[[Offer], Any], settings: Settings,
                 max_loaded: int | None = None, keep_alive: float = FOREVER,
                 on_notice: Callable[[str], None] = lambda message: None) -> None:
        self.offers = {offer.name: offer for offer in offers}
        self.default = offers[0].name  # a request that names no model gets the first
        self.names = {alias: offer.name for offer in reversed(offers) for alias in offer.aliases}
        self.names.update({offer.name: offer.name for offer in offers})
        self.load_engine, self.settings, self.on_notice = load_engine, settings, on_notice
        self.max_loaded, self.keep_alive = max_loaded, keep_alive
        self.loaded: dict[str, Served] = {}
        self.loading: dict[str, asyncio.Task] = {}
        self.starting: set[str] = set()  # loads past make_room: each holds a place under --max-loaded
        self.wanted: dict[str, int] = {}  # requests waiting for each model to load
        self.waiting_for_room = 0
        self.changed = asyncio.Event()  # set (and replaced) whenever a model loads, unloads or goes idle
        self.decoded_by_unloaded = 0  # tokens_decoded of schedulers gone, so the counter never goes down
        self.metrics: Any = None  # the app's Metrics, set by create_app (loads, unloads, load seconds)

    # ------------------------------------------------------------ what endpoints call

    def find(self, name: str | None) -> Offer:
        """The offer a request names; a name not offered is OpenAI's 404 model_not_found, listing them."""
        if name is None:
            return self.offers[self.default]
        if name not in self.names:
            offered = ", ".join(repr(offered) for offered in self.offers)
            verb = "runs" if len(self.offers) == 1 else "offers"
            raise ApiError(404, f"unknown model {name!r}; this server {verb} {offered}", "not_found_error",
                           param="model", code="model_not_found")
        return self.offers[self.names[name]]

    @asynccontextmanager
    async def use(self, name: str | None, keep_alive: float | None = None) -> AsyncIterator[Served]:
        """The model, loaded, kept busy while the block runs (and, through `hold`, while its job runs)."""
        offer = self.find(name)
        served = await self.acquire(self.offers[offer.parent] if offer.on_parent else offer, keep_alive)
        try:
            yield served
        finally:
            self.release(served)

    def adapter_of(self, name: str | None) -> str | None:
        """The LoRA adapter a request's model names (run on its base: see `use`), or None."""
        offer = self.find(name)
        return offer.name if offer.on_parent else None

    def hold(self, served: Served, start: Callable) -> Callable:
        """`start` (common.Start) whose job keeps the model busy until it ends: a stream outlives the
        endpoint's function, and its model must not unload under it."""
        def held(emit: Any, cancelled: Any) -> asyncio.Future:
            future = start(emit, cancelled)
            served.busy += 1
            future.add_done_callback(lambda _: self.release(served))
            return future

        return held

    async def acquire(self, offer: Offer, keep_alive: float | None = None) -> Served:
        self.wanted[offer.name] = self.wanted.get(offer.name, 0) + 1  # not a victim while it is awaited
        try:
            while (served := self.loaded.get(offer.name)) is None:
                await self.load(offer)  # or wait for the load in progress; an unload may come between: again
        finally:
            self.wanted[offer.name] -= 1
        served.busy += 1
        served.idle_until = FOREVER
        served.keep_alive = self.keep_alive_of(offer) if keep_alive is None else keep_alive
        return served

    def release(self, served: Served) -> None:
        served.busy -= 1
        served.last_used = time.monotonic()
        if served.busy == 0:
            served.idle_until = served.last_used + served.keep_alive
            self.notify()

    def keep_alive_of(self, offer: Offer) -> float:
        return self.keep_alive if offer.keep_alive is None else offer.keep_alive

    # ------------------------------------------------------------ loading and unloading

    async def load(self, offer: Offer) -> None:
        """Load the offer, or wait for its load in progress. The load is a task of its own: a client
        that hangs up does not cancel it for the others waiting."""
        if offer.name in self.loaded:
            return
        task = self.loading.get(offer.name)
        if task is None:
            task = self.loading[offer.name] = asyncio.ensure_future(self.load_now(offer))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, even unawaited
        await asyncio.shield(task)

    async def load_now(self, offer: Offer) -> None:
        """Room made, the engine loaded on a thread (the event loop and the other models go on). A failed
        load is a 500 naming the model; the others keep serving."""
        try:
            await self.make_room()
            self.starting.add(offer.name)  # its slot under --max-loaded, from here (no await in between)
            began = time.perf_counter()
            try:
                served = await asyncio.to_thread(self.start, offer)
            finally:
                self.starting.discard(offer.name)
            served.last_used = time.monotonic()
            served.keep_alive = self.keep_alive_of(offer)
            served.idle_until = served.last_used + served.keep_alive
            self.loaded[offer.name] = served
            if self.metrics:
                self.metrics.model_loaded(offer.name, time.perf_counter() - began)
        except ApiError:  # a full queue's 503
            raise
        except Exception as exc:
            raise load_error(offer, exc) from exc
        finally:
            del self.loading[offer.name]
            self.notify()

    def start(self, offer: Offer) -> Served:
        engine = self.load_engine(offer)
        self.add_adapters(offer, engine)
        return start_model(offer, engine, self.settings)

    def add_adapters(self, offer: Offer, engine: Any) -> None:
        """The adapters run on this model, loaded beside it (the base stays loaded once for all of them)."""
        from llmcli.engines import add_adapter_dir

        for adapter in self.offers.values():
            if adapter.on_parent and adapter.parent == offer.name:
                add_adapter_dir(engine, adapter.name, adapter.model, self.on_notice)

    async def make_room(self) -> None:
        """Under --max-loaded: unload the least recently used idle model, or wait until one is idle."""
        if self.max_loaded is None:
            return
        self.waiting_for_room += 1
        try:
            while len(self.loaded) + len(self.starting) >= self.max_loaded:
                victim = self.least_recently_used()
                if victim is not None:
                    await self.unload(victim)
                    continue
                if self.waiting_for_room > self.settings.queue_size:
                    raise busy()
                await self.changed.wait()
        finally:
            self.waiting_for_room -= 1

    def least_recently_used(self) -> Served | None:
        idle = [served for name, served in self.loaded.items() if served.busy == 0 and not self.wanted.get(name)]
        return min(idle, key=lambda served: served.last_used, default=None)

    async def unload(self, served: Served) -> None:
        """An idle model leaves at once (no request can reach it after this line), then is freed."""
        name = served.offer.name
        if self.loaded.get(name) is not served or served.busy:
            return
        del self.loaded[name]
        if served.scheduler is not None:  # read now: no reference to the engine may outlive stop_model
            self.decoded_by_unloaded += served.scheduler.sequences.decoded
        await asyncio.to_thread(stop_model, served)
        if self.metrics:
            self.metrics.model_unloaded(name)
        self.notify()

    async def unload_when_idle(self, name: str) -> bool:
        """POST /models/unload: the model unloads once its requests have ended (none is cut); False
        if it was not loaded."""
        offer = self.find(name)
        if offer.name in self.loading:
            try:
                await asyncio.shield(self.loading[offer.name])
            except ApiError:  # it failed to load: nothing to unload
                return False
        if offer.name not in self.loaded:
            return False
        while (served := self.loaded.get(offer.name)) is not None:
            if served.busy == 0:
                await self.unload(served)
            else:
                await self.changed.wait()
        return True

    async def expire_idle(self) -> None:
        """Runs for the server's life: idle models past their keep-alive unload."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK_SECONDS)
            now = time.monotonic()
            for served in list(self.loaded.values()):
                if served.busy == 0 and served.idle_until <= now:
                    await self.unload(served)

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # ------------------------------------------------------------ the server's life and its numbers

    def preload(self, engine: Any) -> None:
        """The default model, loaded before the server listens (a single -m, as serve always did)."""
        offer = self.offers[self.default]
        self.add_adapters(offer, engine)
        served = start_model(offer, engine, self.settings)
        served.keep_alive = self.keep_alive_of(offer)
        served.last_used = time.monotonic()
        served.idle_until = served.last_used + served.keep_alive
        self.loaded[offer.name] = served

    def drain(self, cut_at: float) -> None:
        """The server is stopping: every model's requests still running at `cut_at` end there."""
        for served in self.loaded.values():
            served.worker.drain(cut_at)

    def close(self) -> None:
        for served in list(self.loaded.values()):
            served.worker.close()

    def running_requests(self) -> int:
        return sum(served.worker.running_requests() for served in self.loaded.values())

    def waiting_requests(self) -> int:
        return sum(served.worker.waiting_requests() for served in self.loaded.values()) + self.waiting_for_room

    def decoded_tokens(self) -> int:
        return self.decoded_by_unloaded + sum(served.scheduler.sequences.decoded for served in self.loaded.values()
                                              if served.scheduler is not None)

    def status(self, name: str) -> str:
        """llama-server's router states: loaded, loading, unloaded (an adapter's are its base's)."""
        offer = self.offers[name]
        name = offer.parent if offer.on_parent else name
        return "loaded" if name in self.loaded else "loading" if name in self.loading else "unloaded"

    def parent_id(self, offer: Offer) -> str | None:
        """An adapter's base as a model id: the offered model it names, else the base as written."""
        if offer.parent is None:
            return None
        return self.names.get(offer.parent, offer.parent)


def load_error(offer: Offer, exc: Exception) -> ApiError:
    """Why a model did not load, for every request waiting on it: a 500 that names the model."""
    if isinstance(exc, LlmcliError):
        reason = exc.message
    else:
        log_internal_error(exc)
        reason = f"{type(exc).__name__}: {exc}"
    return ApiError(500, f"model {offer.name!r} failed to load: {reason}", "server_error", param="model",
                    code="model_load_failed")
