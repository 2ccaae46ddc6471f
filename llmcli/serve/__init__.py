"""`llmcli serve`: an OpenAI-compatible HTTP server in front of the offered models (app.py: routes and
errors; schemas.py: request bodies; offers.py: which models are offered; router.py: which are loaded;
worker.py and scheduler.py: the bounded queue and the thread that runs an engine)."""

from __future__ import annotations

import time
from typing import Any, Callable

GRACE_SECONDS = 10  # after Ctrl-C or SIGTERM: requests in flight finish (or are cut at half of it)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """Said when the model is reachable from other machines and anyone there may use it."""
    if host in ("127.0.0.1", "localhost", "::1") or api_key:
        return None
    return f"Warning: listening on {host} without --api-key: anyone who can reach this port can use the model."


def model_id(engine: Any, served_name: str | None = None) -> str:
    """The name /v1/models lists: --served-model-name, else source_id's."""
    return served_name or source_id(engine.source)


def source_id(source: Any) -> str:
    """A model's id without loading it: the embedded model's alias, a hub id (org/name:QUANT for a pulled
    GGUF), or the file or directory's own name (no spaces, no full paths)."""
    from pathlib import Path

    from llmcli.hub_cache import looks_like_spec
    from llmcli.models import EMBEDDED_ALIAS, EMBEDDED_NAME

    if source.name == EMBEDDED_NAME:
        return EMBEDDED_ALIAS
    if source.kind == "hub" or looks_like_spec(source.name):  # org/name, or a pulled org/name:QUANT
        return source.name
    return Path(source.location).name


def model_aliases(engine: Any) -> frozenset[str]:
    """Other names a request may give: the name shown before, the location, the file or directory name."""
    return source_aliases(engine.source) | {model_id(engine)}


def source_aliases(source: Any) -> frozenset[str]:
    from pathlib import Path

    return frozenset({source.name, source.location, Path(source.location).name, source_id(source)})


def run_server(offers: list[Any], load_engine: Callable[[Any], Any], host: str, port: int, *,
               on_notice: Callable[[str], None], preloaded: Any = None, max_loaded: int | None = None,
               keep_alive: float | None = None, **settings: Any) -> None:
    """Serve `offers` (offers.Offer; `preloaded`, the first one's engine, loaded already) until Ctrl-C or
    SIGTERM; uvicorn then stops accepting, requests in flight get half of GRACE_SECONDS to finish before
    their generations are cut, and the command exits 0, as servers do (a stop that was asked for is not
    an error)."""
    import uvicorn

    from llmcli.serve.app import create_app
    from llmcli.serve.offers import FOREVER
    from llmcli.serve.router import Router
    from llmcli.serve.settings import Settings

    base = Settings(model_name=offers[0].name, model_aliases=offers[0].aliases, **settings)
    router = Router(offers, load_engine, base, max_loaded, FOREVER if keep_alive is None else keep_alive, on_notice)
    if preloaded is not None:
        router.preload(preloaded)
    app = create_app(None, base, router)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=GRACE_SECONDS)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # requests in flight get part of the grace period to finish; then their generations are cut
            # and they end properly (finish_reason "length", [DONE]) before uvicorn would cancel them
            app.state.worker.drain(time.monotonic() + GRACE_SECONDS / 2)
            super().handle_exit(sig, frame)

    server = Server(config)
    models = [offer for offer in offers if not offer.on_parent]  # adapters run on their model
    adapter_names = [offer.name for offer in offers if offer.on_parent]
    adapters = f" (adapters: {', '.join(adapter_names)})" if adapter_names else ""
    if preloaded is not None and len(models) == 1:
        on_notice(f"Serving {models[0].name}{adapters} on http://{host}:{port}/v1 ({preloaded.name} engine). "
                  "Ctrl-C stops.")
    else:
        names = ", ".join(offer.name for offer in models)
        on_notice(f"Serving {len(models)} models ({names}){adapters} on http://{host}:{port}/v1, each loaded at its "
                  "first request. Ctrl-C stops.")
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C or SIGTERM it stopped on: the stop was asked for
        pass
    on_notice("Stopped.")
