"""`llmcli serve`: an OpenAI-compatible HTTP server in front of one engine (app.py: routes and errors;
schemas.py: request bodies; worker.py: the bounded queue and the thread that runs the engine)."""

from __future__ import annotations

from typing import Any, Callable


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """Said when the model is reachable from other machines and anyone there may use it."""
    if host in ("127.0.0.1", "localhost", "::1") or api_key:
        return None
    return f"Warning: listening on {host} without --api-key: anyone who can reach this port can use the model."


def model_id(engine: Any) -> str:
    """The name clients pass as `model`: the model argument's own name (the file or directory name)."""
    return engine.source.name


def run_server(engine: Any, host: str, port: int, *, on_notice: Callable[[str], None], **settings: Any) -> None:
    """Serve until Ctrl-C or SIGTERM; uvicorn then stops accepting and gives requests in flight 10 s, and
    the command exits 0, as servers do (a stop that was asked for is not an error)."""
    import uvicorn

    from llmcli.serve.app import Settings, create_app

    app = create_app(engine, Settings(model_name=model_id(engine), **settings))
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, log_level="warning",
                            timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    on_notice(f"Serving {model_id(engine)} on http://{host}:{port}/v1 ({engine.name} engine). Ctrl-C stops.")
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C or SIGTERM it stopped on: the stop was asked for
        pass
    on_notice("Stopped.")
