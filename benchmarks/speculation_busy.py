"""Issue 45: wall time of `generate` (embedded model, F16, greedy) with speculation off, auto (the current
rule) and auto with the rule before issue 45 (restored by a patch below), beside 0, 1 and 3 busy processes
(`while 1: pass`). One run: every round goes through every load, task and mode, so its figures compare.

    PYTHONPATH=. python benchmarks/speculation_busy.py [ROUNDS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

sys.path.insert(0, "benchmarks")
from speculation import grounded_tasks, in_process  # noqa: E402

from llmcli.engines import choose_engine  # noqa: E402
from llmcli.engines.llama_speculation import PROBE_AFTER, PROBE_AFTER_MAX, Speculation, extra_cost  # noqa: E402

new_length, new_checked = Speculation.draft_length, Speculation.checked

def old_length(self, base, size, matched=0):  # the rule before this branch (linear rate, prior 0.5)
    if self.mode == "on":
        return size
    rate = getattr(self, "rate", 0.5)
    cost = extra_cost(base, size) + base * size * self.draft_cost
    if cost >= size:
        return 0
    if self.resting > 0:
        self.resting -= 1
        return size if self.resting == 0 else 0
    if rate * size > cost:
        return size
    self.resting = self.probe_after
    self.probe_after = min(2 * self.probe_after, PROBE_AFTER_MAX)
    return 0

def old_checked(self, drafted, accepted):
    self.drafted += drafted
    self.accepted += accepted
    share = accepted / drafted
    self.rate = 0.7 * getattr(self, "rate", 0.5) + 0.3 * share
    if share >= 0.5:
        self.probe_after = PROBE_AFTER

def use(rule):
    Speculation.draft_length, Speculation.checked = (old_length, old_checked) if rule == "old" else (new_length, new_checked)

engine = choose_engine(None, "llama.cpp")
tasks = {"quote (64 tok)": (grounded_tasks()["quote from a license"][0], 64),
         "capital (48 max)": ("What is the capital of France? Answer in one sentence.", 48),
         "story (64 tok)": ("Write a long, detailed story about a robot who learns to paint.", 64)}
in_process(engine, "hi", None, "off", 4)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
times = {}
for round_ in range(rounds):
    for load in (0, 1, 3):
        busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(load)]
        try:
            time.sleep(0.3)
            for name, (message, tokens) in tasks.items():
                for mode in (("off", "new"), ("auto", "new"), ("auto", "old")):
                    use(mode[1])
                    began = time.perf_counter()
                    result = in_process(engine, message, None, mode[0], tokens)
                    times.setdefault((name, load, mode), []).append(
                        (time.perf_counter() - began, result.drafted, result.accepted, result.generated_tokens))
        finally:
            for process in busy:
                process.kill()
                process.wait()
print("load average after:", open("/proc/loadavg").read().split()[:3])
for name in tasks:
    for load in (0, 1, 3):
        row = {mode: times[(name, load, mode)] for mode in (("off", "new"), ("auto", "new"), ("auto", "old"))}
        med = {mode: statistics.median(x[0] for x in runs) for mode, runs in row.items()}
        off = med[("off", "new")]
        print(f"{name:17} busy {load}: off {off:5.2f} s | auto new {med[('auto', 'new')]:5.2f} s "
              f"(x{off / med[('auto', 'new')]:.2f}, drafted/kept {row[('auto', 'new')][-1][1]}/{row[('auto', 'new')][-1][2]}) | "
              f"auto old {med[('auto', 'old')]:5.2f} s (x{off / med[('auto', 'old')]:.2f}, drafted/kept "
              f"{row[('auto', 'old')][-1][1]}/{row[('auto', 'old')][-1][2]}) | tokens {row[('off', 'new')][-1][3]}", flush=True)
