"""`llmcli chat`."""


import sys
from typing import Annotated, Callable, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import Terminated, load_engine, parse_logit_bias, started_tools, tool_notice, tool_setup
from llmcli.cli.options import (ModelOption, DeviceOption, DtypeOption, TrustOption, PickleOption, EngineOption,
                                 ThreadsOption, SchemaOption, RegexOption, GrammarOption, ChoiceOption,
                                 PresencePenaltyOption, FrequencyPenaltyOption, LogitBiasOption, CtxSizeOption,
                                 ChatTemplateOption, ReasoningFormatOption, ReasoningOption, ReasoningBudgetOption,
                                 HideReasoningOption, SpeculativeOption, DraftMaxOption, DraftModelOption,
                                 McpOption, ToolsOption, ToolChoiceOption, ApproveOption, MaxToolStepsOption,
                                 ToolTimeoutOption)
from llmcli.errors import LlmcliError


@app.command()
def chat(
    model: ModelOption = None,
    system: Annotated[Optional[str], typer.Option(help="System message (change it later with /system).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="Tokens per reply at most. "
                                                          "Default: 512, or what the model's context leaves.",
                                                          show_default=False)] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy; above 0 samples.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens.")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling threshold in (0, 1].")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below min-p × the top probability.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="Penalty above 1 discourages repeats.")] = None,
    presence_penalty: PresencePenaltyOption = 0.0,
    frequency_penalty: FrequencyPenaltyOption = 0.0,
    logit_bias: LogitBiasOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option(help="End a reply before this string (repeatable).",
                                                      metavar="TEXT")] = None,
    schema: SchemaOption = None,
    regex: RegexOption = None,
    grammar: GrammarOption = None,
    choice: ChoiceOption = None,
    mcp: McpOption = None,
    tools: ToolsOption = None,
    tool_choice: ToolChoiceOption = "auto",
    approve: ApproveOption = None,
    max_tool_steps: MaxToolStepsOption = 8,
    tool_timeout: ToolTimeoutOption = 60.0,
    chat_template: ChatTemplateOption = None,
    reasoning_format: ReasoningFormatOption = "auto",
    reasoning: ReasoningOption = "auto",
    reasoning_budget: ReasoningBudgetOption = None,
    hide_reasoning: HideReasoningOption = False,
    ctx_size: CtxSizeOption = None,
    fast: Annotated[bool, typer.Option("--fast", help="As for generate: quantized weights on llama.cpp, bfloat16 "
                                       "on the CPU with hf.")] = False,
    speculative: SpeculativeOption = "auto",
    draft_max: DraftMaxOption = 12,
    draft_model: DraftModelOption = None,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustOption = False,
    allow_pickle: PickleOption = False,
) -> None:
    """Chat interactively, keeping the conversation. Commands: /reset, /system TEXT, /save FILE, /load FILE,
    /exit (or Ctrl-D). A --schema, --regex, --grammar or --choice constrains every reply. A model without
    a chat template gets plain User:/Assistant: lines (or pass --chat-template FILE). With --mcp the model
    may call the servers' tools: each call is shown and asked for (y / n / a = always for this tool) unless
    --approve covers it."""
    from llmcli.constraints import constraint_from_options
    from llmcli.tasks.generate import GenerateOptions, validate

    options = GenerateOptions(
        max_new_tokens=512 if max_new_tokens is None else max_new_tokens, default_length=max_new_tokens is None,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, logit_bias=parse_logit_bias(logit_bias), seed=seed, chat=True,
        stop=stop or [], speculative=speculative, draft_max=draft_max,
        constraint=constraint_from_options(schema, regex, grammar, choice),
    )
    validate(options)
    from llmcli.reasoning import check_controls, markers

    markers(None, reasoning_format)
    check_controls(reasoning, reasoning_budget)
    thinking = (reasoning_format, reasoning, reasoning_budget, hide_reasoning)
    setup = tool_setup(mcp, tools, tool_choice, approve, max_tool_steps, tool_timeout, options.constraint,
                       ask=ask_consent)
    if setup is None:
        return converse(options, system, model, engine, ctx_size, chat_template, device, dtype, fast, threads,
                        trust_remote_code, allow_pickle, draft_model, thinking)
    with started_tools(setup) as toolbox:
        converse(options, system, model, engine, ctx_size, chat_template, device, dtype, fast, threads,
                 trust_remote_code, allow_pickle, draft_model, thinking, (setup, toolbox))


def converse(options, system, model, engine, ctx_size, chat_template, device, dtype, fast, threads,
             trust_remote_code, allow_pickle, draft_model, thinking, tools=None) -> None:
    """Load the model and hold the conversation (`thinking`: the reasoning options and --hide-reasoning;
    with `tools`: agent.ToolSetup and its toolbox)."""
    from llmcli.reasoning import with_thinking
    from llmcli.tasks.chat import ChatSession
    from llmcli.cli.generate import check_engine_speculation, check_speculation, hf_only_drafting

    check_speculation(options, draft_model)
    runner = load_engine(model, engine, ctx_size, chat_template, command="chat", device=device, dtype=dtype,
                         fast=fast, threads=threads, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                         hf_only=hf_only_drafting(draft_model), draft_model=draft_model)
    if not runner.chat_template:
        from llmcli.tasks.chat import plain_chat

        options = plain_chat(runner, options)
        render.notice("This model has no chat template: the conversation is written as plain 'User:' and "
                      "'Assistant:' lines (--chat-template FILE gives it another).")
    reasoning_format, reasoning, reasoning_budget, hide_reasoning = thinking
    options = with_thinking(runner, options, reasoning_format, reasoning, reasoning_budget, render.notice)
    check_engine_speculation(runner, options, draft_model)
    runner.constraints.compile(options.constraint)  # a constraint the vocabulary cannot express fails now, once
    session = ChatSession(runner, options, system=system, on_notice=render.notice, tools=tools,
                          on_call=tool_notice)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        from llmcli.tasks.chat import HELP

        render.notice("Type a message. " + HELP)
    while True:
        try:
            line = read_message(lambda first: input((">>> " if first else "... ") if interactive else ""))
        except EOFError:  # Ctrl-D: leave, with the shell's prompt on a line of its own
            if interactive:
                render.write("\n")
            break
        except KeyboardInterrupt:  # Ctrl-C at the idle prompt leaves: exit 130, as every interrupt does
            render.write("\n")
            raise
        try:
            reply = session.handle(line, on_text=render.write,
                                   on_reasoning=None if hide_reasoning else render.chat_thinking)
        except LlmcliError as exc:  # one message that cannot be answered: the conversation goes on
            render.error(exc.message, exc.hint)
            continue
        except KeyboardInterrupt as interrupt:
            # Ctrl-C during a reply stops it and keeps the conversation (as ollama and llama-cli do);
            # SIGTERM, or a script's interrupt, still ends the session
            if not interactive or isinstance(interrupt, Terminated):
                render.write("\n")
                raise
            render.write("\n")
            render.notice("Reply stopped (kept in the conversation as far as it got); Ctrl-C again at the prompt "
                          "leaves.")
            continue
        if reply is None:
            break
        if reply:
            render.notice(reply)
        else:
            render.write("\n")
            if session.cut:
                render.notice(f"(reply cut at {session.cut} tokens; -n sets the limit)")


def ask_consent(name: str, arguments: dict) -> str:
    """Whether a tool call may run: y, n, or always (for this tool, for the rest of the chat). The
    question reads the next line of input, as a message does; end of input refuses."""
    interactive = sys.stdin.isatty()
    try:
        answer = input(f"Run {name}? [y]es / [n]o / [a]lways for this tool: " if interactive else "")
    except EOFError:
        return "n"
    return {"y": "y", "yes": "y", "a": "always", "always": "always"}.get(answer.strip().lower(), "n")


def read_message(read_line: Callable[[bool], str]) -> str:
    """One chat message: a line, or the lines between two lines of \"\"\" (ollama's multi-line mode)."""
    line = read_line(True)
    if not line.strip().startswith('"""'):
        return line
    lines = [line.strip()[3:]]
    while not lines[-1].rstrip().endswith('"""'):
        lines.append(read_line(False))
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines).strip()
