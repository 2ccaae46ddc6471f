"""MCP tools in `chat` and `generate` (llmcli/mcp_tools.py, llmcli/agent.py): against mcp-server-time
(real, from the registry) and a server written here with the SDK's MCPServer (FastMCP in mcp 1.x), over
stdio and streamable HTTP. The server writes each call it receives to a log, so a test sees what
reached it (and that a refused call never did); arguments are checked with `jsonschema` against the
schema the server published. The tiny Llama (random weights, 2048-token context) runs the loop with a
forced --tool-choice; the embedded SmolLM2 runs it against mcp-server-time (slow)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import default_sigint, run_cli

pytest.importorskip("mcp")
jsonschema = pytest.importorskip("jsonschema")

PROBE = '''
import json, os, sys, time
from typing import Annotated

from pydantic import Field
from mcp.server.mcpserver import MCPServer

# short strings: the tiny random model writes a free string to its bound
Short = Annotated[str, Field(max_length=6)]

server = MCPServer("probe")
with open(os.environ["PROBE_PIDS"], "a") as pids:
    pids.write(f"{os.getpid()}\\n")


def record(tool, arguments):
    with open(os.environ["PROBE_LOG"], "a") as log:
        log.write(json.dumps({"tool": tool, "arguments": arguments}) + "\\n")


@server.tool()
def lookup(word: Short) -> str:
    """The secret code of a word."""
    record("lookup", {"word": word})
    return f"CODE-{len(word)}-ZEBRA"


@server.tool()
def crash(reason: Short) -> str:
    """Exits in the middle of the call."""
    record("crash", {"reason": reason})
    os._exit(3)


@server.tool()
def hang(reason: Short) -> str:
    """Never answers."""
    record("hang", {"reason": reason})
    time.sleep(3600)
    return "late"


if sys.argv[1:2] == ["http"]:
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
else:
    server.run()
'''


# the tiny model's vocabulary is small (400 tokens): a call in the generic format,
# {"tool_calls":[{"name":"probe_lookup","arguments":{"word":"......"}}]}, takes about 62 tokens
CALL_TOKENS = "72"


class Probe:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.script = root / "probe.py"
        self.script.write_text(PROBE)
        self.log, self.pids = root / "calls.jsonl", root / "pids"
        self.env = {"PROBE_LOG": str(self.log), "PROBE_PIDS": str(self.pids)}

    def config(self, **extra: dict) -> Path:
        path = self.root / "mcp.json"
        servers = {"probe": {"command": sys.executable, "args": [str(self.script)], "env": self.env}, **extra}
        path.write_text(json.dumps({"mcpServers": servers}))
        return path

    def calls(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def started(self) -> list[int]:
        return [int(pid) for pid in self.pids.read_text().split()] if self.pids.exists() else []


@pytest.fixture
def probe(tmp_path) -> Probe:
    return Probe(tmp_path)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def tool_schema(name: str, config: Path) -> dict:
    from llmcli.mcp_tools import McpTools, read_config

    with McpTools(read_config(config)) as hub:
        return next(tool.tool.parameters for tool in hub.tools() if tool.tool.name == name)


# ------------------------------------------------------------------ options and config

@pytest.mark.parametrize("content, message", [
    ("{", "is not JSON"),
    ('{"servers": {}}', 'non-empty "mcpServers"'),
    ('{"mcpServers": {"x": {"command": "a", "url": "http://h"}}}', 'either "command"'),
    ('{"mcpServers": {"x": {"command": "a", "args": "b"}}}', '"args" must be a list of strings'),
    ('{"mcpServers": {"x": {"url": "ftp://h"}}}', "http:// or https://"),
])
def test_a_bad_mcp_file_is_one_error_line(tmp_path, content, message):
    path = tmp_path / "mcp.json"
    path.write_text(content)
    result = run_cli("generate", "--mcp", path, "--approve", "all", "hi")
    assert result.exit_code == 2
    assert result.stderr.startswith("Error:") and message in result.stderr and "Traceback" not in result.stderr


def test_tool_options_need_mcp_and_fit_together(tmp_path, probe):
    result = run_cli("generate", "--approve", "all", "hi")
    assert result.exit_code == 2 and "--mcp" in result.stderr
    result = run_cli("generate", "--mcp", probe.config(), "--schema", '{"type": "object"}', "hi")
    assert result.exit_code == 2 and "--schema" in result.stderr


def test_generate_refuses_unapproved_tools_before_any_call(tiny_llama_2k, probe):
    result = run_cli("generate", "-m", tiny_llama_2k, "--mcp", probe.config(), "--tool-choice", "probe_lookup",
                     "--approve", "probe_crash", "hi")
    assert result.exit_code == 2
    [line] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "probe_lookup" in line and "--approve" in line
    assert probe.calls() == [] and not any(alive(pid) for pid in probe.started())


def test_unknown_tool_names_are_refused(tiny_llama_2k, probe):
    result = run_cli("generate", "-m", tiny_llama_2k, "--mcp", probe.config(), "--tools", "probe_nothing",
                     "--approve", "all", "hi")
    assert result.exit_code == 2 and "probe_nothing" in result.stderr and "probe_lookup" in result.stderr
    result = run_cli("generate", "-m", tiny_llama_2k, "--mcp", probe.config(), "--tool-choice", "probe_nothing",
                     "--approve", "all", "hi")
    assert result.exit_code == 2 and "--tool-choice probe_nothing" in result.stderr


# ------------------------------------------------------------------ the loop

def test_consent_is_asked_until_always():
    from llmcli.agent import Consent
    from llmcli.errors import UsageError

    answers, asked = iter(["n", "y", "always"]), []
    consent = Consent({"s_other"}, ask=lambda name, arguments: (asked.append(name), next(answers))[1])
    assert [consent.allows("s_tool", {}) for _ in range(5)] == [False, True, True, True, True]
    assert asked == ["s_tool"] * 3 and consent.allows("s_other", {})
    with pytest.raises(UsageError, match="--approve s_tool"):
        Consent({"s_other"}).allows("s_tool", {})
    assert Consent({"all"}).allows("s_tool", {})


def test_a_call_reaches_the_server_and_its_result_the_next_prompt(tiny_llama_2k, probe):
    """The forced call runs on the server with arguments valid for its schema, the result is in the
    prompt of the next step, and the answer of that step is the reply."""
    from llmcli.agent import AgentOptions, Consent, run_turn
    from llmcli.engines import choose_engine
    from llmcli.mcp_tools import McpToolbox, McpTools, read_config
    from llmcli.tasks.generate import GenerateOptions

    engine = choose_engine(str(tiny_llama_2k), "hf")
    with McpTools(read_config(probe.config())) as hub:
        toolbox = McpToolbox(hub, ["probe_lookup"])
        reply = run_turn(engine, [{"role": "user", "content": "the code of apple?"}], GenerateOptions(max_new_tokens=int(CALL_TOKENS)),
                         toolbox, Consent({"all"}), AgentOptions("probe_lookup", max_steps=1))
        schema = toolbox.listed()["probe_lookup"].tool.parameters
    [received] = probe.calls()
    jsonschema.validate(received["arguments"], schema)
    [call] = reply.calls
    assert (call.server, call.tool, call.name, call.arguments) == ("probe", "lookup", "probe_lookup", received["arguments"])
    expected = f"CODE-{len(received['arguments']['word'])}-ZEBRA"
    assert call.result == expected and not call.error
    assert len(reply.prompts) == 2
    assert expected not in json.dumps(reply.prompts[0].messages) and expected in json.dumps(reply.prompts[1].messages)
    assert reply.messages[-1] == {"role": "assistant", "content": reply.text}
    assert reply.generation.generated_tokens > 0


def test_generate_json_records_every_call(tiny_llama_2k, probe):
    result = run_cli("generate", "-m", tiny_llama_2k, "--mcp", probe.config(), "--tools", "probe_lookup",
                     "--tool-choice", "probe_lookup", "--approve", "probe_lookup", "--max-tool-steps", "1", "-n", CALL_TOKENS, "--json", "hi")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    [received] = probe.calls()
    [call] = record["tool_calls"]
    assert call["server"] == "probe" and call["tool"] == "lookup" and call["arguments"] == received["arguments"]
    assert call["result"] == f"CODE-{len(received['arguments']['word'])}-ZEBRA" and call["approved"]
    assert call["seconds"] >= 0 and record["steps"] == 2 and isinstance(record["text"], str)
    assert "Tool call: probe_lookup" in result.stderr
    assert not any(alive(pid) for pid in probe.started())  # stopped on exit


@pytest.mark.parametrize("answer, runs", [("n", False), ("y", True)])
def test_chat_asks_before_each_call(tiny_llama_2k, probe, answer, runs):
    """A refused call never reaches the server; the model is told it was declined, and the chat goes on."""
    result = run_cli("chat", "-m", tiny_llama_2k, "--mcp", probe.config(), "--tool-choice", "probe_lookup",
                     "--max-tool-steps", "1", "-n", CALL_TOKENS, input=f"the code of apple?\n{answer}\n/exit\n")
    assert result.exit_code == 0, result.stderr
    assert "Tool call: probe_lookup" in result.stderr
    assert [call["tool"] for call in probe.calls()] == (["lookup"] if runs else [])


def test_a_crash_or_a_hang_mid_call_is_survived(probe):
    """The failed call is an error result; the server is stopped and starts again for the next call."""
    from llmcli.mcp_tools import McpToolbox, McpTools, read_config

    with McpTools(read_config(probe.config()), call_timeout=2) as hub:
        toolbox = McpToolbox(hub)
        crashed = toolbox.run("probe_crash", {"reason": "test"})
        assert crashed.error and "probe" in crashed.text
        hung = toolbox.run("probe_hang", {"reason": "test"})
        assert hung.error and "timed out" in hung.text
        after = toolbox.run("probe_lookup", {"word": "kiwi"})
        assert after == type(after)("probe", "lookup", "CODE-4-ZEBRA", False)
        pids = probe.started()
    assert [call["tool"] for call in probe.calls()] == ["crash", "hang", "lookup"]
    assert len(pids) == 3 and not any(alive(pid) for pid in pids)


def test_the_conversation_goes_on_after_a_crashed_tool(tiny_llama_2k, probe):
    result = run_cli("generate", "-m", tiny_llama_2k, "--mcp", probe.config(), "--tool-choice", "probe_crash",
                     "--approve", "all", "--max-tool-steps", "1", "-n", CALL_TOKENS, "--json", "hi")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    [call] = record["tool_calls"]
    assert call["error"] and "failed" in call["result"] and record["steps"] == 2


def test_streamable_http_server(probe):
    from llmcli.distributed import free_port
    from llmcli.mcp_tools import McpToolbox, McpTools, read_config

    port = free_port()
    server = subprocess.Popen([sys.executable, str(probe.script), "http", str(port)], env={**os.environ, **probe.env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = probe.root / "http.json"
        config.write_text(json.dumps({"mcpServers": {"web": {"url": f"http://127.0.0.1:{port}/mcp",
                                                             "headers": {"X-Test": "1"}}}}))
        deadline = time.monotonic() + 20
        while True:
            try:
                with McpTools(read_config(config)) as hub:
                    toolbox = McpToolbox(hub)
                    assert "web_lookup" in [tool.name for tool in toolbox.offered()]
                    ran = toolbox.run("web_lookup", {"word": "pear"})
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)  # the server is still starting
        assert ran.text == "CODE-4-ZEBRA" and not ran.error
        assert probe.calls() == [{"tool": "lookup", "arguments": {"word": "pear"}}]
    finally:
        server.terminate()
        server.wait(10)


def test_mcp_server_git_status_and_its_refusal(tmp_path):
    """mcp-server-git (real): a status call runs on its repository; a path outside it is the server's
    error, handed back as a result, not an exception."""
    from llmcli.mcp_tools import McpToolbox, McpTools, read_config

    command = shutil.which("mcp-server-git") or str(Path(sys.executable).with_name("mcp-server-git"))
    if not Path(command).exists():
        pytest.skip("mcp-server-git is not installed (the dev extra installs it)")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "notes.txt").write_text("x")
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"repo": {"command": command, "args": ["--repository", str(repo)]}}}))
    with McpTools(read_config(config)) as hub:
        toolbox = McpToolbox(hub, ["repo_git_status"])
        [offered] = toolbox.offered()
        jsonschema.validate({"repo_path": str(repo)}, offered.parameters)
        status = toolbox.run("repo_git_status", {"repo_path": str(repo)})
        outside = toolbox.run("repo_git_status", {"repo_path": str(tmp_path)})
    assert not status.error and "notes.txt" in status.text
    assert outside.error and str(tmp_path) in outside.text


# ------------------------------------------------------------------ no orphans

@pytest.mark.parametrize("signum, when", [(signal.SIGINT, "mid-call"), (signal.SIGTERM, "server started")])
def test_an_interrupt_leaves_no_server_running(tiny_llama_2k, probe, signum, when):
    """Ctrl-C inside a call that never ends (the command waits on the server), or SIGTERM as soon as the
    server runs (the model loading or generating): exit 130, and the server (in a session of its own,
    which a terminal's Ctrl-C does not reach) is gone."""
    command = [sys.executable, "-m", "llmcli", "generate", "-m", str(tiny_llama_2k), "--mcp", str(probe.config()),
               "--tool-choice", "probe_hang", "--approve", "all", "--tool-timeout", "600", "-n", CALL_TOKENS, "hi"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while not (probe.calls() if when == "mid-call" else probe.started()):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        [pid] = probe.started()
        assert alive(pid)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Error: interrupted" in stderr and "Traceback" not in stderr
    assert not alive(pid)


# ------------------------------------------------------------------ the embedded model and a real server

@pytest.fixture
def time_server(tmp_path) -> Path:
    command = shutil.which("mcp-server-time") or str(Path(sys.executable).with_name("mcp-server-time"))
    if not Path(command).exists():
        pytest.skip("mcp-server-time is not installed (the dev extra installs it)")
    path = tmp_path / "time.json"
    path.write_text(json.dumps({"mcpServers": {"time": {"command": command, "args": ["--local-timezone", "UTC"]}}}))
    return path


@pytest.mark.slow
def test_smollm2_asks_mcp_server_time(time_server):
    """SmolLM2 (which would not call on its own) is made to call get_current_time: the arguments are
    valid for the server's schema, the server's answer is recorded, and an answer comes back."""
    result = run_cli("generate", "--mcp", time_server, "--tools", "time_get_current_time", "--tool-choice",
                     "time_get_current_time", "--approve", "all", "--max-tool-steps", "2", "-n", "64", "--json",
                     "What time is it in Tokyo?")
    assert result.exit_code == 0, result.stderr
    [record] = result.json_lines()
    [call] = record["tool_calls"][:1]
    jsonschema.validate(call["arguments"], tool_schema("time_get_current_time", time_server))
    assert call["server"] == "time" and call["tool"] == "get_current_time"
    if not call["error"]:  # a timezone the model made up is the server's error, still given to the model
        assert json.loads(call["result"])["timezone"] == call["arguments"]["timezone"]
    assert record["text"].strip()
