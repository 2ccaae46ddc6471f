"""What several commands do before their task runs: launch workers, check placement, load the
engine, gather inputs."""


import sys
from contextlib import contextmanager

import typer

from llmcli import render
from llmcli.cli import app as app_state
from llmcli.errors import UsageError


def launch_if_asked(num_processes: int, nnodes: int, node_rank: int, master_addr: str, master_port: int | None,
                    device: str | None) -> None:
    """With --num-processes/--nnodes (and not already a worker): run this command line in workers, and
    exit with their result."""
    from llmcli.distributed import Launch, launch

    request = Launch(num_processes, nnodes, node_rank, master_addr, master_port)
    request.validate()
    if request.wanted:
        raise typer.Exit(launch(request, device, app_state.command_line, app_state.debug_mode))


def check_fsdp(device: str | None) -> None:
    """On the CPU accelerate silently drops FSDP and every process would train a whole unsharded copy."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        raise UsageError("--fsdp shards over GPUs, and this run is on the CPU (accelerate would silently train "
                         "unsharded copies)", "Drop --fsdp; --num-processes trains data parallel on the CPU.")
    raise UsageError("--fsdp is not available yet: its sharded checkpoints and exact resume are untested on GPUs",
                     "Drop --fsdp; --num-processes N trains data parallel, one GPU per process.")


def placement_from(device_map: str | None, max_memory: list[str] | None, offload_dir: str | None,
                   device: str | None, num_processes: int, nnodes: int):
    """--device-map and its companions as models.Placement (None without --device-map), checked."""
    from llmcli.models import DEVICE_MAPS, Placement, parse_max_memory

    if device_map is None:
        if max_memory or offload_dir:
            raise UsageError(f"{'--max-memory' if max_memory else '--offload-dir'} works with --device-map",
                             "Add --device-map auto.")
        return None
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"unknown --device-map {device_map!r}", f"Use one of {', '.join(DEVICE_MAPS)}.")
    if device not in (None, "cpu"):
        raise UsageError(f"--device-map places the model itself; --device {device} asks for one device",
                         "Choose one (--device cpu with --device-map keeps it to CPU memory and disk).")
    if num_processes > 1 or nnodes > 1:
        raise UsageError("--device-map spreads one model over the devices; --num-processes gives each process "
                         "its own copy", "Choose one.")
    limits = parse_max_memory(max_memory or [])
    if device == "cpu":  # CPU memory and disk only: accelerate would otherwise also fill any GPU
        if any(isinstance(name, int) for name in limits):
            raise UsageError("--device cpu and a GPU in --max-memory", "Drop one.")
        import psutil

        limits.setdefault("cpu", psutil.virtual_memory().available)
    return Placement(device_map, limits, offload_dir)


def load_engine(model: str | None, engine: str = "hf", ctx_size: int | None = None, chat_template: str | None = None,
                **choices):
    """The model on its engine (see engines.choose_engine), with notices on stderr and a spinner; then
    --ctx-size and --chat-template FILE applied to it (both checked before the slow load)."""
    from llmcli.engines import choose_engine

    if ctx_size is not None and ctx_size < 16:
        raise UsageError(f"--ctx-size must be at least 16 tokens, got {ctx_size}")
    template = read_chat_template(chat_template) if chat_template is not None else None
    with render.status("Loading"):
        runner = choose_engine(model, engine, on_notice=render.notice, **choices)
    if ctx_size is not None:
        if runner.context_length and ctx_size > runner.context_length:
            raise UsageError(f"--ctx-size {ctx_size} is more than this model's trained context of "
                             f"{runner.context_length} tokens", f"Pass at most {runner.context_length}.")
        runner.context_length = ctx_size  # every length rule (prompt fit, default -n, chat history) reads it
    if template is not None:
        runner.chat_template = template  # both engines render what this attribute holds
    return runner


def read_chat_template(path: str) -> str:
    """A chat template file's text, checked to be valid Jinja (a syntax error names its line)."""
    from jinja2 import TemplateSyntaxError

    from llmcli.engines.chat_template import compile_template

    try:
        with open(path, encoding="utf-8") as file:
            source = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --chat-template {path}: {getattr(exc, 'strerror', None) or exc}",
                         "Pass a Jinja chat template file.") from None
    if not source.strip():
        raise UsageError(f"--chat-template {path} is empty", "Pass a Jinja chat template file.")
    try:
        compile_template(source)
    except TemplateSyntaxError as exc:
        raise UsageError(f"--chat-template {path} line {exc.lineno}: {exc.message}",
                         "Fix the template (Jinja syntax, as transformers renders it).") from None
    return source


def collect_inputs(arguments: list[str], file: str | None, read, what: str) -> list:
    """Inputs from arguments, '-' (stdin) or --file, read with `read` (a data.py reader)."""
    from llmcli.data import STDIN

    if file is not None and arguments:
        raise UsageError(f"give {what}s as arguments or with --file, not both")
    if file is not None:
        return read(file)
    if arguments == [STDIN]:
        return read(STDIN)
    if not arguments and not sys.stdin.isatty():  # `echo hi | llmcli generate` reads the pipe, as `llm` does
        import io

        data = sys.stdin.buffer.read()
        if data.strip():
            sys.stdin = io.TextIOWrapper(io.BytesIO(data))  # read again below, as '-' reads it
            return read(STDIN)
    if not arguments:
        raise UsageError(f"no {what} given", f"Pass a {what}, '-' to read stdin, or --file PATH.")
    if any(not a.strip() for a in arguments):
        raise UsageError(f"empty {what}", "Pass some text.")
    return arguments


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled as Ctrl-C everywhere, except that it never just stops a chat reply."""


def parse_logit_bias(items: list[str] | None) -> dict[int, float]:
    """`--logit-bias 504=-100 --logit-bias 42=5` -> {504: -100.0, 42: 5.0}."""
    biases: dict[int, float] = {}
    for item in items or []:
        token, _, bias = item.partition("=")
        try:
            biases[int(token)] = float(bias)  # no '=' leaves bias empty: refused too
        except ValueError:
            raise UsageError(f"bad --logit-bias {item!r}", "Write ID=BIAS, a token id and a number: 504=-100.") from None
    return biases


def tool_setup(mcp: str | None, tools: str | None, tool_choice: str, approve: list[str] | None,
               max_tool_steps: int, tool_timeout: float, constraint: object = None,
               ask: object = None):
    """The tool options checked (before the model loads) into an agent.ToolSetup, or None without --mcp.
    `ask` is how consent is asked for (chat); None refuses what --approve does not cover (generate)."""
    from llmcli.agent import AgentOptions, Consent, ToolSetup
    from llmcli.mcp_tools import read_config

    if mcp is None:
        given = [name for name, value in (("--tools", tools), ("--approve", approve)) if value]
        given += ["--tool-choice"] if tool_choice != "auto" else []
        if given:
            raise UsageError(f"{', '.join(given)} choose among MCP tools, and no --mcp FILE is given", "Add --mcp FILE.json.")
        return None
    import importlib.util

    if importlib.util.find_spec("mcp") is None:
        raise UsageError("--mcp needs the MCP SDK, which is not installed", "pip install 'llmcli[mcp]'")
    if constraint is not None:
        raise UsageError("--schema, --regex, --grammar and --choice constrain the whole reply, which with --mcp is "
                         "the tool calls' format", "Drop the constraint, or --mcp.")
    if max_tool_steps < 1:
        raise UsageError(f"--max-tool-steps must be at least 1, got {max_tool_steps}", "Use --tool-choice none "
                         "for no tools.")
    if tool_timeout <= 0:
        raise UsageError(f"--tool-timeout must be above 0 seconds, got {tool_timeout}")
    only = names_list(tools) if tools else None
    approved = set(name for item in approve or [] for name in names_list(item))
    return ToolSetup(read_config(mcp), only, AgentOptions(tool_choice, max_tool_steps), Consent(approved, ask),
                     tool_timeout)


@contextmanager
def started_tools(setup):
    """The MCP servers started and their tools listed and checked (the choice names one, generate has
    approved them all); stopped when the command ends, however it ends."""
    from llmcli.agent import check_approved, check_choice
    from llmcli.mcp_tools import McpTools, McpToolbox

    with McpTools(setup.servers, setup.timeout) as hub:
        toolbox = McpToolbox(hub, setup.only)
        with render.status("Starting MCP servers"):
            offered = toolbox.offered()
        check_choice(setup.agent, offered)
        check_approved(setup.consent, offered)
        yield toolbox


def tool_notice(name: str, arguments: dict) -> None:
    import json

    render.notice(f"Tool call: {name} {json.dumps(arguments, ensure_ascii=False)}")


def names_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]
