"""Causal fill-mask on a small cloze set of our own (benchmarks/data/cloze.jsonl: 10 blanks each at
the start, middle and end of a sentence): top-1 and top-3 accuracy by position, on the embedded
model, on both engines (hf in float32; llama.cpp on the F16 weights, shared beginnings decoded once).
Measured on 2 cores (top-1 / top-3):

  candidates from                          start      middle     end        all
  left context only (before)               0% / 0%    40% / 70%  80% / 90%  40% / 53%
  + whole-sentence question (hf, 221 s)    30% / 30%  40% / 70%  80% / 90%  50% / 63%
  the same on llama.cpp (123 s)            30% / 30%  40% / 70%  80% / 90%  50% / 63%

(AMD EPYC; 29 of the 30 top-3 lists are identical on the two engines, the 30th differs in 3rd place.)

The question prompt (`fill_mask.blank_question`) puts the answer's first token in its top 100 for
every start blank (" Paris": 1743rd after the left context, 3rd after the question). Tried and not
kept: a chat prompt to the instruct model (its likeliest answers were "The", "This", "No"), and
adding the question's log-probability of each word to its sentence score (weights 0.5, 1, 2: start
top-1 10-20%, all top-1 at most 40%); the sentence score alone ranks best.

Usage: python benchmarks/cloze.py [--out benchmarks/results/cloze.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "results" / "cloze.json"))
    args = parser.parse_args()
    from llmcli.engines import choose_engine
    from llmcli.tasks.fill_mask import FillMaskOptions, fill_mask

    items = [json.loads(line) for line in (ROOT / "data" / "cloze.jsonl").read_text().splitlines() if line.strip()]
    report = {}
    for name in ("hf", "llama.cpp"):  # the same method on both engines: accuracy and time side by side
        engine = choose_engine(None, name, command="fill-mask", kind="auto", device="cpu", dtype="float32")
        options = FillMaskOptions(top_k=3)
        began = time.perf_counter()
        results = fill_mask(engine, [item["text"] for item in items], options)
        seconds = time.perf_counter() - began
        table: dict[str, dict[str, float]] = {}
        for position in ("start", "middle", "end", "all"):
            chosen = [(item, result) for item, result in zip(items, results) if position in ("all", item["position"])]
            top = [[p.token_str.lower() for p in result.predictions[0]] for _, result in chosen]
            answers = [item["answer"].lower() for item, _ in chosen]
            table[position] = {"top1": sum(t[:1] == [a] for t, a in zip(top, answers)) / len(chosen),
                               "top3": sum(a in t for t, a in zip(top, answers)) / len(chosen)}
        report[name] = {"accuracy": table, "seconds": round(seconds, 1),
                        "answers": {item["text"]: [p.token_str for p in result.predictions[0]]
                                    for item, result in zip(items, results)}}
        print(name, json.dumps(table), f"{seconds:.0f} s")
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
