"""`llmcli embed` and `llmcli similar`."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import collect_inputs
from llmcli.cli.options import DeviceOption, ThreadsOption, TrustOption, completes
from llmcli.errors import UsageError

OUTPUT_SUFFIXES = (".jsonl", ".npy", ".parquet")

EmbeddingModelOption = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="A sentence-transformers or Hugging Face encoder directory, a causal LM (directory, "
    ".gguf file or smollm2), a LoRA adapter directory, or a hub id. Default: the embedded all-MiniLM-L6-v2 "
    "('minilm').")]
BatchOption = Annotated[int, typer.Option(help="Inputs per forward pass.")]
PromptOption = Annotated[Optional[str], typer.Option(
    help="One of the model's named prompts (e.g. query), or a text put before every input.")]
DimensionsOption = Annotated[Optional[int], typer.Option(
    help="Keep the first N dimensions (Matryoshka truncation, as sentence-transformers' truncate_dim).")]
PoolingOption = Annotated[str, typer.Option(help="auto (the model's own), mean, cls, max or last.")]
MaxLengthOption = Annotated[Optional[int], typer.Option(help="Tokens per input. Default: the model's limit.")]
EmbedEngineOption = Annotated[str, typer.Option(
    "--engine", help="auto (llama.cpp for a BERT model without Dense layers when installed: about a second cold, "
    "vectors within a few 1e-4 of sentence-transformers'; else hf), hf (transformers: sentence-transformers' own "
    "arithmetic) or llama.cpp.", autocompletion=completes("auto", "hf", "llama.cpp"))]


def load(model: Optional[str], pooling: str, device: Optional[str], trust_remote_code: bool, engine: str,
         threads: Optional[int]):
    from llmcli.sentence_models import load_sentence_model

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    with render.status("Loading the embedding model"):
        loaded = load_sentence_model(model, device=device, pooling=pooling, trust_remote_code=trust_remote_code,
                                     engine=engine, threads=threads)
    if model is None:
        render.notice(f"Using the embedded model {loaded.name} (pass --model to choose another).")
    for notice in loaded.notices:
        render.notice(notice)
    return loaded


class FileTexts:
    """read_text_lines as a collect_inputs reader, remembering what it read for the notice."""

    def __init__(self) -> None:
        self.source: Optional[str] = None
        self.blank_lines = 0

    def __call__(self, path: str) -> list[str]:
        from llmcli.data import STDIN, read_text_lines

        found = read_text_lines(path)
        self.source = "standard input" if path == STDIN else path
        self.blank_lines = found.blank_lines
        return found.texts

    def summary(self, verb: str, count: int) -> str:
        """'Embedded 40 texts from lines.txt (3 blank lines skipped).': rows match the other lines, in order."""
        skipped = f" ({self.blank_lines} blank line{'s' if self.blank_lines != 1 else ''} skipped)" \
            if self.blank_lines else ""
        return f"{verb} {count} text{'s' if count != 1 else ''} from {self.source}{skipped}."


@app.command()
def embed(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to embed; '-' reads stdin, one per line.",
                                                         show_default=False, metavar="TEXT")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read texts from a file: one per line "
                                                "(blank lines skipped), or JSONL with 'text' (or 'prompt').")] = None,
    model: EmbeddingModelOption = None,
    output: Annotated[Optional[str], typer.Option(
        "--output", "-o", help="Write FILE.jsonl, FILE.npy (float32, a row per input) or FILE.parquet (index, "
        "embedding, tokens) instead of stdout.")] = None,
    normalize: Annotated[bool, typer.Option(help="L2-normalize each vector (after --dimensions), as "
                                            "sentence-transformers' normalize_embeddings.")] = False,
    pooling: PoolingOption = "auto",
    prompt: PromptOption = None,
    dimensions: DimensionsOption = None,
    batch_size: BatchOption = 32,
    max_length: MaxLengthOption = None,
    truncate: Annotated[bool, typer.Option(help="Cut an input over the limit to it (with a notice), or refuse "
                                           "it with --no-truncate.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output file.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="JSON Lines {index, text, embedding, tokens} on "
                                              "stdout: one object per input text.")] = False,
    stats: Annotated[bool, typer.Option(help="Print the engine, inputs/s, tokens/s and peak memory to "
                                        "stderr.")] = False,
    engine: EmbedEngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """Embed texts as sentence vectors, equal to sentence-transformers' encode on the same model. JSON
    Lines {"index", "embedding", "tokens"} on stdout, or --output FILE.jsonl|FILE.npy|FILE.parquet."""
    from llmcli.tasks.embed import EmbedOptions, embed_texts

    if json_output and output:
        raise UsageError("--json prints to stdout and --output writes a file", "Pass one of them.")
    target = check_output(output, overwrite)
    reader = FileTexts()
    inputs = collect_inputs(texts or [], file, reader, "text")
    options = EmbedOptions(batch_size=batch_size, prompt=prompt, dimensions=dimensions, normalize=normalize,
                           max_length=max_length, truncate=truncate)
    loaded = load(model, pooling, device, trust_remote_code, engine, threads)
    with render.progress("embedding") as (start, advance):
        start(len(inputs))
        result = embed_texts(loaded, inputs, options, on_batch=advance if file else None)
    if result.truncated:
        render.notice(f"{result.truncated} of {len(inputs)} inputs were cut to the model's limit of "
                      f"{max_length or loaded.max_length} tokens (--no-truncate refuses them).")
    if reader.source is not None:
        render.notice(reader.summary("Embedded", len(inputs)))
    if target is None:
        for number, (vector, tokens) in enumerate(zip(result.vectors, result.tokens)):
            record = {"index": number, "text": inputs[number]} if json_output else {"index": number}
            render.json_line({**record, "embedding": vector.tolist(), "tokens": tokens})
    else:
        write_vectors(target, result.vectors, result.tokens)
    if stats:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        seconds = max(result.seconds, 1e-9)
        render.notice(f"engine {loaded.engine}, {len(inputs)} inputs, {len(inputs) / seconds:.1f} inputs/s, "
                      f"{sum(result.tokens) / seconds:.0f} tokens/s, peak memory {peak:.0f} MB")


def check_output(output: Optional[str], overwrite: bool) -> Optional[Path]:
    if output is None:
        return None
    target = Path(output)
    if target.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--output {output}: the suffix says the format, and {target.suffix or 'none'} is not one",
                         "Use FILE.jsonl, FILE.npy or FILE.parquet.")
    if target.exists() and not overwrite:
        raise UsageError(f"--output {output} exists", "Pass --overwrite to replace it, or choose another file.")
    if not target.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {target.parent} does not exist", "Create it first.")
    return target


def write_vectors(target: Path, vectors, tokens: list[int]) -> None:
    """The whole file under a temporary name, then renamed: it appears complete or not at all."""
    import json
    import os

    import numpy

    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        if target.suffix.lower() == ".npy":
            with partial.open("wb") as handle:
                numpy.save(handle, vectors.astype(numpy.float32), allow_pickle=False)
        elif target.suffix.lower() == ".parquet":  # pyarrow comes with datasets
            import pyarrow
            import pyarrow.parquet

            width = vectors.shape[1]
            column = pyarrow.FixedSizeListArray.from_arrays(pyarrow.array(vectors.astype(numpy.float32).ravel()), width)
            table = pyarrow.table({"index": pyarrow.array(range(len(tokens)), pyarrow.int64()), "embedding": column,
                                   "tokens": pyarrow.array(tokens, pyarrow.int64())})
            pyarrow.parquet.write_table(table, partial)
        else:
            with partial.open("w") as handle:
                for number, (vector, count) in enumerate(zip(vectors, tokens)):
                    handle.write(json.dumps({"index": number, "embedding": vector.tolist(), "tokens": count}) + "\n")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@app.command()
def similar(
    query: Annotated[str, typer.Argument(help="The text to find neighbours of.", show_default=False)],
    file: Annotated[str, typer.Option("--file", "-f", help="The texts to search: one per line (blank lines "
                                      "skipped), or JSONL with 'text' (or 'prompt').")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="How many to list.")] = 5,
    embeddings: Annotated[Optional[str], typer.Option(
        help="Vectors of FILE saved by embed --output FILE.npy (same model and options), instead of embedding "
        "FILE again.")] = None,
    model: EmbeddingModelOption = None,
    pooling: PoolingOption = "auto",
    prompt: PromptOption = None,
    dimensions: DimensionsOption = None,
    batch_size: BatchOption = 32,
    json_output: Annotated[bool, typer.Option("--json", help="JSON Lines {rank, index, score, text}.")] = False,
    engine: EmbedEngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """The lines of FILE nearest to QUERY by cosine similarity, best first."""
    from llmcli.tasks.embed import EmbedOptions, embed_texts, nearest, read_vectors

    if top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {top_k}")
    if not query.strip():
        raise UsageError("empty query", "Pass some text.")
    reader = FileTexts()
    lines = reader(file)
    saved = read_vectors(embeddings, len(lines)) if embeddings else None
    loaded = load(model, pooling, device, trust_remote_code, engine, threads)
    options = EmbedOptions(batch_size=batch_size, prompt=prompt, dimensions=dimensions)
    [query_vector] = embed_texts(loaded, [query], options).vectors
    vectors = saved if saved is not None else embed_texts(loaded, lines, options).vectors
    render.notice(reader.summary("Ranked", len(lines)))
    for rank, (row, score) in enumerate(nearest(query_vector, vectors, top_k), 1):
        if json_output:
            render.json_line({"rank": rank, "index": row, "score": score, "text": lines[row]})
        else:
            render.write(f"{score:.4f}  {lines[row]}\n")
