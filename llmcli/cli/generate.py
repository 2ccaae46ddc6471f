"""`llmcli generate`."""


from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import (collect_inputs, launch_if_asked, load_engine, parse_logit_bias, placement_from,
                               started_tools, tool_notice, tool_setup)
from llmcli.cli.options import (completes, ModelOption, DeviceOption, DtypeOption, TrustOption, PickleOption, EngineOption,
                                 ThreadsOption, SchemaOption, RegexOption, GrammarOption, ChoiceOption,
                                 DeviceMapOption, MaxMemoryOption, OffloadDirOption, NumProcessesOption,
                                 NnodesOption, NodeRankOption, MasterAddrOption, MasterPortOption,
                                 PresencePenaltyOption, FrequencyPenaltyOption, LogitBiasOption, CtxSizeOption,
                                 ChatTemplateOption, ReasoningFormatOption, ReasoningOption, ReasoningBudgetOption,
                                 HideReasoningOption, SpeculativeOption, DraftMaxOption, DraftModelOption,
                                 McpOption, ToolsOption, ToolChoiceOption, ApproveOption, MaxToolStepsOption,
                                 ToolTimeoutOption)
from llmcli.errors import UsageError

if TYPE_CHECKING:
    from llmcli.tasks.generate import Generation


@app.command()
def generate(
    prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts; '-' reads them from stdin, one per line.",
                                                           show_default=False, metavar="PROMPT")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read prompts from a file: one per line, "
                                                "or JSONL with 'prompt' or 'messages'.")] = None,
    model: ModelOption = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", "-n", help="Tokens to generate at most. "
                                                          "Default: 256, or what the model's context leaves.",
                                                          show_default=False)] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy; above 0 samples.")] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens (0 = off).")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling threshold in (0, 1].")] = None,
    min_p: Annotated[Optional[float], typer.Option(help="Drop tokens below min-p × the top probability.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option(help="Penalty above 1 discourages repeats.")] = None,
    presence_penalty: PresencePenaltyOption = 0.0,
    frequency_penalty: FrequencyPenaltyOption = 0.0,
    logit_bias: LogitBiasOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed gives the same samples.")] = None,
    num_return_sequences: Annotated[int, typer.Option(help="Samples per prompt (needs --temperature > 0).")] = 1,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop before this string (repeatable).",
                                                      metavar="TEXT")] = None,
    system: Annotated[Optional[str], typer.Option(help="System message for the chat template.")] = None,
    chat_template: ChatTemplateOption = None,
    reasoning_format: ReasoningFormatOption = "auto",
    reasoning: ReasoningOption = "auto",
    reasoning_budget: ReasoningBudgetOption = None,
    hide_reasoning: HideReasoningOption = False,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Apply the chat template. Default: "
                                                 "when the tokenizer has one.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Prompts decoded together: left-padded into one "
                                                      "forward pass on hf; on llama.cpp every prompt and sample of "
                                                      "the batch in one step. Default: 1 on hf, 16 on llama.cpp.",
                                                      show_default=False)] = None,
    draft_model: DraftModelOption = None,
    prompt_lookup: Annotated[Optional[int], typer.Option(help="Propose N tokens per step by matching the prompt "
                                                         "(fast on repetitive text; same greedy output).")] = None,
    speculative: SpeculativeOption = "auto",
    draft_max: DraftMaxOption = 12,
    truncate: Annotated[str, typer.Option(autocompletion=completes("error", "left"), help="A prompt too long for the context: 'error', or 'left' to keep "
                                          "its end.")] = "error",
    ctx_size: CtxSizeOption = None,
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
    fast: Annotated[bool, typer.Option("--fast", help="llama.cpp: the GGUF's own quantized weights (~1.25x, answers "
                                       "differ more from fp32). hf on CPU: bfloat16 weights (~1.5x). hf on CUDA: a "
                                       "static KV cache and a compiled decode step (~8x, after ~45 s of compiling). "
                                       "Close to but not guaranteed token-identical.")] = False,
    stream: Annotated[Optional[bool], typer.Option("--stream/--no-stream", help="Print tokens as they come. "
                                                   "Default: on for a single prompt.", show_default=False)] = None,
    stats: Annotated[bool, typer.Option(help="Print token counts, time to first token, tokens/s, peak memory.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per generated sequence.")] = False,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustOption = False,
    allow_pickle: PickleOption = False,
    num_processes: NumProcessesOption = 1,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    master_addr: MasterAddrOption = "127.0.0.1",
    master_port: MasterPortOption = None,
    device_map: DeviceMapOption = None,
    max_memory: MaxMemoryOption = None,
    offload_dir: OffloadDirOption = None,
) -> None:
    """Generate text from prompts with a causal LM (greedy by default; equals Hugging Face generate on
    the hf engine, llama.cpp's own decoding on the llama.cpp engine)."""
    from llmcli.tasks.generate import GenerateOptions, generate as run_generate, validate

    options = GenerateOptions(
        max_new_tokens=256 if max_new_tokens is None else max_new_tokens, default_length=max_new_tokens is None,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, logit_bias=parse_logit_bias(logit_bias), seed=seed, num_return_sequences=num_return_sequences,
        stop=stop or [], system=system, chat=chat, batch_size=1 if batch_size is None else batch_size,
        prompt_lookup=prompt_lookup, truncate=truncate, speculative=speculative, draft_max=draft_max,
    )
    from dataclasses import replace

    from llmcli.constraints import constraint_from_options

    options = replace(options, constraint=constraint_from_options(schema, regex, grammar, choice))
    validate(options)  # before the slow model load
    from llmcli.reasoning import check_controls, markers

    markers(None, reasoning_format)
    check_controls(reasoning, reasoning_budget)
    check_speculation(options, draft_model)
    setup = tool_setup(mcp, tools, tool_choice, approve, max_tool_steps, tool_timeout, options.constraint)
    if setup is not None:
        several = [name for name, value in (("--num-return-sequences", num_return_sequences > 1),
                                            ("--num-processes", num_processes > 1), ("--nnodes", nnodes > 1)) if value]
        if several:
            raise UsageError(f"--mcp runs one conversation per prompt, and {several[0]} asks for several at once",
                             f"Drop {several[0]}.")
    from llmcli.data import Prompt, read_prompts

    prompt_list = [p if isinstance(p, Prompt) else Prompt(text=p)
                   for p in collect_inputs(prompts or [], file, read_prompts, "prompt")]
    single = len(prompt_list) == 1 and num_return_sequences == 1
    if stream and not single:
        raise UsageError("--stream works with one prompt and one sequence", "Drop --stream.")
    streaming = (single if stream is None else stream) and not json_output
    placement = placement_from(device_map, max_memory, offload_dir, device, num_processes, nnodes)
    launch_if_asked(num_processes, nnodes, node_rank, master_addr, master_port, device)
    from llmcli.distributed import Workers

    workers = Workers(device)
    from llmcli.reasoning import with_thinking

    def load() -> Any:
        runner = load_engine(model, engine, ctx_size, chat_template, command="generate",
                             device=device or workers.device, dtype=dtype, fast=fast, threads=threads,
                             hf_only=hf_only_drafting(draft_model), draft_model=draft_model,
                             trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, placement=placement)
        check_engine_speculation(runner, options, draft_model)
        return runner

    if setup is not None:
        return generate_with_tools(setup, load, prompt_list, options, streaming, json_output, stats)
    runner = load()
    options = with_thinking(runner, options, reasoning_format, reasoning, reasoning_budget, render.notice)
    check_engine_speculation(runner, options, draft_model)  # again: a thinking budget is one more thing to check
    if batch_size is None:
        options = replace(options, batch_size=runner.default_batch_size)
    if workers.size > 1:  # each process generates for its share of the prompts; rank 0 prints them all
        from llmcli.tasks.generate import settle_length, share_options

        options = settle_length(runner, prompt_list, options, render.notice)
        from dataclasses import replace

        produced = workers.map_in_order(list(enumerate(prompt_list)), options.batch_size, lambda share: [
            replace(result, prompt_number=share[0][0] + result.prompt_number)  # numbered in the whole input
            for result in run_generate(runner, [prompt for _, prompt in share], share_options(options, share[0][0]))])
        if not workers.is_main:
            return
        streaming = False
    else:
        show_thinking = not hide_reasoning and not json_output and render.thinking_on_stderr()
        produced = run_generate(runner, prompt_list, options, on_text=render.write if streaming else None,
                                on_notice=render.notice,
                                on_reasoning=render.thinking if streaming and show_thinking else None)
    results = []
    for result in produced:
        results.append(result)
        if json_output:
            render.json_line(render.generation_record(result))
            continue
        if not single:
            render.generation_header(result, show_index=num_return_sequences > 1)
        if not streaming and result.reasoning and not hide_reasoning and render.thinking_on_stderr():
            render.thinking(result.reasoning + "\n")
        if not streaming:
            render.write(result.text)
        render.write("\n")
        if result.incomplete:  # constrained output cut before it was complete: not valid as it stands
            render.notice(incomplete_notice(result, len(prompt_list) > 1 or num_return_sequences > 1))
    if stats:
        render.generation_stats(results, runner.peak_memory_mb(),
                                runner.constraints.seconds if options.constraint is not None else None)


def generate_with_tools(setup: Any, load: Any, prompts: list, options: "GenerateOptions", streaming: bool,
                        json_output: bool, stats: bool) -> None:
    """Each prompt a conversation in which the model may call the MCP servers' tools (llmcli.agent).
    The servers start (and the approvals are checked) before the model loads."""
    from llmcli.agent import answer_prompts

    with started_tools(setup) as toolbox:
        runner = load()
        results = []
        for reply in answer_prompts(runner, prompts, options, toolbox, setup, render.write if streaming else None,
                                    tool_notice, render.notice):
            results.append(reply.generation)
            if json_output:
                render.json_line({**render.generation_record(reply.generation),
                                  "tool_calls": [call.record() for call in reply.calls], "steps": len(reply.prompts)})
                continue
            if len(prompts) > 1:
                render.generation_header(reply.generation, show_index=False)
            if not streaming:
                render.write(reply.text)
            render.write("\n")
        if stats:
            render.generation_stats(results, runner.peak_memory_mb())


def check_speculation(options: "GenerateOptions", draft_model: str | None) -> None:
    """Ways of proposing tokens that contradict each other, refused before the model loads."""
    if draft_model and options.prompt_lookup:
        raise UsageError("--draft-model and --prompt-lookup are two ways to propose tokens", "Choose one.")
    if (draft_model or options.prompt_lookup) and options.speculative == "off":
        raise UsageError(f"{'--draft-model' if draft_model else '--prompt-lookup'} proposes tokens, and "
                         "--speculative off turns proposing off", "Drop one of them.")


def hf_only_drafting(draft_model: str | None) -> list[str]:
    """A draft model that is not a .gguf file runs on the hf engine only."""
    return ["--draft-model"] if draft_model and not draft_model.endswith(".gguf") else []


def check_engine_speculation(runner: Any, options: "GenerateOptions", draft_model: str | None) -> None:
    """What the loaded engine cannot do: hf speculates through --prompt-lookup and --draft-model only, and
    checks no constraint against their proposals."""
    if runner.name != "hf":
        return
    if options.speculative == "on" and not (draft_model or options.prompt_lookup):
        raise UsageError("--speculative on is for the llama.cpp engine", "On hf pass --prompt-lookup N or "
                         "--draft-model MODEL.")
    from llmcli.reasoning import needs_matcher

    if (options.constraint is not None or needs_matcher(options)) and (draft_model or options.prompt_lookup):
        raise UsageError(f"{'--draft-model' if draft_model else '--prompt-lookup'} proposes tokens that the hf "
                         "engine cannot check against a constraint or a --reasoning-budget", "Drop it, or the "
                         "constraint and budget, or use a .gguf model on the llama.cpp engine.")


def incomplete_notice(result: "Generation", several: bool) -> str:
    """One line saying that a constrained text stopped short of what the constraint asks for, and why."""
    which = f" (prompt {result.prompt_number + 1}, sequence {result.index + 1})" if several else ""
    why = (f"at the {result.generated_tokens}-token limit; -n raises it" if result.finish_reason == "length"
           else "at a stop string")
    return f"Warning: the output{which} is incomplete: cut {why}, so it does not satisfy the constraint."
