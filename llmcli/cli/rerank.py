"""`llmcli rerank`."""

from typing import Annotated, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import collect_inputs
from llmcli.cli.embed import FileTexts
from llmcli.cli.options import DeviceOption, ThreadsOption, TrustOption
from llmcli.errors import UsageError


@app.command()
def rerank(
    query: Annotated[str, typer.Argument(help="What the documents should be relevant to.", show_default=False,
                                                   metavar="QUERY")],
    documents: Annotated[Optional[list[str]], typer.Argument(
        help="Documents to rank; '-' reads stdin, one per line.", show_default=False, metavar="DOCUMENT")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read the documents from a file: one per line "
                                                "(blank lines skipped), or JSONL with 'text' (or 'prompt').")] = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", "-m", help="A cross-encoder: a sentence-transformers CrossEncoder directory, a sequence-"
        "classification model with one label, or a hub id.", show_default=False)] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help="How many to list. Default: all.",
                                                 show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="(query, document) pairs per forward pass.")] = 32,
    json_output: Annotated[bool, typer.Option("--json", help="JSON Lines {rank, index, score, text}, best "
                                              "first.")] = False,
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    trust_remote_code: TrustOption = False,
) -> None:
    """The documents ranked by a cross-encoder's relevance to QUERY, best first, with their scores (equal to
    sentence-transformers' CrossEncoder.predict) and their positions in the input (from 0)."""
    from llmcli.tasks.rerank import RerankOptions, check_options, rerank_documents

    options = RerankOptions(batch_size=batch_size, top_k=top_k)
    check_options(options)
    if not query.strip():
        raise UsageError("empty query", "Pass some text to rank the documents by.")
    if model is None:
        raise UsageError("rerank needs a cross-encoder model", "Pass --model DIR (a sentence-transformers "
                         "CrossEncoder directory or a sequence-classification model with one label).")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    reader = FileTexts()
    texts = collect_inputs(documents or [], file, reader, "document")
    from llmcli.cross_encoders import load_cross_encoder

    with render.status("Loading the cross-encoder"):
        loaded = load_cross_encoder(model, device=device, trust_remote_code=trust_remote_code, threads=threads)
    for notice in loaded.notices:
        render.notice(notice)
    with render.progress("reranking") as (start, advance):
        start(len(texts))
        ranking = rerank_documents(loaded, query, texts, options, on_batch=advance if file else None)
    if ranking.truncated:
        render.notice(f"{ranking.truncated} of {len(texts)} (query, document) pairs were cut to the model's limit of "
                      f"{loaded.max_length} tokens, as sentence-transformers cuts them.")
    if reader.source is not None:
        render.notice(reader.summary("Ranked", len(texts)))
    width = len(str(len(texts) - 1))
    for rank, number in enumerate(ranking.order, 1):
        score = float(ranking.scores[number])
        if json_output:
            render.json_line({"rank": rank, "index": number, "score": score, "text": texts[number]})
        else:
            render.write(f"{score:.4f}  {number:>{width}}  {texts[number]}\n")
