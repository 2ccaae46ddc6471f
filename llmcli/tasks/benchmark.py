"""`eval --tasks`: lm-evaluation-harness's task library run on llmcli's engines.

lm-eval builds the requests (its task YAMLs, few-shot sampling, chat templates, metrics, standard
errors, results file); `EngineLM` answers them on a loaded engine as lm-eval's own `HFLM` does
(models/huggingface.py, 0.4.x): the same tokenization of a context and its continuation (lm-eval's
`TemplateLM._encode_pair`), the same left truncation to the model's length, the same rolling windows,
greedy generation cut at the first `until` string. On the llama.cpp engine the answers of one
question share their context's cells: the context is decoded once (engines/llama_scoring.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmcli.engines import Engine
from llmcli.errors import DataError, UsageError

LM_EVAL_INSTALL_HINT = "Install lm-evaluation-harness with: pip install 'llmcli[tasks]' (make install includes it)."
DEFAULT_MAX_LENGTH = 2048  # lm-eval's, for a model that states no context length
DEFAULT_MAX_GEN_TOKS = 256  # HFLM's max_gen_toks


@dataclass
class TaskOptions:
    tasks: list[str]  # registered task names, or YAML files of the user's own tasks
    num_fewshot: int | None = None
    limit: float | None = None  # examples per task (a fraction of them when below 1), as lm-eval's --limit
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    seed: int | None = None  # every lm-eval seed; None: lm-eval's defaults (0, 1234, 1234, 1234)
    batch_size: int = 32  # hf: 6.9 s for 400 answers at 32, against 9.5 at 8, 13.1 at 128, 26.8 at 1
    log_samples: bool = False
    max_length: int | None = None


@dataclass
class TaskResults:
    results: dict[str, Any]  # lm-eval's whole results object (config, versions, n-shot, hashes, samples)
    seconds: float
    engine: str
    weights: str
    model: str
    rows: list[dict[str, Any]] = field(default_factory=list)  # task, metric, filter, value, stderr


def quiet() -> bool:
    import os

    return not os.environ.get("LLMCLI_DEBUG")


def import_lm_eval() -> Any:
    """lm_eval, quiet unless --debug: its per-request progress bars and its notes on task defaults would
    bury the table (tqdm reads TQDM_DISABLE when a bar is made)."""
    import logging
    import os

    if quiet():
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import lm_eval
    except ImportError as exc:
        raise UsageError(f"eval --tasks needs lm-evaluation-harness, which is not installed ({exc})",
                         LM_EVAL_INSTALL_HINT) from exc
    if quiet():
        from llmcli.models import quiet_libraries

        quiet_libraries()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return lm_eval


def engine_lm(engine: Engine, batch_size: int, max_length: int | None = None, workers: Any = None) -> Any:
    """An `lm_eval.api.model.LM` answering on `engine` (lm-eval is imported here, not at start-up).
    With `workers` of several processes (--num-processes), lm-eval gives each rank its share of every
    task's requests and gathers the answers to rank 0 through this LM's collectives (gloo or NCCL)."""
    import_lm_eval()
    from lm_eval.api.model import TemplateLM

    class EngineLM(TemplateLM):
        def __init__(self) -> None:
            super().__init__()
            self.engine, self.batch_size = engine, batch_size
            self._max_length = max_length or engine.context_length or DEFAULT_MAX_LENGTH
            self._rank, self._world_size = (workers.rank, workers.size) if workers is not None else (0, 1)
            self._device = getattr(engine, "device", None) or "cpu"
            self.answered = 0  # requests this process answered (its share, with several processes)

        def all_gather(self, tensor: Any) -> Any:
            import torch
            import torch.distributed

            if self._world_size == 1:
                return tensor
            parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
            torch.distributed.all_gather(parts, tensor)
            return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

        def gather_object(self, obj: Any, dst: int = 0) -> Any:
            import torch.distributed

            if self._world_size == 1:
                return [obj]
            gathered = [None] * self._world_size if self._rank == dst else None
            torch.distributed.gather_object(obj, gathered, dst=dst)
            return gathered

        def barrier(self) -> None:
            import torch.distributed

            if self._world_size > 1:
                torch.distributed.barrier()

        @property
        def eot_token_id(self) -> int:
            return engine.eos_id

        @property
        def prefix_token_id(self) -> int:
            # HFLM's: the BOS token, else the EOS token
            return engine.bos_id if engine.bos_id is not None else engine.eos_id

        @property
        def max_length(self) -> int:
            return self._max_length

        @property
        def tokenizer_name(self) -> str:
            return engine.source.name.replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            # HFLM: the tokenizer's own special tokens unless told, none when the text already starts with BOS
            add = True if add_special_tokens is None else add_special_tokens
            if add_special_tokens is None and engine.bos_id is not None and engine.adds_bos:
                add = not string.startswith(engine.token_text(engine.bos_id))
            return engine.encode(string, add_special=add)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            # its tokenizing bar is made with disable=False, which TQDM_DISABLE does not override
            self.answered += len(requests)
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or quiet())

        def _loglikelihood_tokens(self, requests: list[Any], **kwargs: Any) -> list[tuple[float, bool]]:
            sequences, starts = [], []
            for _, context, continuation in requests:
                # HFLM: the last max_length + 1 tokens; the last one is only a target
                whole = (context + continuation)[-(self.max_length + 1):]
                sequences.append(whole)
                starts.append(len(whole) - len(continuation))
            answers = engine.continuation_scores(sequences, starts, self.batch_size)
            for (key, _, _), answer in zip(requests, answers):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return answers

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            self.answered += len(requests)
            windows, owners = [], []
            for number, (text,) in enumerate(request.args for request in requests):
                for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((None, context, continuation))
                    owners.append(number)
            totals = [0.0] * len(requests)
            for owner, (value, _) in zip(owners, self._loglikelihood_tokens(windows)):
                totals[owner] += value
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            self.answered += len(requests)
            return answers(engine, [(self.tok_encode(context), kwargs) for context, kwargs in
                                    (request.args for request in requests)], self.max_length, self.batch_size)

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return engine.render_chat(chat_history, add_generation_prompt)

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return engine.chat_template if chat_template else None

    return EngineLM()


def answers(engine: Engine, requests: list[tuple[list[int], dict[str, Any]]], max_length: int,
            batch_size: int) -> list[str]:
    """HFLM's generate_until: greedy, at most max_gen_toks new tokens after each context cut on the left to
    what the model's length leaves, each text cut at the first `until` string. Requests with the same
    generation settings are generated `batch_size` at a time, longest first (HFLM's grouping and order);
    a row stops at its own until string or EOS."""
    import json

    from llmcli.data import Prompt
    from llmcli.tasks.generate import GenerateOptions, generate

    groups: dict[str, list[int]] = {}
    for number, (_, kwargs) in enumerate(requests):
        groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str), []).append(number)
    texts = [""] * len(requests)
    for members in groups.values():
        kwargs = dict(requests[members[0]][1])
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        new_tokens = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
            raise UsageError("a task asks for sampled generation, and eval --tasks generates greedily",
                             "Use a task with greedy generation (do_sample: false).")
        options = GenerateOptions(max_new_tokens=new_tokens, temperature=0.0, stop=[s for s in until if s],
                                  chat=False, batch_size=batch_size)
        members = sorted(members, key=lambda n: -len(requests[n][0]))
        prompts = [Prompt(ids=requests[n][0][-(max_length - new_tokens):]) for n in members]
        for number, generation in zip(members, generate(engine, prompts, options)):
            # HFLM's text: the new tokens decoded whole (an incomplete last character included), cut at each `until`
            text = engine.decode(generation.token_ids)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts[number] = text
    return texts


def run_tasks(engine: Engine, options: TaskOptions, workers: Any = None) -> TaskResults | None:
    """lm-eval's `simple_evaluate` on the engine, with the user's YAML files' folders included; None on
    a worker other than the first (rank 0 gets every rank's answers)."""
    lm_eval = import_lm_eval()
    names, manager = resolve_tasks(options.tasks)
    began = time.perf_counter()
    seeds = {} if options.seed is None else {f"{kind}_seed": options.seed for kind in
                                              ("random", "numpy_random", "torch_random", "fewshot_random")}
    lm = engine_lm(engine, options.batch_size, options.max_length, workers)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=names,
        num_fewshot=options.num_fewshot, limit=options.limit, log_samples=options.log_samples,
        apply_chat_template=options.apply_chat_template, fewshot_as_multiturn=options.fewshot_as_multiturn,
        task_manager=manager, batch_size=options.batch_size, **seeds)
    seconds = time.perf_counter() - began
    shares = lm.gather_object(lm.answered)  # every process takes part; the first gets the list
    if results is None:
        return None
    results["config"].update({"model": engine.source.name, "llmcli_engine": engine.name,
                              "llmcli_weights": engine.weights, "llmcli_threads": getattr(engine, "threads", None),
                              "llmcli_processes": workers.size if workers is not None else 1,
                              "llmcli_requests_per_process": shares})
    return TaskResults(results, seconds, engine.name, engine.weights, engine.source.name, table_rows(results))


def resolve_tasks(tasks: list[str]) -> tuple[list[str], Any]:
    """The task names and lm-eval's index that has them all (an unknown name is an error)."""
    names, folders, own_only = task_names(tasks)
    manager = task_manager(tuple(folders), own_only)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: no task {unknown[0]!r} in lm-eval's registry or the given files",
                         "List them with: lm-eval ls tasks (or check the YAML file's task: name).")
    return names, manager


@lru_cache(maxsize=4)
def task_manager(folders: tuple[str, ...], own_only: bool) -> Any:
    """lm-eval's index of tasks. Indexing its own few thousand YAML files takes 6.5 s here (measured), so
    tasks given only as files that include nothing of lm-eval's are indexed alone; one index serves
    every model of a command. Loading a task reads its data, and data that cannot be read is the user's
    to fix (a missing file, a data set neither cached nor downloadable): one error line, not a traceback."""
    from lm_eval.tasks import TaskManager

    class CheckedTaskManager(TaskManager):
        def load(self, task_list: Any) -> Any:
            try:
                return super().load(task_list)
            except (FileNotFoundError, ConnectionError) as exc:
                raise task_data_error(exc) from exc

    return CheckedTaskManager(include_path=list(folders) or None, include_defaults=not own_only)


def task_data_error(exc: OSError) -> DataError:
    """What datasets said when a task's data could not be read, as the user's error: a data file that is
    missing ("Unable to find '/path/x.jsonl'"), or a hub data set that is not cached while the hub is
    out of reach (`offline_unless_reachable` turned its ~30 s of retries into an immediate failure)."""
    from llmcli.models import offline_reason

    if isinstance(exc, ConnectionError):
        return DataError(f"--tasks: a task's data set is not in the cache, and {offline_reason()} ({exc})",
                         "Run it once where the hub is reachable (the data is cached then), or use a task YAML "
                         "whose data_files are local.")
    return DataError(f"--tasks: a task's data file is missing ({exc})",
                     "Check the path in the task YAML's dataset_kwargs.data_files (or its dataset_path).")


def task_names(tasks: list[str]) -> tuple[list[str], list[str], bool]:
    """Registered names as they are; a YAML file stands for the tasks it names (its folder included).
    Also whether every task is a file of the user's that needs none of lm-eval's own (no `include:`)."""
    import yaml

    names, folders, own_only = [], [], True
    for item in tasks:
        path = Path(item)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise UsageError(f"--tasks {item}: no such file", "Pass a task YAML file or a registered task name.")
            try:
                config = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as exc:
                raise UsageError(f"--tasks {item} is not valid YAML ({exc})".replace("\n", " ")) from exc
            task = config.get("task") if isinstance(config, dict) else None
            if not task:
                raise UsageError(f"--tasks {item} has no 'task:' name", "Name the task in the file (task: my_task).")
            names.extend([task] if isinstance(task, str) else task)
            folders.append(str(path.resolve().parent))
            own_only = own_only and "include" not in config and isinstance(task, str)
        else:
            names.extend(name for name in item.split(",") if name)
            own_only = False
    return names, sorted(set(folders)), own_only


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task, metric and filter, with its standard error, as lm-eval's table lists them."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or key.startswith("alias"):
                continue
            metric, filter_name = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            rows.append({"task": task, "metric": metric, "filter": filter_name, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None,
                         "n_shot": results.get("n-shot", {}).get(task)})
    return rows


def folder_name(model: str) -> str:
    """The folder under --output-path for a model's results: lm-eval's `org__name` for a hub id, and
    nothing a shell would need quoted ("SmolLM2-135M-Instruct (embedded)" -> "SmolLM2-135M-Instruct-embedded")."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", model.replace("/", "__")).strip("-.") or "model"


def save(results: TaskResults, output_path: str) -> Path:
    """lm-eval's own results file (and samples files, when logged), through its EvaluationTracker."""
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=output_path)
    tracker.general_config_tracker.model_name = results.model
    tracker.general_config_tracker.model_name_sanitized = folder_name(results.model)
    everything = dict(results.results)
    samples = everything.pop("samples", None)
    tracker.save_results_aggregated(results=everything, samples=samples)
    if samples:
        for task in everything["configs"]:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    return Path(output_path)
