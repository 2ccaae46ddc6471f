"""`llmcli serve`: an OpenAI-compatible HTTP server in front of one engine (app.py: routes and errors;
schemas.py: request bodies; worker.py: the bounded queue and the thread that runs the engine)."""

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
    """The name /v1/models lists: --served-model-name, else the embedded model's alias, a hub id (org/name:QUANT
    for a pulled GGUF), or the file or directory's own name (no spaces, no full paths)."""
    from pathlib import Path

    from llmcli.models import EMBEDDED_ALIAS, EMBEDDED_NAME

    source = engine.source
    if served_name:
        return served_name
    if source.name == EMBEDDED_NAME:
        return EMBEDDED_ALIAS
    from llmcli.hub_cache import looks_like_spec

    if source.kind == "hub" or looks_like_spec(source.name):  # org/name, or a pulled org/name:QUANT
        return source.name
    return Path(source.location).name


def model_aliases(engine: Any) -> frozenset[str]:
    """Other names a request may give: the name shown before, the location, the file or directory name."""
    from pathlib import Path

    source = engine.source
    return frozenset({source.name, source.location, Path(source.location).name, model_id(engine)})


def run_server(engine: Any, host: str, port: int, *, on_notice: Callable[[str], None], served_name: str | None = None,
               **settings: Any) -> None:
    """Serve until Ctrl-C or SIGTERM; uvicorn then stops accepting, requests in flight get half of
    GRACE_SECONDS to finish before their generations are cut, and the command exits 0, as servers do
    (a stop that was asked for is not an error)."""
    import uvicorn

    from llmcli.serve.app import create_app
    from llmcli.serve.settings import Settings

    name = model_id(engine, served_name)
    app = create_app(engine, Settings(model_name=name, model_aliases=model_aliases(engine), **settings))
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=GRACE_SECONDS)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # requests in flight get part of the grace period to finish; then their generations are cut
            # and they end properly (finish_reason "length", [DONE]) before uvicorn would cancel them
            app.state.worker.drain(time.monotonic() + GRACE_SECONDS / 2)
            super().handle_exit(sig, frame)

    server = Server(config)
    on_notice(f"Serving {name} on http://{host}:{port}/v1 ({engine.name} engine). Ctrl-C stops.")
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C or SIGTERM it stopped on: the stop was asked for
        pass
    on_notice("Stopped.")
