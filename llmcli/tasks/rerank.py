"""`rerank`: a query's documents scored by a cross-encoder, best first. The pairs are tokenized once,
sorted by their token count and batched, so a batch pads little (sentence-transformers sorts by
characters; sorting by tokens pads less, and padding does not change a score), then the scores are put
back in document order."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from llmcli.cross_encoders import CrossEncoderModel
from llmcli.errors import UsageError


@dataclass
class RerankOptions:
    batch_size: int = 32  # CrossEncoder.predict's default
    top_k: int | None = None  # None: every document


@dataclass
class Ranking:
    scores: Any  # float32 NumPy array, one score per document, in document order
    order: list[int]  # document indices, best first, cut to top_k
    tokens: int  # the pairs' tokens after truncation (the usage a server reports)
    truncated: int  # how many pairs were cut to the model's limit
    seconds: float


def check_options(options: RerankOptions) -> None:
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.top_k is not None and options.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {options.top_k}")


def rerank_documents(model: CrossEncoderModel, query: str, documents: list[str], options: RerankOptions,
                     on_batch: Callable[[int], None] | None = None) -> Ranking:
    import numpy

    check_options(options)
    began = time.perf_counter()
    features = model.tokenize(query, documents)
    lengths = [len(ids) for ids in features["input_ids"]]
    cut = model.max_length is not None and max(lengths, default=0) >= model.max_length
    truncated = sum(length > model.max_length for length in model.full_lengths(query, documents)) if cut else 0
    order = sorted(range(len(documents)), key=lambda number: -lengths[number])
    scores = numpy.zeros(len(documents), numpy.float32)
    for start in range(0, len(order), options.batch_size):
        batch = order[start:start + options.batch_size]
        rows = {key: [values[number] for number in batch] for key, values in features.items()}
        scores[batch] = model.score_batch(rows)
        if on_batch:
            on_batch(len(batch))
    return Ranking(scores, best_first(scores, options.top_k), sum(lengths), truncated, time.perf_counter() - began)


def best_first(scores: Any, top_k: int | None) -> list[int]:
    """Indices by descending score; equal scores keep document order (a stable sort)."""
    import numpy

    return [int(number) for number in numpy.argsort(-scores, kind="stable")[:top_k]]
