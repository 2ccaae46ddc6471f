"""Run `llmcli ARGS` in this process and write its peak resident memory (MB) to the file named first.

Used by the finetune benchmark so each side's memory is measured in a process of its own."""

import atexit
import resource
import sys

from llmcli.cli import main

report = sys.argv.pop(1)
atexit.register(lambda: open(report, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
main(sys.argv[1:])
