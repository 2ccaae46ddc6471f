"""Every host runs the llama.cpp engine: every weight type through generate --fast and eval in fresh
processes; the extra-buffer decision (probe, cache, override -> model parameters); a SIGILL that gets
through is one Error line."""

from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import sys

import pytest

from conftest import GPL3

pytest.importorskip("llama_cpp")

from llmcli.engines import llama_host, llamacpp  # noqa: E402

WEIGHT_TYPES = {"F32": None, "F16": "LLAMA_FTYPE_MOSTLY_F16", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
                "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}


def quantized(tiny_gguf, folder, name: str):
    """The tiny F32 fixture requantized by llama.cpp itself (llama_model_quantize)."""
    if WEIGHT_TYPES[name] is None:
        return tiny_gguf
    lib = llamacpp.import_llama_cpp()
    target = folder / f"tiny-{name}.gguf"
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, WEIGHT_TYPES[name])
    assert lib.llama_model_quantize(str(tiny_gguf).encode(), str(target).encode(), ctypes.byref(params)) == 0
    return target


def llmcli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmcli", *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", list(WEIGHT_TYPES))
def test_every_weight_type_generates_and_evaluates_in_a_fresh_process(tiny_gguf, tmp_path, name):
    """A crash (SIGILL in AMX or repacked kernels) or any non-zero exit fails; fresh processes, as a user
    runs them, so one crash cannot hide behind another test's state."""
    path = quantized(tiny_gguf, tmp_path, name)
    generated = llmcli("generate", "This License", "-m", path, "--fast", "--no-chat", "-n", "12", "--json")
    assert generated.returncode == 0, generated.stderr
    record = json.loads(generated.stdout)
    assert record["weights"] == name and record["engine"] == "llama.cpp" and record["generated_tokens"] > 0
    data = tmp_path / "text.txt"
    data.write_text(GPL3.read_text()[:2000])
    scored = llmcli("eval", "-d", data, "-m", path, "--max-length", "128", "--json")
    assert scored.returncode == 0, scored.stderr
    result = json.loads(scored.stdout)
    assert result["weights"] == name and result["tokens"] > 100 and 1 < result["value"] < float("inf")


def dies_by(signum: int) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], -signum, "", "")


def ran() -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], 0, json.dumps({"system_info": "CPU : AVX2 = 1 | AMX_INT8 = 1 |"}), "")


@pytest.fixture
def fresh_decision(tmp_path, monkeypatch):
    """An empty probe cache and no per-process decision yet."""
    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(llama_host.ENV, raising=False)
    monkeypatch.setattr(llamacpp, "_host_checks", {})


def test_a_probe_that_dies_with_extra_buffers_turns_them_off_in_the_model_parameters(fresh_decision, monkeypatch):
    """The AMX host: extra buffer types die by SIGILL, plain kernels run. The model is then loaded with
    use_extra_bufts off, the answer is cached (no second probe), and info says why."""
    calls = []

    def probe(extra_buffers: bool):
        calls.append(extra_buffers)
        return dies_by(signal.SIGILL) if extra_buffers else ran()

    monkeypatch.setattr(llama_host, "run_probe", probe)
    lib = llamacpp.import_llama_cpp()
    assert llamacpp.model_params(lib, 0).use_extra_bufts is False
    assert calls == [True, False]
    monkeypatch.setattr(llamacpp, "_host_checks", {})  # a new process: the cached answer, no probe
    assert llamacpp.host_check() == llama_host.HostCheck(True, False, "probed: died by SIGILL with them, ran without",
                                                         "CPU : AVX2 = 1 | AMX_INT8 = 1 |")
    assert calls == [True, False]
    from llmcli.inventory import llama_cpp_build

    build = llama_cpp_build()
    assert build["extra_buffers"] is False and "SIGILL" in build["why"]


def test_a_probe_that_runs_keeps_extra_buffers_and_the_override_wins(fresh_decision, monkeypatch):
    monkeypatch.setattr(llama_host, "run_probe", lambda extra_buffers: ran())
    lib = llamacpp.import_llama_cpp()
    assert llamacpp.model_params(lib, 0).use_extra_bufts is True
    monkeypatch.setenv(llama_host.ENV, "0")
    assert llamacpp.model_params(lib, 0).use_extra_bufts is False
    monkeypatch.setattr(llama_host, "run_probe", lambda extra_buffers: dies_by(signal.SIGILL))
    monkeypatch.setenv(llama_host.ENV, "1")  # the user's word, even against a probe that would die
    assert llamacpp.model_params(lib, 0).use_extra_bufts is True


def test_a_build_that_dies_either_way_is_one_error_line(fresh_decision, monkeypatch, tiny_gguf):
    from conftest import run_cli

    monkeypatch.setattr(llama_host, "run_probe", lambda extra_buffers: dies_by(signal.SIGILL))
    result = run_cli("generate", "hi", "-m", tiny_gguf, "--engine", "llama.cpp", "-n", "2")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[0] == ("Error: the installed llama.cpp build cannot run on this CPU (probed: died by SIGILL with "
                        "them and by SIGILL without)") and "make llama-rebuild" in lines[1] and len(lines) == 2


def test_a_probe_that_fails_without_a_signal_is_not_cached(fresh_decision, monkeypatch):
    """A broken install is not a fact about the host: extra buffers off for now, probed again next time."""
    calls = []
    monkeypatch.setattr(llama_host, "run_probe",
                        lambda extra_buffers: calls.append(1) or subprocess.CompletedProcess([], 1, "", "ImportError: x"))
    assert llama_host.check().extra_buffers is False
    assert llama_host.check().why == "the probe failed (ImportError: x); extra buffers off"
    assert len(calls) == 2


def test_the_real_probe_classifies_a_killed_child(monkeypatch):
    """run_probe's child, replaced by one that kills itself as AMX code does, reads as that signal."""
    real = subprocess.run

    def child(argv, **kwargs):
        return real([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"], **kwargs)

    monkeypatch.setattr(llama_host.subprocess, "run", child)
    result, lasting = llama_host.probe()
    assert not result.runs and lasting and result.why.count("SIGILL") == 2


def test_the_real_probe_runs_here(tmp_path):
    """The probe child itself, on this host's build: it must run at least without extra buffers."""
    finished = llama_host.run_probe(False)
    assert finished.returncode == 0, finished.stderr
    assert "AVX" in json.loads(finished.stdout)["system_info"]


def test_an_illegal_instruction_inside_llama_cpp_is_one_error_line():
    """A real SIGILL (ud2) inside a foreign call, after the engine's handler is installed."""
    script = (
        "import ctypes, mmap\n"
        "from llmcli.engines import llama_host\n"
        "llama_host.report_illegal_instructions()\n"
        "code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
        "code.write(b'\\x0f\\x0b')  # ud2\n"
        "ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(code)))()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "Error: llama.cpp stopped on an instruction this CPU does not run (SIGILL)."
    assert f"{llama_host.ENV}=0" in lines[1] and len(lines) == 2


def test_a_bad_override_is_a_usage_error(tiny_gguf, monkeypatch):
    from conftest import run_cli

    monkeypatch.setenv(llama_host.ENV, "yes")
    result = run_cli("generate", "hi", "-m", tiny_gguf, "--engine", "llama.cpp")
    assert result.exit_code == 2 and result.stderr.startswith(f"Error: {llama_host.ENV}='yes' is not one of auto, 0, 1")


@pytest.mark.parametrize("given, expected", [({}, "1000"), ({"GOMP_SPINCOUNT": "5"}, "5"),
                                             ({"OMP_WAIT_POLICY": "active"}, None)])
def test_openmp_threads_spin_briefly_unless_the_user_chose(given, expected):
    """libgomp's default spin (300000) collapses decoding when other processes share the cores (0.4 vs
    11 tok/s measured); the engine lowers it before llama_cpp loads libgomp, and keeps a user's choice."""
    import os

    script = ("import os\nfrom llmcli.engines.llamacpp import import_llama_cpp\nimport_llama_cpp()\n"
              "print(os.environ.get('GOMP_SPINCOUNT'))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**env, **given})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)
