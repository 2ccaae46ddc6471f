"""`embed` and `similar`: texts to vectors (batched by length, pooled by the model's own modules,
truncated to `dimensions`, normalized when asked) and the lines nearest to a query by cosine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmcli.errors import DataError, UsageError
from llmcli.sentence_models import SentenceModel


@dataclass
class EmbedOptions:
    batch_size: int = 32  # sentence-transformers' default
    prompt: str | None = None  # a named prompt of the model, or the text itself
    dimensions: int | None = None  # Matryoshka truncation, as sentence-transformers' truncate_dim
    normalize: bool = False  # L2 after truncation, as its normalize_embeddings (a Normalize module applies anyway)
    max_length: int | None = None  # tokens per input; None: the model's max_seq_length
    truncate: bool = True  # False: an input over the limit is an error


@dataclass
class Embeddings:
    vectors: Any  # float32 NumPy array, one row per input, in input order
    tokens: list[int]  # each input's token count (after truncation)
    truncated: int  # how many inputs were cut to the limit
    seconds: float


def check_options(model: SentenceModel, options: EmbedOptions) -> None:
    if options.dimensions is not None and not 1 <= options.dimensions <= model.dimension:
        raise UsageError(f"--dimensions {options.dimensions} is outside this model's 1..{model.dimension}",
                         f"Pass at most {model.dimension}, or drop --dimensions.")
    if options.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.max_length is not None and not 1 <= options.max_length <= (model.positions or options.max_length):
        raise UsageError(f"--max-length {options.max_length} is outside this model's 1..{model.positions} tokens",
                         f"Pass at most {model.positions}, or drop --max-length.")


def embed_texts(model: SentenceModel, texts: list[str], options: EmbedOptions,
                on_batch: Callable[[int], None] | None = None) -> Embeddings:
    """The inputs' vectors: sorted by length so each batch pads little (as sentence-transformers
    sorts), then put back in input order."""
    import numpy

    check_options(model, options)
    began = time.perf_counter()
    prefix = model.prompt_text(options.prompt)
    prompted = [prefix + text for text in texts]
    limit = options.max_length or model.max_length
    lengths = model.count_tokens(prompted)
    over = [number for number, length in enumerate(lengths) if limit is not None and length > limit]
    if over and not options.truncate:
        raise DataError(f"input {over[0] + 1} has {lengths[over[0]]} tokens, above the limit of {limit}",
                        "Shorten it, or drop --no-truncate to cut it to the limit.")
    saved, model.max_length = model.max_length, limit
    order = sorted(range(len(texts)), key=lambda number: -len(prompted[number]))
    vectors: list[Any] = [None] * len(texts)
    tokens = [0] * len(texts)
    try:
        for start in range(0, len(order), options.batch_size):
            batch = order[start:start + options.batch_size]
            out, counts = model.encode_batch([prompted[number] for number in batch])
            for number, row, count in zip(batch, out, counts):
                vectors[number], tokens[number] = row, count
            if on_batch:
                on_batch(len(batch))
    finally:
        model.max_length = saved
    stacked = numpy.stack(vectors) if vectors else numpy.zeros((0, model.dimension), numpy.float32)
    if options.dimensions is not None:
        stacked = stacked[:, :options.dimensions]
    if options.normalize:  # as torch.nn.functional.normalize: x / max(|x|, 1e-12)
        stacked = stacked / numpy.maximum(numpy.linalg.norm(stacked, axis=1, keepdims=True), 1e-12)
    return Embeddings(stacked.astype(numpy.float32), tokens, len(over), time.perf_counter() - began)


def read_vectors(path: str, rows: int) -> Any:
    """Vectors saved by `embed --output FILE.npy`, checked to have one row per line."""
    import numpy

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--embeddings {path}: no such file", "Write it with llmcli embed -f FILE --output FILE.npy.")
    try:
        vectors = numpy.load(file, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"--embeddings {path} is not a NumPy array file ({exc})") from exc
    if vectors.ndim != 2 or vectors.shape[0] != rows:
        raise DataError(f"--embeddings {path} has shape {vectors.shape}, not one row for each of the {rows} lines",
                        "Embed the same file again with --output.")
    return vectors


def nearest(query: Any, vectors: Any, top_k: int) -> list[tuple[int, float]]:
    """The rows nearest to `query` by cosine, best first: (row, score)."""
    import numpy

    if vectors.shape[1] != query.shape[0]:
        raise DataError(f"the saved vectors have {vectors.shape[1]} dimensions and the query {query.shape[0]}",
                        "Embed the file again with the same model and --dimensions.")
    norms = numpy.linalg.norm(vectors, axis=1) * numpy.linalg.norm(query)
    scores = (vectors @ query) / numpy.maximum(norms, 1e-12)
    best = numpy.argsort(-scores, kind="stable")[:top_k]
    return [(int(row), float(scores[row])) for row in best]
