"""Fill in `[MASK]` blanks: masked LMs exactly as the fill-mask pipeline, causal LMs by rescoring.

Masked LMs: one batched forward pass, softmax over the vocabulary at each mask, top-k; sequences
and token strings built as `FillMaskPipeline.postprocess` builds them (transformers 5).

Causal LMs have no mask token, so a blank is filled by candidate rescoring: propose the tokens the
model predicts from the left context and, asked about the whole sentence, for the blank; extend the best ones into words of several tokens, score each
whole sentence (so the right context counts), and report a softmax over sentence log-likelihoods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from llmcli.distributed import OneProcess
from llmcli.errors import DataError, UsageError
from llmcli.models import LoadedModel

MASK_MARKER = "[MASK]"


@dataclass
class FillMaskOptions:
    top_k: int = 5
    targets: list[str] = field(default_factory=list)
    batch_size: int = 32
    max_mask_tokens: int = 3  # causal mode: tokens one blank may stand for
    all_positions: bool = False


@dataclass
class Prediction:
    token: int  # first token id of the filling (the pipeline's `token`)
    token_str: str
    score: float
    sequence: str
    token_ids: list[int] = field(default_factory=list)  # every id of the filling (a causal blank may take several)


@dataclass
class FillMaskResult:
    text: str
    predictions: list[list[Prediction]]  # one ranked list per mask
    method: str  # "masked-lm" | "causal-rescoring"
    all_positions: str | None = None  # argmax at every position, decoded (--all-positions)


def validate(options: FillMaskOptions) -> None:
    if options.top_k <= 0:
        raise UsageError(f"--top-k must be at least 1, got {options.top_k}")
    if options.batch_size <= 0:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.max_mask_tokens <= 0:
        raise UsageError(f"--max-mask-tokens must be at least 1, got {options.max_mask_tokens}")
    if any(not target.strip() for target in options.targets):
        raise UsageError("--targets must not be empty")


def fill_mask(engine: Any, texts: list[str], options: FillMaskOptions, workers: Any = None) -> list[FillMaskResult]:
    """Results in input order, from an engine (engines.choose_engine): a masked LM on hf, a causal LM
    on either engine. `workers` (distributed.Workers) shares the work out between processes: whole
    batches of a masked LM, whole texts of a causal one, so every number is the one-process one."""
    validate(options)
    if options.all_positions and engine.kind != "masked":
        raise UsageError("--all-positions needs a masked LM (BERT-style)", "Pass --model with a masked LM.")
    map_in_order = (workers or OneProcess()).map_in_order
    if engine.kind == "masked":
        import torch

        with torch.inference_mode():
            return fill_masked_lm(engine.loaded, texts, options, map_in_order)
    scorer = LlamaCausalScorer(engine) if engine.name == "llama.cpp" else HFCausalScorer(engine.loaded)
    return map_in_order(texts, 1, lambda share: [fill_causal_lm(scorer, text, options) for text in share])


# ---------------------------------------------------------------- masked LMs


def with_model_mask(tokenizer: Any, text: str) -> str:
    """`[MASK]` becomes the model's own mask token (`<mask>` for RoBERTa); the own token is kept."""
    mask = tokenizer.mask_token
    text = text.replace(MASK_MARKER, mask)
    if mask not in text:
        raise DataError(f"no mask in {text!r}", f"Mark each blank with {MASK_MARKER} (or the model's {mask}).")
    return text


def target_ids(tokenizer: Any, targets: list[str]) -> list[int]:
    """Vocabulary ids of the targets, looked up as the pipeline does, but a multi-token word is an error."""
    vocab = tokenizer.get_vocab()
    ids = []
    for target in targets:
        if target in vocab:
            ids.append(vocab[target])
            continue
        pieces = tokenizer(target, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = tokenizer.convert_ids_to_tokens(pieces)
            raise UsageError(
                f"target {target!r} is not a single token of this model's vocabulary (it splits into {shown})",
                "Pick a single-token word, or use a causal LM (--mode causal), which scores words of any length.",
            )
        if pieces[0] == tokenizer.unk_token_id:  # the word is not in the vocabulary at all
            raise UsageError(f"target {target!r} is not in this model's vocabulary (it becomes "
                             f"{tokenizer.unk_token})", "Pick a word the model knows.")
        ids.append(pieces[0])
    return sorted(set(ids))


def fill_masked_lm(loaded: LoadedModel, texts: list[str], options: FillMaskOptions,
                   map_in_order: Callable[..., list[Any]]) -> list[FillMaskResult]:

    tokenizer, model = loaded.tokenizer, loaded.model
    texts_with_masks = [with_model_mask(tokenizer, text) for text in texts]
    targets = target_ids(tokenizer, options.targets) if options.targets else None
    # a tokenizer trained on its own often does not know the model's limit: take the smaller
    max_length = min(getattr(tokenizer, "model_max_length", None) or 10**9,
                     getattr(model.config, "max_position_embeddings", None) or 10**9)
    encoded = tokenizer(texts_with_masks)["input_ids"]
    for text, ids in zip(texts_with_masks, encoded):
        if len(ids) > max_length:
            raise DataError(f"input of {len(ids)} tokens is longer than the model's {max_length}: {text[:60]!r}...",
                            "Shorten the text.")
    parts = None if options.all_positions else encoder_and_head(model)
    # batches of similar length waste less on padding; results go back in input order
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    batches = [order[start:start + options.batch_size] for start in range(0, len(order), options.batch_size)]

    def fill_share(share: list[list[int]]) -> list[tuple[int, FillMaskResult]]:
        return [pair for members in share
                for pair in fill_masked_batch(loaded, texts, encoded, members, targets, parts, options)]

    results: list[FillMaskResult] = [None] * len(texts)  # type: ignore[list-item]
    for index, result in map_in_order(batches, 1, fill_share):
        results[index] = result
    return results


def fill_masked_batch(loaded: LoadedModel, texts: list[str], encoded: list[list[int]], members: list[int],
                      targets: list[int] | None, parts: tuple[Any, Any] | None,
                      options: FillMaskOptions) -> list[tuple[int, FillMaskResult]]:
    """(input number, result) for the texts numbered `members`, in one forward pass."""
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    filled_in = []
    batch = tokenizer.pad({"input_ids": [encoded[i] for i in members]}, return_tensors="pt").to(loaded.device)
    blanks = batch["input_ids"] == tokenizer.mask_token_id
    if parts is None:
        logits = model(**batch).logits.float()
        blank_logits = logits[blanks]
    else:  # the vocabulary head on the blanks alone: for a small BERT it is ~1/6 of the work per token
        encoder, head = parts
        blank_logits = head(encoder(**batch)[0][blanks]).float()
    # blank_logits holds the blanks of every row in turn, each row's left to right
    first_blank = [0, *blanks.sum(dim=1).cumsum(0).tolist()]
    for row, index in enumerate(members):
        text, ids = texts[index], encoded[index]
        input_ids = torch.tensor(ids)
        masked_index = torch.nonzero(input_ids == tokenizer.mask_token_id).squeeze(-1)
        probs = blank_logits[first_blank[row]:first_blank[row + 1]].softmax(dim=-1).cpu()
        if targets is not None:
            probs = probs[..., targets]
        values, predictions = probs.topk(min(options.top_k, probs.shape[-1]))
        single_mask = len(masked_index) == 1
        ranked = []
        for i, (scores, tokens) in enumerate(zip(values.tolist(), predictions.tolist())):
            row_predictions = []
            for score, token in zip(scores, tokens):
                token = targets[token] if targets is not None else token
                filled = input_ids.clone()
                filled[masked_index[i]] = token
                # as the pipeline: other masks stay visible when there are several
                sequence = tokenizer.decode(filled.tolist(), skip_special_tokens=single_mask)
                row_predictions.append(Prediction(token, tokenizer.decode([token]), score, sequence, [token]))
            ranked.append(row_predictions)
        argmax_text = None
        if options.all_positions:
            argmax = logits[row, : len(ids)].argmax(-1).cpu()
            # drop the [CLS]/[SEP]-like positions, keep the blanks
            special = torch.tensor(tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)).bool()
            argmax_text = tokenizer.decode(argmax[~special | (input_ids == tokenizer.mask_token_id)].tolist())
        filled_in.append((index, FillMaskResult(text, ranked, "masked-lm", argmax_text)))
    return filled_in


def encoder_and_head(model: Any) -> tuple[Any, Any] | None:
    """The encoder and the vocabulary head of a masked LM built as `<base model> + one head module`
    (BERT, RoBERTa), so the head can run on the blanks alone; None for other layouts."""
    prefix = getattr(model, "base_model_prefix", "")
    heads = [module for name, module in model.named_children() if name != prefix]
    if prefix and hasattr(model, prefix) and len(heads) == 1:
        return getattr(model, prefix), heads[0]
    return None


# ---------------------------------------------------------------- causal LMs by rescoring


class HFCausalScorer:
    """Sentences scored with plain batched forward passes (right-padded, every token's log_softmax):
    the reference computation, which tests/test_fill_mask.py repeats by hand."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded, self.tokenizer = loaded, loaded.tokenizer
        self.start = start_token(self.tokenizer)
        self.special = set(self.tokenizer.all_special_ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def next_logprobs(self, prefixes: list[str], batch_size: int) -> list[Any]:
        """Log-probabilities (numpy, over the vocabulary) of the token after each prefix."""
        import torch

        rows = []
        with torch.inference_mode():
            for start in range(0, len(prefixes), batch_size):
                sequences = [[self.start] + self.encode(text) for text in prefixes[start:start + batch_size]]
                ids, mask = padded(self.loaded, sequences)
                logits = self.loaded.model(input_ids=ids, attention_mask=mask).logits
                last = torch.tensor([len(s) - 1 for s in sequences], device=logits.device)
                rows.extend(logits[torch.arange(len(sequences)), last].float().log_softmax(-1).cpu().numpy())
        return rows

    def sentence_logprobs(self, sentences: list[str], batch_size: int) -> list[float]:
        """Total log-likelihood of each sentence, every token conditioned on all before it."""
        import torch

        totals: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(sentences), batch_size):
                sequences = [[self.start] + self.encode(text) for text in sentences[start:start + batch_size]]
                ids, mask = padded(self.loaded, sequences)
                logprobs = self.loaded.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float().log_softmax(-1)
                token_lp = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
                totals.extend(token_lp.sum(-1).tolist())
        return totals


class LlamaCausalScorer:
    """The same numbers on llama.cpp, the candidates' shared beginning (the start token and the left
    context) decoded once (engines/llama_scoring.py); `batch_size` does not apply: the scorer groups
    the sentences itself."""

    def __init__(self, engine: Any) -> None:
        from llmcli.engines.llama_scoring import SharedPrefixScorer

        self.engine, self.scorer = engine, SharedPrefixScorer(engine)
        self.start = self.start_token()
        lib = engine.lib
        self.special = {t for t in range(engine.n_vocab) if lib.llama_vocab_is_control(engine.vocab, t)}

    def start_token(self) -> int:
        """As start_token below: <|endoftext|> where the vocabulary has it, else BOS, else EOS."""
        ids = self.engine.encode("<|endoftext|>", add_special=False)
        if len(ids) == 1 and self.engine.token_text(ids[0]) == "<|endoftext|>":
            return ids[0]
        for token in (self.engine.bos_id, self.engine.eos_id):
            if token is not None:
                return token
        raise UsageError("this causal LM's tokenizer has neither a BOS nor an EOS token to condition on")

    def encode(self, text: str) -> list[int]:
        return self.engine.encode(text, add_special=False)

    def piece(self, token: int) -> str:
        return self.engine.decode([token])

    def next_logprobs(self, prefixes: list[str], batch_size: int) -> list[Any]:
        return [row for _, row in self.scorer.score([[self.start] + self.encode(p) for p in prefixes], rows=True)]

    def sentence_logprobs(self, sentences: list[str], batch_size: int) -> list[float]:
        return [total for total, _ in self.scorer.score([[self.start] + self.encode(s) for s in sentences])]


def start_token(tokenizer: Any) -> int:
    """The token a sentence is conditioned on: the pretraining document separator where there is one.

    SmolLM2-Instruct's BOS is the chat token <|im_start|>; conditioned on it, "Birds can fly because
    they have wings." scores -38.0 nats and " fly" is not among the 100 likeliest next tokens after
    "Birds can"; conditioned on <|endoftext|> it scores -31.5 and " fly" ranks 4th (measured).
    """
    vocab = tokenizer.get_vocab()
    for token in ("<|endoftext|>", tokenizer.bos_token, tokenizer.eos_token):
        if token is not None and token in vocab:
            return vocab[token]
    raise UsageError("this causal LM's tokenizer has neither a BOS nor an EOS token to condition on")


def padded(loaded: LoadedModel, sequences: list[list[int]]) -> tuple[Any, Any]:
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids.to(loaded.device), mask.to(loaded.device)


def word_starts(scorer: Any, logprobs: Any, leading_space: bool, count: int) -> list[str]:
    """The `count` likeliest tokens in `logprobs` that begin a word, most likely first: a letter or
    digit first (after one space when `leading_space`), so pure punctuation ("," ".") and clitics
    ("'s") never fill a word blank."""
    import numpy as np

    pieces: list[str] = []
    for token in np.argsort(-logprobs, kind="stable").tolist():
        piece = scorer.piece(token)
        word = piece[1:] if leading_space and piece.startswith(" ") else piece
        if (token not in scorer.special and piece.startswith(" ") == leading_space and word[:1].isalnum()
                and word.isprintable() and piece not in pieces):
            pieces.append(piece)
        if len(pieces) == count:
            break
    return pieces


def blank_question(sentence: str) -> str:
    """A prompt whose next token is the blank's word, chosen with the whole sentence in view."""
    return f'In the sentence "{sentence}", the blank ___ stands for the word "'


def word_candidates(scorer: Any, left: str, right: str, needs_space: bool, count: int, batch_size: int) -> list[str]:
    """First pieces of the blank's word from two proposers, each giving its `count` likeliest.

    The left context alone never proposes the answer when the blank starts the sentence: for
    "[MASK] is the capital of France." " Paris" ranks 1743rd after the start token, but 3rd after
    `blank_question` (measured on the embedded model, benchmarks/cloze.py)."""
    space = " " if needs_space else ""
    after_left, after_question = scorer.next_logprobs([left, blank_question(left + space + "___" + right)], batch_size)
    from_left = word_starts(scorer, after_left, needs_space, count)
    from_sentence = [space + piece for piece in word_starts(scorer, after_question, False, count)]
    return list(dict.fromkeys(from_left + from_sentence))


def extend_candidates(scorer: Any, left: str, seeds: list[str], options: FillMaskOptions) -> list[str]:
    """Grow candidates greedily by word-continuing pieces (no leading space), up to --max-mask-tokens,
    so a blank can stand for a word the tokenizer splits (" Pythag" + "oras")."""
    import numpy as np

    frontier, grown = seeds, []
    for _ in range(options.max_mask_tokens - 1):
        logprobs = scorer.next_logprobs([left + c for c in frontier], options.batch_size)
        extended = []
        for candidate, row in zip(frontier, logprobs):
            for token in np.argsort(-row, kind="stable")[:2].tolist():
                piece = scorer.piece(token)
                if piece[:1].isalnum() and token not in scorer.special:
                    extended.append(candidate + piece)
        grown.extend(extended)
        frontier = extended
        if not frontier:
            break
    return grown


def softmax_ranked(candidates: list[str], scores: list[float], sentences: list[str]) -> list[tuple[str, float, str]]:
    import math

    top = max(scores)
    total = sum(math.exp(s - top) for s in scores)
    ranked = sorted(zip(candidates, scores, sentences), key=lambda item: item[1], reverse=True)
    return [(c, math.exp(s - top) / total, sentence) for c, s, sentence in ranked]


def fill_one_blank(scorer: Any, left: str, right: str, options: FillMaskOptions) -> list[tuple[str, float, str]]:
    """Ranked (filling, probability, sentence) for the blank between left and right."""
    needs_space = left != left.rstrip() and bool(left.strip())
    left = left.rstrip() if needs_space else left
    if options.targets:
        candidates = [(" " + t.strip()) if needs_space else t.strip() for t in options.targets]
        sentences = [left + c + right for c in candidates]
        return softmax_ranked(candidates, scorer.sentence_logprobs(sentences, options.batch_size), sentences)
    # Each proposer is weak alone ("Birds can" rarely predicts " fly"), so take many first tokens:
    # scoring a short sentence is cheap next to missing the answer.
    count = max(10 * options.top_k, 100)
    candidates = word_candidates(scorer, left, right, needs_space, count, options.batch_size)
    scores = scorer.sentence_logprobs([left + c + right for c in candidates], options.batch_size)
    # Extend both the best sentences and the most likely first pieces: a word prefix (" Pythag")
    # is likely from the left but scores badly as a whole word until it is completed.
    by_sentence = [c for _, c in sorted(zip(scores, candidates), reverse=True)[: options.top_k]]
    seeds = list(dict.fromkeys(by_sentence + candidates[: options.top_k]))
    grown = [c for c in extend_candidates(scorer, left, seeds, options) if c not in candidates]
    sentences = [left + c + right for c in grown]
    return softmax_ranked(
        candidates + grown, scores + (scorer.sentence_logprobs(sentences, options.batch_size) if grown else []),
        [left + c + right for c in candidates] + sentences,
    )


def fill_causal_lm(scorer: Any, text: str, options: FillMaskOptions) -> FillMaskResult:
    """Blanks are filled left to right: each sees earlier blanks filled with their best word and the
    right context up to the next blank."""
    parts = text.split(MASK_MARKER)
    if len(parts) < 2:
        raise DataError(f"no mask in {text!r}", f"Mark each blank with {MASK_MARKER}.")
    filled_left = parts[0]
    predictions = []
    for blank, right in enumerate(parts[1:]):
        ranked = fill_one_blank(scorer, filled_left, right, options)
        after = MASK_MARKER.join(parts[blank + 2:])
        row = []
        for filling, score, sentence in ranked[: options.top_k]:
            sequence = sentence + (MASK_MARKER + after if blank + 2 < len(parts) else "")
            ids = scorer.encode(filling)
            row.append(Prediction(ids[0], filling.strip(), score, sequence, ids))
        predictions.append(row)
        filled_left = ranked[0][2]
    return FillMaskResult(text, predictions, "causal-rescoring")
