"""OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}` with its HTTP status, for
every way a request can fail: bad fields, unknown routes, task errors, a full queue, a bug (whose
traceback stays in the server's log)."""

from __future__ import annotations

import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcli.errors import ContextOverflow, LlmcliError


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(error: ApiError, anthropic: bool = False) -> JSONResponse:
    """The error as OpenAI shapes it, or (`anthropic`: on /v1/messages) as Anthropic does."""
    if anthropic:
        return JSONResponse(anthropic_body(error), status_code=anthropic_status(error), headers=error.headers)
    return JSONResponse(error_body(error.message, error.kind, error.param, error.code), status_code=error.status,
                        headers=error.headers)


# Anthropic's error types by HTTP status (docs.anthropic.com, "Errors"); any other 4xx is an invalid
# request, any other 5xx an api_error
ANTHROPIC_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_body(error: ApiError) -> dict[str, Any]:
    kind = ANTHROPIC_KINDS.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def anthropic_status(error: ApiError) -> int:
    return 529 if error.status == 503 else error.status  # Anthropic's status for overloaded, which its clients retry


UNION_BRANCHES = ("str", "int", "float", "bool", "list", "dict")  # pydantic names the union member it tried


def validation_error(first: dict[str, Any]) -> ApiError:
    """pydantic's first complaint as OpenAI's 400: the message names the field's path (`messages.0.content`,
    without pydantic's union-branch parts such as `str`) and has no "Value error, " prefix; `param` is
    the top-level field."""
    kind, context = first.get("type"), first.get("ctx") or {}
    where = [str(part) for part in first.get("loc", ()) if part != "body"]
    where = [part for part in where if part not in UNION_BRANCHES and "[" not in part]
    if kind == "json_invalid" or (not where and kind not in ("value_error", "unsupported_field")):
        return ApiError(400, "the request body is not a JSON object (send one, with Content-Type: application/json)")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if not where:  # a check of the whole body: its context names the field
        return ApiError(400, message, param=context.get("field"))
    return ApiError(400, f"{'.'.join(where)}: {message}", param=where[0])


def route_error(app: FastAPI, request: Request, error: StarletteHTTPException) -> ApiError:
    """A path this server does not serve names what it does serve; a method it does not take on a
    path it serves says which it takes (and the Allow header, as HTTP asks)."""
    routes = {route.path: route.methods for route in app.routes if getattr(route, "include_in_schema", False)}
    if error.status_code == 404:
        served = ", ".join(sorted(f"{' '.join(sorted(methods))} {path}" for path, methods in routes.items()))
        return ApiError(404, f"this server has no {request.method} {request.url.path}; it serves {served}",
                        "not_found_error", code="unknown_url")
    allow = (error.headers or {}).get("Allow")  # starlette names the route's methods on a 405
    if error.status_code == 405 and allow:
        return ApiError(405, f"{request.url.path} takes {allow}, not {request.method}", headers={"Allow": allow})
    return ApiError(error.status_code, str(error.detail), headers=error.headers)


CLI_TO_API = {"--max-new-tokens": "max_tokens", "--logit-bias": "logit_bias"}  # what an error names, as a client sends it


def api_error(exc: LlmcliError) -> ApiError:
    """A user error from the task as a 400; one that does not fit the context says so in OpenAI's code."""
    overflow = isinstance(exc, ContextOverflow)
    return ApiError(400, api_message(exc), code="context_length_exceeded" if overflow else None)


def api_message(exc: LlmcliError) -> str:
    """The error for an API client: request fields instead of command-line options, and no hint about
    options it cannot pass."""
    message = exc.message
    for option, name in CLI_TO_API.items():
        message = message.replace(option, name)
    return message


def busy() -> ApiError:
    return ApiError(503, "the server is busy: too many requests are waiting", "server_busy",
                    headers={"Retry-After": "1"})


def log_internal_error(exc: BaseException) -> None:
    import os

    if os.environ.get("LLMCLI_DEBUG"):
        import traceback

        traceback.print_exception(exc)
    sys.stderr.write(f"internal error: {type(exc).__name__}: {exc} (--debug shows the traceback)\n")
