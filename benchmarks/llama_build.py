"""How fast and how big is the installed llama.cpp build on this host? Run once per build to compare
builds (native, portable x86-64-v3, ...) on one host: every figure is from fresh `llmcli` processes.

- generate: tok/s of greedy decoding of the same chat prompt, default weights (F16) and --fast (the
  embedded Q4_1 file as it is), and the process's peak RSS;
- eval: seconds to score a GPL text on the embedded Q4_1 file (eval runs the file as it is);
- busy: the same F16 generate while BUSY processes spin on the cores, with the default threads and
  with --threads 1 (llama.cpp's threads wait for each other at every op: a descheduled one stalls all).

Usage: python benchmarks/llama_build.py [--label NAME] [--out FILE] [--busy 4]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

LLMCLI = [sys.executable, "-m", "llmcli"]
PROMPT = "Write a short story about a lighthouse keeper."
GPL = Path("/usr/share/common-licenses/GPL-3")


def stats_of(args: list[str], env: dict | None = None) -> dict[str, float]:
    """--stats of one `llmcli generate`, as numbers."""
    result = subprocess.run([*LLMCLI, "generate", PROMPT, "-n", "128", "--stats", *args], capture_output=True,
                            text=True, env={**os.environ, **(env or {})}, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"generate {args} failed ({result.returncode}): {result.stderr[-500:]}")
    figures = {}
    for key, pattern in (("tok_s", r"tokens/s\s+([\d.]+)"), ("rss_mb", r"peak memory\s+([\d.]+) MB"),
                         ("tokens", r"generated tokens\s+(\d+)")):
        figures[key] = float(re.search(pattern, result.stderr).group(1))
    return figures


def generate_figures(args: list[str], repeats: int) -> dict[str, float]:
    runs = [stats_of(args) for _ in range(repeats)]
    return {"tok_s": statistics.median(r["tok_s"] for r in runs), "rss_mb": max(r["rss_mb"] for r in runs),
            "tokens": runs[0]["tokens"]}


def eval_seconds(data: Path, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run([*LLMCLI, "eval", "-d", str(data), "--json"], capture_output=True, text=True, timeout=900)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"eval failed ({result.returncode}): {result.stderr[-500:]}")
    return statistics.median(times)


def spin(deadline: float) -> None:
    while time.monotonic() < deadline:
        pass


def busy_figures(count: int, repeats: int) -> dict[str, float]:
    """Default threads vs --threads 1 while `count` processes spin (each stops by itself in 10 min)."""
    deadline = time.monotonic() + 600
    spinners = [multiprocessing.Process(target=spin, args=(deadline,), daemon=True) for _ in range(count)]
    for process in spinners:
        process.start()
    try:
        time.sleep(1)
        return {"default_tok_s": generate_figures([], repeats)["tok_s"],
                "threads1_tok_s": generate_figures(["--threads", "1"], repeats)["tok_s"]}
    finally:
        for process in spinners:
            process.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="installed")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=4, help="spinning processes for the busy figures (0: skip)")
    args = parser.parse_args()
    import llama_cpp

    data = Path("/tmp/llama-build-eval.txt")
    data.write_text(GPL.read_text()[:20000])
    stats_of([])  # the F16 conversion, once, outside the timings
    cpu = open("/proc/cpuinfo").read()
    figures = {
        "label": args.label, "python": platform.python_version(),
        "cpu_flags": sorted(set(re.findall(r"\b(amx\w*|avx512f|avx2)\b", cpu))),
        "llama_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "generate_f16": generate_figures([], args.repeats),
        "generate_fast_q4_1": generate_figures(["--fast"], args.repeats),
        "eval_q4_1_20kB_s": round(eval_seconds(data, args.repeats), 2),
        "generate_f16_threads1": generate_figures(["--threads", "1"], args.repeats),
    }
    if args.busy:
        figures[f"busy{args.busy}"] = busy_figures(args.busy, args.repeats)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
