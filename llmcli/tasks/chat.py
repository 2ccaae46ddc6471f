"""A conversation with history on top of `tasks.generate`; the REPL loop itself lives in cli."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from llmcli.data import Prompt
from llmcli.engines import Engine
from llmcli.tasks.generate import GenerateOptions, TextCallback, generate


@dataclass
class ChatSession:
    engine: Engine
    options: GenerateOptions
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    on_notice: TextCallback | None = None

    def handle(self, line: str, on_text: TextCallback) -> str | None:
        """React to one input line: a /command returns a notice, a message streams a reply and returns "".

        Returns None when the user asks to leave.
        """
        text = line.strip()
        if text in ("/exit", "/quit", "/bye"):
            return None
        if text == "/reset":
            self.history.clear()
            return "Conversation cleared."
        if text == "/system" or text.startswith("/system "):
            self.system = text[len("/system"):].strip() or None
            self.history.clear()
            return f"System message {'set' if self.system else 'removed'}; conversation cleared."
        if text.startswith("/"):
            return f"Unknown command {text.split()[0]}; use /reset, /system TEXT or /exit."
        if not text:
            return "Type a message, or /exit to leave."
        self.history.append({"role": "user", "content": text})
        options = replace(self.options, system=self.system, reuse_prefix=True)
        try:
            [reply] = list(generate(self.engine, [Prompt(messages=list(self.history))], options, on_text=on_text,
                                    on_notice=self.on_notice))
        except BaseException:
            self.history.pop()  # an interrupted turn leaves no half conversation behind
            raise
        self.history.append({"role": "assistant", "content": reply.text})
        return ""
