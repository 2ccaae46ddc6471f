"""Text generation: prompts -> token ids -> `model.generate` -> results with finish reasons and timings.

Decoding is Hugging Face's own `generate`, so greedy output equals it token for token; this module
adds batching with left padding, chat templates, stop strings cut out of the text, and streaming.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from llmcli.data import Prompt
from llmcli.errors import DataError, UsageError
from llmcli.models import LoadedModel

TextCallback = Callable[[str], None]


@dataclass
class GenerateOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    num_return_sequences: int = 1
    stop: list[str] = field(default_factory=list)
    system: str | None = None
    chat: bool | None = None  # None: use the chat template when the tokenizer has one
    batch_size: int = 1
    prompt_lookup: int | None = None  # prompt-lookup decoding: tokens proposed per step from the prompt
    truncate: str = "error"  # a prompt too long for the context: "error" or "left" (keep its end)
    static_cache: bool = False  # fixed-size KV cache; on CUDA transformers then compiles the decode step


@dataclass
class Generation:
    prompt: str
    index: int  # which of the prompt's --num-return-sequences this is
    text: str  # the continuation only, cut before any stop string
    token_ids: list[int]
    finish_reason: str  # "length" | "stop" | "eos"
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    time_to_first_token: float | None = None


def uses_chat_template(tokenizer: Any, prompt: Prompt, options: GenerateOptions) -> bool:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt.messages is not None or options.chat:
        if not has_template:
            raise UsageError(
                "this model's tokenizer has no chat template, so chat messages cannot be formatted",
                "Pass plain prompts with --no-chat.",
            )
        return True
    return has_template and options.chat is None


def encode_prompt(tokenizer: Any, prompt: Prompt, options: GenerateOptions) -> list[int]:
    """Token ids of one prompt; without a chat template exactly `tokenizer(prompt)`."""
    if not uses_chat_template(tokenizer, prompt, options):
        if prompt.text is None:
            raise UsageError("chat messages given with --no-chat", "Drop --no-chat or pass plain prompts.")
        return tokenizer(prompt.text)["input_ids"]
    messages = prompt.messages or [{"role": "user", "content": prompt.text}]
    if options.system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": options.system}, *messages]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template already holds the special tokens; adding them again would double the BOS.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sampling_kwargs(options: GenerateOptions) -> dict[str, Any]:
    """Only what the user set, so the model's own generation_config supplies the rest, as in HF."""
    kwargs: dict[str, Any] = {"max_new_tokens": options.max_new_tokens}
    if options.temperature == 0:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=options.temperature)
        for name in ("top_k", "top_p", "min_p"):
            if getattr(options, name) is not None:
                kwargs[name] = getattr(options, name)
    if options.repetition_penalty is not None:
        kwargs["repetition_penalty"] = options.repetition_penalty
    if options.num_return_sequences > 1:
        kwargs["num_return_sequences"] = options.num_return_sequences
    if options.stop:
        kwargs["stop_strings"] = options.stop
    if options.prompt_lookup:
        kwargs["prompt_lookup_num_tokens"] = options.prompt_lookup
    return kwargs


def eos_ids(loaded: LoadedModel) -> set[int]:
    eos = loaded.model.generation_config.eos_token_id
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def finish(tokenizer: Any, ids: list[int], eos: set[int], stops: list[str]) -> tuple[str, list[int], str]:
    """Text, kept token ids and finish reason of one generated sequence.

    `generate` pads a finished sequence of a batch with pad tokens (often the EOS id), so everything
    after the first EOS is dropped, and a stop string is looked for before that.
    """
    eos_at = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if eos_at is None else ids[:eos_at]
    text = tokenizer.decode(body, skip_special_tokens=True)
    stop_at = find_stop(text, stops)
    if stop_at is not None:
        # keep the tokens up to the one that completed the stop string, where generate stopped
        kept = next(n for n in range(1, len(body) + 1)
                    if find_stop(tokenizer.decode(body[:n], skip_special_tokens=True), stops) is not None)
        return text[:stop_at], body[:kept], "stop"
    if eos_at is not None:
        return text, ids[: eos_at + 1], "eos"
    return text, ids, "length"


class TokenStreamer:
    """A `generate` streamer: records the first-token time and, for one sequence, emits new text.

    Text is released only when it cannot change: not while it ends in an incomplete UTF-8 character
    (decoded as U+FFFD), nor while its tail could be the start of a stop string.
    """

    def __init__(self, tokenizer: Any, on_text: TextCallback | None, stops: list[str], eos: set[int]) -> None:
        self.tokenizer, self.on_text, self.stops, self.eos = tokenizer, on_text, stops, eos
        self.ids: list[int] = []
        self.emitted = 0
        self.prompt_seen = False
        self.done = False
        self.first_token_at: float | None = None

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate first passes the prompt ids
            self.prompt_seen = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.on_text is None or self.done:
            return
        for token in value.reshape(-1).tolist():
            if token in self.eos:
                self.done = True
                break
            self.ids.append(token)
        self.flush(final=self.done)

    def end(self) -> None:
        if self.on_text is not None and not self.done:
            self.flush(final=True)

    def flush(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        end = len(text)
        stop_at = find_stop(text, self.stops)
        if stop_at is not None:
            end, self.done = stop_at, True
        elif not final:
            end = len(text.rstrip("\ufffd"))
            for stop in self.stops:
                for size in range(min(len(stop) - 1, end), 0, -1):
                    if text[:end].endswith(stop[:size]):
                        end -= size
                        break
        if end > self.emitted:
            self.on_text(text[self.emitted:end])
            self.emitted = end


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
    if options.repetition_penalty is not None and options.repetition_penalty <= 0:
        raise UsageError(f"--repetition-penalty must be positive, got {options.repetition_penalty}")
    if options.batch_size <= 0:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.num_return_sequences <= 0:
        raise UsageError(f"--num-return-sequences must be at least 1, got {options.num_return_sequences}")
    if options.num_return_sequences > 1 and options.temperature == 0:
        raise UsageError(
            "--num-return-sequences > 1 needs sampling, but --temperature is 0 (greedy gives one answer)",
            "Add --temperature 0.7 (or any value above 0).",
        )
    if any(stop == "" for stop in options.stop):
        raise UsageError("--stop must not be empty")
    if options.truncate not in ("error", "left"):
        raise UsageError(f"unknown --truncate {options.truncate!r}", "Use error or left.")
    if options.prompt_lookup is not None and options.prompt_lookup <= 0:
        raise UsageError(f"--prompt-lookup must be at least 1, got {options.prompt_lookup}")


def fit_to_context(ids: list[int], context: int | None, options: GenerateOptions) -> list[int]:
    """The prompt's ids, checked (or, with --truncate left, cut) so the generation fits the context."""
    if not context:
        return ids
    if options.max_new_tokens >= context:
        raise UsageError(f"--max-new-tokens {options.max_new_tokens} leaves no room in the model's context of "
                         f"{context} tokens", f"Use --max-new-tokens below {context}.")
    overflow = len(ids) + options.max_new_tokens - context
    if overflow <= 0:
        return ids
    if options.truncate == "left":
        return ids[overflow:]
    raise DataError(f"prompt of {len(ids)} tokens plus --max-new-tokens {options.max_new_tokens} exceeds the "
                    f"model's context of {context} tokens",
                    "Shorten the prompt, lower --max-new-tokens, or pass --truncate left.")


def assisted_kwargs(loaded: LoadedModel, draft: LoadedModel | None) -> dict[str, Any]:
    if draft is None:
        return {}
    kwargs = {"assistant_model": draft.model}
    if draft.tokenizer.get_vocab() != loaded.tokenizer.get_vocab():  # universal assisted decoding
        kwargs["assistant_tokenizer"] = draft.tokenizer
    return kwargs


def generate(
    loaded: LoadedModel,
    prompts: list[Prompt],
    options: GenerateOptions,
    on_text: TextCallback | None = None,
    draft: LoadedModel | None = None,
) -> Iterator[Generation]:
    """Yield generations in input order, batch by batch; `on_text` streams a lone sequence's text.

    With a `draft` model (assisted decoding) or --prompt-lookup, the main model verifies several
    proposed tokens per forward pass; greedy output is the same, only faster when proposals hit."""
    from transformers import set_seed

    validate(options)
    for prompt in prompts:
        if prompt.text is not None and not prompt.text.strip():
            raise DataError("empty prompt", "Pass some text to continue.")
    tokenizer, model = loaded.tokenizer, loaded.model
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    if options.seed is not None:
        set_seed(options.seed)
    context = getattr(model.config, "max_position_embeddings", None)
    encoded = [fit_to_context(encode_prompt(tokenizer, prompt, options), context, options) for prompt in prompts]
    eos = eos_ids(loaded)
    stream = on_text if len(prompts) == 1 and options.num_return_sequences == 1 else None
    decoding = assisted_kwargs(loaded, draft)
    if options.static_cache and not decoding and not options.prompt_lookup:  # assisted decoding needs a dynamic cache
        decoding["cache_implementation"] = "static"
    for start in range(0, len(prompts), options.batch_size):
        batch_ids = encoded[start:start + options.batch_size]
        batch = tokenizer.pad({"input_ids": batch_ids}, return_tensors="pt").to(loaded.device)
        streamer = TokenStreamer(tokenizer, stream, options.stop, eos)
        began = time.perf_counter()
        output = model.generate(
            **batch, **sampling_kwargs(options), **decoding, streamer=streamer, tokenizer=tokenizer,
            pad_token_id=tokenizer.pad_token_id,
        )
        seconds = time.perf_counter() - began
        ttft = streamer.first_token_at - began if streamer.first_token_at else None
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        for row, token_ids in enumerate(new_tokens):
            prompt_index = start + row // options.num_return_sequences
            text, kept, reason = finish(tokenizer, token_ids, eos, options.stop)
            yield Generation(
                prompt=prompts[prompt_index].display(),
                index=row % options.num_return_sequences,
                text=text,
                token_ids=kept,
                finish_reason=reason,
                prompt_tokens=len(encoded[prompt_index]),
                generated_tokens=len(kept),
                seconds=seconds,
                time_to_first_token=ttft,
            )
