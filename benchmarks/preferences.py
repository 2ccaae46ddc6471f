"""P24 and P25: `llmcli finetune --objective dpo | grpo` against TRL's DPOTrainer and GRPOTrainer on
the same job: the embedded SmolLM2-135M-Instruct as llmcli loads it (the float32 safetensors that
`-m smollm2` converts its GGUF file into, handed to TRL as that directory), the same data, batch,
max length, beta, AdamW (fused, both), learning rate and steps, on the CPU in float32.

Each run is a process of its own (peak RSS is per process, imports included), the two sides
alternating. Speed counts the optimizer steps after the first (the warm-up), each side timed at the
end of every step, from the start of its training loop, so loading and tokenizing are outside it:
llmcli through its loop's progress callback (this file run as `preferences.py llmcli REPORT finetune
...`), TRL through a TrainerCallback's `on_step_end`. Both also record the process's CPU time per step.

`run.py` calls `dpo_figures` and `grpo_figures`. TRL's side is this file run as a script:

    python benchmarks/preferences.py trl-dpo --model DIR --data FILE --max-steps 6 ...
    python benchmarks/preferences.py trl-grpo --model DIR --data FILE --max-steps 4 ...

each printing one JSON line (step end times, peak RSS and, for GRPO, the split of each step).
P25 runs llmcli with each `--rollout-engine` (hf, llama). Whether both engines train the same way:

    python benchmarks/preferences.py reward-curves 10

runs docs/finetune.md's sums example with each engine and prints each one's reward per step.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PREFERENCES = ROOT.parent / "examples" / "preferences.jsonl"
# GRPO: short questions whose answer is a number, rewarded when the whole answer is one number
# (which the instruct model, used to writing sentences, rarely does untrained)
QUESTIONS = [f"What is {a} + {b}? Answer with the number only." for a, b in
             [(3, 4), (12, 9), (25, 17), (8, 8), (40, 2), (7, 15), (31, 11), (6, 19)]]
NUMBER_ONLY = r"^\s*-?\d+\s*$"


# ---------------------------------------------------------------- the llmcli side and the comparison

def steps_per_second(ends: list[float]) -> float:
    """Steps after the first (the warm-up) over their time."""
    return (len(ends) - 1) / (ends[-1] - ends[0])


def cpu_seconds_per_step(cpu_ends: list[float]) -> float:
    """The process's CPU time (all threads) per step after the first: less moved than wall time by other
    work on a shared machine, which this benchmark's host was (see the notes in docs/performance.md)."""
    return (cpu_ends[-1] - cpu_ends[0]) / (len(cpu_ends) - 1)


def run_llmcli(data: Path, output: Path, report: Path, settings: list[str]) -> dict:
    """`llmcli finetune` as the user runs it (`-m smollm2`), in a process of its own, timed at each
    optimizer step (see `llmcli_timed`); its records from metrics.jsonl."""
    subprocess.run([sys.executable, str(ROOT / "preferences.py"), "llmcli", str(report), "finetune", "-d", str(data),
                    "-m", "smollm2", "-o", str(output), "--device", "cpu", "--log-every", "1", "--json", *settings],
                   capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {"records": records, **json.loads(report.read_text())}


def llmcli_timed(report: str, arguments: list[str]) -> None:
    """Run `llmcli ARGUMENTS` in this process with a clock on the loop's progress callback (called at
    the end of every optimizer step, where TRL's `on_step_end` comes), then write the step end times
    (wall and CPU, from the loop's start) and the peak RSS to `report`, as peak_rss.py does."""
    import atexit

    from llmcli.cli import main as llmcli_main
    from llmcli.engines import process_peak_rss_mb
    from llmcli.tasks import finetune_loop
    from llmcli.tasks.finetune import Reporter

    ends: list[float] = []
    cpu_ends: list[float] = []
    peaks: list[float] = []  # the peak so far at each step's end: is the process's peak training or saving?
    train = finetune_loop.train

    def timed_train(*positional, **named):
        reporter = next(a for a in [*positional, *named.values()] if isinstance(a, Reporter))
        began, cpu_began, moved = time.perf_counter(), time.process_time(), reporter.step

        def step(done: int) -> None:
            ends.append(time.perf_counter() - began)
            cpu_ends.append(time.process_time() - cpu_began)
            peaks.append(peak_rss_mb())
            moved(done)

        reporter.step = step
        return train(*positional, **named)

    finetune_loop.train = timed_train
    atexit.register(lambda: Path(report).write_text(json.dumps({"step_ends": ends, "cpu_ends": cpu_ends,
                                                                "step_peaks": peaks,
                                                                "peak_rss_mb": process_peak_rss_mb()})))
    llmcli_main(arguments)


def run_trl(kind: str, model_dir: Path, data: Path, output: Path, settings: list[str]) -> dict:
    done = subprocess.run([sys.executable, str(ROOT / "preferences.py"), f"trl-{kind}", "--model", str(model_dir),
                           "--data", str(data), "--output", str(output), *settings],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def embedded_model_dir() -> Path:
    """The safetensors directory `finetune -m smollm2` loads (converted from the GGUF file once)."""
    from llmcli import models

    return Path(models.local_model_dir(models.resolve_model("smollm2")))


def dpo_figures(workdir: Path, steps: int, repeats: int, lora: bool, checkpointing: bool) -> list:
    """P24: DPO (sigmoid, beta 0.1), the 12 chat pairs of examples/preferences.jsonl, batch 4 pairs,
    max length 256, lr 1e-5 linear; full finetune (reference: a frozen copy on both sides) and, with
    `lora`, --lora r 8 / alpha 16 / dropout 0.05 on all linear layers at lr 5e-4 (reference: the
    adapter switched off on both). Gradient checkpointing off on both (llmcli's default; TRL's configs
    default to on), and with `checkpointing` each run again with it on, both sides. TRL reads the
    records in llmcli's order, so every batch holds the same pairs and padding."""
    from run import Figure

    from llmcli.tasks.finetune_loop import epoch_batches

    model_dir = embedded_model_dir()
    records = PREFERENCES.read_text().splitlines()
    batch, seed = 4, 42
    ordered = workdir / "preferences-ordered.jsonl"
    epochs = -(-steps * batch // len(records)) + 1
    ordered.write_text("".join(records[i] + "\n" for epoch in range(epochs)
                               for b in epoch_batches(len(records), epoch, seed, batch, 1, 0) for i in b))
    figures = []
    # full: a frozen copy as reference, TRL's default (llmcli's default without LoRA precomputes them)
    copy = ["--reference", "copy"] if "--reference" in finetune_help() else []
    runs = [("full", copy, 1e-5)] + ([("--lora", ["--lora"], 5e-4)] if lora else [])
    if checkpointing:  # TRL's default, traded for memory
        runs += [(f"{name}, --grad-checkpointing", [*extra, "--grad-checkpointing"], lr) for name, extra, lr in runs]
    for name, extra, lr in runs:
        common = ["--max-steps", str(steps), "--batch-size", str(batch), "--max-length", "256", "--lr", str(lr),
                  "--beta", "0.1", "--seed", str(seed)]
        ours_runs, trl_runs = [], []
        for attempt in range(repeats):
            ours = run_llmcli(PREFERENCES, workdir / f"dpo-{len(figures)}-{attempt}", workdir / "report.json",
                              ["--objective", "dpo", *common, *extra])
            theirs = run_trl("dpo", model_dir, ordered, workdir / f"trl-dpo-{len(figures)}-{attempt}",
                             [*common, *(e for e in extra if e not in copy)])
            for runs, run in ((ours_runs, ours), (trl_runs, theirs)):
                runs.append({"steps_per_second": steps_per_second(run["step_ends"]),
                             "cpu_seconds_per_step": cpu_seconds_per_step(run["cpu_ends"]),
                             "peak_rss_mb": run["peak_rss_mb"], "step_peaks": run["step_peaks"]})
        speed, cpu, memory = ([statistics.median(r[key] for r in runs) for runs in (ours_runs, trl_runs)]
                              for key in ("steps_per_second", "cpu_seconds_per_step", "peak_rss_mb"))
        shape = (f"embedded SmolLM2-135M fp32, {steps} steps of {batch} pairs ({len(records)} chat pairs), "
                 f"max length 256, lr {lr:g}; median of {repeats}")
        raw = {"llmcli": ours_runs, "trl": trl_runs}
        figures += [Figure(f"P24 finetune --objective dpo ({name}) vs TRL DPOTrainer", speed[0], speed[1], "steps/s",
                           goal=1.0, raw=raw, note=f"{shape}; first step excluded; CPU time per step "
                                                   f"{cpu[0]:.1f} s vs TRL's {cpu[1]:.1f} s ({cpu[1] / cpu[0]:.2f}x)"),
                    Figure(f"P24 dpo ({name}) peak memory vs TRL", memory[0], memory[1], "MB RSS",
                           higher_is_better=False, goal=1.0, note="whole process, imports included")]
    return figures


def finetune_help() -> str:
    return subprocess.run([sys.executable, "-m", "llmcli", "finetune", "--help"], capture_output=True, text=True).stdout


def llmcli_has_grpo() -> bool:
    return "--num-generations" in finetune_help()


def grpo_split(records: list[dict]) -> dict[str, float]:
    """Median seconds per step in generating, syncing llama.cpp's weights (llama rollouts only), scoring and
    updating, over the steps after the first."""
    keys = [k for k in ("time/generate", "time/sync", "time/score", "time/update") if k in (records[-1] if records else {})]
    timed = [r for r in records[1:] if all(k in r for k in keys)]
    return {k.split("/")[1]: statistics.median(r[k] for r in timed) for k in keys} if timed else {}


ROLLOUT_ENGINES = {"hf": "hf rollouts", "llama": "llama.cpp rollouts"}


def grpo_figures(workdir: Path, steps: int, repeats: int) -> list:
    """P25: GRPO, 2 prompts a step x 4 completions (TRL's per_device_train_batch_size counts
    completions: 8), at most 32 new tokens, temperature 1.0, beta 0.04 (a frozen reference on both
    sides), one regex reward (the answer is a number), lr 1e-6; seconds per step after the first, with
    each side's split of a step into generating, (llama.cpp: syncing its weights,) scoring and the update;
    gradient checkpointing off on both (TRL's default is on). llmcli runs with each --rollout-engine, the
    three runs alternating."""
    from run import Figure

    if not llmcli_has_grpo():
        print("P25 skipped: llmcli has no grpo objective yet (finetune --help lists no --num-generations)")
        return []
    engines = [e for e in ROLLOUT_ENGINES if e == "hf" or "--rollout-engine" in finetune_help()]
    model_dir = embedded_model_dir()
    data = workdir / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    prompts, generations, length = 2, 4, 32
    common = ["--max-steps", str(steps), "--lr", "1e-6", "--beta", "0.04", "--seed", "42", "--temperature", "1.0",
              "--num-generations", str(generations), "--max-completion-length", str(length)]
    ours_runs: dict[str, list[dict]] = {engine: [] for engine in engines}
    trl_runs: list[dict] = []

    def summary(run: dict) -> dict:
        return {"seconds_per_step": 1 / steps_per_second(run["step_ends"]),
                "cpu_seconds_per_step": cpu_seconds_per_step(run["cpu_ends"]), "split": run["split"],
                "peak_rss_mb": run["peak_rss_mb"], "completion_length": run["completion_length"]}

    for attempt in range(repeats):
        for engine in engines:
            ours = run_llmcli(data, workdir / f"grpo-{engine}-{attempt}", workdir / "report.json",
                              ["--objective", "grpo", *common, "--batch-size", str(prompts),
                               "--reward", f"regex:{NUMBER_ONLY}", "--rollout-engine", engine])
            ours.update(split=grpo_split(ours["records"]), completion_length=statistics.mean(
                r.get("completion_length", 0.0) for r in ours["records"][1:]))
            ours_runs[engine].append(summary(ours))
        theirs = run_trl("grpo", model_dir, data, workdir / f"trl-grpo-{attempt}",
                         [*common, "--batch-size", str(prompts * generations), "--reward-pattern", NUMBER_ONLY])
        trl_runs.append(summary(theirs))

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def split(runs: list[dict]) -> str:
        parts = {k: statistics.median(r["split"][k] for r in runs) for k in runs[0]["split"]}
        return " / ".join(f"{k} {v:.2f}" for k, v in parts.items()) + " s" if parts else "none logged"

    figures = []
    for engine, runs in ours_runs.items():
        figures.append(Figure(
            f"P25 finetune --objective grpo ({ROLLOUT_ENGINES[engine]}) vs TRL GRPOTrainer (no vLLM)",
            median(runs, "seconds_per_step"), median(trl_runs, "seconds_per_step"), "s/step", higher_is_better=False,
            goal=1.5, raw={"llmcli": runs, "trl": trl_runs},
            note=f"embedded SmolLM2-135M fp32, {steps} steps of {prompts} prompts x {generations} completions of at "
                 f"most {length} tokens (mean {median(runs, 'completion_length'):.1f} vs TRL's "
                 f"{median(trl_runs, 'completion_length'):.1f}); per step: llmcli {split(runs)}, TRL {split(trl_runs)}; "
                 f"CPU time per step {median(runs, 'cpu_seconds_per_step'):.1f} s vs TRL's "
                 f"{median(trl_runs, 'cpu_seconds_per_step'):.1f} s; first step excluded; median of {repeats}"))
    return figures


def grpo_reward_curves(workdir: Path, steps: int) -> dict[str, list[float]]:
    """Same training with either rollout engine? The worked example of docs/finetune.md ("Rewards"): the
    sums of examples/sums.jsonl, rewarded for ending with 'Answer: N', LoRA; each engine's per-step
    answer_format reward and seconds per step (run as `preferences.py reward-curves STEPS`)."""
    examples = ROOT.parent / "examples"
    curves = {}
    for engine in ROLLOUT_ENGINES:
        run = run_llmcli(examples / "sums.jsonl", workdir / f"sums-{engine}", workdir / "report.json",
                         ["--objective", "grpo", "--reward", f"{examples / 'rewards.py'}:answer_format",
                          "--num-generations", "4", "--batch-size", "2", "--max-completion-length", "48",
                          "--max-steps", str(steps), "--lora", "--lr", "2e-3", "--scheduler", "constant",
                          "--rollout-engine", engine])
        curves[engine] = [round(r["reward"], 3) for r in run["records"]]
        curves[f"{engine} s/step"] = [round(b - a, 1) for a, b in zip([0.0, *run["step_ends"]], run["step_ends"])]
        curves[f"{engine} split"] = grpo_split(run["records"])
    return curves


# ---------------------------------------------------------------- TRL's side (run as a script)

def trl_common(args: argparse.Namespace) -> dict:
    """TrainingArguments both TRL trainers take as llmcli runs them."""
    return dict(output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                learning_rate=args.lr, seed=args.seed, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                weight_decay=0.0, optim="adamw_torch_fused", logging_steps=1, save_strategy="no", report_to="none",
                use_cpu=True, bf16=False, disable_tqdm=True, dataloader_num_workers=0, beta=args.beta,
                # TRL's configs default to True (llmcli's --grad-checkpointing to off): the same on both sides
                gradient_checkpointing=args.grad_checkpointing)


def step_clock() -> tuple[object, dict[str, list[float]]]:
    """A callback recording the time (wall and CPU) at the end of each optimizer step, from the start of
    training."""
    from transformers import TrainerCallback

    ends: dict[str, list[float]] = {"step_ends": [], "cpu_ends": [], "step_peaks": []}

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            self.began, self.cpu_began = time.perf_counter(), time.process_time()

        def on_step_end(self, *_, **__):
            ends["step_ends"].append(time.perf_counter() - self.began)
            ends["cpu_ends"].append(time.process_time() - self.cpu_began)
            ends["step_peaks"].append(peak_rss_mb())

    return Clock(), ends


def peak_rss_mb() -> float:
    return next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))


def lora_config(args: argparse.Namespace):
    if not args.lora:
        return None
    from peft import LoraConfig

    # llmcli's --lora defaults
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")


def trl_dpo(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    config = trl.DPOConfig(**trl_common(args), max_length=args.max_length, train_sampling_strategy="sequential",
                           loss_type=["sigmoid"])
    clock, ends = step_clock()
    records = [json.loads(line) for line in open(args.data)]
    trainer = trl.DPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model, dtype="float32"), args=config,
                             train_dataset=datasets.Dataset.from_list(records),
                             processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora_config(args),
                             callbacks=[clock])
    trainer.train()
    return {**ends, "peak_rss_mb": peak_rss_mb()}


def trl_grpo(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    pattern = re.compile(args.reward_pattern)

    def number_only(completions, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [1.0 if pattern.search(t) else 0.0 for t in texts]

    config = trl.GRPOConfig(**trl_common(args), num_generations=args.num_generations,
                            max_completion_length=args.max_completion_length, temperature=args.temperature)
    clock, ends = step_clock()
    trainer = trl.GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(args.model, dtype="float32"),
                              reward_funcs=number_only, args=config,
                              train_dataset=datasets.Dataset.from_list([json.loads(line) for line in open(args.data)]),
                              processing_class=AutoTokenizer.from_pretrained(args.model), peft_config=lora_config(args),
                              callbacks=[clock])
    # the split: TRL's rollouts (`_generate`, on the weights being trained) and rewards, timed per step;
    # the update is the rest of the step (reference log-probabilities, loss, backward, optimizer)
    spent = {"generate": [], "score": []}
    for method, part in (("_generate", "generate"), ("_calculate_rewards", "score")):
        original = getattr(trainer, method)

        def timed(*positional, _original=original, _part=part, **named):
            began = time.perf_counter()
            try:
                return _original(*positional, **named)
            finally:
                spent[_part].append(time.perf_counter() - began)

        setattr(trainer, method, timed)
    trainer.train()
    durations = [b - a for a, b in zip([0.0, *ends["step_ends"]], ends["step_ends"])][1:]  # after the first
    generate, score = spent["generate"][1:], spent["score"][1:]
    update = [d - g - s for d, g, s in zip(durations, generate, score)]
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history[1:] if "completions/mean_length" in e]
    return {**ends, "peak_rss_mb": peak_rss_mb(),
            "split": {"generate": statistics.median(generate), "score": statistics.median(score),
                      "update": statistics.median(update)},
            "completion_length": statistics.mean(lengths) if lengths else 0.0}


def main() -> None:
    if sys.argv[1:2] == ["llmcli"]:
        llmcli_timed(sys.argv[2], sys.argv[3:])
        return
    if sys.argv[1:2] == ["reward-curves"]:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(grpo_reward_curves(Path(tmp), int(sys.argv[2]))))
        return
    parser = argparse.ArgumentParser(description="TRL's side of P24 (trl-dpo) and P25 (trl-grpo).")
    parser.add_argument("trainer", choices=["trl-dpo", "trl-grpo"])
    # llmcli's option names, so that both sides take one list of settings
    for name, kind in [("--model", str), ("--data", str), ("--output", str), ("--max-steps", int), ("--batch-size", int),
                       ("--lr", float), ("--beta", float), ("--seed", int)]:
        parser.add_argument(name, type=kind, required=True)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--reward-pattern", default=NUMBER_ONLY)
    args = parser.parse_args()
    result = (trl_dpo if args.trainer == "trl-dpo" else trl_grpo)(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
