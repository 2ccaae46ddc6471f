"""A conversation with history on top of `tasks.generate`; the REPL loop itself lives in cli.

When the conversation outgrows the model's context, the oldest turns are dropped (the system message
stays), as llama-cli and ollama carry on; a reply stopped by Ctrl-C stays in the history as far as it
got, with the user's message, as llama-cli keeps it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from llmcli.data import Prompt
from llmcli.engines import Engine
from llmcli.errors import DataError, LlmcliError, UsageError
from llmcli.tasks.generate import GenerateOptions, TextCallback, encode_prompt, generate

HELP = ('Commands: /reset clears the conversation (the system message stays), /system TEXT sets the system '
        'message (the conversation goes on; /system alone removes it), /save FILE writes the whole conversation '
        'as JSON, /load FILE goes on from one, /help (or /?) '
        'shows this, /exit (or /quit, /bye, Ctrl-D) leaves. A line of """ starts and ends a message of '
        'several lines.')


def plain_chat(engine: Engine, options: GenerateOptions) -> GenerateOptions:
    """A model without a chat template chats in plain lines; its replies stop where it would write the
    user's next turn."""
    from llmcli.engines.chat_template import FALLBACK_CHAT_TEMPLATE, FALLBACK_STOP

    engine.chat_template = FALLBACK_CHAT_TEMPLATE
    return replace(options, stop=[*options.stop, FALLBACK_STOP])


@dataclass
class ChatSession:
    engine: Engine
    options: GenerateOptions
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    on_notice: TextCallback | None = None
    cut: int | None = None  # the last reply's length, when it stopped at max_new_tokens
    dropped: list[dict[str, str]] = field(default_factory=list)  # the oldest turns, trimmed to fit the context
    # --mcp: (agent.ToolSetup, its toolbox); a reply may then call tools (llmcli.agent), and the calls and
    # results stay in the history as OpenAI's messages
    tools: tuple[Any, Any] | None = None
    on_call: Callable[[str, dict[str, Any]], None] | None = None

    def handle(self, line: str, on_text: TextCallback, on_reasoning: TextCallback | None = None) -> str | None:
        """React to one message: a /command returns a notice, a message streams a reply and returns ""
        (`cut` says whether -n stopped it). Returns None when the user asks to leave."""
        text = line.strip()
        if text in ("/exit", "/quit", "/bye"):
            return None
        if text in ("/help", "/?"):
            return HELP
        if text == "/reset":
            self.history.clear()
            self.dropped.clear()
            return f"Conversation cleared{'; the system message stays (/system alone removes it)' if self.system else ''}."
        if text == "/system" or text.startswith("/system "):
            # the conversation goes on under the new system message, as ollama's /set system does
            self.system = text[len("/system"):].strip() or None
            return (f"System message {'set' if self.system else 'removed'}; the conversation goes on (/reset clears "
                    "the conversation and keeps the system message).")
        for command, act in (("/save", self.save), ("/load", self.load)):
            if text == command or text.startswith(command + " "):
                path = text[len(command):].strip()
                if not path:
                    raise UsageError(f"{command} needs a file name", f"Type {command} FILE.")
                return act(Path(path).expanduser())
        if text.startswith("/") and "\n" not in text:
            return f"Unknown command {text.split()[0]}; /help lists the commands."
        if not text:
            return "Type a message, or /exit to leave."
        self.history.append({"role": "user", "content": text})
        options = replace(self.options, system=self.system, reuse_prefix=True)
        try:
            self.fit_history(options)
        except LlmcliError:
            self.history.pop()  # this message alone does not fit: the conversation before it stays
            raise
        pieces: list[str] = []
        thought = [False]  # the reply's thinking was shown: the answer starts on a line of its own

        def stream(piece: str) -> None:
            if thought[0] and not pieces:
                on_text("\n")
            pieces.append(piece)
            on_text(piece)

        def think(piece: str) -> None:
            thought[0] = True
            on_reasoning(piece)

        try:
            if self.tools is not None:
                return self.answer_with_tools(options, stream)
            [reply] = list(generate(self.engine, [Prompt(messages=list(self.history))], options, on_text=stream,
                                    on_notice=self.on_notice, on_reasoning=think if on_reasoning else None))
        except KeyboardInterrupt:  # stopped by the user: the message and the reply so far stay
            self.history.append({"role": "assistant", "content": "".join(pieces)})
            raise
        except BaseException:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": reply.text})
        self.cut = reply.generated_tokens if reply.finish_reason == "length" else None
        return ""

    def answer_with_tools(self, options: GenerateOptions, stream: TextCallback) -> str:
        from llmcli.agent import run_turn

        setup, toolbox = self.tools
        system = [{"role": "system", "content": self.system}] if self.system else []
        reply = run_turn(self.engine, system + self.history, replace(options, system=None), toolbox, setup.consent,
                         setup.agent, on_text=stream, on_call=self.on_call, on_notice=self.on_notice)
        self.history += reply.messages
        self.cut = reply.generation.generated_tokens if reply.generation.finish_reason == "length" else None
        return ""

    def prompt(self) -> Prompt:
        """The history as the engine reads it: with tools, calls and results in the template's form."""
        if self.tools is None:
            return Prompt(messages=self.history)
        from llmcli import tools

        return Prompt(messages=tools.prompt_messages(self.history, None, tools.call_format(self.engine.chat_template))[0])

    def messages(self) -> list[dict[str, str]]:
        """The whole conversation, the turns trimmed from the model's context included."""
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.dropped + self.history

    def save(self, path: Path) -> str:
        """The whole conversation (the turns trimmed to fit the context too) as one JSON object
        {"messages": [...]}: a line that `generate --file` reads too. An existing file is left alone (a new name is asked for); the file appears whole or not at all."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps({"messages": self.messages()}, ensure_ascii=False) + "\n", encoding="utf-8")
            os.link(temporary, path)  # fails if the name was taken meanwhile, where a rename would replace it
        except FileExistsError:
            raise UsageError(f"{path} exists", "/save FILE with a new name; nothing was written.") from None
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}", "/save to another place.") from None
        finally:
            temporary.unlink(missing_ok=True)
        trimmed = f" ({len(self.dropped)} of them no longer in the model's context)" if self.dropped else ""
        return f"Saved {len(self.dropped) + len(self.history)} messages to {path}{trimmed}."

    def load(self, path: Path) -> str:
        """Go on from a saved conversation (or any JSON object with OpenAI-style "messages"): it replaces
        this one, its system message included; a file that is not one changes nothing."""
        try:
            messages = json.loads(path.read_text(encoding="utf-8"))["messages"]
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}", "/load a file written by /save.") from None
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path} is not a saved conversation (a JSON object with \"messages\")",
                            "/load a file written by /save.") from None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in messages):
            raise DataError(f"{path}: each message needs a role (system, user or assistant) and a text content",
                            "/load a file written by /save.")
        system = [m["content"] for m in messages if m["role"] == "system"]
        self.system = system[-1] if system else None
        self.history = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        self.dropped = []
        self.cut = None
        return f"Loaded {len(self.history)} messages from {path}; the conversation goes on from there."

    def fit_history(self, options: GenerateOptions) -> None:
        """Drops the oldest turns until the conversation and a reply fit the model's context; says so."""
        context = self.engine.context_length
        if not context:
            return
        room = context - min(options.max_new_tokens, context // 2) if options.default_length \
            else context - options.max_new_tokens
        dropped = 0
        while len(self.history) > 1 and len(encode_prompt(self.engine, self.prompt(), options)) > room:
            # a user message and what answered it (with tools: calls and results too), up to the next one
            turn = next((at for at in range(1, len(self.history)) if self.history[at]["role"] == "user"), 1)
            self.dropped += self.history[:turn]  # out of the model's sight, still in what /save writes
            del self.history[:turn]
            dropped += turn
        if dropped and self.on_notice:
            self.on_notice(f"The conversation outgrew the model's context of {context} tokens: the oldest "
                           f"{dropped} messages were dropped{' (the system message is kept)' if self.system else ''}.")
