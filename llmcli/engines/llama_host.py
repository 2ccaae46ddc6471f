"""Whether this host runs the installed llama.cpp build, and whether llama.cpp may use its "extra
buffer types" (weights repacked for AMX tiles or for wider SIMD) here.

Hosts of one machine kind differ: some Xeon virtual machines advertise AMX (cpuinfo flags, XCR0, the
kernel's ARCH_REQ_XCOMP_PERM all say yes) but do not run tile instructions, and a build compiled on
one host can lack nothing on it yet die on another. Neither can be seen without running the code, so
the first use of a build on a host runs it in a child process (llama_probe): with extra buffer types,
and if that dies by a signal, without them. The answer is cached per host and build, so later
commands pay only a file read. LLMCLI_LLAMA_EXTRA_BUFFERS=0|1 overrides the probe; auto is the default.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from llmcli.errors import UsageError

ENV = "LLMCLI_LLAMA_EXTRA_BUFFERS"
CHOICES = ("auto", "0", "1")
PROBE_TIMEOUT_S = 120
REBUILD_HINT = ("Rebuild llama.cpp on this machine (make llama-rebuild, or CMAKE_ARGS=-DGGML_NATIVE=OFF pip "
                "install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36), or use --engine hf.")


@dataclass
class HostCheck:
    runs: bool  # whether the build runs on this host at all
    extra_buffers: bool  # llama_model_params.use_extra_bufts
    why: str  # how that was decided, for `llmcli info`
    system_info: str | None = None  # llama_print_system_info() of the build, when the probe ran


def setting() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise UsageError(f"{ENV}={os.environ[ENV]!r} is not one of auto, 0, 1",
                         f"Unset it (auto: probed once per host and build), or set {ENV}=0 or 1.")
    return value


def build_files() -> list[Path]:
    """The installed llama.cpp libraries (regular files; their .so.N links point at them)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(next(iter(spec.submodule_search_locations))) / "lib"
    return sorted(p for p in folder.glob("lib*.so*") if p.is_file() and not p.is_symlink())


def host_and_build_key() -> str:
    """Changes with the CPU (model and flags), the hypervisor's view of it, and the build's files."""
    digest = hashlib.sha256()
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.split(":")[0].strip() in ("vendor_id", "model name", "flags", "microcode"):
            digest.update(line.encode())
    for path in build_files():
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    try:
        digest.update(version("llama-cpp-python").encode())
    except PackageNotFoundError:
        pass
    return digest.hexdigest()[:24]


def cache_file() -> Path:
    from llmcli import models

    return models.cache_root() / "llama-host.json"


def read_cached(key: str) -> HostCheck | None:
    try:
        return HostCheck(**json.loads(cache_file().read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(key: str, result: HostCheck) -> None:
    """Atomic, so concurrent first runs cannot leave a torn file; a read-only cache only costs a probe."""
    path = cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    known[key] = asdict(result)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps(known, indent=1) + "\n")
        tmp.replace(path)
    except OSError:
        pass


def run_probe(extra_buffers: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LLMCLI_DEBUG"}
    return subprocess.run([sys.executable, "-m", "llmcli.engines.llama_probe", "1" if extra_buffers else "0"],
                          capture_output=True, text=True, env=env, timeout=PROBE_TIMEOUT_S)


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def probe() -> tuple[HostCheck, bool]:
    """Run the build in a child, with extra buffer types and then without; (result, worth caching)."""
    try:
        first = run_probe(True)
    except subprocess.TimeoutExpired:
        return HostCheck(True, False, f"the probe did not finish in {PROBE_TIMEOUT_S} s; extra buffers off"), False
    if first.returncode == 0:
        return HostCheck(True, True, "probed: ran with them", info_of(first)), True
    if first.returncode > 0:  # not a crash: a broken install, which the import itself will report
        return HostCheck(True, False, f"the probe failed ({last_line(first)}); extra buffers off"), False
    died = signal_name(first.returncode)
    second = run_probe(False)
    if second.returncode == 0:
        return HostCheck(True, False, f"probed: died by {died} with them, ran without", info_of(second)), True
    if second.returncode < 0:
        return HostCheck(False, False, f"probed: died by {died} with them and by "
                                       f"{signal_name(second.returncode)} without"), True
    return HostCheck(True, False, f"probed: died by {died} with them; without, {last_line(second)}"), False


def info_of(result: subprocess.CompletedProcess) -> str | None:
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])["system_info"]
    except (IndexError, ValueError, KeyError):
        return None


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1][:200] if lines else f"exit {result.returncode}"


def check() -> HostCheck:
    """The decision for this process: the override, else the cached probe, else a new probe."""
    chosen = setting()
    if chosen != "auto":
        return HostCheck(True, chosen == "1", f"{ENV}={chosen}")
    key = host_and_build_key()
    cached = read_cached(key)
    if cached is not None:
        return cached
    result, lasting = probe()
    if lasting:
        write_cached(key, result)
    return result


def require_runnable(result: HostCheck) -> None:
    if not result.runs:
        raise UsageError(f"the installed llama.cpp build cannot run on this CPU ({result.why})", REBUILD_HINT)


_on_illegal_instruction = None  # the ctypes callback must outlive the process's every llama.cpp call


def report_illegal_instructions() -> None:
    """Turn a SIGILL inside llama.cpp (a kernel the probe did not reach) into one Error line and exit 2,
    instead of the shell's bare "Illegal instruction". A C-level handler through ctypes: Python's own
    signal handlers run between bytecodes, and a synchronous SIGILL would re-execute the instruction
    forever. The handler only writes and exits."""
    global _on_illegal_instruction
    if _on_illegal_instruction is not None or not hasattr(signal, "SIGILL"):
        return
    message = (f"Error: llama.cpp stopped on an instruction this CPU does not run (SIGILL).\n"
               f"Set {ENV}=0 (llama.cpp's AMX and repacked weights off); if that does not help: {REBUILD_HINT}\n")

    def on_signal(signum: int) -> None:
        os.write(2, message.encode())
        os._exit(2)

    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
    _on_illegal_instruction = handler_type(on_signal)
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, handler_type]
    libc.signal(signal.SIGILL, _on_illegal_instruction)
