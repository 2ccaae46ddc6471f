"""Run `llmcli ARGS` in this process and write its peak resident memory (MB) to the file named first.

Used by the finetune benchmark so each side's memory is measured in a process of its own."""

import atexit
import sys

from llmcli.cli import main


def peak_rss_mb() -> float:
    """VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child of a
    process holding a big model would report its parent's peak."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


report = sys.argv.pop(1)
atexit.register(lambda: open(report, "w").write(str(peak_rss_mb())))
main(sys.argv[1:])
