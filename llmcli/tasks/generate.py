"""Text generation: prompts -> token ids -> an engine's decoding -> results with finish reasons and timings.

The engine decodes (Hugging Face's own `generate`, or llama.cpp); this module, shared by both, adds
chat templates, context checks, batching, stop strings cut out of the text, EOS, and streaming that
never splits a UTF-8 character.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator

from llmcli import reasoning
from llmcli.data import Prompt
from llmcli.engines import Engine, as_engine
from llmcli.errors import ContextOverflow, DataError, UsageError

TextCallback = Callable[[str], None]
SEEDS = 2**32  # seeds are 0..SEEDS-1, numpy's range (transformers.set_seed seeds numpy too)


@dataclass
class GenerateOptions:
    max_new_tokens: int = 256
    default_length: bool = False  # max_new_tokens is a default, not the user's: capped to what the context leaves
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    # OpenAI's penalties, over the generated tokens only: a token's logit loses presence_penalty once it
    # has been generated and frequency_penalty for each time it has
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before sampling
    seed: int | None = None
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)
    system: str | None = None
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    batch_size: int = 1
    prompt_lookup: int | None = None  # prompt-lookup decoding: tokens proposed per step from the prompt
    # llama.cpp's speculative decoding (llama_speculation): "auto" drafts while it pays, "on" always
    speculative: str = "off"
    draft_max: int = 12  # tokens drafted per step at most (12 measured best of 4, 8, 12, 16: docs/performance.md)
    truncate: str = "error"  # a prompt too long for the context: "error" or "left" (keep its end)
    reuse_prefix: bool = False  # a chat's next turn: engines that can may keep the cached prompt prefix
    constraint: Any = None  # structured output (llmcli.constraints.Constraint): only tokens it allows are sampled
    reasoning: Any = None  # a thinking model's markers and budget (llmcli.reasoning.Thinking): the reply is split
    template_kwargs: dict[str, Any] = field(default_factory=dict)  # extra chat-template variables (enable_thinking)


@dataclass
class Generation:
    prompt: str
    index: int  # which of the prompt's --num-return-sequences this is
    text: str  # the continuation only, cut before any stop string; a thinking model's answer only
    token_ids: list[int]
    finish_reason: str  # "length" | "stop" | "eos"
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    time_to_first_token: float | None = None
    engine: str = "hf"
    weights: str = ""
    prompt_number: int = 0  # the prompt's place in the input (0-based): matches records to lines when prompts repeat
    incomplete: bool | None = None  # under a constraint: the text ended before the constraint was satisfied
    drafted: int | None = None  # speculative decoding: tokens proposed (None: it did not speculate)
    accepted: int | None = None  # of those, the ones kept
    reasoning: str | None = None  # a thinking model's thinking (None: the reply had no thinking block)


def uses_chat_template(engine: Engine, prompt: Prompt, options: GenerateOptions) -> bool:
    has_template = bool(engine.chat_template)
    if prompt.messages is not None or options.chat:
        if not has_template:
            raise UsageError(
                "this model's tokenizer has no chat template, so chat messages cannot be formatted",
                "Pass plain prompts (llmcli generate continues text without a template).",
            )
        return True
    if options.system is not None and (options.chat is False or not has_template):  # it would be dropped
        raise UsageError("--system needs the chat template, but " + (
            "--no-chat is given" if options.chat is False else "this model's tokenizer has none"),
            "Drop --system, or put the instructions in the prompt.")
    return has_template and options.chat is None


def encode_prompt(engine: Engine, prompt: Prompt, options: GenerateOptions) -> list[int]:
    """Token ids of one prompt; without a chat template exactly `tokenizer(prompt)`; ids given as they are."""
    if prompt.ids is not None:
        return list(prompt.ids)
    if not uses_chat_template(engine, prompt, options):
        if prompt.text is None:
            raise UsageError("chat messages given with --no-chat", "Drop --no-chat or pass plain prompts.")
        return engine.encode(prompt.text)
    messages = prompt.messages or [{"role": "user", "content": prompt.text}]
    if options.system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": options.system}, *messages]
    return engine.encode_chat(messages, prompt.tools, options.template_kwargs or None)


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def finish(decode: Callable[[list[int]], str], ids: list[int], eos: set[int],
           stops: list[str]) -> tuple[str, list[int], str]:
    """Text, kept token ids and finish reason of one generated sequence.

    `generate` pads a finished sequence of a batch with pad tokens (often the EOS id), so everything
    after the first EOS is dropped, and a stop string is looked for before that.
    """
    eos_at = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if eos_at is None else ids[:eos_at]
    text = decode(body).rstrip("\ufffd")  # a character cut by the token limit is dropped, not replaced
    stop_at = find_stop(text, stops)
    if stop_at is not None:
        # keep the tokens up to the one that completed the stop string, where generate stopped
        kept = next(n for n in range(1, len(body) + 1)
                    if find_stop(decode(body[:n]), stops) is not None)
        return text[:stop_at], body[:kept], "stop"
    if eos_at is not None:
        return text, ids[: eos_at + 1], "eos"
    return text, ids, "length"


class TokenStreamer:
    """Follows one decoding: records the first-token time and, for a single sequence, emits new text
    and notices a stop string (`done`), which is when an engine that decodes token by token stops.

    Text is released only when it cannot change: not while it ends in an incomplete UTF-8 character
    (decoded as U+FFFD), nor while its tail could be the start of a stop string.
    """

    def __init__(self, decode: Callable[[list[int]], str], on_text: TextCallback | None, stops: list[str],
                 eos: set[int], single: bool = True, thinking: Any = None,
                 on_reasoning: TextCallback | None = None) -> None:
        self.decode, self.on_text, self.stops, self.eos = decode, on_text, stops, eos
        self.follow = single and (on_text is not None or on_reasoning is not None or bool(stops))
        # a thinking model's text goes through the splitter: the answer to on_text, the thinking to on_reasoning
        self.route = reasoning.stream_router(thinking, on_text, on_reasoning)
        self.ids: list[int] = []
        self.emitted = 0
        self.done = False
        self.first_token_at: float | None = None

    def add(self, tokens: list[int]) -> None:
        """The new ids of one decoding step (one per sequence of the batch)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if not self.follow or self.done:
            return
        for token in tokens:
            if token in self.eos:
                self.done = True
                break
            self.ids.append(token)
        self.flush(final=self.done)

    def end(self) -> None:
        if self.follow and not self.done:
            self.flush(final=True)

    def flush(self, final: bool) -> None:
        text = self.decode(self.ids).rstrip("\ufffd")  # an incomplete character: held back, or dropped at the end
        end = len(text)
        stop_at = find_stop(text, self.stops)
        if stop_at is not None:
            end, self.done, final = stop_at, True, True
        elif not final:
            for stop in self.stops:
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if text[:end].endswith(stop[:size]):
                        end -= size
                        break
        if end > self.emitted or final:
            self.route(text[self.emitted:end], final)
            self.emitted = max(end, self.emitted)


def validate(options: GenerateOptions) -> None:
    if options.max_new_tokens <= 0:
        raise UsageError(f"--max-new-tokens must be at least 1, got {options.max_new_tokens}")
    if options.temperature < 0:
        raise UsageError(f"--temperature must be 0 (greedy) or positive, got {options.temperature}")
    if options.top_p is not None and not 0 < options.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {options.top_p}")
    if options.min_p is not None and not 0 <= options.min_p <= 1:
        raise UsageError(f"--min-p must be in [0, 1], got {options.min_p}")
    if options.top_k is not None and options.top_k < 0:
        raise UsageError(f"--top-k must be 0 (off) or positive, got {options.top_k}")
    if options.repetition_penalty is not None and not 0.01 <= options.repetition_penalty <= 100:
        # it divides the logits: a tiny one makes them infinite and sampling fails (found by schemathesis)
        raise UsageError(f"--repetition-penalty must be in [0.01, 100], got {options.repetition_penalty}",
                         "1 is none; 1.1-1.3 discourages repeats.")
    for name, value in (("--presence-penalty", options.presence_penalty),
                        ("--frequency-penalty", options.frequency_penalty)):
        if not -2 <= value <= 2:  # OpenAI's range
            raise UsageError(f"{name} must be in [-2, 2], got {value}")
    for token, bias in options.logit_bias.items():
        if not -100 <= bias <= 100:
            raise UsageError(f"--logit-bias {token}={bias}: a bias must be in [-100, 100]",
                             "-100 bans the token, 100 all but forces it.")
    if options.batch_size <= 0:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.num_return_sequences <= 0:
        raise UsageError(f"--num-return-sequences must be at least 1, got {options.num_return_sequences}")
    ignored = [name for name, value in (("--top-k", options.top_k), ("--top-p", options.top_p),
                                        ("--min-p", options.min_p)) if value is not None]
    if ignored and options.temperature == 0:
        raise UsageError(f"{', '.join(ignored)} shape{'s' if len(ignored) == 1 else ''} sampling, but --temperature "
                         "is 0 (greedy)", "Add --temperature 0.7 (or any value above 0), or drop "
                         f"{'it' if len(ignored) == 1 else 'them'}.")
    if options.num_return_sequences > 1 and options.temperature == 0:
        raise UsageError(
            "--num-return-sequences > 1 needs sampling, but --temperature is 0 (greedy gives one answer)",
            "Add --temperature 0.7 (or any value above 0).",
        )
    if any(stop == "" for stop in options.stop):
        raise UsageError("--stop must not be empty")
    if options.truncate not in ("error", "left"):
        raise UsageError(f"unknown --truncate {options.truncate!r}", "Use error or left.")
    if options.seed is not None and not 0 <= options.seed < SEEDS:
        raise UsageError(f"--seed must be in 0..{SEEDS - 1}, got {options.seed}")
    if options.prompt_lookup is not None and options.prompt_lookup <= 0:
        raise UsageError(f"--prompt-lookup must be at least 1, got {options.prompt_lookup}")
    if options.speculative not in ("auto", "on", "off"):
        raise UsageError(f"unknown --speculative {options.speculative!r}", "Use auto, on or off.")
    if not 1 <= options.draft_max <= 64:
        raise UsageError(f"--draft-max must be in 1..64, got {options.draft_max}")


def cap_default_length(options: GenerateOptions, encoded: list[list[int]], context: int | None,
                       on_notice: TextCallback | None) -> GenerateOptions:
    """A default --max-new-tokens that does not fit the context after the longest prompt is lowered to
    what fits (with a notice); a value the user gave is checked by fit_to_context instead."""
    if not options.default_length or not context or not encoded:
        return options
    room = context - max(len(ids) for ids in encoded)
    if not 0 < room < options.max_new_tokens:
        return options
    if on_notice:
        on_notice(f"--max-new-tokens defaults to {options.max_new_tokens}; using {room}, what the model's context "
                  f"of {context} tokens leaves after the prompt.")
    return replace(options, max_new_tokens=room)


def settle_length(engine: Engine, prompts: list[Prompt], options: GenerateOptions,
                  on_notice: TextCallback | None = None) -> GenerateOptions:
    """The options with a default --max-new-tokens capped for all `prompts` at once: decided before
    the prompts are shared out between processes, so that every share generates as the whole would."""
    engine = as_engine(engine)
    encoded = [encode_prompt(engine, prompt, options) for prompt in prompts]
    return replace(cap_default_length(options, encoded, engine.context_length, on_notice), default_length=False)


def share_options(options: GenerateOptions, first_prompt: int) -> GenerateOptions:
    """The options for a share of the prompts that starts at prompt number `first_prompt`: its seeds
    are the ones those prompts get in a single process."""
    if options.seed is None:
        return options
    return replace(options, seed=(options.seed + first_prompt * options.num_return_sequences) % SEEDS)


def fit_to_context(ids: list[int], context: int | None, options: GenerateOptions) -> list[int]:
    """The prompt's ids, checked (or, with --truncate left, cut) so the generation fits the context."""
    if not context:
        return ids
    if options.max_new_tokens >= context:
        raise ContextOverflow(f"--max-new-tokens {options.max_new_tokens} leaves no room in the model's context of "
                         f"{context} tokens", f"Use --max-new-tokens below {context}.")
    overflow = len(ids) + options.max_new_tokens - context
    if overflow <= 0:
        return ids
    if options.truncate == "left":
        return ids[overflow:]
    raise ContextOverflow(f"prompt of {len(ids)} tokens plus --max-new-tokens {options.max_new_tokens} exceeds the "
                    f"model's context of {context} tokens",
                    "Shorten the prompt, lower --max-new-tokens, or pass --truncate left.")


def generate(
    engine: Engine,
    prompts: list[Prompt],
    options: GenerateOptions,
    on_text: TextCallback | None = None,
    on_notice: TextCallback | None = None,
    cancelled: Callable[[], bool] | None = None,
    on_reasoning: TextCallback | None = None,
) -> Iterator[Generation]:
    """Yield generations in input order, batch by batch; `on_text` streams a lone sequence's text (a
    thinking model's answer; `on_reasoning` its thinking).

    `engine` may also be a models.LoadedModel, which runs on the Hugging Face engine."""
    engine = as_engine(engine)
    encoded, options = prepare(engine, prompts, options, on_notice)
    single = len(prompts) == 1 and options.num_return_sequences == 1
    for start in range(0, len(prompts), options.batch_size):
        batch_ids = encoded[start:start + options.batch_size]
        if options.seed is not None:
            # each batch samples from a seed of its own (its first sequence's number): a prompt's sample
            # then does not depend on the batches before it, and a share of the prompts on another
            # process (shifted by share_options) draws exactly what one process would
            engine.set_seed((options.seed + start * options.num_return_sequences) % SEEDS)
        streamer = TokenStreamer(engine.decode, on_text if single else None, options.stop, engine.eos_ids,
                                 single=len(batch_ids) == 1 and options.num_return_sequences == 1,
                                 thinking=options.reasoning, on_reasoning=on_reasoning if single else None)
        began = time.perf_counter()
        # a server's client that went away (`cancelled`) stops decoding at the next token, as a stop string does
        adapters = [prompt.adapter for prompt in prompts[start:start + options.batch_size]]
        rows = engine.generate(batch_ids, options, on_tokens=streamer.add,
                               should_stop=lambda: streamer.done or bool(cancelled and cancelled()),
                               **({"adapters": adapters} if any(adapters) else {}))
        streamer.end()
        seconds = time.perf_counter() - began
        ttft = streamer.first_token_at - began if streamer.first_token_at else None
        checked = getattr(engine, "drafts_checked", None) or [(None, None)] * len(rows)
        for row, token_ids in enumerate(rows):
            prompt_index = start + row // options.num_return_sequences
            drafted, accepted = checked[row]
            yield replace(generation_of(engine, prompts[prompt_index], row % options.num_return_sequences, token_ids,
                                        options.stop, len(encoded[prompt_index]), seconds, ttft,
                                        constrained=options.constraint is not None, thinking=options.reasoning),
                          prompt_number=prompt_index, drafted=drafted, accepted=accepted)


def prepare(engine: Engine, prompts: list[Prompt], options: GenerateOptions,
            on_notice: TextCallback | None = None) -> tuple[list[list[int]], GenerateOptions]:
    """The prompts' token ids, checked against the context, and the options with a default length
    capped: what every way of generating (this module's `generate`, the server's scheduler) starts from."""
    validate(options)
    for prompt in prompts:
        if prompt.ids is None and prompt.text is not None and not prompt.text.strip():
            raise DataError("empty prompt", "Pass some text to continue.")
    engine.constraints.compile(options.constraint)  # compiled now: its error comes first, its time is not decoding's
    encoded = [encode_prompt(engine, prompt, options) for prompt in prompts]
    options = cap_default_length(options, encoded, engine.context_length, on_notice)
    if options.reasoning is not None and encoded:
        # whether the reply starts inside the thinking: decided by the generation prompt, which a run's
        # prompts share (a template renders the same one after every conversation)
        options = replace(options, reasoning=reasoning.for_prompt(options.reasoning, engine, encoded[0]))
    outside = outside_vocabulary(options.logit_bias, engine)
    if outside is not None:
        raise UsageError(f"--logit-bias names token {outside}, outside this model's vocabulary of "
                         f"{engine.constraints.n_vocab} tokens", f"Use ids 0..{engine.constraints.n_vocab - 1}.")
    return [fit_to_context(ids, engine.context_length, options) for ids in encoded], options


def outside_vocabulary(tokens: Iterable[int], engine: Engine) -> int | None:
    """The first of `tokens` that is no id of the engine's vocabulary, or None."""
    return next((token for token in tokens if not 0 <= token < engine.constraints.n_vocab), None)


def generation_of(engine: Engine, prompt: Prompt, index: int, token_ids: list[int], stops: list[str],
                  prompt_tokens: int, seconds: float, ttft: float | None, constrained: bool = False,
                  thinking: Any = None) -> Generation:
    """One decoded sequence as a result: its text cut at EOS or a stop string, and why it ended. Under
    a constraint only EOS ends a satisfied text (the mask allows EOS nowhere else), so a length or a
    stop string leaves it incomplete. A thinking model's text is split into its thinking and answer."""
    text, kept, reason = finish(engine.decode, token_ids, engine.eos_ids, stops)
    thought, text = reasoning.split(text, thinking)
    return Generation(prompt=prompt.display(), index=index, text=text, token_ids=kept, finish_reason=reason,
                      reasoning=thought,
                      prompt_tokens=prompt_tokens, generated_tokens=len(kept), seconds=seconds,
                      time_to_first_token=ttft, engine=engine.name, weights=engine.weights,
                      incomplete=reason != "eos" if constrained else None)
