"""MCP servers as tools, through the `mcp` SDK: read a config in Claude Desktop's and Cursor's format,
start each server when its tools are first needed, list its tools, call them, stop them all.

The SDK is async (anyio) and llmcli's generation is not: the sessions live on an event loop in a thread
of their own, and every call from the command waits on it with a timeout. A server that crashes or
hangs is stopped and forgotten (its call is an error result, never an exception), so the conversation
goes on, and the next call starts it again.

Stdio servers run in a session of their own (the SDK's choice, so a terminal's Ctrl-C is ours to
handle): `close` stops every one of them, and waits for that even through a second interrupt.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.errors import DataError, LlmcliError, UsageError
from llmcli.tools import Tool

CALL_TIMEOUT = 60.0  # seconds a tool call may take before its server counts as hung
START_TIMEOUT = 30.0  # seconds a server may take to start and list its tools
# stopping is bounded by the SDK: stdin closed, 2 s, SIGTERM to the process group, 2 s, SIGKILL
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServerConfig:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def read_config(path: str | Path) -> dict[str, ServerConfig]:
    """`{"mcpServers": {NAME: {"command", "args", "env"} | {"url", "headers"}}}`, checked entry by entry."""
    path = Path(path)
    hint = 'Write {"mcpServers": {"NAME": {"command": ..., "args": [...]}}} (or {"url": ...} for HTTP).'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise DataError(f"cannot read --mcp {path}: {exc.strerror}", hint) from None
    except ValueError as exc:
        raise DataError(f"--mcp {path} is not JSON: {exc}", hint) from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict) or not servers:
        raise DataError(f"--mcp {path}: expected an object with a non-empty \"mcpServers\" object", hint)
    return {name: server_config(path, name, entry) for name, entry in servers.items()}


def server_config(path: Path, name: str, entry: Any) -> ServerConfig:
    where = f"--mcp {path}: server {name!r}"
    if not isinstance(entry, dict) or ("command" in entry) == ("url" in entry):
        raise DataError(f"{where} needs either \"command\" (stdio) or \"url\" (streamable HTTP)")

    def strings(key: str, kind: type) -> Any:
        value = entry.get(key, kind())
        items = value.items() if isinstance(value, dict) else value if isinstance(value, list) else None
        if not isinstance(value, kind) or any(not isinstance(item, str) for pair in items for item in
                                              (pair if isinstance(pair, tuple) else (pair,))):
            shape = "an object of strings" if kind is dict else "a list of strings"
            raise DataError(f"{where}: \"{key}\" must be {shape}")
        return value

    if "url" in entry:
        if not isinstance(entry["url"], str) or not re.match(r"https?://", entry["url"]):
            raise DataError(f"{where}: \"url\" must be an http:// or https:// address")
        return ServerConfig(name, url=entry["url"], headers=dict(strings("headers", dict)))
    if not isinstance(entry["command"], str) or not entry["command"]:
        raise DataError(f"{where}: \"command\" must be a program name")
    return ServerConfig(name, command=entry["command"], args=tuple(strings("args", list)),
                        env=dict(strings("env", dict)))


def public_name(server: str, tool: str) -> str:
    """SERVER_TOOL, in OpenAI's alphabet for function names (what templates and clients expect)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}_{tool}")[:64]


@dataclass(frozen=True)
class McpTool:
    server: str
    name: str  # the server's own name for it
    tool: Tool  # as the model sees it: public name, description, input schema


@dataclass(frozen=True)
class ToolResult:
    text: str
    error: bool = False


def result_text(result: Any) -> str:
    """A CallToolResult's content as the text the model reads: text parts as they are, others named."""
    parts = []
    for item in result.content:
        if getattr(item, "type", None) == "text":
            parts.append(item.text)
        elif getattr(item, "type", None) == "resource" and hasattr(item.resource, "text"):
            parts.append(item.resource.text)
        else:  # an image or audio: named, as the model reads text only
            kind, mime = getattr(item, "type", "content"), getattr(item, "mime_type", None)
            parts.append(f"[{kind}: {mime}]" if mime else f"[{kind}]")
    if not parts and getattr(result, "structured_content", None) is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


class McpTools:
    """The servers of one config: `tools()` starts them (once) and lists their tools, `call` runs one,
    `close` stops them. Use as a context manager so that they stop however the command ends."""

    def __init__(self, servers: dict[str, ServerConfig], call_timeout: float = CALL_TIMEOUT) -> None:
        self.servers = servers
        self.call_timeout = call_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.sessions: dict[str, tuple[Any, asyncio.Event, asyncio.Future]] = {}  # name -> (client, stop, held)
        self.listed: list[McpTool] | None = None

    def __enter__(self) -> "McpTools":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- the loop's thread

    def run(self, coroutine: Any, timeout: float) -> Any:
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="mcp", daemon=True)
            self.thread.start()
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    async def start(self, config: ServerConfig) -> Any:
        """The server's client, connected: held open by a task of its own until `stop` is set (an
        anyio context is entered and left in one task)."""
        from mcp import Client

        ready = asyncio.get_running_loop().create_future()
        # read whatever happens: a start cancelled by an interrupt leaves no one waiting for it, and asyncio
        # would print "Future exception was never retrieved" with a traceback
        ready.add_done_callback(lambda done: done.cancelled() or done.exception())
        stop = asyncio.Event()

        async def hold() -> None:
            try:
                async with Client(transport(config), read_timeout_seconds=self.call_timeout) as client:
                    ready.set_result(client)
                    await stop.wait()
            except BaseException as exc:  # a server that fails to start, or dies: its calls say so
                if not ready.done():
                    ready.set_exception(exc)
            finally:
                if self.sessions.get(config.name, (None, None))[1] is stop:  # not a newer session of it
                    del self.sessions[config.name]

        held = asyncio.ensure_future(hold())
        try:
            client = await asyncio.wait_for(asyncio.shield(ready), START_TIMEOUT)
        except BaseException:
            stop.set()
            held.cancel()
            raise
        self.sessions[config.name] = (client, stop, held)
        return client

    async def client(self, name: str) -> Any:
        if name in self.sessions:
            return self.sessions[name][0]
        return await self.start(self.servers[name])

    async def list_all(self) -> list[McpTool]:
        found = []
        for name in self.servers:
            try:
                listing = await (await self.client(name)).list_tools()
            except Exception as exc:
                raise UsageError(f"MCP server {name!r} did not start: {describe(exc)}",
                                 "Check its command (or url) in the --mcp file; run it by hand to see why.") from None
            for tool in listing.tools:
                schema = tool.input_schema if isinstance(tool.input_schema, dict) else {"type": "object"}
                found.append(McpTool(name, tool.name, Tool(public_name(name, tool.name), tool.description or "", schema)))
        return found

    async def stop(self, name: str) -> None:
        session = self.sessions.get(name)
        if session is None:
            return
        _, stop, held = session
        stop.set()
        await asyncio.wait({held}, timeout=STOP_TIMEOUT)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(name) for name in list(self.sessions)))
        # what is left: a server still starting when an interrupt came (its shielded shutdown kills the
        # process, so it is waited for) and the SDK's stream readers; cancelled, and the loop closes clean
        others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=STOP_TIMEOUT)

    # ---------------------------------------------------------------- the command's side

    def tools(self) -> list[McpTool]:
        """Every server's tools (the servers start now, once)."""
        if self.listed is None:
            self.listed = self.run(self.list_all(), START_TIMEOUT * max(1, len(self.servers)) + 5)
        return self.listed

    def call(self, tool: McpTool, arguments: dict[str, Any]) -> ToolResult:
        """Run a tool; a failure (the tool's own error, a crash, a hang) is an error result."""
        async def call() -> Any:
            client = await self.client(tool.server)
            return await client.call_tool(tool.name, arguments, read_timeout_seconds=self.call_timeout)

        try:
            result = self.run(call(), self.call_timeout + START_TIMEOUT)
        except (Exception, asyncio.CancelledError) as exc:
            # crashed or hung: stopped now, and started afresh if the model calls it again
            self.run(self.stop(tool.server), STOP_TIMEOUT + 1)
            if isinstance(exc, LlmcliError):
                raise
            return ToolResult(f"MCP server {tool.server!r} failed: {describe(exc)}", error=True)
        return ToolResult(result_text(result), error=bool(result.is_error))

    def close(self) -> None:
        """Stop every server and the loop. A Ctrl-C or SIGTERM meanwhile waits for this (bounded by
        STOP_TIMEOUT) and is raised after, so no server outlives the command."""
        if self.loop is None:
            return
        interrupted: BaseException | None = None
        future = asyncio.run_coroutine_threadsafe(self.stop_all(), self.loop)
        deadline = time.monotonic() + 2 * STOP_TIMEOUT + 2  # the sessions, then what was still starting
        while time.monotonic() < deadline:
            try:
                future.result(max(0.0, deadline - time.monotonic()))
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
            except Exception:
                break
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(STOP_TIMEOUT)
        if not self.thread.is_alive():
            self.loop.close()
        self.loop = None
        if interrupted is not None:
            raise interrupted


def describe(exc: BaseException) -> str:
    """One line for an error from the SDK or its transports (often an exception group)."""
    while getattr(exc, "exceptions", None):  # an exception group (anyio's task groups)
        exc = exc.exceptions[0]
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return "no answer in time (timed out)"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def transport(config: ServerConfig) -> Any:
    """What `mcp.Client` connects through: the command on stdio, or the URL over streamable HTTP."""
    if config.url is not None:
        return http_transport(config)
    from mcp.client.stdio import StdioServerParameters, stdio_client

    parameters = StdioServerParameters(command=config.command, args=list(config.args), env=config.env or None)
    return stdio_client(parameters, errlog=server_log())


@asynccontextmanager
async def http_transport(config: ServerConfig) -> Any:
    """Streamable HTTP with the config's headers: the SDK takes headers through an HTTP client of ours,
    which is then ours to close."""
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared._httpx_utils import create_mcp_http_client

    async with create_mcp_http_client(headers=config.headers or None) as http:
        async with streamable_http_client(config.url, http_client=http) as streams:
            yield streams


def server_log() -> Any:
    """Where a stdio server's stderr goes: ours, when it is a real file (a test's capture is not)."""
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
            return stream
        except (AttributeError, OSError, ValueError):
            continue
    import subprocess

    return subprocess.DEVNULL


class McpToolbox:
    """The tools offered to the model (all of the servers', or those named by --tools), run by their
    SERVER_TOOL names: what `llmcli.agent` calls."""

    def __init__(self, hub: McpTools, only: list[str] | None = None) -> None:
        self.hub, self.only = hub, only
        self.by_name: dict[str, McpTool] | None = None

    def listed(self) -> dict[str, McpTool]:
        if self.by_name is None:
            every = {tool.tool.name: tool for tool in self.hub.tools()}
            unknown = [name for name in self.only or [] if name not in every]
            if unknown:
                raise UsageError(f"--tools names {', '.join(unknown)}, which no MCP server offers",
                                 f"The servers offer: {', '.join(every) or 'no tools'}.")
            self.by_name = {name: tool for name, tool in every.items() if self.only is None or name in self.only}
        return self.by_name

    def offered(self) -> tuple[Tool, ...]:
        return tuple(tool.tool for tool in self.listed().values())

    def where(self, name: str) -> tuple[str, str]:
        tool = self.listed()[name]
        return tool.server, tool.name

    def run(self, name: str, arguments: dict[str, Any]) -> "Ran":
        from llmcli.agent import Ran

        tool = self.listed()[name]
        result = self.hub.call(tool, arguments)
        return Ran(tool.server, tool.name, result.text, result.error)
