"""P26: what a tool call through MCP (stdio) adds to a turn of `generate --mcp` / `chat --mcp`, beyond
the model's own time. Goal: under 50 ms per call.

The turn is `llmcli.agent.run_turn` on the embedded SmolLM2 with mcp-server-time (the real server,
from the registry), its call forced (`--tool-choice time_get_current_time`, one tool step): the
model writes the call, the call runs on the server, the result goes back, the model answers. The
time inside the engine's `generate` (prompt encoding, the constraint, decoding) is the model's; the
rest of the turn (rendering the tools and the history, reading the call, consent, the JSON-RPC round
trip to the server's process and back through the SDK and llmcli's event-loop thread) is the
overhead, per call. The server is started before the turns are timed (its start, ~1-3 s for a Python
server, is once per command and reported in the note), and the SDK's own `call_tool` from a plain
asyncio loop on the same server is the reference for the round trip alone.

    python benchmarks/run.py --only P26
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import time
from pathlib import Path

BUDGET_MS = 50.0


def time_server() -> str | None:
    command = shutil.which("mcp-server-time") or str(Path(sys.executable).with_name("mcp-server-time"))
    return command if Path(command).exists() else None


def sdk_round_trip(command: str, calls: int) -> float:
    """The median seconds of the SDK's own call_tool, from a plain asyncio loop: the floor."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    async def run() -> float:
        parameters = StdioServerParameters(command=command, args=["--local-timezone", "UTC"])
        async with Client(parameters) as client:
            await client.call_tool("get_current_time", {"timezone": "Asia/Tokyo"})  # warm-up
            times = []
            for _ in range(calls):
                began = time.perf_counter()
                await client.call_tool("get_current_time", {"timezone": "Asia/Tokyo"})
                times.append(time.perf_counter() - began)
        return statistics.median(times)

    return asyncio.run(run())


def mcp_figures(turns: int, calls: int) -> list:
    from run import Figure

    from llmcli import agent
    from llmcli.agent import AgentOptions, Consent, run_turn
    from llmcli.engines import choose_engine
    from llmcli.mcp_tools import McpToolbox, McpTools, ServerConfig
    from llmcli.tasks.generate import GenerateOptions

    command = time_server()
    if command is None:
        return []
    engine = choose_engine(None, "auto")
    model_seconds = [0.0]
    generate = agent.generate

    def timed_generate(*args, **kwargs):  # the model's own time: everything inside the engine's generate
        began = time.perf_counter()
        try:
            return list(generate(*args, **kwargs))
        finally:
            model_seconds[0] += time.perf_counter() - began

    agent.generate = timed_generate
    try:
        server = ServerConfig("time", command=command, args=("--local-timezone", "UTC"))
        began = time.perf_counter()
        with McpTools({"time": server}) as hub:
            toolbox = McpToolbox(hub, ["time_get_current_time"])
            toolbox.offered()
            started = time.perf_counter() - began
            overheads, call_seconds = [], []
            for turn in range(turns + 1):  # the first is the warm-up (the constraint's first compile)
                model_seconds[0] = 0.0
                began = time.perf_counter()
                reply = run_turn(engine, [{"role": "user", "content": "What time is it in Tokyo?"}],
                                 GenerateOptions(max_new_tokens=48), toolbox, Consent({"all"}),
                                 AgentOptions("time_get_current_time", max_steps=1))
                wall = time.perf_counter() - began
                if turn:
                    overheads.append((wall - model_seconds[0]) / len(reply.calls))
                    call_seconds += [call.seconds for call in reply.calls]
    finally:
        agent.generate = generate
    floor = sdk_round_trip(command, calls)
    overhead_ms = statistics.median(overheads) * 1000
    return [Figure("P26 MCP tool round trip (stdio, mcp-server-time): a turn's time beyond the model's, per call",
                   overhead_ms, BUDGET_MS, "ms", higher_is_better=False, goal=1.0,
                   note=f"baseline = the 50 ms budget; {turns} turns on the embedded model ({engine.name}), one "
                        f"forced call each; the call alone {statistics.median(call_seconds) * 1000:.1f} ms (the "
                        f"SDK's own call_tool from a plain asyncio loop: {floor * 1000:.1f} ms); server start "
                        f"{started:.2f} s, once per command",
                   raw={"overheads_ms": [o * 1000 for o in overheads], "call_ms": [c * 1000 for c in call_seconds],
                        "sdk_call_ms": floor * 1000, "server_start_s": started})]
