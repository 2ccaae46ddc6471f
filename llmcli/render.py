"""Everything llmcli prints: results on stdout, notices, errors and stats on stderr. Nothing here computes."""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)
from rich.table import Table

from llmcli import strict_json

class OutputClosed(Exception):
    """stdout or stderr was closed by its reader (`llmcli ... | head`, `llmcli ... 2>&1 | head`). Not an
    OSError on purpose: click turns an EPIPE OSError into a silent exit 1, and a closed pipe is not an
    error."""


class GuardedStream:
    """sys.stdout or sys.stderr (looked up at each write, as tests replace them) with a closed pipe
    raised as OutputClosed."""

    def __init__(self, name: str) -> None:
        self.name = name

    def target(self) -> Any:
        stream = getattr(sys, self.name)
        # under a rich spinner or progress bar sys.stderr is rich's proxy, which prints through this console
        return getattr(stream, "rich_proxied_file", stream)

    def write(self, text: str) -> int:
        try:
            return self.target().write(text)
        except BrokenPipeError as exc:
            raise OutputClosed from exc

    def flush(self) -> None:
        try:
            self.target().flush()
        except BrokenPipeError as exc:
            raise OutputClosed from exc

    def isatty(self) -> bool:
        return self.target().isatty()

    def fileno(self) -> int:
        return self.target().fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.target(), "encoding", None) or "utf-8"


stdout = GuardedStream("stdout")
# rich honours NO_COLOR and drops styling when stderr is not a terminal.
stderr = Console(file=GuardedStream("stderr"), highlight=False)


def stdout_console() -> Console:
    return Console(file=stdout, highlight=False)


def print_table(table: Any) -> None:
    """A table on stdout without the spaces rich pads its lines with (they show in diffs and files);
    colours stay when stdout is a terminal."""
    console = stdout_console()
    with console.capture() as captured:
        console.print(table)
    stdout.write("\n".join(line.rstrip() for line in captured.get().split("\n")))
    stdout.flush()


quiet = False  # a worker process other than rank 0: rank 0 alone speaks for the command


def quiet_other_ranks() -> None:
    global quiet
    quiet = True


def notice(message: str) -> None:
    if not quiet:
        stderr.print(message, style="dim", markup=False, soft_wrap=True)


def error(message: str, hint: str | None = None) -> None:
    end_open_line()
    stderr.print(f"Error: {message}", style="bold red", markup=False, soft_wrap=True)
    if hint:
        stderr.print(hint, markup=False, soft_wrap=True)


@contextmanager
def status(message: str) -> Iterator[None]:
    """A spinner on stderr while something slow runs (only on a terminal)."""
    if stderr.is_terminal and not quiet:
        with stderr.status(message):
            yield
    else:
        yield


_line_open = [False]  # the last text written to stdout did not end its line (a stream was cut)


def write(text: str) -> None:
    """Write result text to stdout immediately (used for streaming)."""
    stdout.write(text)
    stdout.flush()
    if text:
        _line_open[0] = not text.endswith("\n")


def thinking_on_stderr() -> bool:
    """generate shows a thinking model's thinking only where a person reads stderr."""
    return stderr.is_terminal and not quiet


def thinking(text: str) -> None:
    """A piece of a thinking model's thinking, dimmed on stderr (generate: stdout keeps the answer alone)."""
    stderr.print(text, style="dim", markup=False, highlight=False, soft_wrap=True, end="")


def chat_thinking(text: str) -> None:
    """A piece of the thinking in chat, dimmed within the conversation on stdout (plain when it is no
    terminal, or under NO_COLOR: rich decides)."""
    stdout_console().print(text, style="dim", markup=False, highlight=False, soft_wrap=True, end="")
    stdout.flush()
    if text:
        _line_open[0] = not text.endswith("\n")


def end_open_line() -> None:
    """Before an error on a terminal: end the line a cut stream left open (Ctrl-C mid-text), so that
    `Error:` starts a line of its own. Redirected output is left as it was written."""
    if _line_open[0] and stdout.isatty():
        write("\n")


def human_size(size: float) -> str:
    """Bytes as people read them, in llmcli's binary MB (2**20): 512 B, 3.4 kB, 258 MB, 1.2 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 10 else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def json_line(record: dict[str, Any]) -> None:
    write(strict_json.dumps(record, ensure_ascii=False) + "\n")


def generation_record(generation: Any) -> dict[str, Any]:
    """The `--json` object of the command-line contract (DESIGN.md section 3)."""
    record = asdict(generation)
    record.pop("time_to_first_token")
    if record.get("incomplete") is None:  # only constrained output has the flag
        record.pop("incomplete", None)
    if record.get("reasoning") is None:  # only a thinking model's reply has it
        record.pop("reasoning", None)
    if record.get("drafted") is None:  # only a speculating sequence counts drafts
        record.pop("drafted", None)
        record.pop("accepted", None)
    record["seconds"] = round(record["seconds"], 4)
    return record


def generation_header(generation: Any, show_index: bool) -> None:
    suffix = f"  [{generation.index}]" if show_index else ""
    stderr.print(f"── {generation.prompt}{suffix}", style="bold cyan", markup=False, soft_wrap=True)


def generation_stats(generations: list[Any], peak_memory_mb: float, constraint_seconds: float | None = None) -> None:
    generated = sum(g.generated_tokens for g in generations)
    # generations of one batch share their timing: count each batch once
    batches = {(g.seconds, g.time_to_first_token) for g in generations}
    seconds = sum(s for s, _ in batches)
    first_token = [t for _, t in batches if t is not None]
    rows = [("engine", f"{generations[0].engine} ({generations[0].weights})" if generations else "-"),
            ("prompt tokens", str(sum(g.prompt_tokens for g in generations if g.index == 0))),
            ("generated tokens", str(generated))]
    if first_token:
        rows.append(("time to first token", f"{first_token[0] * 1000:.0f} ms"))
    rows += [("generation time", f"{seconds:.2f} s"),
             ("tokens/s", f"{generated / seconds:.1f}" if seconds else "-"),
             ("peak memory", f"{peak_memory_mb:.0f} MB")]
    speculating = [g for g in generations if g.drafted is not None]
    if speculating:
        drafted, accepted = sum(g.drafted for g in speculating), sum(g.accepted for g in speculating)
        rows += [("drafted tokens", str(drafted)),
                 ("accepted tokens", f"{accepted} ({accepted / drafted:.0%})" if drafted else "0")]
    if constraint_seconds is not None:  # llguidance's tokenizer and the grammar, built once per run
        rows.append(("constraint compile", f"{constraint_seconds * 1000:.0f} ms"))
    for label, value in rows:  # plain lines: no padding after the value, easy to grep
        stderr.print(f"{label:<20} {value}", markup=False, highlight=False, soft_wrap=True)


def fill_mask_record(result: Any) -> dict[str, Any]:
    """The `--json` object of the contract: text and, per mask, the ranked predictions."""
    record = {"text": result.text, "predictions": [[asdict(p) for p in row] for row in result.predictions]}
    if result.method == "masked-lm":  # one token a blank: the pipeline's keys exactly
        for row in record["predictions"]:
            for prediction in row:
                prediction.pop("token_ids")
    if result.all_positions is not None:
        record["all_positions"] = result.all_positions
    return record


def fill_mask_table(result: Any, model_name: str) -> None:
    caption = (f"causal LM rescoring estimate ({model_name}): softmax over candidate sentences' log-likelihoods"
               if result.method == "causal-rescoring" else f"masked LM ({model_name})")
    for number, row in enumerate(result.predictions, 1):
        title = result.text if len(result.predictions) == 1 else f"{result.text}  (blank {number})"
        table = Table(title=title, caption=caption, title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column("probability", justify="right")
        table.add_column("")
        table.add_column("sequence")
        for rank, prediction in enumerate(row, 1):
            bar = "█" * round(prediction.score * 20)
            table.add_row(str(rank), prediction.token_str, f"{prediction.score:.4f}", bar, prediction.sequence)
        print_table(table)
    if result.all_positions is not None:
        write(f"all positions: {result.all_positions}\n")


@contextmanager
def progress(description: str, in_bytes: bool = False) -> Iterator[tuple[Any, Any]]:
    """A progress bar on stderr; yields (start(total), advance(n)) callbacks for a task to call. `in_bytes`:
    counts bytes, shown as sizes and a transfer speed."""
    counts = (DownloadColumn(binary_units=True), TransferSpeedColumn()) if in_bytes else (MofNCompleteColumn(),)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), *counts, TimeRemainingColumn(),
                   console=stderr, transient=True, disable=quiet or not stderr.is_terminal)
    task = bar.add_task(description, total=None)
    with bar:
        yield (lambda total: bar.update(task, total=total)), (lambda n: bar.advance(task, n))


def eval_record(result: Any) -> dict[str, Any]:
    """The `--json` object of the contract, plus the protocol and standard error."""
    record = asdict(result)
    record["seconds"] = round(record["seconds"], 4)
    return record


def eval_table(results: list[Any]) -> None:
    """One row per model. With one protocol it is the caption; with several, each row points to a
    numbered line under the table, which names the engine and weights too. Results of the same metric
    and protocol are compared (the best in bold green), whatever their engine: `eval` runs several
    models on the weights `generate` would, so their rows compare models, not formats."""
    runs = [f"{r.metric}: {r.protocol} on {r.engine} ({r.weights})" for r in results]
    scores = [(r.metric, r.protocol) for r in results]
    legend = list(dict.fromkeys(runs))
    table = Table(title=", ".join(dict.fromkeys(r.metric for r in results)), title_justify="left",
                  caption=legend[0] if len(legend) == 1 else "\n".join(f"[{i}] {run}" for i, run in
                                                                         enumerate(legend, 1)))
    table.add_column("model", overflow="fold")
    if len(legend) > 1:
        table.add_column("run", no_wrap=True)
    for column in ("value", "± stderr", "tokens", "bits/byte", "seconds"):
        table.add_column(column, justify="right", no_wrap=True)
    for r, name, run, score in zip(results, short_names([r.model for r in results]), runs, scores):
        peers = [p.value for p, p_score in zip(results, scores) if p_score == score]
        best = max(peers) if r.metric == "accuracy" else min(peers)
        style = "bold green" if len(peers) > 1 and r.value == best else None
        cells = [f"{r.value:.4f}", "-" if r.stderr is None else f"{r.stderr:.4f}", str(r.tokens),
                 "-" if r.bits_per_byte is None else f"{r.bits_per_byte:.4f}", f"{r.seconds:.1f}"]
        table.add_row(name, *([f"[{legend.index(run) + 1}]"] if len(legend) > 1 else []), *cells, style=style)
    print_table(table)


def task_table(results: list[Any]) -> None:
    """`eval --tasks`: one row per model, task, metric and filter, with its standard error, as lm-eval's
    own table lists them; the caption names each model's engine and weights."""
    table = Table(title="lm-evaluation-harness tasks", title_justify="left",
                  caption="\n".join(f"{name}: {r.engine} ({r.weights}), {r.seconds:.1f} s"
                                    for name, r in zip(short_names([r.model for r in results]), results)))
    for column in ("model", "task", "n-shot", "metric", "filter", "value", "± stderr"):
        table.add_column(column, justify="right" if column in ("n-shot", "value", "± stderr") else "left",
                         overflow="fold")
    for name, r in zip(short_names([r.model for r in results]), results):
        for row in r.rows:
            value, stderr = row["value"], row["stderr"]
            table.add_row(name, row["task"], "-" if row["n_shot"] is None else str(row["n_shot"]), row["metric"],
                          row["filter"], f"{value:.4f}" if isinstance(value, (int, float)) else str(value),
                          "-" if stderr is None else f"{stderr:.4f}")
    print_table(table)


def short_names(names: list[str]) -> list[str]:
    """The shortest trailing path parts that still tell the models apart (runs/a/final vs runs/b/final)."""
    parts = [name.rstrip("/").split("/") for name in names]
    for keep in range(1, max(len(p) for p in parts) + 1):
        short = ["/".join(p[-keep:]) for p in parts]
        if len(set(short)) == len(set(names)):
            return short
    return names


@contextmanager
def training_progress(enabled: bool = True) -> Iterator[Any]:
    """A Reporter drawing a progress bar (step, loss, lr, tokens/s, ETA) on stderr."""
    from llmcli.tasks.finetune import Reporter

    bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[status]}"),
                   TimeRemainingColumn(), console=stderr, disable=not (enabled and stderr.is_terminal))
    task = bar.add_task("train", total=None, status="")

    def log(record: dict[str, Any]) -> None:
        parts = [f"loss {record['loss']:.4f}" if "loss" in record else "",
                 f"lr {record['lr']:.2e}" if "lr" in record else "",
                 f"{record['tokens_per_second']:.0f} tok/s" if "tokens_per_second" in record else "",
                 f"eval {record['eval_loss']:.4f}" if "eval_loss" in record else "",
                 # preference objectives: how often and by how much the chosen answer wins
                 f"acc {record['rewards/accuracies']:.2f}" if "rewards/accuracies" in record else "",
                 f"margin {record['rewards/margins']:.3f}" if "rewards/margins" in record else "",
                 f"kl {record['kl']:.3f}" if "kl" in record else "",
                 # grpo: the mean reward of the step's completions
                 f"reward {record['reward']:.3f}" if "reward" in record else ""]
        bar.update(task, completed=record["step"], status="  ".join(p for p in parts if p))
        if not stderr.is_terminal and enabled:
            notice(strict_json.dumps(record))

    with bar:
        yield Reporter(start=lambda total, done: bar.update(task, total=total, completed=done),
                       step=lambda done: bar.update(task, completed=done), log=log,
                       note=lambda message: notice(message) if enabled else None)


def finetune_record(result: Any) -> dict[str, Any]:
    record = asdict(result)
    record.pop("history")
    return record


def finetune_summary(result: Any) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("output", result.output)
    table.add_row("objective / data", f"{result.objective} / {result.data_format} ({result.train_examples} training sequences)")
    table.add_row("steps", str(result.steps))
    if result.final_loss is not None:
        table.add_row("final train loss", f"{result.final_loss:.4f}")
    if result.eval_loss is not None:
        table.add_row("eval loss / perplexity", f"{result.eval_loss:.4f} / {math.exp(min(result.eval_loss, 700)):.2f}")
    table.add_row("tokens/s", f"{result.tokens_per_second:.0f} ({result.world_size} process(es))")
    table.add_row("time", f"{result.seconds:.1f} s")
    print_table(table)


def llama_cpp_rows(build: dict[str, Any] | None) -> list[tuple[str, str]]:
    if build is None:
        return []
    if not build["runs"]:
        return [("llama.cpp", f"cannot run here: {build['why']}")]
    state = "on" if build["extra_buffers"] else "off"
    return [("llama.cpp", " ".join(build["features"])), ("", f"extra buffer types {state} ({build['why']})")]


def config_lines(config: dict[str, Any]) -> None:
    """`llmcli info`'s defaults: the config file and what it sets for each command, then LLMCLI_MODEL."""
    write(f"{'config':<15} {config['path']}{'' if config['found'] else ' (none)'}\n")

    def tables(table: dict[str, Any], where: str) -> None:
        values = {k: v for k, v in table.items() if not isinstance(v, dict)}
        if values:
            write(f"{'':<15} [{where}] " + ", ".join(f"{k} = {strict_json.dumps(v)}" for k, v in values.items()) + "\n")
        for name, value in table.items():
            if isinstance(value, dict):
                tables(value, f"{where}.{name}" if where else name)

    tables(config["defaults"], "")
    if config["LLMCLI_MODEL"]:
        write(f"{'LLMCLI_MODEL':<15} {config['LLMCLI_MODEL']}\n")


def info_table(details: dict[str, Any]) -> None:
    """`llmcli info` as aligned lines."""
    packages = ", ".join(f"{name} {found or '-'}" for name, found in details["packages"].items())
    engines = ", ".join(name for name, available in details["engines"].items() if available)
    rows = [("llmcli", details["llmcli"]), ("python", f"{details['python']} ({details['platform']})"),
            ("packages", packages),
            ("cpu", f"{details['cpu']['physical']} physical cores, {details['cpu']['logical']} logical; "
                    f"{' '.join(details['cpu']['features']) or 'no vector extensions seen'}"),
            ("gpus", ", ".join(details["gpus"]) or "none"), ("engines", engines),
            *llama_cpp_rows(details.get("llama.cpp")),
            ("embedded model", details["embedded_model"] or "not installed"),
            ("embedding model", details["embedded_embedding_model"] or "not installed"),
            ("cache", details["cache"]["path"])]
    rows += [("", f"{e['name']}  {e['kind']}  {human_size(e['size_bytes'])}") for e in details["cache"]["entries"]]
    for label, value in rows:
        write(f"{label:<15} {value}\n")
