"""DPO's reference model, each way in a process of its own: peak RSS and wall time of
`llmcli finetune -d examples/preferences.jsonl --objective dpo` with --reference copy, precomputed, and
--lora (the base with the adapter disabled). The figures behind `--reference auto`.

    .venv/bin/python benchmarks/dpo_reference.py [--model smollm2] [--steps 3] [--repeats 1] [--ways copy ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "examples" / "preferences.jsonl"
WAYS = {"copy": ["--reference", "copy"], "precomputed": ["--reference", "precomputed"],
        "lora (adapter disabled)": ["--lora"], "lora, precomputed": ["--lora", "--reference", "precomputed"]}


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_run(model: str, steps: int, extra: list[str], workdir: Path) -> tuple[float, float, float]:
    """(peak RSS MB, wall seconds, CPU seconds): CPU time varies less than wall time on a shared machine."""
    rss_file, output = workdir / "rss.json", workdir / "out"
    began, cpu = time.perf_counter(), child_cpu_seconds()
    subprocess.run([sys.executable, str(ROOT / "peak_rss.py"), str(rss_file), "finetune", "-d", str(DATA), "-m", model,
                    "--objective", "dpo", "--max-steps", str(steps), "--batch-size", "4", "--lr", "5e-6",
                    "--log-every", "1", "-o", str(output), "--overwrite", *extra], check=True, capture_output=True)
    return json.loads(rss_file.read_text())["peak_rss_mb"], time.perf_counter() - began, child_cpu_seconds() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--ways", nargs="*", default=list(WAYS), choices=list(WAYS))
    args = parser.parse_args()
    print(f"{'reference':26} {'peak RSS MB':>12} {'seconds':>9} {'CPU s':>7}   ({args.model}, {args.steps} steps, batch 4, "
          f"median of {args.repeats})")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.ways:
            extra = WAYS[name]
            runs = [one_run(args.model, args.steps, extra, Path(tmp)) for _ in range(args.repeats)]
            medians = [statistics.median(r[i] for r in runs) for i in range(3)]
            print(f"{name:26} {medians[0]:12.0f} {medians[1]:9.1f} {medians[2]:7.1f}", flush=True)


if __name__ == "__main__":
    main()
