"""`llmcli info` and `llmcli cache list|rm`."""


from typing import Annotated, Optional

import typer

from llmcli import render
from llmcli.cli.app import app


@app.command()
def info(json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Versions, devices, engines, the embedded model and the model cache."""
    from llmcli.inventory import machine_info

    details = machine_info()
    details["config"] = config_summary()
    if json_output:
        render.json_line(details)
    else:
        render.info_table(details)
        render.config_lines(details["config"])


def config_summary() -> dict:
    """The config file read (checked at start-up), the defaults it sets per command, and LLMCLI_MODEL."""
    import os

    from llmcli.cli.config import config_path, read_config

    path = config_path()
    return {"path": str(path), "found": path.is_file(), "defaults": read_config(path),
            "LLMCLI_MODEL": os.environ.get("LLMCLI_MODEL")}


cache_app = typer.Typer(help="The model cache: GGUF conversions made once (safetensors for hf, F16 for llama.cpp), "
                        "the embedding models' files, and the models 'llmcli pull' put in the Hugging Face cache.",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list(json_output: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per entry.")] = False
               ) -> None:
    """Each cache entry (name, kind, size and what it came from) and their total, then the models in the
    Hugging Face hub cache (pulled: org/name, or org/name:QUANT for a GGUF file)."""
    from llmcli.inventory import cache_entries, hub_entries
    from llmcli.models import cache_root

    own, hub = cache_entries(), hub_entries()
    for entry in own + hub:
        if json_output:
            render.json_line(entry.__dict__)
        else:
            size = render.human_size(entry.size_bytes)
            render.write(f"{entry.name}  {entry.kind}  {size}  {entry.source or ''}".rstrip() + "\n")
    if json_output:
        return
    if own:
        render.write(f"total  {render.human_size(sum(e.size_bytes for e in own))} in {cache_root()} "
                     "(llmcli cache rm NAME|--all)\n")
    else:
        render.notice(f"The cache at {cache_root()} is empty.")


@cache_app.command("rm")
def cache_rm(
    name: Annotated[Optional[str], typer.Argument(help="An entry's name (or a unique start of it), from "
                                                       "'llmcli cache list'; a pulled model: org/name (the whole "
                                                       "repository) or org/name:QUANT (that GGUF file).",
                                                  show_default=False, metavar="NAME")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Remove every entry of llmcli's own (conversions, "
                                             "embedding models), not the shared Hugging Face cache.")] = False,
) -> None:
    """Remove one cache entry, or all of llmcli's own with --all (each is rebuilt when next needed); a pulled
    model is gone until pulled again."""
    from llmcli.inventory import remove_cache_entries

    for removed in remove_cache_entries(name, everything):
        render.notice(f"Removed {removed}")
