"""One command on N processes and N machines.

Launching: `--num-processes`/`--nnodes` start this same command line in worker processes through
torchrun's own launcher (`elastic_launch` with torchrun's argument parsing and static rendezvous).
A command started by an outside launcher (`torchrun -m llmcli`, `accelerate launch -m llmcli`,
`srun` + torchrun) finds `LOCAL_RANK` set and runs as a worker without launching again.

Working: `Workers.map_in_order` gives each rank a contiguous, batch-aligned share of the inputs
(accelerate's `split_between_processes`) and gathers every rank's results back in input order
(`gather_object`). Batches are never split across ranks, so each input is computed in the same batch
as in one process, and results are the same numbers. Only rank 0 prints.

Failing: a launched worker does not print its error; it records it for the launcher, which prints the
first real failure once and exits with its code (torchrun stops the other workers).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from llmcli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, UsageError

ERRORS_DIR_ENV = "LLMCLI_WORKER_ERRORS"  # set by our launcher: where workers record their failure
LAUNCH_OPTIONS = ("--num-processes", "--nnodes", "--node-rank", "--master-addr", "--master-port")


@dataclass
class Launch:
    num_processes: int = 1  # per machine
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None

    def validate(self) -> None:
        if self.num_processes <= 0:
            raise UsageError(f"--num-processes must be at least 1, got {self.num_processes}")
        if self.nnodes <= 0:
            raise UsageError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(f"--node-rank must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), "
                             f"got {self.node_rank}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise UsageError(f"--master-port must be in 1..65535, got {self.master_port}")
        if self.nnodes > 1 and self.master_port is None:
            raise UsageError("--nnodes above 1 needs --master-port (and --master-addr: node 0's address)",
                             "Give every machine the same --master-addr and --master-port.")

    @property
    def wanted(self) -> bool:
        """Whether this invocation should launch workers (it is not one itself)."""
        return (self.num_processes > 1 or self.nnodes > 1) and not is_worker()


def is_worker() -> bool:
    return "LOCAL_RANK" in os.environ


def exit_worker(code: int) -> NoReturn:
    """End a worker process without the interpreter's teardown. gloo's threads release the tensors of
    finished collectives in their own time, taking the GIL to do it; one that does so while the
    interpreter shuts down aborts the process ("terminate called without an active exception", SIGABRT)
    and turns a run that succeeded into a failure, now and then. destroy_process_group does not stop
    those threads, so the worker runs its exit handlers, flushes its output and leaves at once."""
    import atexit
    import sys

    torch = sys.modules.get("torch")  # never imported just for this (a worker that failed early)
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # leave the group cleanly, as the other ranks do
    atexit._run_exitfuncs()  # what the interpreter's exit would have run: temporary folders, logging
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(code)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# ---------------------------------------------------------------- launching


def without_launch_options(argv: list[str]) -> list[str]:
    """The command line minus the launch options, for the workers (which must not launch again)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in LAUNCH_OPTIONS:
            skip = "=" not in arg
            continue
        kept.append(arg)
    return kept


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(launch: Launch, device: str | None, argv: list[str], debug: bool = False) -> int:
    """Run this command line in `launch.num_processes` workers on this machine (one of `nnodes`), and
    wait for all. Returns the exit code of the contract: 0, or the first failing worker's code."""
    import logging

    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch
    from torch.distributed.run import config_from_args, parse_args

    from llmcli import render

    on_cpu = device == "cpu" or not torch.cuda.is_available()
    if not on_cpu and launch.num_processes > torch.cuda.device_count():
        gpus = torch.cuda.device_count()  # NCCL refuses two ranks on one GPU, deep inside the workers
        raise UsageError(f"--num-processes {launch.num_processes} needs {launch.num_processes} GPUs, and {gpus} "
                         "found", f"Use --num-processes {gpus}, or --device cpu for CPU processes.")
    if not debug:  # torchrun's own warnings and failure reports: the workers' one error line says it
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("torch.distributed"):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    port = launch.master_port or free_port()
    errors = Path(tempfile.mkdtemp(prefix="llmcli-workers-"))
    env = {ERRORS_DIR_ENV: str(errors)}
    if on_cpu:
        env["ACCELERATE_USE_CPU"] = "1"  # accelerate then sets up gloo DDP instead of looking for GPUs
        # the cores shared out between this machine's workers (torch would give each worker all of them)
        from llmcli.engines import machine_physical_cores

        env["OMP_NUM_THREADS"] = str(max(1, machine_physical_cores() // launch.num_processes))
    # the workers inherit this process's environment (torchrun has no other way to pass it): set for
    # the launch only, the user's own OMP_NUM_THREADS first
    saved = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items() if k not in os.environ or k == ERRORS_DIR_ENV})
        args = parse_args([f"--nnodes={launch.nnodes}", f"--nproc-per-node={launch.num_processes}",
                           f"--node-rank={launch.node_rank}", f"--master-addr={launch.master_addr}",
                           f"--master-port={port}", "--rdzv-backend=static", "--max-restarts=0",
                           "-m", "llmcli", *without_launch_options(argv)])
        config, command, command_args = config_from_args(args)
        where = f" (machine {launch.node_rank} of {launch.nnodes})" if launch.nnodes > 1 else ""
        render.notice(f"Launching {launch.num_processes} process{'es' if launch.num_processes > 1 else ''}{where}.")
        elastic_launch(config, command)(*command_args)
        return 0
    except ChildFailedError as failed:
        return report_failure(errors, {rank: failure.exitcode for rank, failure in failed.failures.items()})
    except (SignalException, KeyboardInterrupt):  # Ctrl-C or SIGTERM: torchrun has stopped the workers
        return EXIT_INTERRUPTED  # cli.main says "interrupted" for this code
    except Exception as exc:  # rendezvous timeouts, an unreachable master
        render.error(f"could not run the workers: {type(exc).__name__}: {exc}",
                     "Check --master-addr and --master-port, and that every machine was started.")
        return EXIT_INTERNAL
    finally:
        import shutil

        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(errors, ignore_errors=True)


def report_failure(errors: Path, exit_codes: dict[int, int]) -> int:
    """Print the first failing worker's error once and return its exit code. Workers stopped because
    another one failed record an interrupt: a real error is preferred to those."""
    from llmcli import render

    recorded = []
    for path in errors.glob("rank-*.json"):
        try:
            recorded.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    recorded.sort(key=lambda r: (r["code"] == EXIT_INTERRUPTED, r["time"]))
    if recorded:
        first = recorded[0]
        if first["code"] != EXIT_INTERRUPTED:  # cli.main says "interrupted" for that code
            render.error(f"{first['message']} (process {first['rank']})", first["hint"])
        return first["code"]
    # the first worker that failed on its own: the others were stopped by torchrun (SIGTERM)
    rank, code = min(exit_codes.items(), key=lambda item: (item[1] == -signal.SIGTERM, item[0]))
    how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
    render.error(f"worker process {rank} {how}", "A killed worker often ran out of memory; try fewer processes.")
    return EXIT_INTERNAL


def record_error(message: str, hint: str | None, code: int) -> bool:
    """A launched worker records its error for the launcher instead of printing it; False if this
    process was not launched by us (then it prints its own)."""
    folder = os.environ.get(ERRORS_DIR_ENV)
    if not folder or not is_worker():
        return False
    record = {"rank": rank(), "message": message, "hint": hint, "code": code, "time": time.time()}
    target = Path(folder) / f"rank-{rank()}.json"
    try:
        partial = target.with_suffix(".tmp")
        partial.write_text(json.dumps(record))
        partial.replace(target)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------- working


class OneProcess:
    """The workers of a task called without any: everything is computed here."""

    def map_in_order(self, items: Sequence[Any], batch_size: int, compute: Callable[[list[Any]], list[Any]]) -> list[Any]:
        return compute(list(items))


class Workers:
    """Shares out inputs and gathers results. One process: everything runs here, nothing imported."""

    def __init__(self, device: str | None = None) -> None:
        self.rank, self.size = rank(), world_size()
        self.state = None
        if self.size > 1:
            import torch
            from accelerate import PartialState

            # cpu=True is what makes a launched CPU run gloo DDP (MULTI_CPU)
            self.state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        """The device this rank should use when the user named none: its own GPU."""
        if self.state is None or self.state.device.type == "cpu":
            return None
        return str(self.state.device)

    def map_in_order(self, items: Sequence[Any], batch_size: int, compute: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """compute(this rank's share of items) on every rank; every rank's results, concatenated in rank
        (so input) order, on every rank."""
        if self.state is None:
            return compute(list(items))
        from accelerate.utils import gather_object

        batches = [list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
        with self.state.split_between_processes(batches) as mine:
            share = [item for batch in mine for item in batch]
        local = compute(share) if share else []  # more ranks than batches: some have nothing to do
        return gather_object(local)  # each rank's list, concatenated in rank order

    def progress(self, advance: Callable[[int], None]) -> Callable[[int], None]:
        """Rank 0's bar counts all ranks' work: shares are equal to a batch, so its own progress times
        the number of ranks (the bar ends when the results are gathered)."""
        if self.size == 1:
            return advance
        return (lambda n: advance(n * self.size)) if self.is_main else (lambda n: None)
