"""A conversation with history on top of `tasks.generate`; the REPL loop itself lives in cli.

When the conversation outgrows the model's context, the oldest turns are dropped (the system message
stays), as llama-cli and ollama carry on; a reply stopped by Ctrl-C stays in the history as far as it
got, with the user's message, as llama-cli keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llmcli.data import Prompt
from llmcli.engines import Engine
from llmcli.errors import LlmcliError
from llmcli.tasks.generate import GenerateOptions, TextCallback, encode_prompt, generate

HELP = ('Commands: /reset clears the conversation, /system TEXT sets the system message (the conversation '
        'goes on), /help (or /?) '
        'shows this, /exit (or /quit, /bye, Ctrl-D) leaves. A line of """ starts and ends a message of '
        'several lines.')


@dataclass
class ChatSession:
    engine: Engine
    options: GenerateOptions
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    on_notice: TextCallback | None = None
    cut: int | None = None  # the last reply's length, when it stopped at max_new_tokens

    def handle(self, line: str, on_text: TextCallback) -> str | None:
        """React to one message: a /command returns a notice, a message streams a reply and returns ""
        (`cut` says whether -n stopped it). Returns None when the user asks to leave."""
        text = line.strip()
        if text in ("/exit", "/quit", "/bye"):
            return None
        if text in ("/help", "/?"):
            return HELP
        if text == "/reset":
            self.history.clear()
            return "Conversation cleared."
        if text == "/system" or text.startswith("/system "):
            # the conversation goes on under the new system message, as ollama's /set system does
            self.system = text[len("/system"):].strip() or None
            return f"System message {'set' if self.system else 'removed'}; the conversation goes on (/reset clears it)."
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

        def stream(piece: str) -> None:
            pieces.append(piece)
            on_text(piece)

        try:
            [reply] = list(generate(self.engine, [Prompt(messages=list(self.history))], options, on_text=stream,
                                    on_notice=self.on_notice))
        except KeyboardInterrupt:  # stopped by the user: the message and the reply so far stay
            self.history.append({"role": "assistant", "content": "".join(pieces)})
            raise
        except BaseException:
            self.history.pop()
            raise
        self.history.append({"role": "assistant", "content": reply.text})
        self.cut = reply.generated_tokens if reply.finish_reason == "length" else None
        return ""

    def fit_history(self, options: GenerateOptions) -> None:
        """Drops the oldest turns until the conversation and a reply fit the model's context; says so."""
        context = self.engine.context_length
        if not context:
            return
        room = context - min(options.max_new_tokens, context // 2) if options.default_length \
            else context - options.max_new_tokens
        dropped = 0
        while len(self.history) > 1 and len(encode_prompt(self.engine, Prompt(messages=self.history), options)) > room:
            del self.history[:2 if len(self.history) > 2 else 1]  # a user message and its reply
            dropped += 2
        if dropped and self.on_notice:
            self.on_notice(f"The conversation outgrew the model's context of {context} tokens: the oldest "
                           f"{dropped} messages were dropped{' (the system message is kept)' if self.system else ''}.")
