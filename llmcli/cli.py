"""The command line: option declarations and validation only; the work happens in `llmcli.tasks`.

Nothing heavy is imported at module level, so `llmcli --help` does not load torch or transformers.
"""

from __future__ import annotations

import sys
import traceback
from typing import Annotated, Callable, Optional

import typer

try:  # typer 0.2x vendors its own click, whose exceptions are not click's
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException, NoArgsIsHelpError

from llmcli import __version__, render
from llmcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, LlmcliError, UsageError

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


def _argument_type_label(argument: object, ctx: object) -> str | None:
    """typer 0.2x labels a positional argument with its Python type ("TEXT <list[str]>"); where we
    name the argument (metavar), that name is the label and the usage line already shows "...". """
    if getattr(argument, "metavar", None) is not None:
        return None
    return _typer_argument_type_label(argument, ctx)


if hasattr(typer.core, "TyperArgument"):
    _typer_argument_type_label = typer.core.TyperArgument.display_type_rich
    typer.core.TyperArgument.display_type_rich = _argument_type_label

# Options shared by the commands that load a model.
ModelOption = Annotated[
    Optional[str],
    typer.Option("--model", "-m", help="Hub id, local save_pretrained dir, .gguf file, or 'smollm2'. "
                 "Default: the embedded SmolLM2-135M-Instruct."),
]
DeviceOption = Annotated[Optional[str], typer.Option(envvar="LLMCLI_DEVICE", show_envvar=True,
                                                     help="cpu, cuda, cuda:N or mps. Default: accelerate's choice.")]
DtypeOption = Annotated[str, typer.Option(help="auto (bf16 on capable GPUs, else fp32), float32, bfloat16, float16.")]
# Commands whose output is a score default to float32, so that scores match the references on any machine
ScoringDtypeOption = Annotated[str, typer.Option(help="float32, so scores do not depend on the machine; auto, "
                                                 "bfloat16 or float16 trade exactness for speed.")]
TrustOption = Annotated[bool, typer.Option(help="Allow the model repository's own Python code to run.")]
PickleOption = Annotated[bool, typer.Option(help="Allow pickle weights (*.bin), which can run code when loaded; "
                                            "safetensors are always preferred.")]
EngineOption = Annotated[str, typer.Option(help="auto (llama.cpp for .gguf models when installed, else hf), hf "
                                           "(transformers) or llama.cpp.")]
ThreadsOption = Annotated[Optional[int], typer.Option(help="CPU threads. Default: the physical cores.",
                                                      show_default=False)]
# accelerate's big-model inference (hf engine): a model bigger than one device
# structured output (llmcli.constraints): generate and chat
SchemaOption = Annotated[Optional[str], typer.Option(help="Output valid for this JSON schema (a file or inline JSON; "
                                                     "'json' for any JSON object).", show_default=False)]
RegexOption = Annotated[Optional[str], typer.Option(help="Output matching this regular expression.",
                                                    show_default=False)]
GrammarOption = Annotated[Optional[str], typer.Option(help="Output in this Lark grammar (a file).", show_default=False)]
ChoiceOption = Annotated[Optional[list[str]], typer.Option(help="Output exactly one of these (repeatable).",
                                                           show_default=False, metavar="TEXT")]
DeviceMapOption = Annotated[Optional[str], typer.Option(help="Spread the layers over GPUs, CPU memory and disk: "
                                                        "auto (or balanced, sequential). hf engine.",
                                                        show_default=False, rich_help_panel="Big models")]
MaxMemoryOption = Annotated[Optional[list[str]], typer.Option(metavar="DEVICE=SIZE", help="With --device-map: memory "
                                                              "one device may hold, e.g. cpu=2GiB or 0=20GiB "
                                                              "(repeatable).", rich_help_panel="Big models")]
OffloadDirOption = Annotated[Optional[str], typer.Option(help="With --device-map: where layers that fit no device go "
                                                         "(a fresh folder inside it, removed at exit). Default: a "
                                                         "temporary folder.", show_default=False,
                                                         rich_help_panel="Big models")]
# Launching one command on N processes and N machines (distributed.py); under an outside launcher
# (torchrun, accelerate launch) these are not needed: the command sees LOCAL_RANK and runs as a worker.
NumProcessesOption = Annotated[int, typer.Option(help="Processes on this machine (data parallel; one GPU each, "
                                                 "or gloo on CPU).", rich_help_panel="Processes")]
NnodesOption = Annotated[int, typer.Option(help="Machines taking part (start the same command on each).",
                                           rich_help_panel="Processes")]
NodeRankOption = Annotated[int, typer.Option(help="This machine's number, 0..nnodes-1 (0 hosts the rendezvous).",
                                             rich_help_panel="Processes")]
MasterAddrOption = Annotated[str, typer.Option(help="Machine 0's address, as the others reach it.",
                                               rich_help_panel="Processes")]
MasterPortOption = Annotated[Optional[int], typer.Option(help="A free TCP port on machine 0 (needed with --nnodes "
                                                         "above 1).", show_default=False,
                                                         rich_help_panel="Processes")]


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


def launch_if_asked(num_processes: int, nnodes: int, node_rank: int, master_addr: str, master_port: int | None,
                    device: str | None) -> None:
    """With --num-processes/--nnodes (and not already a worker): run this command line in workers, and
    exit with their result."""
    from llmcli.distributed import Launch, launch

    request = Launch(num_processes, nnodes, node_rank, master_addr, master_port)
    request.validate()
    if request.wanted:
        raise typer.Exit(launch(request, device, command_line, debug_mode))


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


def load_engine(model: str | None, engine: str = "hf", **choices):
    """The model on its engine (see engines.choose_engine), with notices on stderr and a spinner."""
    from llmcli.engines import choose_engine

    with render.status("Loading"):
        return choose_engine(model, engine, on_notice=render.notice, **choices)


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
    seed: Annotated[Optional[int], typer.Option(help="Random seed: the same seed gives the same samples.")] = None,
    num_return_sequences: Annotated[int, typer.Option(help="Samples per prompt (needs --temperature > 0).")] = 1,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop before this string (repeatable).",
                                                      metavar="TEXT")] = None,
    system: Annotated[Optional[str], typer.Option(help="System message for the chat template.")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Apply the chat template. Default: "
                                                 "when the tokenizer has one.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Prompts decoded together: left-padded into one "
                                                      "forward pass on hf; on llama.cpp every prompt and sample of "
                                                      "the batch in one step. Default: 1 on hf, 16 on llama.cpp.",
                                                      show_default=False)] = None,
    draft_model: Annotated[Optional[str], typer.Option(help="Small model proposing tokens for the main one to "
                                                       "verify (assisted decoding; same greedy output).")] = None,
    prompt_lookup: Annotated[Optional[int], typer.Option(help="Propose N tokens per step by matching the prompt "
                                                         "(fast on repetitive text; same greedy output).")] = None,
    truncate: Annotated[str, typer.Option(help="A prompt too long for the context: 'error', or 'left' to keep "
                                          "its end.")] = "error",
    schema: SchemaOption = None,
    regex: RegexOption = None,
    grammar: GrammarOption = None,
    choice: ChoiceOption = None,
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
        repetition_penalty=repetition_penalty, seed=seed, num_return_sequences=num_return_sequences,
        stop=stop or [], system=system, chat=chat, batch_size=1 if batch_size is None else batch_size,
        prompt_lookup=prompt_lookup, truncate=truncate,
    )
    from dataclasses import replace

    from llmcli.constraints import constraint_from_options

    options = replace(options, constraint=constraint_from_options(schema, regex, grammar, choice))
    validate(options)  # before the slow model load
    if draft_model and prompt_lookup:
        raise UsageError("--draft-model and --prompt-lookup are two ways to propose tokens", "Choose one.")
    if options.constraint is not None and (draft_model or prompt_lookup):
        raise UsageError(f"{'--draft-model' if draft_model else '--prompt-lookup'} proposes tokens that a "
                         "constraint cannot check yet", "Drop it, or the constraint.")
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
    hf_only = [name for name, given in (("--draft-model", draft_model), ("--prompt-lookup", prompt_lookup)) if given]
    runner = load_engine(model, engine, command="generate", device=device or workers.device, dtype=dtype, fast=fast,
                         threads=threads, hf_only=hf_only, draft_model=draft_model,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, placement=placement)
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
        produced = run_generate(runner, prompt_list, options, on_text=render.write if streaming else None,
                                on_notice=render.notice)
    results = []
    for result in produced:
        results.append(result)
        if json_output:
            render.json_line(render.generation_record(result))
            continue
        if not single:
            render.generation_header(result, show_index=num_return_sequences > 1)
        if not streaming:
            render.write(result.text)
        render.write("\n")
    if stats:
        render.generation_stats(results, runner.peak_memory_mb(),
                                runner.constraints.seconds if options.constraint is not None else None)


@app.command("fill-mask")
def fill_mask(
    texts: Annotated[Optional[list[str]], typer.Argument(help="Texts with [MASK] blanks; '-' reads stdin.",
                                                         show_default=False, metavar="TEXT")] = None,
    file: Annotated[Optional[str], typer.Option("--file", "-f", help="Read texts from a file: one per line, "
                                                "or JSONL with 'text'.")] = None,
    model: ModelOption = None,
    top_k: Annotated[int, typer.Option(help="Predictions per blank.")] = 5,
    targets: Annotated[Optional[list[str]], typer.Option(help="Score only these words (repeatable).",
                                                         metavar="WORD")] = None,
    mode: Annotated[str, typer.Option(help="auto (from the model type), mlm (masked LM) or causal "
                                      "(candidate rescoring with a causal LM).")] = "auto",
    max_mask_tokens: Annotated[int, typer.Option(help="Causal mode: tokens one blank may stand for "
                                                 "(words of several tokens).")] = 3,
    batch_size: Annotated[int, typer.Option(help="Texts (or candidate sentences) per forward pass.")] = 32,
    all_positions: Annotated[bool, typer.Option(help="Also print the argmax token at every position "
                                                "(the original BERT example).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per input text.")] = False,
    device: DeviceOption = None,
    dtype: ScoringDtypeOption = "float32",
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
    """Fill [MASK] blanks. Masked LMs score as the fill-mask pipeline does; causal LMs (the default
    embedded model) rescore candidate words with the whole sentence, filling several blanks left to
    right, each conditioned on the earlier ones' best word."""
    from llmcli.data import read_texts
    from llmcli.tasks.fill_mask import FillMaskOptions, fill_mask as run_fill_mask, validate

    options = FillMaskOptions(top_k=top_k, targets=targets or [], batch_size=batch_size,
                              max_mask_tokens=max_mask_tokens, all_positions=all_positions)
    validate(options)
    kinds = {"auto": "auto", "mlm": "masked", "causal": "causal"}
    if mode not in kinds:
        raise UsageError(f"unknown --mode {mode!r}", "Use auto, mlm or causal.")
    inputs = collect_inputs(texts or [], file, read_texts, "text")
    placement = placement_from(device_map, max_memory, offload_dir, device, num_processes, nnodes)
    launch_if_asked(num_processes, nnodes, node_rank, master_addr, master_port, device)
    from llmcli.distributed import Workers
    from llmcli.errors import WrongModelKind

    workers = Workers(device)
    try:
        loaded = load_engine(model, "hf", kind=kinds[mode], device=device or workers.device, dtype=dtype,
                             trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                             placement=placement).loaded
    except WrongModelKind as exc:  # here the fix is the --mode option, not another command
        raise WrongModelKind(exc.message, f"Drop --mode {mode}: fill-mask picks the method from the model.") from exc
    results = run_fill_mask(loaded, inputs, options, workers)
    if not workers.is_main:
        return
    for result in results:
        if json_output:
            render.json_line(render.fill_mask_record(result))
        else:
            render.fill_mask_table(result, loaded.source.name)


@app.command("eval")
def evaluate(
    data: Annotated[str, typer.Option("--data", "-d", help="Text to score: .txt, JSONL with 'text', or '-' "
                                      "for stdin.", show_default=False)],
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", metavar="MODEL", help="Model to evaluate (repeatable: one "
                                                       "row each). Default: the embedded SmolLM2.")] = None,
    metric: Annotated[Optional[str], typer.Option(help="perplexity (causal LMs), pseudo-perplexity or accuracy "
                                                  "(masked LMs). Default: from the model type.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Window length in tokens. Default: the model's "
                                                      "context, at most 1024.")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Tokens a sliding window moves. Default: max-length / 2.")]
    = None,
    llama_cpp: Annotated[bool, typer.Option("--llama-cpp", help="llama-perplexity's method: chunks of --ctx "
                                            "tokens, second half scored.")] = False,
    ctx: Annotated[int, typer.Option(help="Chunk size for --llama-cpp (llama-perplexity -c).")] = 512,
    lm_eval: Annotated[bool, typer.Option("--lm-eval", help="lm-evaluation-harness's rolling log-likelihood: "
                                          "every token scored, disjoint windows of max-length.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help="Windows per forward pass. Default: 1 on CPU, 8 on "
                                                      "GPUs.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the 15% masking for --metric accuracy.")] = 0,
    per_record: Annotated[bool, typer.Option("--per-record", help="Score each line (or JSONL 'text' record) as a "
                                             "text of its own, and aggregate over all their tokens.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per model.")] = False,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    dtype: ScoringDtypeOption = "float32",
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
    """Score a text: perplexity for causal LMs (sliding window by default), pseudo-perplexity or
    accuracy for masked LMs. Every result names its protocol, token count and standard error."""
    from llmcli.data import Completion, read_document, read_eval_records
    from llmcli.tasks.evaluate import EvalOptions, evaluate as run_evaluate

    if llama_cpp and lm_eval:
        raise UsageError("--llama-cpp and --lm-eval are two different protocols", "Choose one.")
    if stride is not None and stride <= 0:
        raise UsageError(f"--stride must be at least 1, got {stride}")
    if stride is not None and max_length is not None and stride > max_length:
        raise UsageError(f"--stride ({stride}) must not exceed --max-length ({max_length})")
    protocol = "llama.cpp" if llama_cpp else "rolling" if lm_eval else "sliding"
    options = EvalOptions(metric=metric, protocol=protocol, max_length=max_length, stride=stride, ctx=ctx,
                          batch_size=batch_size, seed=seed)
    if per_record or data.endswith(".jsonl"):
        records = read_eval_records(data)
        # prompt/completion and chat records are scored each on its own, as a completion given its prompt
        completions = any(isinstance(record, Completion) for record in records)
        text = records if per_record or completions else "\n\n".join(records)
    else:
        text = read_document(data)
    placement = placement_from(device_map, max_memory, offload_dir, device, num_processes, nnodes)
    launch_if_asked(num_processes, nnodes, node_rank, master_addr, master_port, device)
    from llmcli.distributed import Workers

    workers = Workers(device)
    results = []
    for name in model or [None]:
        runner = load_engine(name, engine, command="eval", kind="auto", device=device or workers.device, dtype=dtype,
                             threads=threads, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                             placement=placement)
        with render.progress(f"Scoring with {runner.source.name}") as (start, advance):
            result = run_evaluate(runner, text, options, on_start=start, on_progress=workers.progress(advance),
                                  workers=workers)
        results.append(result)
        if not workers.is_main:
            continue
        if json_output:
            render.json_line(render.eval_record(result))
    if not json_output and workers.is_main:
        render.eval_table(results)


@app.command()
def finetune(
    data: Annotated[str, typer.Option("--data", "-d", help="Training data: JSONL (text, prompt+completion or "
                                      "messages), .txt, .csv, or a save_to_disk directory.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory for the model, metrics and "
                                        "checkpoints.")] = "llmcli-finetuned",
    data_eval: Annotated[Optional[str], typer.Option(help="Evaluation data, same format.")] = None,
    model: ModelOption = None,
    objective: Annotated[str, typer.Option(help="auto (from the model), clm or mlm.")] = "auto",
    from_scratch: Annotated[bool, typer.Option(help="Random weights instead of pretrained ones.")] = False,
    arch: Annotated[Optional[str], typer.Option(help="Architecture for --from-scratch: gpt2, llama or bert.")] = None,
    config_overrides: Annotated[str, typer.Option(help="Config changes for --from-scratch, e.g. "
                                                  "n_layer=2,n_embd=128,n_head=4.")] = "",
    tokenizer_vocab_size: Annotated[Optional[int], typer.Option(help="Train a tokenizer of this size on the data "
                                                                "(--from-scratch).")] = None,
    text_column: Annotated[str, typer.Option(help="Column holding the text in a .csv file.")] = "text",
    line_by_line: Annotated[bool, typer.Option(help=".txt: one example per line instead of per paragraph.")] = False,
    epochs: Annotated[float, typer.Option(help="Passes over the data (fractions allowed).")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="Examples per batch per process.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example (block size when packing). Default: "
                                                      "512, or the model's context if smaller.",
                                                      show_default=False)] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Concatenate and cut into "
                                                    "--max-length blocks. Default: on for plain text.",
                                                    show_default=False)] = None,
    mask_prompt: Annotated[Optional[bool], typer.Option("--mask-prompt/--no-mask-prompt", help="Loss only on "
                                                        "completions / assistant turns. Default: on for those "
                                                        "formats.", show_default=False)] = None,
    warmup: Annotated[float, typer.Option(help="Warmup steps, or a fraction of all steps when below 1.")] = 0.0,
    scheduler: Annotated[str, typer.Option(help="LR schedule: linear, cosine, constant, ...")] = "linear",
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases and norms).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0 = off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for weights, data order, dropout and masking.")] = 42,
    val_split: Annotated[float, typer.Option(help="Fraction of the data held out for evaluation.")] = 0.0,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps (and at the end).")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help="Keep only the last N checkpoints.")] = None,
    log_every: Annotated[int, typer.Option(help="Write a metrics line every N steps.")] = 10,
    resume: Annotated[Optional[str], typer.Option(help="Continue from the latest checkpoint in --output, or "
                                                  "from the checkpoint directory given.", show_default=False)] = None,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters (peft) instead of all weights.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    lora_targets: Annotated[str, typer.Option(help="Modules to adapt: all-linear or names like q_proj,v_proj.")]
    = "all-linear",
    merge_lora: Annotated[bool, typer.Option(help="Write the merged model instead of the adapter.")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 mixed precision.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="float16 mixed precision (GPU).")] = False,
    grad_checkpointing: Annotated[bool, typer.Option(help="Trade compute for memory.")] = False,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Shard weights, gradients and optimizer state over the GPUs "
                                       "(FSDP2 through accelerate). GPUs only.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --output.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    device: DeviceOption = None,
    trust_remote_code: TrustOption = False,
    allow_pickle: PickleOption = False,
    num_processes: NumProcessesOption = 1,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    master_addr: MasterAddrOption = "127.0.0.1",
    master_port: MasterPortOption = None,
) -> None:
    """Finetune a model (or train one from scratch) on your data, with checkpoints that resume exactly."""
    from llmcli.tasks.finetune import FinetuneOptions, validate
    from llmcli.tasks.finetune_loop import run

    if bf16 and fp16:
        raise UsageError("--bf16 and --fp16 both given", "Choose one.")
    if fsdp:
        check_fsdp(device)
    options = FinetuneOptions(
        data=data, output=output, data_eval=data_eval, model=model, objective=objective, from_scratch=from_scratch,
        arch=arch, config_overrides=config_overrides, tokenizer_vocab_size=tokenizer_vocab_size,
        text_column=text_column, line_by_line=line_by_line, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, packing=packing,
        mask_prompt=mask_prompt, warmup=warmup, scheduler=scheduler, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, seed=seed, val_split=val_split, eval_every=eval_every, save_every=save_every,
        keep_checkpoints=keep_checkpoints, log_every=log_every, resume=resume, lora=lora, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets, merge_lora=merge_lora,
        mixed_precision="bf16" if bf16 else "fp16" if fp16 else "no", grad_checkpointing=grad_checkpointing,
        overwrite=overwrite, device=device, trust_remote_code=trust_remote_code, num_processes=num_processes,
        allow_pickle=allow_pickle,
    )
    validate(options)
    launch_if_asked(num_processes, nnodes, node_rank, master_addr, master_port, device)
    if model is None and not from_scratch:
        render.notice("Using the embedded model SmolLM2-135M-Instruct (pass --model to choose another).")
    from llmcli.distributed import rank

    main_process = rank() == 0
    with render.training_progress(enabled=main_process) as reporter:
        result = run(options, reporter)
    if main_process:
        if json_output:
            render.json_line(render.finetune_record(result))
        else:
            render.finetune_summary(result)


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
    seed: Annotated[Optional[int], typer.Option(help="Random seed for sampling.")] = None,
    schema: SchemaOption = None,
    regex: RegexOption = None,
    grammar: GrammarOption = None,
    choice: ChoiceOption = None,
    fast: Annotated[bool, typer.Option("--fast", help="As for generate: quantized weights on llama.cpp, bfloat16 "
                                       "on the CPU with hf.")] = False,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustOption = False,
    allow_pickle: PickleOption = False,
) -> None:
    """Chat interactively, keeping the conversation. Commands: /reset, /system TEXT, /exit (or Ctrl-D).
    A --schema, --regex, --grammar or --choice constrains every reply."""
    from llmcli.constraints import constraint_from_options
    from llmcli.tasks.chat import ChatSession
    from llmcli.tasks.generate import GenerateOptions, validate

    options = GenerateOptions(
        max_new_tokens=512 if max_new_tokens is None else max_new_tokens, default_length=max_new_tokens is None,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, seed=seed, chat=True,
        constraint=constraint_from_options(schema, regex, grammar, choice),
    )
    validate(options)
    runner = load_engine(model, engine, command="chat", device=device, dtype=dtype, fast=fast, threads=threads,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if not runner.chat_template:
        raise UsageError("this model's tokenizer has no chat template, so llmcli chat cannot format a conversation",
                         "Use llmcli generate to continue plain text, or a chat model.")
    runner.constraints.matcher(options.constraint)  # a constraint the vocabulary cannot express fails now, once
    session = ChatSession(runner, options, system=system, on_notice=render.notice)
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
            reply = session.handle(line, on_text=render.write)
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


@app.command()
def serve(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the model to the network "
                                      "(set --api-key then).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="LLMCLI_API_KEY", show_envvar=True, show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on /v1.")] = None,
    max_tokens_limit: Annotated[Optional[int], typer.Option(help="The most max_tokens one request may ask for.",
                                                            show_default=False)] = None,
    queue_size: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 503.")] = 64,
    max_batch: Annotated[int, typer.Option(help="hf engine: waiting requests with the same settings (one choice, "
                                           "no seed, not streamed) generated as one batch, up to this many; 1 "
                                           "never batches.")] = 8,
    parallel: Annotated[int, typer.Option(help="llama.cpp: requests' sequences decoded together, each step "
                                          "(llama-server's -np); requests join and leave between steps.")] = 8,
    ctx_size: Annotated[Optional[int], typer.Option(help="llama.cpp: KV-cache tokens the running sequences share "
                                                    "(default: the model's context, at most 16384).", show_default=False)] = None,
    prefix_cache: Annotated[bool, typer.Option(help="llama.cpp: a prompt that starts with tokens still cached (a "
                                               "chat's earlier turns) decodes only the rest.")] = True,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 above).")] = 1 << 20,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model's id in /v1/models (default: the "
                                                             "alias, file or directory name).", show_default=False)] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Access log lines as JSON.")] = False,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustOption = False,
    allow_pickle: PickleOption = False,
) -> None:
    """Serve the model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /health), streaming as server-sent events. Ctrl-C or SIGTERM: stop accepting, let requests in
    flight finish for up to 10 s, exit 0."""
    for name, value in (("--port", port), ("--queue-size", queue_size), ("--max-body", max_body),
                        ("--max-batch", max_batch), ("--parallel", parallel), ("--ctx-size", 1 if ctx_size is None else ctx_size)):
        if value <= 0 or (name == "--port" and value > 65535):
            raise UsageError(f"{name} must be {'in 1..65535' if name == '--port' else 'at least 1'}, got {value}")
    if max_tokens_limit is not None and max_tokens_limit <= 0:
        raise UsageError(f"--max-tokens-limit must be at least 1, got {max_tokens_limit}")
    if parallel > 128:  # llama.cpp's 256 sequence ids hold the live ones and as many cached prefixes
        raise UsageError(f"--parallel must be at most 128, got {parallel}")
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty", "Pass a secret, or drop --api-key.")
    import socket

    with socket.socket() as probe:  # a taken port is a one-line error before the slow model load
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             "Pick another --port, or stop what is using it.") from exc
    runner = load_engine(model, engine, command="generate", device=device, dtype=dtype, threads=threads,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    from llmcli.serve import exposure_warning, run_server

    warning = exposure_warning(host, api_key)
    if warning:
        render.notice(warning)
    run_server(runner, host, port, api_key=api_key, max_tokens_limit=max_tokens_limit, queue_size=queue_size,
               max_batch=max_batch, parallel=parallel, ctx_size=ctx_size, prefix_cache=prefix_cache,
               max_body_bytes=max_body, json_logs=json_logs, served_name=served_model_name, on_notice=render.notice)


@app.command()
def info(json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False) -> None:
    """Versions, devices, engines, the embedded model and the model cache."""
    from llmcli.inventory import machine_info

    details = machine_info()
    if json_output:
        render.json_line(details)
    else:
        render.info_table(details)


cache_app = typer.Typer(help="The model cache: GGUF conversions made once (safetensors for hf, F16 for llama.cpp).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list(json_output: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per entry.")] = False
               ) -> None:
    """Each cached conversion: name, kind, size and the file it came from."""
    from llmcli.inventory import cache_entries

    entries = cache_entries()
    for entry in entries:
        if json_output:
            render.json_line(entry.__dict__)
        else:
            render.write(f"{entry.name}  {entry.kind}  {entry.size_mb:.0f} MB  {entry.source or ''}".rstrip() + "\n")
    if not entries and not json_output:
        render.notice("The cache is empty.")


@cache_app.command("rm")
def cache_rm(
    name: Annotated[Optional[str], typer.Argument(help="An entry's name (or a unique start of it), from "
                                                       "'llmcli cache list'.", show_default=False, metavar="NAME")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
) -> None:
    """Remove one cached conversion, or all with --all (they are rebuilt when next needed)."""
    from llmcli.inventory import remove_cache_entries

    for removed in remove_cache_entries(name, everything):
        render.notice(f"Removed {removed}")


def with_resume_default(argv: list[str]) -> list[str]:
    """`--resume` may stand alone (latest checkpoint) or take a directory; click wants a value, so a
    bare `--resume` becomes `--resume latest`."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            argv.insert(i + 1, "latest")
            break
    return argv


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled as Ctrl-C everywhere, except that it never just stops a chat reply."""


def interrupt_on_sigterm() -> None:
    """SIGTERM (kill, a job scheduler's timeout) gets Ctrl-C's cleanup: flushed output, a finetune
    checkpoint, no half-written cache, exit 130."""
    import signal

    def raise_interrupt(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, raise_interrupt)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app and turn every failure into the exit-code contract."""
    global command_line
    from llmcli import distributed

    interrupt_on_sigterm()
    if distributed.is_worker() and distributed.rank() != 0:
        render.quiet_other_ranks()
    command = typer.main.get_command(app)
    command_line = with_resume_default(sys.argv[1:] if argv is None else argv)
    try:
        code = command.main(args=command_line, prog_name="llmcli", standalone_mode=False)
        if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into Exit(130), which click returns
            report_error("interrupted", None, EXIT_INTERRUPTED)
    except typer.Exit as exc:
        code = exc.exit_code
    except NoArgsIsHelpError as exc:  # bare `llmcli`: show the help, which is what was asked for
        print(exc.ctx.get_help())
        code = 0
    except ClickException as exc:  # bad option values and unknown options, from click itself
        context = getattr(exc, "ctx", None)
        code = report_error(exc.format_message(), f"Run '{context.command_path if context else 'llmcli'} --help' for "
                            "usage.", EXIT_USAGE)
    except (KeyboardInterrupt, typer.Abort):
        code = report_error("interrupted", None, EXIT_INTERRUPTED)
    except LlmcliError as exc:
        if debug_mode:
            traceback.print_exc()
        code = report_error(exc.message, exc.hint, exc.exit_code)
    except (render.OutputClosed, BrokenPipeError):  # `llmcli generate ... | head` closed the pipe: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
        code = 0
    except Exception as exc:
        if debug_mode:
            traceback.print_exc()
        code = report_error(f"internal error: {type(exc).__name__}: {exc}", "Run again with --debug for the "
                            "traceback.", EXIT_INTERNAL)
    if distributed.is_worker():
        distributed.exit_worker(code or 0)
    sys.exit(code or 0)


def report_error(message: str, hint: str | None, code: int) -> int:
    """The one `Error:` line; a worker we launched hands it to the launcher, which prints it once."""
    from llmcli import distributed

    if not distributed.record_error(message, hint, code):
        render.error(message, hint)
    return code
