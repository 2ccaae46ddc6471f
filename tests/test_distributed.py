"""Every command on N processes and N machines (gloo DDP on the CPU): the output one process gives.

Each launch starts real worker processes through torchrun's launcher, so these tests start
`python -m llmcli` subprocesses; two "machines" are two launcher invocations over 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GPL3, run_cli

LOOPBACK = {"GLOO_SOCKET_IFNAME": "lo"}


def llmcli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **LOOPBACK, **(env or {})})


def records(result: subprocess.CompletedProcess) -> list[dict]:
    """The --json lines, without the wall-clock `seconds` (the one field that differs run to run)."""
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    for line in lines:
        line.pop("seconds", None)
    return lines


def free_port() -> int:
    from llmcli.distributed import free_port

    return free_port()


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    """Five prompts of uneven lengths: more prompts than ranks, and batches of 2 that do not divide them."""
    words = GPL3.read_text().split()
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(" ".join(words[i * 7:i * 7 + length]) for i, length in enumerate([3, 30, 1, 12, 6])))
    return path


@pytest.mark.parametrize("model, batch", [("tiny_gpt2", "2"), ("tiny_gguf", "1")])
def test_generate_on_two_processes_equals_one(model, batch, prompt_file, request):
    model_dir = request.getfixturevalue(model)
    args = ["generate", "-f", prompt_file, "-m", model_dir, "--no-chat", "-n", "12", "--batch-size", batch, "--json"]
    one = records(llmcli(*args))
    two = llmcli(*args, "--num-processes", "2")
    assert records(two) == one and len(one) == 5
    assert two.stderr.count("Launching 2 processes") == 1
    # fewer prompts than ranks: the second process has nothing to do, and the output is still one record
    single = ["generate", "the program", "-m", model_dir, "--no-chat", "-n", "12", "--json"]
    assert records(llmcli(*single, "--num-processes", "2")) == records(llmcli(*single))


@pytest.mark.parametrize("model, batch", [("tiny_gpt2", "2"), ("tiny_gguf", "1")])
def test_seeded_sampling_on_two_processes_equals_one(model, batch, prompt_file, request):
    """Each batch samples from its own seed, so a prompt drawn on the second process gets the sample
    one process gives it."""
    model_dir = request.getfixturevalue(model)
    args = ["generate", "-f", prompt_file, "-m", model_dir, "--no-chat", "-n", "12", "--batch-size", batch, "--json",
            "-t", "1.0", "--seed", "5", "--num-return-sequences", "2"]
    one = records(llmcli(*args))
    assert records(llmcli(*args, "--num-processes", "2")) == one and len(one) == 10
    assert len({record["text"] for record in one}) > 5  # samples, not one greedy answer repeated


def test_fill_mask_on_two_processes_equals_one(tiny_bert):
    texts = ["the [MASK] of this license", "you may [MASK] it", "[MASK] program", "the work is [MASK] by law",
             "source [MASK]"]
    args = ["fill-mask", *texts, "-m", tiny_bert, "--json", "--batch-size", "2"]
    one = records(llmcli(*args))
    assert records(llmcli(*args, "--num-processes", "2")) == one and len(one) == 5


@pytest.fixture
def eval_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(GPL3.read_text()[:6000])
    return path


def threads_per_worker(processes: int) -> int:
    """The threads each of `processes` CPU workers gets from llmcli's launcher (the cores shared out)."""
    from llmcli.engines import machine_physical_cores

    return max(1, machine_physical_cores() // processes)


def test_eval_on_two_processes_and_under_torchrun_equals_one(tiny_gpt2, eval_file):
    """Causal perplexity: per-token NLLs gathered in order, so value, tokens and stderr are the one-process
    ones exactly, once each forward pass runs on as many threads as a worker's: on an AVX2-only AMD EPYC
    host torch's float32 kernels sum in another order on 1 thread than on 2 (nll 18497.031833171844 with
    --threads 1, 18497.03183364868 with 2, measured), so the reference is one process with a worker's
    threads. Started by torchrun or `accelerate launch`, the command runs as a worker and does not
    launch again."""
    args = ["eval", "-d", eval_file, "-m", tiny_gpt2, "--max-length", "64", "--stride", "32", "--batch-size", "2",
            "--json"]
    threads = threads_per_worker(2)
    [one] = records(llmcli(*args, "--threads", str(threads)))
    [two] = records(llmcli(*args, "--num-processes", "2"))
    assert two == one
    launched = {**os.environ, **LOOPBACK, "OMP_NUM_THREADS": str(threads)}
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                               f"--master-port={free_port()}", "-m", "llmcli", *map(str, args)],
                              capture_output=True, text=True, timeout=300, env=launched)
    assert records(torchrun) == [one]  # one line: rank 0 alone prints
    assert "Launching" not in torchrun.stderr
    accelerate = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes=2",
                                 "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no",
                                 f"--main_process_port={free_port()}", "-m", "llmcli", *map(str, args)],
                                capture_output=True, text=True, timeout=300, env=launched)
    assert records(accelerate) == [one] and "Launching" not in accelerate.stderr


def test_pseudo_perplexity_and_accuracy_on_two_processes_equal_one(tiny_bert, eval_file):
    for metric in ("pseudo-perplexity", "accuracy"):
        args = ["eval", "-d", eval_file, "-m", tiny_bert, "--metric", metric, "--max-length", "64",
                "--batch-size", "16", "--json"]
        [one] = records(llmcli(*args, "--threads", str(threads_per_worker(2))))  # see the causal test above
        assert records(llmcli(*args, "--num-processes", "2")) == [one], metric


def test_two_machines_train_and_score_as_one_machine_with_two_processes(tiny_llama, tmp_path):
    """Two single-process "machines" (two launchers over 127.0.0.1, static rendezvous) against one machine
    with two processes: bit-identical final weights, and the same eval value."""
    from safetensors.torch import load_file

    data = tmp_path / "data.txt"
    data.write_text(GPL3.read_text()[:20000])
    common = ["finetune", "--data", data, "-m", tiny_llama, "--max-steps", "4", "--max-length", "64",
              "--batch-size", "2", "--lr", "3e-3"]

    def two_machines(*args) -> list[subprocess.CompletedProcess]:
        port = free_port()
        machines = [subprocess.Popen([sys.executable, "-m", "llmcli", *map(str, args), "--nnodes", "2",
                                      "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port",
                                      str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **LOOPBACK}) for rank in (0, 1)]
        finished = []
        for machine in machines:
            stdout, stderr = machine.communicate(timeout=300)
            finished.append(subprocess.CompletedProcess(machine.args, machine.returncode, stdout, stderr))
        return finished

    machine0, machine1 = two_machines(*common, "-o", tmp_path / "two-machines")
    assert machine0.returncode == 0 and machine1.returncode == 0, machine0.stderr + machine1.stderr
    assert "machine 1 of 2" in machine1.stderr
    one = llmcli(*common, "-o", tmp_path / "one-machine", "--num-processes", "2")
    assert one.returncode == 0, one.stderr
    ours, reference = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("two-machines", "one-machine"))
    assert set(ours) == set(reference) and all((ours[k] == reference[k]).all() for k in reference)
    run = json.loads((tmp_path / "two-machines" / "run.json").read_text())
    assert run["resolved"]["world_size"] == 2

    scoring = ["eval", "-d", data, "-m", tmp_path / "one-machine", "--max-length", "64", "--json"]
    machine0, machine1 = two_machines(*scoring)
    assert machine1.stdout == ""  # only rank 0 prints
    assert records(machine0) == records(llmcli(*scoring, "--num-processes", "2"))


def test_a_failing_worker_ends_all_with_one_error_line(tiny_gpt2, prompt_file):
    """The second process's share holds a prompt too long for the context: exit 2, one `Error:` line
    (the worker's own message, from the launcher), no traceback, no torchrun report."""
    lines = prompt_file.read_text().splitlines()
    lines[-1] = " ".join(GPL3.read_text().split()[:400])
    prompt_file.write_text("\n".join(lines))
    result = llmcli("generate", "-f", prompt_file, "-m", tiny_gpt2, "--no-chat", "-n", "8", "--num-processes", "2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("Error:") == 1 and "exceeds the model's context" in result.stderr, result.stderr
    assert "(process 1)" in result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr


def test_a_crashed_worker_is_named_not_the_one_torchrun_stopped(tmp_path, capsys):
    """A worker that dies without recording an error (a signal): the report names it, not a worker
    that torchrun then stopped with SIGTERM, even when that one has the lower rank."""
    from llmcli.distributed import report_failure

    assert report_failure(tmp_path, {0: -signal.SIGTERM, 1: -signal.SIGABRT}) == 1
    assert "Error: worker process 1 was killed by signal 6" in capsys.readouterr().err


def workers_of(marker: str) -> list[int]:
    """Pids of processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_launcher_leaves_no_worker_behind(tiny_gpt2, tmp_path, signum):
    prompts = tmp_path / f"long-{signum.name}.txt"  # the file name marks this test's workers
    prompts.write_text("\n".join(["the program"] * 40))
    launcher = subprocess.Popen([sys.executable, "-m", "llmcli", "generate", "-f", str(prompts), "-m", str(tiny_gpt2),
                                 "--no-chat", "-n", "200", "--num-processes", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **LOOPBACK},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(workers_of(str(prompts))) < 3:  # the launcher and its two workers
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.2)
    time.sleep(3)  # the workers are loading or generating
    launcher.send_signal(signum)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, stderr
    assert stderr.decode().count("Error:") == 1 and "Traceback" not in stderr.decode(), stderr
    deadline = time.time() + 30
    while workers_of(str(prompts)):
        assert time.time() < deadline, f"orphaned workers: {workers_of(str(prompts))}"
        time.sleep(0.2)


def test_launch_options_are_checked_before_anything_starts(tiny_gpt2):
    for args, message in ((["--num-processes", "0"], "--num-processes must be at least 1"),
                          (["--nnodes", "2"], "--nnodes above 1 needs --master-port"),
                          (["--nnodes", "2", "--node-rank", "2", "--master-port", "29999"], "--node-rank must be in 0..1"),
                          (["--master-port", "70000"], "--master-port must be in 1..65535")):
        result = run_cli("generate", "hi", "-m", tiny_gpt2, *args)
        assert result.exit_code == 2 and f"Error: {message}" in result.stderr, (args, result.stderr)


def test_disk_offloaded_model_gives_the_in_memory_results(tiny_llama, tmp_path):
    """--device-map auto with a --max-memory too small for the weights: accelerate keeps some layers on
    disk (in a fresh folder inside --offload-dir, removed at exit) and the greedy tokens and perplexity
    are those of the model held in memory."""
    from accelerate.utils import compute_module_sizes
    from transformers import AutoModelForCausalLM

    size = compute_module_sizes(AutoModelForCausalLM.from_pretrained(tiny_llama))[""]
    offload = tmp_path / "offload"
    offload.mkdir()
    (offload / "mine.txt").write_text("the user's file")
    placed = ["--device-map", "auto", "--max-memory", f"cpu={size // 2}", "--offload-dir", offload]
    generate = ["generate", "the program", "-m", tiny_llama, "--no-chat", "-n", "12", "--json"]
    text = tmp_path / "text.txt"
    text.write_text(GPL3.read_text()[:3000])
    evaluate = ["eval", "-d", text, "-m", tiny_llama, "--max-length", "64", "--json"]
    for command in (generate, evaluate):
        in_memory = run_cli(*command)
        offloaded = llmcli(*command, *placed)  # a process of its own: the folder goes when it exits
        assert "--device-map: 1 module on cpu, 4 on disk" in offloaded.stderr
        assert records(offloaded) == [{k: v for k, v in r.items() if k != "seconds"} for r in in_memory.json_lines()]
        assert [p.name for p in offload.iterdir()] == ["mine.txt"]


def test_finetune_stopped_on_two_processes_resumes_exactly(tiny_gpt2, tmp_path):
    """SIGTERM to the launcher: both workers stop at the same step's end (they agree on it), save one
    checkpoint and exit 130; --resume on two processes ends with the uninterrupted run's weights, bit
    for bit."""
    from safetensors.torch import load_file

    data = tmp_path / "data.txt"
    data.write_text(GPL3.read_text()[:20000])
    args = ["finetune", "--data", data, "-m", tiny_gpt2, "--max-steps", "150", "--max-length", "64",
            "--batch-size", "2", "--log-every", "1", "--num-processes", "2"]
    straight = llmcli(*args, "-o", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr
    stopped = tmp_path / "stopped"
    launcher = subprocess.Popen([sys.executable, "-m", "llmcli", *map(str, args), "-o", str(stopped)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **LOOPBACK})
    deadline = time.time() + 120
    while not (stopped / "metrics.jsonl").exists() or len((stopped / "metrics.jsonl").read_text().splitlines()) < 5:
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, stderr
    assert stderr.decode().count("Error:") == 1 and "Traceback" not in stderr.decode(), stderr
    assert not (stopped / "model.safetensors").exists() and list((stopped / "checkpoints").iterdir())
    resumed = llmcli(*args, "-o", stopped, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    ours, reference = (load_file(str(path / "model.safetensors")) for path in (stopped, tmp_path / "straight"))
    assert all((ours[k] == reference[k]).all() for k in reference)
