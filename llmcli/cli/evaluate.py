"""`llmcli eval`."""


from typing import Annotated, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import launch_if_asked, load_engine, placement_from
from llmcli.cli.options import (completes, DeviceOption, ScoringDtypeOption, TrustOption, PickleOption, EngineOption,
                                 ThreadsOption, DeviceMapOption, MaxMemoryOption, OffloadDirOption,
                                 NumProcessesOption, NnodesOption, NodeRankOption, MasterAddrOption, MasterPortOption)
from llmcli.errors import UsageError


@app.command("eval")
def evaluate(
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Text to score: .txt, JSONL with 'text', or "
                                                "'-' for stdin.", show_default=False)] = None,
    tasks: Annotated[Optional[list[str]], typer.Option(
        "--tasks", "-t", metavar="NAMES|FILE.yaml", help="lm-evaluation-harness tasks instead of --data: registered "
        "names (comma-separated or repeated) or task YAML files of your own.", show_default=False)] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="--tasks: examples in each prompt. Default: the "
                                                       "task's.", show_default=False)] = None,
    limit: Annotated[Optional[float], typer.Option(help="--tasks: examples per task (below 1: a fraction of "
                                                   "them).", show_default=False)] = None,
    apply_chat_template: Annotated[bool, typer.Option(help="--tasks: put each prompt through the model's chat "
                                                      "template.")] = False,
    fewshot_as_multiturn: Annotated[bool, typer.Option(help="--tasks: few-shot examples as chat turns (with "
                                                       "--apply-chat-template).")] = False,
    log_samples: Annotated[bool, typer.Option(help="--tasks: keep every request and answer in the results "
                                              "(--output-path).")] = False,
    output_path: Annotated[Optional[str], typer.Option(help="--tasks: a folder for lm-eval's results JSON (and "
                                                       "samples).", show_default=False)] = None,
    model: Annotated[Optional[list[str]], typer.Option("--model", "-m", metavar="MODEL", envvar="LLMCLI_MODEL",
                                                       show_envvar=True, help="Model to evaluate (repeatable: one "
                                                       "row each). Default: the embedded SmolLM2.")] = None,
    metric: Annotated[Optional[str], typer.Option(autocompletion=completes("perplexity", "pseudo-perplexity",
                                                                           "accuracy"), help="perplexity (causal LMs), pseudo-perplexity or accuracy "
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
    batch_size: Annotated[Optional[int], typer.Option(help="Windows (masked copies for a masked LM) per forward "
                                                      "pass. Default: 8, or 1 for perplexity on the CPU.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the 15% masking for --metric accuracy (0); with "
                                                "--tasks every lm-eval seed (default: lm-eval's).",
                                                show_default=False)] = None,
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

    if tasks:
        from llmcli.cli.tasks import run_tasks_command

        if data is not None:
            raise UsageError("--data and --tasks are two kinds of evaluation", "Pass one of them.")
        data_only = [name for name, value in (("--metric", metric), ("--stride", stride),
                                              ("--llama-cpp", llama_cpp or None), ("--lm-eval", lm_eval or None),
                                              ("--ctx", None if ctx == 512 else ctx),
                                              ("--per-record", per_record or None), ("--device-map", device_map),
                                              ("--max-memory", max_memory), ("--offload-dir", offload_dir))
                     if value is not None]
        if data_only:
            raise UsageError(f"{data_only[0]} is for --data, not --tasks", "Drop it.")
        launch_if_asked(num_processes, nnodes, node_rank, master_addr, master_port, device)
        run_tasks_command(model or [None], tasks, num_fewshot=num_fewshot, limit=limit,
                          apply_chat_template=apply_chat_template, fewshot_as_multiturn=fewshot_as_multiturn,
                          seed=seed, batch_size=batch_size, log_samples=log_samples, output_path=output_path,
                          max_length=max_length, json_output=json_output, engine=engine, threads=threads,
                          device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          allow_pickle=allow_pickle)
        return
    if data is None:
        raise UsageError("nothing to evaluate", "Pass --data FILE (a text to score) or --tasks NAMES.")
    task_only = [name for name, value in (("--num-fewshot", num_fewshot), ("--limit", limit),
                                          ("--apply-chat-template", apply_chat_template or None),
                                          ("--fewshot-as-multiturn", fewshot_as_multiturn or None),
                                          ("--log-samples", log_samples or None), ("--output-path", output_path))
                 if value is not None]
    if task_only:
        raise UsageError(f"{task_only[0]} is for --tasks", "Drop it, or pass --tasks.")
    if llama_cpp and lm_eval:
        raise UsageError("--llama-cpp and --lm-eval are two different protocols", "Choose one.")
    if stride is not None and stride <= 0:
        raise UsageError(f"--stride must be at least 1, got {stride}")
    if stride is not None and max_length is not None and stride > max_length:
        raise UsageError(f"--stride ({stride}) must not exceed --max-length ({max_length})")
    protocol = "llama.cpp" if llama_cpp else "rolling" if lm_eval else "sliding"
    options = EvalOptions(metric=metric, protocol=protocol, max_length=max_length, stride=stride, ctx=ctx,
                          batch_size=batch_size, seed=seed or 0)
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
    # one model: its file as it is (llama-perplexity's number for that file); several: each on the weights
    # generate would run (F16 for a quantized GGUF), so the rows compare models, not formats
    compared = len(model or []) > 1
    for name in model or [None]:
        runner = load_engine(name, engine, command="generate" if compared else "eval", kind="auto",
                             device=device or workers.device, dtype=dtype,
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
