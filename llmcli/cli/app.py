"""The typer application and its root options (--version, --debug); each command registers itself
on `app` from a module of its own."""

from typing import Annotated

import typer

from llmcli import __version__

app = typer.Typer(
    name="llmcli",
    help="Pretrained language models from the shell: generate, chat, fill-mask, finetune, eval. "
    "Offline by default.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion (shellingham is imported only then)
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text: skips importing markdown-it (~60 ms of startup)
    context_settings={"help_option_names": ["-h", "--help"]},
)

debug_mode = False
command_line: list[str] = []  # the arguments this process was started with: what launched workers run


def version_callback(value: bool) -> None:
    if value:
        print(f"llmcli {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=version_callback, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    global debug_mode
    debug_mode = debug
    if debug:  # models.quiet_libraries leaves library output alone then
        import os

        os.environ["LLMCLI_DEBUG"] = "1"
