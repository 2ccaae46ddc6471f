"""The tool loop shared by `chat` and `generate`: the model's reply -> its calls -> consent -> the
tool runner (MCP) -> the results back in the conversation -> the model again, until it answers or
the steps are spent.

Calls go through `llmcli.tools`, as the server's do: the tools are rendered into the prompt and the
reply is constrained, so every call parses and its arguments are valid for the tool's schema.
Consent is decided here, in `Consent.allows`, for whoever runs the loop.

A tool's result is data: it goes into the conversation as a `tool` message and nowhere else. Nothing
in it is read as an instruction to llmcli (it cannot change options, approve or start a tool, or
write a file); only the model's next constrained reply can ask for another call, and that call meets
the same consent.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol

from llmcli import tools
from llmcli.data import Prompt
from llmcli.engines import Engine
from llmcli.errors import UsageError
from llmcli.tasks.generate import GenerateOptions, Generation, TextCallback, generate

REFUSED = "The user declined to run this tool."


class Toolbox(Protocol):
    """What the loop needs of a tool runner: the tools it offers and a way to run one by name."""

    def offered(self) -> tuple[tools.Tool, ...]: ...

    def where(self, name: str) -> tuple[str, str]: ...  # (server, the server's name for the tool)

    def run(self, name: str, arguments: dict[str, Any]) -> "Ran": ...


@dataclass(frozen=True)
class Ran:
    server: str
    tool: str  # the server's own name for it
    text: str
    error: bool = False


@dataclass
class Consent:
    """Which calls may run: the tools approved beforehand (`all` for every one), and otherwise the
    answer of `ask` (chat: y / n / always for this tool). Without `ask` (generate), a call to a tool
    that is not approved is an error, and nothing runs."""

    approved: set[str] = field(default_factory=set)
    ask: Callable[[str, dict[str, Any]], str] | None = None

    def allows(self, name: str, arguments: dict[str, Any]) -> bool:
        if "all" in self.approved or name in self.approved:
            return True
        if self.ask is None:
            raise UsageError(f"the model called {name}, which is not approved to run (--approve {name} lets it)",
                             "Pass --approve TOOL,... or --approve all.")
        answer = self.ask(name, arguments)
        if answer == "always":
            self.approved.add(name)
        return answer in ("y", "always")


@dataclass(frozen=True)
class CallRecord:
    """One call as `generate --json` records it."""

    server: str
    tool: str
    name: str  # SERVER_TOOL, as the model called it
    arguments: dict[str, Any]
    result: str | None  # None: consent refused, it did not run
    error: bool
    seconds: float

    def record(self) -> dict[str, Any]:
        return {"server": self.server, "tool": self.tool, "name": self.name, "arguments": self.arguments,
                "result": self.result, "error": self.error, "approved": self.result is not None,
                "seconds": round(self.seconds, 4)}


@dataclass
class AgentReply:
    text: str  # the final answer
    generation: Generation  # the last step's (timings, finish reason)
    messages: list[dict[str, Any]]  # what the turn added: calls, results, the answer (OpenAI's shapes)
    calls: list[CallRecord]
    prompts: list[Prompt]  # each step's prompt, as the engine got it


@dataclass(frozen=True)
class AgentOptions:
    choice: str = "auto"  # auto | required | none | a tool's name; required and a name: the first step only
    max_steps: int = 8  # model steps that may call tools; the one after them must answer


@dataclass
class ToolSetup:
    """What --mcp and its companions ask for: the servers (mcp_tools.ServerConfig by name), the tools
    offered (None: all), the loop's options, consent, and a call's timeout in seconds."""

    servers: dict[str, Any]
    only: list[str] | None
    agent: AgentOptions
    consent: Consent
    timeout: float


def step_choice(options: AgentOptions, step: int) -> str:
    if options.choice == "none" or step >= options.max_steps:
        return "none"
    return options.choice if step == 0 else "auto"


def run_turn(engine: Engine, messages: list[dict[str, Any]], options: GenerateOptions, toolbox: Toolbox,
             consent: Consent, agent: AgentOptions, on_text: TextCallback | None = None,
             on_call: Callable[[str, dict[str, Any]], None] | None = None,
             on_notice: TextCallback | None = None) -> AgentReply:
    """Answer the conversation `messages` (OpenAI's shapes; the system message first, if any), calling
    tools on the way. `on_text` streams the answer's text; `on_call` hears of each call before it runs."""
    form = tools.call_format(engine.chat_template)
    history = list(messages)
    added: list[dict[str, Any]] = []
    calls: list[CallRecord] = []
    prompts: list[Prompt] = []
    for step in range(agent.max_steps + 1):
        use = tools.ToolUse(toolbox.offered(), step_choice(agent, step))
        rendered, template_tools = tools.prompt_messages(history, use, form)
        prompt = Prompt(messages=rendered, tools=template_tools)
        prompts.append(prompt)
        reader = tools.ReplyReader(form) if use.active else None
        stream = on_text if reader is None else answer_stream(reader, on_text)
        [generation] = list(generate(engine, [prompt], replace(options, constraint=tools.constraint(use, form)),
                                     on_text=stream, on_notice=on_notice))
        if reader is None:
            reply = tools.Reply(generation.text)
        else:
            reader.text = generation.text  # the finished text: a stop string is not part of it
            for delta in reader.feed("", finished=True):  # what the stream held back
                if on_text and delta.get("content"):
                    on_text(delta["content"])
            reply = reader.reply()
        if not reply.calls:
            answer = {"role": "assistant", "content": reply.content or ""}
            return AgentReply(answer["content"], generation, added + [answer], calls, prompts)
        asked = {"role": "assistant", "content": reply.content,
                 "tool_calls": [{"id": call.id, "name": call.name, "arguments": call.arguments} for call in reply.calls]}
        history.append(asked)
        added.append(asked)
        for call in reply.calls:
            record = run_call(toolbox, consent, call, on_call)
            calls.append(record)
            result = {"role": "tool", "tool_call_id": call.id, "content": REFUSED if record.result is None
                      else record.result}
            history.append(result)
            added.append(result)
    raise AssertionError("the last step answers without tools")  # step_choice makes it "none"


def answer_stream(reader: tools.ReplyReader, on_text: TextCallback | None) -> TextCallback | None:
    """The reply's content as it streams (a call is not text to show)."""
    if on_text is None:
        return None

    def feed(piece: str) -> None:
        for delta in reader.feed(piece):
            if delta.get("content"):
                on_text(delta["content"])

    return feed


def run_call(toolbox: Toolbox, consent: Consent, call: tools.Call,
             on_call: Callable[[str, dict[str, Any]], None] | None) -> CallRecord:
    arguments = json.loads(call.arguments)  # whole_calls kept only calls whose arguments are an object
    if on_call:
        on_call(call.name, arguments)
    if not consent.allows(call.name, arguments):
        return CallRecord(*toolbox.where(call.name), call.name, arguments, None, False, 0.0)
    began = time.perf_counter()
    ran = toolbox.run(call.name, arguments)
    return CallRecord(ran.server, ran.tool, call.name, arguments, ran.text, ran.error, time.perf_counter() - began)


def check_choice(agent: AgentOptions, offered: tuple[tools.Tool, ...]) -> None:
    if agent.choice not in ("auto", "required", "none") and agent.choice not in {tool.name for tool in offered}:
        raise UsageError(f"--tool-choice {agent.choice} names no offered tool",
                         f"Use auto, required, none or one of: {', '.join(tool.name for tool in offered)}.")
    if not offered and agent.choice != "none":
        raise UsageError("the MCP servers offer no tools (or --tools left none)", "Check the --mcp file and --tools.")


def check_approved(consent: Consent, offered: tuple[tools.Tool, ...]) -> None:
    """Where no one can be asked (generate), every offered tool must be approved beforehand."""
    missing = [tool.name for tool in offered if "all" not in consent.approved and tool.name not in consent.approved]
    if consent.ask is None and missing:
        raise UsageError(f"generate runs only tools approved beforehand with --approve, and {', '.join(missing)} "
                         f"{'is' if len(missing) == 1 else 'are'} not", f"Pass --approve {','.join(missing)} (or "
                         "--approve all), or --tools to offer fewer.")


def conversation(prompt: Prompt, system: str | None) -> list[dict[str, Any]]:
    """A generate prompt as the loop's messages, the system message first."""
    messages = prompt.messages or [{"role": "user", "content": prompt.text}]
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def answer_prompts(engine: Engine, prompts: list[Prompt], options: GenerateOptions, toolbox: Toolbox,
                   setup: ToolSetup, on_text: TextCallback | None = None,
                   on_call: Callable[[str, dict[str, Any]], None] | None = None,
                   on_notice: TextCallback | None = None) -> Iterator[AgentReply]:
    """generate's prompts, one turn each, in order."""
    for prompt in prompts:
        began = time.perf_counter()
        reply = run_turn(engine, conversation(prompt, options.system), replace(options, system=None), toolbox,
                         setup.consent, setup.agent, on_text, on_call, on_notice)
        reply.generation = replace(reply.generation, prompt=prompt.display(), text=reply.text,
                                   seconds=time.perf_counter() - began)  # the whole turn, tools and all
        yield reply
