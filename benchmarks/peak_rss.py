"""Run `llmcli ARGS` in this process and write its peak memory to the file named first, as JSON:
peak_rss_mb (resident set) and peak_gpu_mb (torch's peak GPU allocation, null without a GPU).

Used by the finetune benchmark so each side's memory is measured in a process of its own."""

import atexit
import json
import sys

from llmcli.cli import main
from llmcli.engines import process_peak_rss_mb


def peak_gpu_mb() -> float | None:
    torch = sys.modules.get("torch")  # not imported here: the llama.cpp engine's runs never load it
    return torch.cuda.max_memory_allocated() / 2**20 if torch and torch.cuda.is_available() else None


report = sys.argv.pop(1)
atexit.register(lambda: open(report, "w").write(json.dumps({"peak_rss_mb": process_peak_rss_mb(),
                                                            "peak_gpu_mb": peak_gpu_mb()})))
main(sys.argv[1:])
