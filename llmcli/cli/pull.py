"""`llmcli pull`."""


from typing import Annotated

import typer

from llmcli import render
from llmcli.cli.app import app


@app.command()
def pull(
    model: Annotated[str, typer.Argument(help="org/name: a transformers model (config, tokenizer, chat template, "
                                         "safetensors weights); org/name:QUANT: the GGUF file of that quantization "
                                         "in a repository of GGUFs (Q4_K_M, Q8_0, ...; any case).", metavar="MODEL",
                                         show_default=False)],
    revision: Annotated[str, typer.Option(help="A branch, tag or commit of the repository.")] = "main",
    allow_pickle: Annotated[bool, typer.Option(help="Download pickle weights (*.bin), which can run code when "
                                               "loaded, from a repository that has no safetensors.")] = False,
) -> None:
    """Download a model from the Hugging Face hub (HF_ENDPOINT, HF_TOKEN) into its cache, where -m finds it
    offline. Resumes an interrupted download; checks every file against the hub's hashes."""
    from llmcli.tasks.pull import pull as run_pull

    with render.progress(f"Pulling {model}", in_bytes=True) as (start, advance):
        try:
            result = run_pull(model, revision, allow_pickle, on_start=start, on_advance=advance,
                              on_notice=render.notice)
        except KeyboardInterrupt:
            render.notice("The partial download is kept: the same pull continues it.")
            raise
    resumed = sum(result.resumed_from.values())
    how = f"downloaded {render.human_size(result.downloaded_bytes)}" + (
        f", continuing {render.human_size(resumed)} of an earlier pull" if resumed else "")
    if len(result.cached) == len(result.files):
        how = "already in the cache"
    else:
        how += ", checked against the hub's hashes"
    render.notice(f"Pulled {result.name} ({len(result.files)} file{'s' * (len(result.files) != 1)}, {how}) into "
                  f"{result.path}.")
    render.notice(f"Run it with: llmcli generate -m {result.name} \"...\"")
