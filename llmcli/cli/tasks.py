"""`llmcli eval --tasks`: lm-evaluation-harness tasks on each model given (one table row per model,
task and metric)."""

from __future__ import annotations

from typing import Optional

from llmcli import render
from llmcli.cli.common import load_engine
from llmcli.errors import UsageError


def run_tasks_command(models: list[Optional[str]], tasks: list[str], *, num_fewshot: Optional[int],
                      limit: Optional[float], apply_chat_template: bool, fewshot_as_multiturn: bool,
                      seed: Optional[int], batch_size: Optional[int], log_samples: bool, output_path: Optional[str],
                      max_length: Optional[int], json_output: bool, engine: str, threads: Optional[int],
                      device: Optional[str], dtype: str, trust_remote_code: bool, allow_pickle: bool) -> None:
    from llmcli.tasks.benchmark import TaskOptions, import_lm_eval, resolve_tasks, run_tasks, save

    if num_fewshot is not None and num_fewshot < 0:
        raise UsageError(f"--num-fewshot must be at least 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise UsageError(f"--limit must be above 0, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if fewshot_as_multiturn and not apply_chat_template:
        raise UsageError("--fewshot-as-multiturn needs --apply-chat-template", "Pass both, or neither.")
    if log_samples and output_path is None:
        raise UsageError("--log-samples writes the samples beside the results", "Pass --output-path DIR too.")
    from llmcli.models import offline_unless_reachable

    offline_unless_reachable()  # before datasets is imported: uncached data then fails at once, not after ~30 s
    import_lm_eval()  # its absence, or an unknown task, is said before any model loads
    resolve_tasks(tasks)
    options = TaskOptions(tasks=tasks, num_fewshot=num_fewshot, limit=limit, apply_chat_template=apply_chat_template,
                          fewshot_as_multiturn=fewshot_as_multiturn, seed=seed, batch_size=batch_size or TaskOptions.batch_size,
                          log_samples=log_samples, max_length=max_length)
    from llmcli.distributed import Workers

    workers = Workers(device)  # one process, or this worker's place among --num-processes
    everything = []
    for name in models:
        runner = load_engine(name, engine, command="eval --tasks", kind="causal",
                             device=device or workers.device, dtype=dtype, threads=threads,
                             trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        with render.status(f"Running {', '.join(tasks)} with {runner.source.name}"):
            results = run_tasks(runner, options, workers)
        if results is None:  # another worker's answers went to the first
            continue
        if output_path is not None:
            save(results, output_path)
        everything.append(results)
        if json_output:
            for row in results.rows:
                render.json_line({"model": results.model, "engine": results.engine, "weights": results.weights,
                                  **row, "seconds": round(results.seconds, 4)})
    if everything and not json_output:
        render.task_table(everything)
