"""Reasoning models: a reply split into thinking and answer by the chat template's markers.

DeepSeek-R1 distills, Qwen3 and their fine-tunes write `<think>…</think>` before the answer; some
templates open `<think>` in the prompt, so the reply starts inside the thinking. As llama-server
(`--reasoning-format deepseek`) and vLLM's reasoning parsers do, the thinking is returned apart from
the answer (`reasoning_content`), structured output and tool calls constrain the answer only, and a
thinking budget forces the end marker after N thinking tokens.

Two halves, both used by every engine and every command: `Splitter` cuts text (whole or streamed) into
reasoning and answer; `ThinkingMatcher` follows the tokens of one sequence to count the budget and to
start the answer's constraint after the end marker (by token ids, as vLLM's `is_reasoning_end` does).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from llmcli.errors import UsageError

FORMATS = ("auto", "deepseek", "none")  # llama-server's --reasoning-format names (auto: from the template)
MODES = ("auto", "on", "off")
DEEPSEEK = ("<think>", "</think>")
# marker pairs found in chat templates: DeepSeek-R1 and Qwen3 (and most fine-tunes), Command R7B,
# Magistral, Seed-OSS
KNOWN_MARKERS = (DEEPSEEK, ("<|START_THINKING|>", "<|END_THINKING|>"), ("[THINK]", "[/THINK]"),
                 ("<seed:think>", "</seed:think>"))
SWITCH = "enable_thinking"  # the template variable Qwen3 (and templates after it) read to think or not


@dataclass(frozen=True)
class Thinking:
    """How one model writes its thinking, and the run's limits on it."""

    start: str
    end: str
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]
    budget: int | None = None  # thinking tokens after which the end marker is forced (None: no limit)
    opened: bool = False  # the prompt opened the block: the reply starts inside the thinking


def markers(template: str | None, reasoning_format: str) -> tuple[str, str] | None:
    """The thinking markers: the first known pair the template writes (auto), DeepSeek's (deepseek), or
    none (none: no split)."""
    if reasoning_format not in FORMATS:
        raise UsageError(f"unknown --reasoning-format {reasoning_format!r}", "Use auto, deepseek or none.")
    if reasoning_format == "none":
        return None
    if reasoning_format == "deepseek":
        return DEEPSEEK
    return next(((start, end) for start, end in KNOWN_MARKERS if template and start in template and end in template),
                None)


def check_controls(mode: str, budget: int | None) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown --reasoning {mode!r}", "Use auto, on or off.")
    if budget is not None and budget < 0:
        raise UsageError(f"--reasoning-budget must be 0 or more, got {budget}", "Drop it for no limit.")


def thinking_for(engine: Any, reasoning_format: str = "auto", budget: int | None = None,
                 mode: str = "auto") -> Thinking | None:
    """The engine's thinking markers with the run's budget; None when it writes none (or with
    --reasoning-format none). `off` on a template without a switch forces an empty thinking block
    (budget 0): the model may open one, and it is closed at once."""
    check_controls(mode, budget)
    found = markers(engine.chat_template, reasoning_format)
    if found is None:
        return None
    if mode == "off" and not has_switch(engine.chat_template):
        budget = 0
    start, end = found
    return Thinking(start, end, tuple(engine.encode(start, add_special=False)),
                    tuple(engine.encode(end, add_special=False)), budget)


def with_thinking(engine: Any, options: Any, reasoning_format: str, mode: str, budget: int | None,
                  on_notice: Callable[[str], None]) -> Any:
    """generate's and chat's options (a GenerateOptions) with the model's thinking markers, budget and
    template switch (--reasoning-format, --reasoning, --reasoning-budget); says where an option has
    nothing to act on."""
    thinking = thinking_for(engine, reasoning_format, budget, mode)
    if mode != "auto" and not has_switch(engine.chat_template):
        if thinking is None:
            on_notice(f"--reasoning {mode}: this model's chat template writes no thinking markers; nothing changes.")
        elif mode == "off":
            on_notice("--reasoning off: the chat template has no enable_thinking switch, so a thinking block the "
                      "model opens is closed at once (an empty thinking).")
    if budget is not None and thinking is None:
        on_notice("--reasoning-budget: this model's chat template writes no thinking markers (--reasoning-format "
                  "deepseek names <think>…</think>); it is not applied.")
    return replace(options, reasoning=thinking, template_kwargs=template_kwargs(engine.chat_template, mode))


def has_switch(template: str | None) -> bool:
    return bool(template) and SWITCH in template


def template_kwargs(template: str | None, mode: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The chat template's variables for --reasoning (its `enable_thinking` switch, where it has one);
    variables the caller gives (a request's chat_template_kwargs) win."""
    kwargs: dict[str, Any] = {}
    if mode != "auto" and has_switch(template):
        kwargs[SWITCH] = mode == "on"
    return {**kwargs, **(given or {})}


def opened_by(prompt_tail: str, thinking: Thinking) -> bool:
    """Whether a prompt ending in `prompt_tail` leaves the reply inside the thinking: its last marker is
    the start marker (`…<think>\\n`, as DeepSeek-R1's and QwQ's templates end), not the end marker (Qwen3
    with enable_thinking false ends `<think>\\n\\n</think>\\n\\n`)."""
    start, end = prompt_tail.rfind(thinking.start), prompt_tail.rfind(thinking.end)
    return start >= 0 and start > end and not prompt_tail[start + len(thinking.start):].strip()


def for_prompt(thinking: Thinking | None, engine: Any, prompt_ids: Sequence[int]) -> Thinking | None:
    """The thinking with `opened` decided by the prompt's last tokens."""
    if thinking is None:
        return None
    tail = engine.decode(list(prompt_ids[-32:]), keep_special=True)
    return replace(thinking, opened=opened_by(tail, thinking))


# ------------------------------------------------------------------ text

class Splitter:
    """Cuts a reply, fed whole or in pieces, into (kind, text) parts, kind "reasoning" or "answer".

    Without the block opened by the prompt, a reply is thinking only when it starts (after
    whitespace) with the start marker. The thinking's leading and trailing whitespace and the answer's
    leading whitespace are dropped, as llama-server trims them; text that may still turn out to be a
    marker or such whitespace is held back, so the pieces always join to the whole reply's split."""

    def __init__(self, thinking: Thinking) -> None:
        self.start, self.end = thinking.start, thinking.end
        self.state = "thinking" if thinking.opened else "start"
        self.thought = thinking.opened  # a thinking block was seen
        self.buffer = ""
        self.lead = True  # the thinking's leading whitespace is still to drop

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        parts: list[tuple[str, str]] = []
        buffer = self.buffer + text
        while True:
            if self.state == "start":
                stripped = buffer.lstrip()
                if stripped.startswith(self.start):
                    self.state, self.thought, buffer = "thinking", True, stripped[len(self.start):]
                    continue
                if self.start.startswith(stripped) and not final:
                    break  # whitespace, or the start of the marker: wait for more
                self.state = "answer"
                continue
            if self.state == "thinking":
                if self.lead:
                    buffer = buffer.lstrip()
                    if not buffer:
                        break
                    self.lead = False
                at = buffer.find(self.end)
                if at >= 0:
                    parts.append(("reasoning", buffer[:at].rstrip()))
                    self.state, buffer = "after", buffer[at + len(self.end):]
                    continue
                if final:
                    parts.append(("reasoning", buffer.rstrip()))
                    buffer = ""
                    break
                keep = len(buffer) - held_marker(buffer, self.end)
                shown = buffer[:keep].rstrip()
                parts.append(("reasoning", shown))
                buffer = buffer[len(shown):]
                break
            if self.state == "after":
                buffer = buffer.lstrip()
                if not buffer:
                    break
                self.state = "answer"
                continue
            parts.append(("answer", buffer))
            buffer = ""
            break
        self.buffer = buffer
        return [(kind, piece) for kind, piece in parts if piece]


def held_marker(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def split(text: str, thinking: Thinking | None) -> tuple[str | None, str]:
    """(reasoning, answer) of a whole reply; reasoning None when it has no thinking block."""
    if thinking is None:
        return None, text
    splitter = Splitter(thinking)
    parts = splitter.feed(text, final=True)
    reasoning = "".join(piece for kind, piece in parts if kind == "reasoning")
    return (reasoning if splitter.thought else None), "".join(piece for kind, piece in parts if kind == "answer")


def stream_router(thinking: Thinking | None, on_answer: Callable[[str], None] | None,
                  on_reasoning: Callable[[str], None] | None) -> Callable[[str, bool], None]:
    """A (piece, final) callback that sends a streamed reply's thinking and answer each to its own
    callback (either may be None: that part is dropped)."""
    splitter = Splitter(thinking) if thinking is not None else None

    def route(piece: str, final: bool) -> None:
        parts = splitter.feed(piece, final) if splitter else [("answer", piece)] if piece else []
        for kind, text in parts:
            target = on_answer if kind == "answer" else on_reasoning
            if target is not None:
                target(text)

    return route


def thinking_block(reasoning: str | None) -> dict[str, Any] | None:
    """An Anthropic Messages `thinking` content block for a reply's reasoning (Generation.reasoning), or
    None without one; it goes before the text block. No signature: nothing here signs thinking."""
    if not reasoning:
        return None
    return {"type": "thinking", "thinking": reasoning, "signature": ""}


def thinking_delta(piece: str) -> dict[str, Any]:
    """A streamed piece of thinking (generate's on_reasoning) as a Messages `content_block_delta` delta,
    inside a block started with thinking_block("") fields {"type": "thinking", "thinking": ""}."""
    return {"type": "thinking_delta", "thinking": piece}


# ------------------------------------------------------------------ tokens

def needs_matcher(options: Any) -> bool:
    """Whether decoding must follow the thinking token by token: a budget to count, or a constraint that
    starts after it."""
    thinking = getattr(options, "reasoning", None)
    return thinking is not None and (thinking.budget is not None or getattr(options, "constraint", None) is not None)


def sequence_matcher(engine: Any, options: Any) -> Any:
    """One sequence's matcher: the constraint's (llmcli.constraints.Matcher), wrapped by a
    ThinkingMatcher when the model thinks first; None when neither applies."""
    constraint = getattr(options, "constraint", None)
    constraints = engine.constraints
    if not needs_matcher(options):
        return constraints.matcher(constraint)
    return ThinkingMatcher(options.reasoning, constraints.matcher(constraint), constraints.n_vocab,
                           lambda token: engine.decode([token], keep_special=True))


class ThinkingMatcher:
    """Follows one sequence through its thinking: every token is free there (EOS excepted when an answer
    constraint waits: the answer must come), after `budget` thinking tokens the end marker's tokens are
    forced, and once the end marker is written the answer's constraint (`inner`) takes over. Without the
    block opened by the prompt, the first token is the constraint's or the start marker's."""

    def __init__(self, thinking: Thinking, inner: Any, n_vocab: int, token_text: Callable[[int], str]) -> None:
        self.thinking, self.inner, self.n_vocab, self.token_text = thinking, inner, n_vocab, token_text
        self.text = ""  # the thinking's end, token by token: the end marker is found whatever its tokens
        self.phase = "thinking" if thinking.opened else "start"
        self.started = 0  # start-marker tokens taken
        self.recent: list[int] = []  # tokens since the thinking began
        self.forcing: list[int] = []  # end-marker tokens still to force

    def allowed(self) -> Any:
        import numpy

        if self.phase == "answer":
            return self.inner.allowed() if self.inner is not None else numpy.ones(self.n_vocab, dtype=bool)
        start_ids = self.thinking.start_ids
        if self.phase == "start":
            if self.started:
                return self.only(start_ids[self.started])
            allowed = self.inner.allowed().copy() if self.inner is not None else numpy.ones(self.n_vocab, dtype=bool)
            allowed[start_ids[0]] = True
            return allowed
        self.check_budget()
        if self.forcing:
            return self.only(self.forcing[0])
        allowed = numpy.ones(self.n_vocab, dtype=bool)
        if self.inner is not None:  # the EOS that the constraint's tokenizer knows (its grammar's end)
            allowed[self.inner.tokenizer.eos_token] = False
        return allowed

    def only(self, token: int) -> Any:
        import numpy

        allowed = numpy.zeros(self.n_vocab, dtype=bool)
        allowed[token] = True
        return allowed

    def mask(self, logits: Any) -> None:
        import numpy

        allowed = self.allowed()
        if not allowed.all():
            numpy.copyto(logits, -numpy.inf, where=~allowed)

    def check_budget(self) -> None:
        budget = self.thinking.budget
        if budget is None or self.forcing or len(self.recent) < budget:
            return
        end = list(self.thinking.end_ids)
        # an end marker the model has begun is finished, not begun again
        begun = next((size for size in range(min(len(end) - 1, len(self.recent)), 0, -1)
                      if self.recent[-size:] == end[:size]), 0)
        self.forcing = end[begun:]

    def accept(self, token: int, eos: Any, eos_id: int | None, room: int) -> int | None:
        """Follows the sampled token; returns an EOS id to end with (the constraint's, once the answer is
        complete), as constraints.Matcher.accept does."""
        if self.phase == "answer":
            return self.inner.accept(token, eos, eos_id, room) if self.inner is not None else None
        start_ids = self.thinking.start_ids
        if self.phase == "start":
            if token == start_ids[self.started]:
                self.started += 1
                if self.started == len(start_ids):
                    self.phase = "thinking"
                return None
            self.phase = "answer"
            return self.accept(token, eos, eos_id, room)
        self.recent.append(token)
        self.text = (self.text + self.token_text(token))[-256:]  # a window: the marker is short
        if self.forcing and token == self.forcing[0]:
            self.forcing.pop(0)
        if self.thinking.end in self.text:
            self.phase, self.forcing = "answer", []
        return None
