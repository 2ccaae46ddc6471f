"""Run `llmcli ARGS` in this process and write its peak memory to the file named first, as JSON:
peak_rss_mb (resident set) and peak_gpu_mb (torch's peak GPU allocation, null without a GPU).

Used by the finetune benchmark so each side's memory is measured in a process of its own."""

import atexit
import json
import sys

from llmcli.cli import main


def peak_rss_mb() -> float:
    """VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of a
    process holding a big model would report its parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_gpu_mb() -> float | None:
    torch = sys.modules.get("torch")  # not imported here: the llama.cpp engine's runs never load it
    return torch.cuda.max_memory_allocated() / 2**20 if torch and torch.cuda.is_available() else None


report = sys.argv.pop(1)
atexit.register(lambda: open(report, "w").write(json.dumps({"peak_rss_mb": peak_rss_mb(),
                                                            "peak_gpu_mb": peak_gpu_mb()})))
main(sys.argv[1:])
