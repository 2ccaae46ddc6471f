"""What survives which failure: fuzzed inputs, interrupts, killed conversions, corrupt caches, partial checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import default_sigint, gpl_text, run_cli
from llmcli.errors import DataError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# text with NUL bytes, surrogate-free unicode of every plane, JSON-looking fragments and very long lines
TEXTS = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(['{"prompt": "a"}', '{"text": ', "[MASK]", "\x00", "\n", "é", "😀", '"', "{", "}",
                              '{"messages": []}', '{"prompt": "p", "completion": "c"}', ",", "x" * 5000]),
             max_size=30).map("".join),
)
BYTES = st.one_of(st.binary(max_size=400), TEXTS.map(lambda t: t.encode("utf-8")))


def fuzz_file(directory: Path, suffix: str, data: bytes) -> str:
    path = directory / f"input{suffix}"
    path.write_bytes(data)
    return str(path)


@FUZZ
@given(data=BYTES, suffix=st.sampled_from([".txt", ".jsonl", ".csv", ""]))
def test_readers_raise_data_error_or_succeed(tmp_path, data, suffix):
    from llmcli.data import load_training_data, read_document, read_prompts, read_texts

    path = fuzz_file(tmp_path, suffix, data)
    for read in (read_prompts, read_texts, read_document, load_training_data):
        try:
            read(path)
        except DataError:
            pass


@FUZZ
@given(text=TEXTS)
def test_mask_parsing_raises_data_error_or_succeeds(tiny_bert_tokenizer, text):
    from llmcli.tasks.fill_mask import with_model_mask

    try:
        marked = with_model_mask(tiny_bert_tokenizer, text)
        assert tiny_bert_tokenizer.mask_token in marked
    except DataError:
        assert "[MASK]" not in text


@pytest.fixture(scope="module")
def tiny_bert_tokenizer(tiny_bert):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_bert)


def test_resume_skips_incomplete_checkpoints(tiny_gpt2, tmp_path):
    """A checkpoint killed mid-write is either a .tmp directory or lacks its state file: never picked."""
    data = tmp_path / "gpl.txt"
    data.write_text(gpl_text()[:12000])
    output = tmp_path / "out"
    args = ["finetune", "--data", data, "-m", tiny_gpt2, "-o", output, "--max-length", "64", "--max-steps", "12",
            "--save-every", "4", "--keep-checkpoints", "5", "--json"]
    assert run_cli(*args).exit_code == 0
    checkpoints = output / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-12", "step-4", "step-8"]  # the last step too
    (checkpoints / "step-8" / "trainer_state.json").unlink()  # as if killed before the state was written
    shutil.rmtree(checkpoints / "step-12")
    (checkpoints / ".tmp-step-12-dead").mkdir()  # as if killed before the rename
    (output / "config.json").unlink()  # and so before the final model was written: the run is not finished
    result = run_cli(*args, "--resume")
    assert result.exit_code == 0, result.stderr
    assert "checkpoints/step-4 (step 4 of 12;" in result.stderr


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmcli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=default_sigint,
                            env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_generate_flushes_output_and_exits_130(signum):
    process = start(["generate", "Write a very long story about a lighthouse keeper.", "-n", "400"])
    first = process.stdout.read(20)  # streamed text has started to arrive
    process.send_signal(signum)
    rest, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert len(first + rest) >= 20
    assert b"Traceback" not in stderr and b"Error: interrupted" in stderr


@pytest.mark.slow
def test_gguf_cache_survives_interrupts_races_and_corruption(tmp_path):
    cache = tmp_path / "cache"
    env = {"LLMCLI_CACHE": str(cache)}
    entries = lambda: sorted(p.name for p in (cache / "gguf").iterdir() if not p.name.endswith(".lock"))  # noqa: E731

    # 1. Ctrl-C during the conversion: exit 130, and no half-written entry left behind
    process = start(["generate", "hi", "-n", "2", "--engine", "hf"], env)
    deadline = time.time() + 120
    while not (cache / "gguf").is_dir() or not any(p.name.startswith(".tmp-") for p in (cache / "gguf").iterdir()):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and b"Error: interrupted" in stderr, stderr
    assert entries() == [] and not any(p.name.startswith(".tmp-") for p in (cache / "gguf").iterdir())

    # 2. two processes converting the same file at once: both succeed, one complete entry
    first, second = start(["generate", "hi", "-n", "2", "--engine", "hf"], env), start(["generate", "hi", "-n", "2", "--engine", "hf"], env)
    for process in (first, second):
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr
    [entry] = entries()
    marker = json.loads((cache / "gguf" / entry / "llmcli-cache.json").read_text())
    assert marker["files"]["model.safetensors"] > 100_000_000

    # 3. a truncated cache entry is detected and rebuilt, not loaded
    weights = cache / "gguf" / entry / "model.safetensors"
    with open(weights, "r+b") as file:
        file.truncate(1000)
    rebuilt = start(["generate", "What is the capital of France?", "-n", "12", "--json", "--engine", "hf"], env)
    stdout, stderr = rebuilt.communicate(timeout=300)
    assert rebuilt.returncode == 0, stderr
    assert b"Converting" in stderr and "Paris" in json.loads(stdout)["text"]
    assert b"de-quantizing" not in stderr  # transformers' own tqdm bar: our notice says it once
    assert weights.stat().st_size == marker["files"]["model.safetensors"]


def read_until(fd: int, marker: bytes, seen: bytearray, timeout: float = 60) -> None:
    """Read a pseudo-terminal's output into `seen` until `marker` appears after what was there."""
    import select

    start, deadline = len(seen), time.time() + timeout
    while marker not in seen[start:]:
        assert time.time() < deadline, bytes(seen[-300:])
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                seen.extend(os.read(fd, 4096))
            except OSError:  # the child closed the terminal
                break


@pytest.mark.slow
def test_chat_at_a_terminal_ctrl_c_stops_a_reply_then_leaves(tmp_path):
    """In a pseudo-terminal: Ctrl-C during a reply returns to the prompt (the session goes on); Ctrl-C
    at the idle prompt leaves with 130 and an error line of its own; Ctrl-D leaves with 0 and a newline."""
    import pty

    def start_chat() -> tuple[subprocess.Popen, int]:
        master, slave = pty.openpty()
        process = subprocess.Popen([sys.executable, "-m", "llmcli", "chat", "-n", "300"], stdin=slave, stdout=slave,
                                   stderr=slave, env={**os.environ, "TERM": "dumb"}, close_fds=True,
                                   preexec_fn=default_sigint)
        os.close(slave)
        return process, master

    process, master = start_chat()
    seen = bytearray()
    read_until(master, b">>> ", seen)
    os.write(master, b"Write a very long story about a lighthouse keeper.\n")
    read_until(master, b"lighthouse keeper.", seen)
    time.sleep(0.5)
    before = len(seen)
    read_until(master, b" ", seen)  # the reply is streaming
    process.send_signal(signal.SIGINT)
    read_until(master, b">>> ", seen)  # back at the prompt, still running
    assert process.poll() is None and len(seen) > before
    assert b"Reply stopped" in seen
    time.sleep(0.5)  # into input() proper, past the prompt's echo
    process.send_signal(signal.SIGINT)  # at the idle prompt: leave
    assert process.wait(timeout=60) == 130
    read_until(master, b"interrupted", seen)
    assert b"\n" in seen[seen.rindex(b">>> "):seen.index(b"Error: interrupted")]  # not glued to the prompt
    os.close(master)

    process, master = start_chat()
    seen = bytearray()
    read_until(master, b">>> ", seen)
    os.write(master, b"\x04")  # Ctrl-D
    assert process.wait(timeout=60) == 0
    read_until(master, b"\n", seen, timeout=5)
    assert seen.endswith(b"\n") or seen.endswith(b"\r\n")
    os.close(master)


@pytest.mark.parametrize("interrupt, signum", [("KeyboardInterrupt", "SIGINT"), ("Terminated", "SIGTERM")])
def test_an_interrupt_python_cannot_raise_is_sent_again_not_printed(interrupt, signum, capsys):
    """An interrupt raised in a weakref callback is "unraisable": Python would print a traceback and
    drop it. main's hook sends the signal again instead (received here by a recording handler)."""
    import signal
    import weakref

    from llmcli.cli import redeliver_interrupts
    from llmcli.cli.common import Terminated

    error = {"KeyboardInterrupt": KeyboardInterrupt, "Terminated": Terminated}[interrupt]
    number = getattr(signal, signum)
    received = []
    previous = signal.signal(number, lambda n, frame: received.append(n))
    hook, sys.unraisablehook = sys.unraisablehook, redeliver_interrupts
    try:
        class Target:
            pass

        target = Target()

        def callback(reference):
            raise error()

        reference = weakref.ref(target, callback)  # noqa: F841  (the callback runs when target goes)
        del target
        deadline = time.time() + 5
        while not received and time.time() < deadline:  # sent from another thread, once the hook has returned
            time.sleep(0.01)
    finally:
        sys.unraisablehook = hook
        signal.signal(number, previous)
    assert received == [number]
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_mid_stream_puts_the_error_on_a_line_of_its_own():
    """On a terminal (a pty here) a Ctrl-C while text streams ends the text's line before
    `Error: interrupted`."""
    import os
    import pty
    import select
    import signal
    import subprocess
    import sys
    import time

    controller, terminal = pty.openpty()
    # as in a terminal's foreground: SIGINT is not ignored, whatever this test run inherited (a shell
    # without job control starts its background jobs with SIGINT ignored, and exec keeps that)
    process = subprocess.Popen([sys.executable, "-m", "llmcli", "generate", "Once upon a time", "--no-chat",
                                "-n", "2000"], stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.close(terminal)
    seen, deadline, interrupted = b"", time.time() + 120, False
    while time.time() < deadline:
        ready, _, _ = select.select([controller], [], [], 1)
        if ready:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        # well into the streamed text: 80 plain characters since the last escape code of the notices
        if not interrupted and len(seen.rsplit(b"\x1b", 1)[-1].split(b"m", 1)[-1]) > 80:
            process.send_signal(signal.SIGINT)
            interrupted = True
    process.wait(timeout=60)
    os.close(controller)
    import re

    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace").replace("\r\n", "\n"))  # no colours
    assert interrupted and process.returncode == 130, text
    assert "\nError: interrupted" in text and "Traceback" not in text, text


@pytest.mark.parametrize("words, offered", [
    ("generate --engine ", ["auto", "hf", "llama.cpp"]),
    ("chat --dtype b", ["bfloat16"]),
    ("export model --type q8", ["q8_0"]),
    ("eval --metric p", ["perplexity", "pseudo-perplexity"]),
    ("generate --truncate ", ["error", "left"]),
    ("finetune --objective ", ["auto", "clm", "mlm", "dpo", "kto", "orpo", "simpo", "grpo"]),
    ("finetune --reference ", ["auto", "copy", "precomputed"]),
    ("finetune --arch ", ["gpt2", "llama", "bert"]),
])
def test_shell_completion_offers_each_options_choices(words, offered):
    """What `llmcli --install-completion` wires up: bash asks through click's completion variables."""
    parts = words.split()
    current = len(parts) + (1 if words.endswith(" ") else 0)
    result = subprocess.run([sys.executable, "-m", "llmcli"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "_LLMCLI_COMPLETE": "complete_bash",
                                 "COMP_WORDS": f"llmcli {words}", "COMP_CWORD": str(current)})
    assert result.stdout.split() == offered, (result.stdout, result.stderr)


@pytest.mark.parametrize("closed", ["stdout and stderr", "stderr"])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(closed, tiny_gguf, tmp_path):
    """`llmcli generate -f prompts -n 30 2>&1 | head -1`, and with only stderr piped (stdout alone:
    test_errors.py): the reader takes one line and goes; llmcli stops at its next write, with exit status
    0 (what `head` users expect: the output ended, nothing failed)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"Prompt number {n}\n" for n in range(40)))
    piped = {"stdout and stderr": (subprocess.PIPE, subprocess.STDOUT),
             "stderr": (open(tmp_path / "out.txt", "wb"), subprocess.PIPE)}[closed]
    process = subprocess.Popen([sys.executable, "-m", "llmcli", "generate", "-f", str(prompts), "-n", "30", "-m",
                                str(tiny_gguf)], stdout=piped[0], stderr=piped[1])
    reader = process.stdout if closed != "stderr" else process.stderr
    assert reader.readline()  # `head -1`
    reader.close()
    assert process.wait(timeout=120) == 0
