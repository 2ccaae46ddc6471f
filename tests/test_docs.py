"""The documentation cannot drift from the product: every `$ llmcli ...` line in a ```console block of
README.md or docs/*.md must parse against the real command line (an option renamed or removed, or a
value that no longer validates, fails here), the blocks marked `<!-- test: run -->` run on the
embedded model and must print what they show, and the site builds with `mkdocs build --strict`.

A run marker takes two settings:
    <!-- test: run [exit=N] [output=exact|shape|none] -->
exit is the status the command must end with (0 unless given); output says how the lines shown under
a command are compared with what it printed (stdout and stderr together, whitespace collapsed):
exact: each shown line is one of the printed lines (deterministic output: greedy text on the
embedded model, errors, --help); shape: the same, with every number free (timings, token counts
that vary with the host); none: the output shown is illustrative and only the exit status counts.
A shown line of "..." stands for lines left out.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*test:\s*run\b(?P<settings>[^>]*)-->")
PROMPT = re.compile(r"^[\w.-]*\$ (?P<command>.*)$")  # "$ llmcli ...", "machine-a$ llmcli ..."
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "<", "2>", "2>&1", "&"}


@dataclass
class Example:
    """One command of a console block, with the lines the doc shows under it."""

    path: Path
    line: int
    command: str
    shown: list[str] = field(default_factory=list)
    run: dict[str, str] | None = None  # the block's run marker's settings; None: parse only

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def is_llmcli(self) -> bool:
        return llmcli_position(shlex.split(self.command, comments=True)) is not None


def console_examples(text: str, path: Path = ROOT / "README.md") -> list[Example]:
    """The commands of every ```console block, in order; a block's run marker is the last non-blank
    line before its fence."""
    examples: list[Example] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```console":
            i += 1
            continue
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        marker = MARKER.search(before)
        run = parse_settings(marker["settings"]) if marker else None
        i += 1
        current: Example | None = None
        while i < len(lines) and lines[i].strip() != "```":
            prompt = PROMPT.match(lines[i])
            if prompt:
                start, command = i, prompt["command"]
                while command.endswith("\\") and i + 1 < len(lines):  # a command continued on the next line
                    i += 1
                    command = command[:-1] + " " + lines[i].strip()
                current = Example(path, start + 1, command, run=run)
                examples.append(current)
            elif current is not None:
                current.shown.append(lines[i])
            i += 1
        i += 1
    return examples


def parse_settings(settings: str) -> dict[str, str]:
    found = dict(pair.split("=", 1) for pair in settings.split())
    unknown = set(found) - {"exit", "output"}
    assert not unknown, f"unknown run-marker settings {sorted(unknown)}: use exit=N and output=exact|shape|none"
    assert found.get("output", "exact") in {"exact", "shape", "none"}, f"output={found['output']}"
    return found


def llmcli_position(words: list[str]) -> int | None:
    """Where `llmcli` starts the command line or a command of its pipeline (`printf ... | llmcli chat`)."""
    for i, word in enumerate(words):
        if word == "llmcli" and (i == 0 or words[i - 1] in SHELL_OPERATORS):
            return i
    return None


def llmcli_arguments(command: str) -> list[str]:
    """The arguments after `llmcli`, up to the next pipe or redirection; shell comments dropped."""
    words = shlex.split(command, comments=True)
    start = llmcli_position(words)
    assert start is not None, command
    arguments = []
    for word in words[start + 1:]:
        if word in SHELL_OPERATORS:
            break
        arguments.append(word)
    return arguments


def parse_command_line(arguments: list[str]):
    """Parse as `llmcli` would, down to the command that runs, without running it: unknown options,
    missing arguments and values that do not validate raise click's usage errors."""
    import typer

    from llmcli.cli import app, with_resume_default

    command = typer.main.get_command(app)
    if "--help" in arguments or "-h" in arguments:  # help is printed before anything else is checked:
        for name in arguments[:arguments.index("--help" if "--help" in arguments else "-h")]:  # the names
            assert hasattr(command, "commands") and name in command.commands, f"no command {name!r}"
            command = command.commands[name]
        return None
    context = command.make_context("llmcli", with_resume_default(arguments))
    while hasattr(command, "resolve_command"):  # a group: descend into the named subcommand
        rest = [*getattr(context, "_protected_args", []), *getattr(context, "protected_args", []), *context.args]
        if not rest:
            break
        name, command, rest = command.resolve_command(context, rest)
        context = command.make_context(name, rest, parent=context)
    return context


def shown_lines_missing(shown: list[str], printed: str, output: str) -> list[str]:
    """The lines shown in the doc that the command did not print (see the module's docstring)."""
    if output == "none":
        return []
    normalize = lambda line: " ".join(line.split())  # noqa: E731
    printed_lines = [normalize(line) for line in printed.splitlines()]
    missing = []
    for line in map(normalize, shown):
        if not line or line == "...":
            continue
        if output == "exact":
            found = line in printed_lines
        else:
            pattern = re.compile(r"\d+(?:\.\d+)?".join(map(re.escape, re.split(r"\d+(?:\.\d+)?", line))))
            found = any(pattern.fullmatch(candidate) for candidate in printed_lines)
        if not found:
            missing.append(line)
    return missing


ALL_EXAMPLES = [example for path in DOC_FILES for example in console_examples(path.read_text(), path)]
LLMCLI_EXAMPLES = [example for example in ALL_EXAMPLES if example.is_llmcli]
RUN_EXAMPLES = [example for example in LLMCLI_EXAMPLES if example.run is not None]


def test_the_docs_have_examples_of_every_command():
    """Collection itself can break (a changed fence or prompt): then nothing would be checked."""
    from llmcli.cli import app
    import typer

    commands = set(typer.main.get_command(app).commands)
    used = {llmcli_arguments(example.command)[0] for example in LLMCLI_EXAMPLES}
    assert commands <= used, f"no console example of {sorted(commands - used)}"
    assert len(RUN_EXAMPLES) >= 5


@pytest.mark.parametrize("example", LLMCLI_EXAMPLES, ids=lambda example: example.where)
def test_a_console_example_parses_against_the_cli(example):
    try:
        parse_command_line(llmcli_arguments(example.command))
    except Exception as exc:  # click's UsageError and BadParameter, from typer's own copy of click
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        pytest.fail(f"{example.where}: `{example.command}` does not parse: {message}")


def test_a_misspelt_option_or_a_bad_value_does_not_parse():
    doc = "```console\n$ llmcli generate \"hi\" --max-new-token 8\n$ llmcli generate \"hi\" -n eight\n```\n"
    misspelt, bad_value = console_examples(doc)
    with pytest.raises(Exception, match="No such option: --max-new-token"):
        parse_command_line(llmcli_arguments(misspelt.command))
    with pytest.raises(Exception, match="'eight' is not a valid int"):
        parse_command_line(llmcli_arguments(bad_value.command))


def documented_options(page: str) -> tuple[list[str], set[str]]:
    """The commands a page is about (from its title, "# `llmcli generate`") and the options its
    reference text names: an `| option |` table's first column, and everything in an "## Options" section."""
    commands = re.findall(r"`llmcli ([\w-]+)", page.split("\n", 1)[0])
    option = re.compile(r"(?<![\w-])--[a-z][\w-]*")
    options = set()
    for section in re.findall(r"^## Options[^\n]*\n(.*?)(?=^## |\Z)", page, re.S | re.M):
        options |= set(option.findall(section))
    for table in re.findall(r"^\| option \|.*?(?=\n\n|\Z)", page, re.S | re.M):
        for row in table.strip().split("\n")[2:]:
            options |= set(option.findall(row.split("|")[1]))
    return commands, options


@pytest.mark.parametrize("path", [path for path in DOC_FILES if documented_options(path.read_text())[0]],
                         ids=lambda path: path.name)
def test_the_options_a_command_page_documents_exist(path):
    """Option tables and lists are prose, not examples: a renamed or removed option would stay in them."""
    commands, options = documented_options(path.read_text())
    assert options_lacking(commands, options) == set(), f"{path.name} documents options that {commands} lack"


def options_lacking(commands: list[str], options: set[str]) -> set[str]:
    import typer

    from llmcli.cli import app

    group = typer.main.get_command(app)
    known = {name for command in commands for param in group.commands[command].params
             for name in [*param.opts, *getattr(param, "secondary_opts", [])]}
    return options - known


def test_a_misspelt_option_in_an_options_table_is_found():
    page = "# `llmcli generate`\n\n| option | meaning |\n|---|---|\n| `--top-k`, `--top-q` | sampling |\n"
    assert options_lacking(*documented_options(page)) == {"--top-q"}


def test_the_quick_start_names_make_targets_that_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for path in DOC_FILES:
        for block in re.findall(r"```console\n(.*?)```", path.read_text(), re.S):
            for target in re.findall(r"^make ([\w-]+)", block, re.M):
                assert target in targets, f"{path.relative_to(ROOT)}: `make {target}` is not a Makefile target"


def test_the_readmes_links_point_at_files_that_exist():
    """README.md is not part of the site (mkdocs checks the links inside docs/), so its own links are
    checked here."""
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text()):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_shown_output_is_compared_line_by_line():
    printed = "Using the embedded model.\nyes\ntokens/s             22.1\n"
    assert shown_lines_missing(["yes", "...", "tokens/s   22.1"], printed, "exact") == []
    assert shown_lines_missing(["no"], printed, "exact") == ["no"]
    assert shown_lines_missing(["ye"], printed, "exact") == ["ye"]  # whole lines, not substrings
    assert shown_lines_missing(["tokens/s 48.0"], printed, "exact") == ["tokens/s 48.0"]
    assert shown_lines_missing(["tokens/s 48.0"], printed, "shape") == []
    assert shown_lines_missing(["tokens per second 48.0"], printed, "shape") == ["tokens per second 48.0"]
    assert shown_lines_missing(["anything"], printed, "none") == []


@pytest.fixture(scope="module")
def shell_with_llmcli(tmp_path_factory):
    """A folder for the commands to run in (what they write lands there, with examples/ linked in), and
    a PATH on which `llmcli` is this checkout's, run by this Python."""
    folder = tmp_path_factory.mktemp("docs-examples")
    (folder / "examples").symlink_to(ROOT / "examples")
    bin_dir = tmp_path_factory.mktemp("bin")
    shim = bin_dir / "llmcli"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llmcli "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), NO_COLOR="1",
               COLUMNS="100", TERM="dumb")
    return folder, env


@pytest.mark.slow
@pytest.mark.parametrize("example", RUN_EXAMPLES, ids=lambda example: example.where)
def test_a_marked_example_prints_what_the_doc_shows(example, shell_with_llmcli):
    pytest.importorskip("llama_cpp")  # the examples show the embedded model on its default engine
    folder, env = shell_with_llmcli
    result = subprocess.run(["bash", "-c", example.command], cwd=folder, env=env, capture_output=True,
                            text=True, timeout=300)
    printed = result.stdout + result.stderr
    expected_exit = int(example.run.get("exit", 0))
    assert result.returncode == expected_exit, \
        f"{example.where}: `{example.command}` exited {result.returncode}, not {expected_exit}:\n{printed}"
    missing = shown_lines_missing(example.shown, printed, example.run.get("output", "exact"))
    assert not missing, f"{example.where}: `{example.command}` did not print {missing}; it printed:\n{printed}"


def test_the_site_builds_strictly(tmp_path):
    """Every page is in the nav, and every link and heading anchor resolves (mkdocs.yml's validation
    settings, turned into failures by --strict). Skipped where the docs extra is not installed."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert result.returncode == 0, result.stdout + result.stderr
