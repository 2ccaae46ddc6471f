"""Perplexity and friends, each result naming the exact protocol that produced it.

Causal LMs:
- sliding(max_length, stride): the window layout of the Hugging Face guide "Perplexity of
  fixed-length models"; every token from the second on is scored exactly once, and the value is
  exp(total NLL / scored tokens). (The guide's own code weights each window's mean loss by its
  labelled tokens - 1, which is off by ~1e-4 relative when stride < max_length; we report the exact
  per-token value. With stride == max_length the two agree.)
- rolling(lm-eval): lm-evaluation-harness's loglikelihood_rolling: the first token conditioned on
  the prefix token (BOS, else EOS), then disjoint windows of max_length; every token scored.
- llama.cpp(ctx): llama-perplexity's method: chunks of ctx tokens, BOS replacing the first token of
  each chunk when the model adds one, only the second half of each chunk scored.
Masked LMs: pseudo-perplexity (each token masked in turn, Salazar et al. 2020) and accuracy
(seeded 15% masking).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from llmcli.data import Completion
from llmcli.distributed import OneProcess
from llmcli.engines import Engine, ProgressCallback, Window, as_engine, same_shape_batches
from llmcli.errors import DataError, UsageError


@dataclass
class EvalOptions:
    metric: str | None = None  # perplexity | pseudo-perplexity | accuracy; None: from the model type
    protocol: str = "sliding"  # sliding | rolling | llama.cpp (causal perplexity only)
    max_length: int | None = None  # None: the model's context, at most 1024
    stride: int | None = None  # None: max_length // 2
    ctx: int = 512  # llama.cpp chunk size
    batch_size: int | None = None  # None: 8, or 1 for causal windows on the CPU (each fastest there, measured)
    seed: int = 0  # accuracy's masking


@dataclass
class EvalResult:
    model: str
    metric: str
    protocol: str
    value: float
    stderr: float | None  # standard error of the value (delta method over per-token NLL); None from one token
    tokens: int  # tokens scored
    nll: float | None  # total negative log-likelihood, nats (None for accuracy)
    bits_per_byte: float | None
    word_perplexity: float | None
    seconds: float
    engine: str = "hf"
    weights: str = ""


def sliding_windows(ids: list[int], max_length: int, stride: int) -> list[Window]:
    """The guide's layout: windows of max_length moved by stride; each scores only its new tokens."""
    windows, previous_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        new = end - previous_end
        # the first window's first token has no context, so it scores one token less
        windows.append(Window(ids[begin:end], min(new, end - begin - 1)))
        previous_end = end
        if end == len(ids):
            break
    return windows


def rolling_windows(ids: list[int], prefix: int, max_length: int) -> list[Window]:
    """lm-eval's get_rolling_token_windows(context_len=1) + make_disjoint_window, as forward passes:
    the prefix token and the first max_length tokens, then each next max_length tokens with the
    window reaching back to a full max_length of context (the last one included)."""
    predicted = min(max_length, len(ids))
    windows = [Window([prefix] + ids[:predicted], predicted)]
    while predicted < len(ids):
        end = min(predicted + max_length, len(ids))
        windows.append(Window(ids[end - max_length - 1:end], end - predicted))
        predicted = end
    return windows


def llama_cpp_windows(ids: list[int], ctx: int, bos: int | None) -> list[Window]:
    """llama-perplexity: whole chunks of ctx tokens; tokens after position ctx/2 are scored."""
    windows = []
    for start in range(0, len(ids) - ctx + 1, ctx):
        chunk = ids[start:start + ctx]
        if bos is not None:
            chunk = [bos] + chunk[1:]
        windows.append(Window(chunk, ctx - 1 - ctx // 2))
    return windows


def summary(nlls: list[float], texts: list[str], lm_eval: bool = False) -> tuple[float, float | None, float, float,
                                                                               float | None]:
    """value (perplexity), its standard error, total NLL, bits per byte, word perplexity; `texts` are
    the texts scored (one, or each record)."""
    n = len(nlls)
    total = math.fsum(nlls)
    mean = total / n
    variance = math.fsum((x - mean) ** 2 for x in nlls) / max(n - 1, 1)
    perplexity = math.exp(mean)
    # delta method: d exp(m) = exp(m) dm; one token has no spread to estimate it from
    stderr = perplexity * math.sqrt(variance / n) if n > 1 else None
    words = sum(len(re.split(r"\s+", text)) for text in texts)  # lm-eval's word count for word_perplexity
    characters = sum(len(text) for text in texts)
    if not lm_eval and characters > 40 * words:
        # no word separators (Chinese, Japanese, DNA...): "words" would be whole lines or the whole
        # text, and exp(NLL / words) astronomically large; lm-eval's exact definition stays under --lm-eval
        return perplexity, stderr, total, bits_per_byte_of(total, texts), None
    try:
        word_perplexity = math.exp(total / words)
    except OverflowError:  # beyond a float: not a number anyone can use
        word_perplexity = None
    return perplexity, stderr, total, bits_per_byte_of(total, texts), word_perplexity


def bits_per_byte_of(total_nll: float, texts: list[str]) -> float:
    return total_nll / (math.log(2) * sum(len(text.encode("utf-8")) for text in texts))


def causal_windows(engine: Engine, text: str, options: EvalOptions) -> tuple[str, list[Window]]:
    """The protocol's name and the forward passes that score `text` under it."""
    if options.protocol == "llama.cpp":
        ids = engine.encode(text)
        if len(ids) < 2 * options.ctx:
            raise DataError(f"the text has {len(ids)} tokens; llama.cpp's method needs at least 2 × ctx = "
                            f"{2 * options.ctx}", "Use a longer text or a smaller --ctx.")
        return f"llama.cpp(ctx={options.ctx})", llama_cpp_windows(ids, options.ctx,
                                                                 engine.bos_id if engine.adds_bos else None)
    if options.protocol == "rolling":
        ids = engine.encode(text, add_special=False)
        prefix = engine.bos_id if engine.bos_id is not None else engine.eos_id
        return (f"rolling(lm-eval,max_length={options.max_length})",
                rolling_windows(ids, prefix, options.max_length))
    ids = engine.encode(text)
    if len(ids) < 2:
        raise DataError(f"the text is {len(ids)} token long; perplexity needs at least 2", "Use a longer text.")
    return (f"sliding(max_length={options.max_length},stride={options.stride})",
            sliding_windows(ids, options.max_length, options.stride))


def completion_windows(engine: Engine, record: Completion, options: EvalOptions) -> tuple[str, list[Window]]:
    """One pass scoring the completion's tokens given its prompt, as `finetune --mask-prompt` trains
    (the boundary from the prompt tokenized alone); a record longer than --max-length keeps its end."""
    if record.messages is not None:
        prompt_ids = engine.encode_chat(record.messages)
        ids = prompt_ids + engine.encode(record.completion, add_special=False)
    else:
        prompt_ids = engine.encode(record.prompt)
        ids = engine.encode(record.prompt + record.completion)
    scored = len(ids) - len(prompt_ids)
    if scored < 1:
        raise DataError("the completion adds no token to its prompt", "Check the record.")
    ids = ids[-(options.max_length + 1):]  # the last token is only a target (see Window)
    return f"completion-given-prompt(max_length={options.max_length})", [Window(ids, min(scored, len(ids) - 1))]


def causal_batches(engine: Engine, text: str | Completion, options: EvalOptions) -> tuple[str, list[Any]]:
    """The protocol and the text's windows as the batches the engine runs (see `score`)."""
    if isinstance(text, Completion):
        if options.protocol != "sliding":
            raise UsageError("prompt/completion and chat records are scored as a completion given its prompt, "
                             "not with --lm-eval or --llama-cpp", "Drop that option, or pass text records.")
        protocol, windows = completion_windows(engine, text, options)
    else:
        protocol, windows = causal_windows(engine, text, options)
    return protocol, list(same_shape_batches(windows, options.batch_size))


def special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text ([CLS] and [SEP] for BERT).

    transformers 5 tokenizers no longer offer build_inputs_with_special_tokens, so they are read off
    one encoded word."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    return full[:start], full[start + len(plain):]


def masked_chunks(tokenizer: Any, text: str, max_length: int) -> list[list[int]]:
    """The text's tokens cut into pieces that fit max_length with the special tokens around each."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError("the text has no tokens", "Use a longer text.")
    prefix, suffix = special_affixes(tokenizer)
    body = max_length - len(prefix) - len(suffix)
    return [prefix + ids[i:i + body] + suffix for i in range(0, len(ids), body)]


def pseudo_batches(loaded: Any, text: str, options: EvalOptions) -> tuple[str, list[Any]]:
    """Each token masked in turn, in chunks of max_length with [CLS]/[SEP] added: (chunk, position)
    jobs, batch_size masked copies per forward pass."""
    tokenizer = loaded.tokenizer
    jobs = []
    for chunk in masked_chunks(tokenizer, text, options.max_length):
        special = tokenizer.get_special_tokens_mask(chunk, already_has_special_tokens=True)
        jobs += [(chunk, position) for position, is_special in enumerate(special) if not is_special]
    batches = [jobs[i:i + options.batch_size] for i in range(0, len(jobs), options.batch_size)]
    return f"pseudo-perplexity(max_length={options.max_length})", batches


def pseudo_nlls(loaded: Any, run: list[tuple[list[int], int]]) -> list[float]:
    """The NLL of each job's masked token, in one forward pass."""
    import torch

    tokenizer = loaded.tokenizer
    width = max(len(chunk) for chunk, _ in run)
    batch = torch.full((len(run), width), tokenizer.pad_token_id or 0)
    attention = torch.zeros((len(run), width), dtype=torch.long)
    for row, (chunk, position) in enumerate(run):
        batch[row, : len(chunk)] = torch.tensor(chunk)
        attention[row, : len(chunk)] = 1
        batch[row, position] = tokenizer.mask_token_id
    from llmcli.tasks.fill_mask import encoder_and_head

    inputs = {"input_ids": batch.to(loaded.device), "attention_mask": attention.to(loaded.device)}
    rows, positions = torch.arange(len(run)), torch.tensor([position for _, position in run])
    parts = encoder_and_head(loaded.model)
    if parts is None:
        logits = loaded.model(**inputs).logits[rows, positions]
    else:  # the vocabulary head on the masked positions alone: a batch's logits stay one row per job
        encoder, head = parts
        logits = head(encoder(**inputs)[0][rows, positions])
    return [-logits[row].float().log_softmax(-1)[chunk[position]].item() for row, (chunk, position) in enumerate(run)]


def masked_accuracy_jobs(loaded: Any, text: str, options: EvalOptions, generator: Any) -> list[tuple[Any, Any]]:
    """(chunk, masked positions) for each chunk, a seeded 15% of its tokens (at least one) masked;
    drawn in order from one generator, before any forward pass, so shares cannot change them."""
    import torch

    tokenizer = loaded.tokenizer
    jobs = []
    for ids in masked_chunks(tokenizer, text, options.max_length):
        chunk = torch.tensor(ids)
        special = torch.tensor(tokenizer.get_special_tokens_mask(chunk.tolist(), already_has_special_tokens=True))
        candidates = (special == 0).nonzero().squeeze(-1)
        count = max(1, round(0.15 * len(candidates)))
        jobs.append((chunk, candidates[torch.randperm(len(candidates), generator=generator)[:count]]))
    return jobs


def masked_correct(loaded: Any, chunk: Any, masked: Any) -> int:
    inputs = chunk.clone()
    inputs[masked] = loaded.tokenizer.mask_token_id
    logits = loaded.model(input_ids=inputs[None].to(loaded.device)).logits[0]
    return int((logits[masked].argmax(-1).cpu() == chunk[masked]).sum())


def resolve_options(engine: Engine, options: EvalOptions) -> EvalOptions:
    """Fill in defaults from the model and check the options against it."""
    default_metric = "pseudo-perplexity" if engine.kind == "masked" else "perplexity"
    metric = options.metric or default_metric
    if metric not in ("perplexity", "pseudo-perplexity", "accuracy"):
        raise UsageError(f"unknown --metric {metric!r}", "Use perplexity, pseudo-perplexity or accuracy.")
    if engine.kind == "causal" and metric != "perplexity":
        raise UsageError(f"--metric {metric} needs a masked LM, but {engine.source.name} is a causal LM",
                         "Use --metric perplexity.")
    if engine.kind == "masked" and metric == "perplexity":
        raise UsageError(f"--metric perplexity needs a causal LM, but {engine.source.name} is a masked LM",
                         "Use --metric pseudo-perplexity (or accuracy).")
    context = engine.context_length
    max_length = options.max_length or min(context or 1024, 1024)
    if max_length < 2:
        raise UsageError(f"--max-length must be at least 2, got {max_length}")
    if context and max_length > context:
        raise UsageError(f"--max-length {max_length} is above the model's context of {context} tokens",
                         f"Use --max-length {context} or less.")
    stride = options.stride if options.stride is not None else max(1, max_length // 2)
    if not 0 < stride <= max_length:
        raise UsageError(f"--stride must be in 1..max-length ({max_length}), got {stride}")
    if options.protocol == "llama.cpp" and context and options.ctx > context:
        raise UsageError(f"--ctx {options.ctx} is above the model's context of {context} tokens")
    if options.ctx < 4:
        raise UsageError(f"--ctx must be at least 4, got {options.ctx}")
    on_accelerator = engine.name == "hf" and engine.device.type != "cpu"
    # measured on 2 CPU cores (docs/eval.md): causal windows are fastest one at a time; a masked LM's
    # copies (one per token) gain up to 1.2x in batches of 8, and more rows only add memory
    batch_size = options.batch_size or (8 if on_accelerator or engine.kind == "masked" else 1)
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    return EvalOptions(metric=metric, protocol=options.protocol, max_length=max_length, stride=stride,
                       ctx=options.ctx, batch_size=batch_size, seed=options.seed)


def evaluate(engine: Engine, text: str | list[str], options: EvalOptions,
             on_start: Callable[[int], None] | None = None,
             on_progress: ProgressCallback | None = None, workers: Any = None) -> EvalResult:
    """Score `text`, or each of a list of records as a text of its own, aggregated exactly (summed
    NLL over all scored tokens). `engine` may also be a models.LoadedModel (the Hugging Face engine).

    `workers` (distributed.Workers) shares the forward passes out between processes, whole batches
    each, and gathers the per-token values back in order: every process's result is the one-process
    result, to the last bit, when that process runs on a worker's number of threads (CPU kernels may
    sum in another order on another number of threads)."""
    engine = as_engine(engine)
    texts = [text] if isinstance(text, str) else text
    if not any(isinstance(t, Completion) or t.strip() for t in texts):
        raise DataError("the evaluation text is empty", "Pass a file with some text.")
    if engine.kind == "masked" and any(isinstance(t, Completion) for t in texts):
        raise UsageError("prompt/completion and chat records score a completion given its prompt, which needs a "
                         "causal model", "Pass text records, or a causal model.")
    options = resolve_options(engine, options)
    workers = workers or OneProcess()
    if engine.kind == "masked":
        import torch

        with torch.inference_mode():
            return score(engine, texts, options, on_start, on_progress, not isinstance(text, str), workers)
    return score(engine, texts, options, on_start, on_progress, not isinstance(text, str), workers)


def score(engine: Engine, texts: list[str], options: EvalOptions, on_start: Callable[[int], None] | None,
          on_progress: ProgressCallback | None, per_record: bool, workers: Any) -> EvalResult:
    began = time.perf_counter()
    if options.metric == "accuracy":
        import torch

        generator = torch.Generator().manual_seed(options.seed)
        jobs = [job for text in texts for job in masked_accuracy_jobs(engine.loaded, text, options, generator)]
        correct = sum(workers.map_in_order(jobs, 1, lambda share: [masked_correct(engine.loaded, *job)
                                                                   for job in share]))
        total = sum(len(masked) for _, masked in jobs)
        protocol = f"masked-accuracy(p=0.15,seed={options.seed},max_length={options.max_length})"
        value = correct / total
        return EvalResult(engine.source.name, "accuracy", per_record_name(protocol, len(texts), 0, per_record), value,
                          math.sqrt(value * (1 - value) / total), total, None, None, None,
                          time.perf_counter() - began, engine.name, engine.weights)
    # Every text's forward passes first, as (text number, batch) units, then the passes themselves:
    # shared out whole between processes, so a batch is the same batch in any number of them.
    units: list[tuple[int, Any]] = []
    protocol = ""
    for number, text in enumerate(texts):
        try:
            if options.metric == "pseudo-perplexity":
                protocol, batches = pseudo_batches(engine.loaded, text, options)
            else:
                protocol, batches = causal_batches(engine, text, options)
        except DataError:
            if not per_record:
                raise
            batches = []  # a record too short to score anything (a one-token line): counted as skipped
        units += [(number, batch) for batch in batches]
    if on_start:
        on_start(sum(len(batch) for _, batch in units))

    def compute(share: list[tuple[int, Any]]) -> list[tuple[int, list[float]]]:
        results = []
        for number, batch in share:
            if options.metric == "pseudo-perplexity":
                values = pseudo_nlls(engine.loaded, batch)
                if on_progress:
                    on_progress(len(batch))
            else:
                values = engine.token_nlls(batch, options.batch_size, on_progress)
            results.append((number, values))
        return results

    by_text: dict[int, list[float]] = {}
    for number, values in workers.map_in_order(units, 1, compute):
        by_text.setdefault(number, []).extend(values)
    nlls = [value for number in sorted(by_text) for value in by_text[number]]
    scored_texts = [texts[number].completion if isinstance(texts[number], Completion) else texts[number]
                    for number in sorted(by_text) if by_text[number]]
    if not nlls:
        raise DataError("no token could be scored", "Use a longer text.")
    value, stderr, total, bits_per_byte, word_perplexity = summary(nlls, scored_texts,
                                                                   lm_eval=options.protocol == "rolling")
    if options.protocol == "llama.cpp" and options.metric == "perplexity":
        bits_per_byte = word_perplexity = None  # only half of each chunk is scored: per byte/word is undefined
    protocol = per_record_name(protocol, len(texts), len(texts) - len(scored_texts), per_record)
    return EvalResult(engine.source.name, options.metric, protocol, value, stderr, len(nlls), total,
                      bits_per_byte, word_perplexity, time.perf_counter() - began, engine.name, engine.weights)


def per_record_name(protocol: str, records: int, skipped: int, per_record: bool) -> str:
    if not per_record:
        return protocol
    return f"per-record(records={records}{f',skipped={skipped}' if skipped else ''}) {protocol}"
