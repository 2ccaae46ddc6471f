"""`make bench`: llmcli against the plain Hugging Face way of doing the same job, in one run.

Each figure is a median of repeated runs with a warm-up excluded; the table shows llmcli's figure,
the baseline's, their ratio (>1 means llmcli is better), the goal and whether it was met. Raw
figures go to benchmarks/results/latest.json and a chart to latest.png.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
BIN = Path(sys.executable).parent
GPL3 = Path("/usr/share/common-licenses/GPL-3")
STORY = "Write a long, detailed story about a robot who learns to paint."
QUESTION = "What is the capital of France?"
sys.path.insert(0, str(ROOT.parent / "tests"))  # the tiny-model builders of the test suite


@dataclass
class Figure:
    name: str
    ours: float
    baseline: float | None
    unit: str
    higher_is_better: bool = True
    goal: float | None = None  # minimum ratio
    note: str = ""
    raw: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None:
            return None
        return self.ours / self.baseline if self.higher_is_better else self.baseline / self.ours


def median_time(run: Callable[[], object], repeats: int, warmup: bool = True) -> tuple[float, object]:
    """Median wall time of `repeats` runs after one warm-up run, and the last run's result."""
    result = run() if warmup else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def paired_median_times(ours: Callable[[], object], theirs: Callable[[], object],
                        repeats: int, warmup: bool = True) -> tuple[tuple[float, object], tuple[float, object]]:
    """median_time of both sides with their runs alternating, so a machine that slows down or speeds up
    during the benchmark weighs on both alike."""
    if warmup:  # one run each, untimed
        ours(), theirs()
    times: tuple[list[float], list[float]] = ([], [])
    results: list[object] = [None, None]
    for _ in range(repeats):
        for side, run in enumerate((ours, theirs)):
            start = time.perf_counter()
            results[side] = run()
            times[side].append(time.perf_counter() - start)
    return (statistics.median(times[0]), results[0]), (statistics.median(times[1]), results[1])


def startup(repeats: int) -> Figure:
    def command(*args: str) -> Callable[[], object]:
        return lambda: subprocess.run(args, capture_output=True, check=True)

    (ours, _), (theirs, _) = paired_median_times(
        command(shutil.which("llmcli", path=f"{BIN}:{os.environ['PATH']}"), "--help"),
        command(str(BIN / "transformers"), "--help"), repeats)
    return Figure("P1 startup: --help", ours, theirs, "s", higher_is_better=False, goal=10,
                  note="llmcli --help vs transformers --help")


def generation(loaded, new_tokens: int, repeats: int, device: str) -> list[Figure]:
    import torch

    from llmcli import models
    from llmcli.data import Prompt
    from llmcli.engines.hf import HFEngine
    from llmcli.tasks.generate import GenerateOptions, encode_prompt, generate

    prompt = Prompt(text=STORY)
    options = GenerateOptions(max_new_tokens=new_tokens)
    tokenizer, model = loaded.tokenizer, loaded.model
    ids = torch.tensor([encode_prompt(HFEngine(loaded), prompt, options)], device=loaded.device)

    def ours(target=loaded, opts=options, text=prompt) -> int:
        return sum(g.generated_tokens for g in generate(target, [text], opts))

    def plain(input_ids=ids) -> int:
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
        return output.shape[1] - input_ids.shape[1]

    figures = []
    (seconds, count), (base_seconds, base_count) = paired_median_times(ours, plain, repeats)
    baseline = base_count / base_seconds
    figures.append(Figure(f"P2 generate greedy {new_tokens} tok", count / seconds, baseline, "tok/s", goal=1.0,
                          note="embedded SmolLM2, same loaded model, model.generate baseline"))
    fast = models.load_model(None, device=device, dtype="bfloat16")
    seconds, count = median_time(lambda: ours(target=fast), repeats)
    figures.append(Figure("P2 generate --fast (bf16)", count / seconds, baseline, "tok/s", goal=1.5,
                          note="CPU: bf16 weights; CUDA: static cache + compiled step"))
    repetitive = Prompt(text="Repeat this list exactly three times: apple, banana, cherry, date, elderberry, fig, "
                             "grape, honeydew, kiwi, lemon, mango.")
    lookup = GenerateOptions(max_new_tokens=new_tokens, prompt_lookup=10)
    rep_ids = torch.tensor([encode_prompt(HFEngine(loaded), repetitive, lookup)], device=loaded.device)
    (seconds, count), (base_seconds, base_count) = paired_median_times(
        lambda: ours(opts=lookup, text=repetitive), lambda: plain(rep_ids), repeats)
    figures.append(Figure("P2 generate --prompt-lookup 10", count / seconds, base_count / base_seconds, "tok/s",
                          goal=1.0, note="repetitive prompt; same greedy tokens"))
    return figures


def llama_engine(loaded, new_tokens: int, repeats: int) -> list[Figure]:
    """The llama.cpp engine against a bare llama-cpp-python loop on the same file, ids and threads
    (llmcli's overhead), and against Hugging Face's float32 `model.generate` (the engine's point)."""
    import torch
    from conftest import bare_llama

    from llmcli import models
    from llmcli.data import Prompt
    from llmcli.engines import physical_cores
    from llmcli.engines.llamacpp import LlamaCppEngine, converted_path
    from llmcli.tasks.generate import GenerateOptions, generate

    threads = physical_cores()
    prompt = Prompt(text=STORY)
    options = GenerateOptions(max_new_tokens=new_tokens)
    source = models.resolve_model(None)
    engines = {weights: LlamaCppEngine.load(source, weights, threads, False, print) for weights in ("default", "as-is")}
    engines["default"].path == converted_path(models.embedded_gguf_path(), "F16") or sys.exit("no F16 conversion")

    def ours(engine) -> int:
        return sum(g.generated_tokens for g in generate(engine, [prompt], options))

    def bare(llm, ids) -> int:
        """What a llama-cpp-python user writes: Llama.generate at temperature 0 (flash attention on,
        as llama.cpp's own tools and llmcli run it), stopping at end-of-generation."""
        llm.reset()  # otherwise Llama.generate reuses the cached prompt: llmcli's generate decodes it each time
        count = 0
        for token in llm.generate(ids, temp=0.0):
            count += 1
            if llm.token_eos() == token or count == new_tokens:
                return count
        return count

    figures = []
    hf_rate = None
    ids = engines["default"].encode_chat([{"role": "user", "content": STORY}])
    for weights, goal, name in (("default", 0.95, "default F16"), ("as-is", 0.9, "--fast Q4_1")):
        engine = engines[weights]
        # the engine's extra-buffer decision for this host (Llama's default dies where AMX does not run)
        llm = bare_llama(engine.path, n_ctx=len(ids) + new_tokens, n_threads=threads, n_threads_batch=threads,
                         flash_attn=True)
        (seconds, count), (base_seconds, base_count) = paired_median_times(
            lambda: ours(engine), lambda: bare(llm, ids), repeats)
        figures.append(Figure(f"P8 llama.cpp {name} vs bare loop", count / seconds, base_count / base_seconds,
                              "tok/s", goal=goal, note=f"same file and ids, {threads} threads, {new_tokens} tokens"))
        del llm
        if weights == "default":
            hf_ids = torch.tensor([ids])

            def plain() -> int:
                output = loaded.model.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                                               do_sample=False, max_new_tokens=new_tokens,
                                               pad_token_id=loaded.tokenizer.pad_token_id)
                return output.shape[1] - hf_ids.shape[1]

            (seconds, count), (base_seconds, base_count) = paired_median_times(lambda: ours(engine), plain, repeats)
            hf_rate = base_count / base_seconds
            figures.append(Figure("P8 llama.cpp default F16 vs HF fp32", count / seconds, hf_rate, "tok/s", goal=4,
                                  note="same prompt ids; HF float32 model.generate on the dequantized weights"))
    seconds, count = median_time(lambda: ours(engines["as-is"]), repeats)
    figures.append(Figure("P8 llama.cpp --fast Q4_1 vs HF fp32", count / seconds, hf_rate, "tok/s",
                          note="quantized activations: answers differ from fp32 (docs/engines.md)"))
    return figures


def cold_start(repeats: int) -> list[Figure]:
    """A cold `llmcli generate QUESTION -n 32` on each engine: wall time and peak RSS of the process."""
    figures = []
    runs = {}
    for engine in ("llama.cpp", "hf"):
        times, peaks = [], []
        for attempt in range(repeats + 1):  # the first run builds any cache entry and is not counted
            with tempfile.NamedTemporaryFile(suffix=".json") as rss:
                start = time.perf_counter()
                subprocess.run([sys.executable, str(ROOT / "peak_rss.py"), rss.name, "generate", QUESTION, "-n", "32",
                                "--engine", engine], capture_output=True, check=True)
                if attempt:
                    times.append(time.perf_counter() - start)
                    peaks.append(json.loads(Path(rss.name).read_text())["peak_rss_mb"])
        runs[engine] = (statistics.median(times), statistics.median(peaks))
    (wall, rss), (hf_wall, hf_rss) = runs["llama.cpp"], runs["hf"]
    figures.append(Figure("P9 cold generate wall time (llama.cpp vs hf)", wall, hf_wall, "s", higher_is_better=False,
                          goal=5, note=f"'{QUESTION}' -n 32, new process each time; goal ~1 s"))
    figures.append(Figure("P9 cold generate peak RSS (llama.cpp vs hf)", rss, hf_rss, "MB", higher_is_better=False,
                          goal=3, note="whole process; goal < 300 MB"))
    return figures


def loading(repeats: int, device: str) -> Figure:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcli import models

    path = models.embedded_gguf_path()
    models.convert_gguf(path)  # the figure is the second load: conversion happened once before
    ours, _ = median_time(lambda: models.load_model(None, device=device), repeats)

    def from_gguf() -> object:
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).to(device)

    # no warm-up run here: each GGUF load takes ~25 s, and imports are already warm from llmcli's side
    theirs, _ = median_time(from_gguf, repeats, warmup=False)
    return Figure("P3 second load of the embedded model", ours, theirs, "s", higher_is_better=False, goal=10,
                  note="cached safetensors vs transformers' GGUF load (dequantizing)")


def small_models(workdir: Path) -> tuple[Path, Path]:
    """A small BERT and a small GPT-2 (4 layers, 256 wide), tokenizers trained on GPL-3."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, BertConfig, GPT2Config

    from conftest import train_tokenizer, train_wordpiece_tokenizer

    torch.manual_seed(0)
    bert_tokenizer = train_wordpiece_tokenizer(vocab_size=2000)
    bert = AutoModelForMaskedLM.from_config(BertConfig(
        vocab_size=len(bert_tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=1024, max_position_embeddings=512, pad_token_id=bert_tokenizer.pad_token_id))
    bert.save_pretrained(workdir / "bert")
    bert_tokenizer.save_pretrained(workdir / "bert")
    gpt_tokenizer = train_tokenizer(vocab_size=2000)
    gpt = AutoModelForCausalLM.from_config(GPT2Config(
        vocab_size=len(gpt_tokenizer), n_embd=256, n_layer=4, n_head=4, n_positions=512,
        bos_token_id=gpt_tokenizer.eos_token_id, eos_token_id=gpt_tokenizer.eos_token_id))
    gpt.save_pretrained(workdir / "gpt2")
    gpt_tokenizer.save_pretrained(workdir / "gpt2")
    return workdir / "bert", workdir / "gpt2"


def fill_mask(bert: Path, lines: int, repeats: int, device: str) -> Figure:
    from transformers import pipeline

    from llmcli.engines import choose_engine
    from llmcli.tasks.fill_mask import FillMaskOptions, fill_mask as run_fill_mask

    sentences = [line.strip() for line in GPL3.read_text().splitlines() if len(line.split()) > 6]
    texts = [" ".join("[MASK]" if i == 3 else w for i, w in enumerate(s.split())) for s in sentences][:lines]
    engine = choose_engine(str(bert), "hf", kind="masked", device=device, dtype="float32")  # fill-mask's default
    fill = pipeline("fill-mask", model=str(bert), device=device)
    (ours, results), (theirs, reference) = paired_median_times(
        lambda: run_fill_mask(engine, texts, FillMaskOptions(batch_size=32)),
        lambda: [fill(t, top_k=5) for t in texts], repeats)
    same = all([p.token for p in r.predictions[0]] == [p["token"] for p in ref] for r, ref in zip(results, reference))
    return Figure(f"P4 fill-mask {len(texts)} lines", len(texts) / ours, len(texts) / theirs, "lines/s", goal=4,
                  note=f"small BERT; pipeline one line at a time; same top-5: {same}")


CLOZE = ["The capital of France is [MASK].", "Birds can [MASK] because they have wings.",
         "[MASK] is the first month of the year."]


def causal_fill_mask(repeats: int) -> Figure:
    """`llmcli fill-mask` on the embedded model as a user runs it (a new process each time, so loading
    counts): the default llama.cpp engine, candidates' shared beginning decoded once, against the hf
    path (batched forward passes over whole sentences, which was the only path before)."""
    def command(engine: str) -> Callable[[], object]:
        return lambda: subprocess.run([str(BIN / "llmcli"), "fill-mask", *CLOZE, "--top-k", "3", "--json",
                                       "--engine", engine], capture_output=True, check=True, text=True).stdout

    (ours, llama_out), (theirs, hf_out) = paired_median_times(command("llama.cpp"), command("hf"), repeats)
    ranked = lambda out: [[p["token_str"] for p in json.loads(line)["predictions"][0]]  # noqa: E731
                          for line in out.splitlines()]
    return Figure(f"P17 causal fill-mask, {len(CLOZE)} sentences, embedded model (llama.cpp vs hf)", ours, theirs,
                  "s", higher_is_better=False, goal=1.5,
                  note=f"new process each, top-3; same top-3 on both: {ranked(llama_out) == ranked(hf_out)}; "
                       f"llama.cpp {ranked(llama_out)}")


def guide_perplexity(model, ids, max_length: int, stride: int) -> float:
    """The guide's loop (transformers docs, "Perplexity of fixed-length models"), batch size 1."""
    import torch

    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + max_length, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids != -100).sum().item() - 1
        nll_sum += loss * valid
        n_tokens += valid
        prev_end = end
        if end == ids.size(1):
            break
    return torch.exp(nll_sum / n_tokens).item()


def perplexity(gpt2: Path, repeats: int, device: str, text_bytes: int) -> Figure:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcli import models
    from llmcli.tasks.evaluate import EvalOptions, evaluate

    text = (GPL3.read_text() * (text_bytes // 30000 + 1))[:text_bytes]
    loaded = models.load_model(str(gpt2), device=device, dtype="float32")  # the guide's precision: identical value
    options = EvalOptions(max_length=512, stride=512)  # llmcli's default batch size for the device
    model = AutoModelForCausalLM.from_pretrained(gpt2).to(device).eval()
    ids = AutoTokenizer.from_pretrained(gpt2)(text, return_tensors="pt").input_ids.to(device)
    (ours, result), (theirs, value) = paired_median_times(
        lambda: evaluate(loaded, text, options), lambda: guide_perplexity(model, ids, 512, 512), repeats)
    return Figure("P5 eval perplexity", result.tokens / ours, result.tokens / theirs, "tok/s", goal=3,
                  note=f"small GPT-2, {text_bytes // 1000} KB, windows 512/512; values {result.value:.4f} vs {value:.4f}")


def pseudo_perplexity(bert: Path, repeats: int, device: str, text_bytes: int) -> Figure:
    """`eval --metric pseudo-perplexity` with its default --batch-size against --batch-size 1 (the
    default before it was measured): the same value, the time and the process's peak memory."""
    from llmcli import models
    from llmcli.tasks.evaluate import EvalOptions, evaluate

    text = GPL3.read_text()[:text_bytes]
    loaded = models.load_model(str(bert), kind="masked", device=device, dtype="float32")
    (ours, result), (theirs, one) = paired_median_times(
        lambda: evaluate(loaded, text, EvalOptions(metric="pseudo-perplexity")),
        lambda: evaluate(loaded, text, EvalOptions(metric="pseudo-perplexity", batch_size=1)), repeats)
    return Figure("P18 pseudo-perplexity, default --batch-size vs 1", result.tokens / ours, one.tokens / theirs,
                  "tok/s", goal=1.1, note=f"small BERT, {text_bytes // 1000} KB; values "
                  f"{result.value:.6f} vs {one.value:.6f}")


def finetune(gpt2: Path, steps: int, repeats: int, workdir: Path, device: str) -> list[Figure]:
    """Each side in processes of its own (peak memory is per process), alternating, `repeats` times."""
    data = workdir / "gpl.txt"
    data.write_text(GPL3.read_text())
    settings = ["--max-length", "128", "--batch-size", "8", "--max-steps", str(steps), "--lr", "1e-3",
                "--seed", "0"]
    rss_file = workdir / "rss.txt"
    # on a GPU the memory that limits training is the GPU's; on the CPU it is the whole process's
    memory_key, memory_unit, memory_note = (("peak_gpu_mb", "MB GPU", "torch's peak GPU allocation") if device != "cpu"
                                            else ("peak_rss_mb", "MB RSS", "whole process, including imports"))
    ours_runs, baseline_runs = [], []
    for attempt in range(repeats):
        output = workdir / f"ours-{attempt}"
        ours = subprocess.run([sys.executable, str(ROOT / "peak_rss.py"), str(rss_file), "finetune", "--data",
                               str(data), "-m", str(gpt2), "-o", str(output), "--json", "--device", device,
                               "--log-every", str(steps), *settings], capture_output=True, text=True, check=True)
        result = json.loads(ours.stdout.strip().splitlines()[-1])
        ours_runs.append({"tokens": result["tokens"], "tokens_per_second": result["tokens_per_second"],
                          **json.loads(rss_file.read_text())})
        theirs = subprocess.run([sys.executable, str(ROOT / "trainer_baseline.py"), "--model", str(gpt2), "--data",
                                 str(data), "--output", str(workdir / f"trainer-{attempt}"), "--device", device,
                                 *settings], capture_output=True, text=True, check=True)
        baseline_runs.append(json.loads(theirs.stdout.strip().splitlines()[-1]))

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(run[key] for run in runs)

    raw = {"llmcli": ours_runs, "trainer": baseline_runs}
    return [
        Figure("P6 finetune speed", median(ours_runs, "tokens_per_second"), median(baseline_runs, "tokens_per_second"),
               "tok/s", goal=1.1, raw=raw,
               note=f"small GPT-2, {steps} steps of 8x128 tokens, vs transformers.Trainer; median of {repeats}"),
        Figure("P6 finetune peak memory", median(ours_runs, memory_key), median(baseline_runs, memory_key),
               memory_unit, higher_is_better=False, goal=1.0, note=f"{memory_note}; median of {repeats}"),
    ]


def scaling(loaded, gpt2: Path, batch_sizes: list[int], sizes: list[int], device: str) -> list[Figure]:
    from llmcli import models
    from llmcli.data import Prompt
    from llmcli.tasks.evaluate import EvalOptions, evaluate
    from llmcli.tasks.generate import GenerateOptions, generate

    figures = []
    prompts = [Prompt(text=f"Tell me a fact about the number {n}.") for n in range(max(batch_sizes))]
    for size in batch_sizes:
        options = GenerateOptions(max_new_tokens=32, batch_size=size)
        seconds, count = median_time(lambda: sum(g.generated_tokens for g in generate(loaded, prompts[:size],
                                                                                       options)), 1)
        figures.append(Figure(f"P7 generate batch {size}", count / seconds, None, "tok/s"))
    small = models.load_model(str(gpt2), device=device, dtype="float32")
    text = GPL3.read_text()
    for size in sizes:
        document = (text * (size // len(text) + 1))[:size]
        seconds, result = median_time(lambda: evaluate(small, document, EvalOptions(max_length=512, stride=256,
                                                                                    batch_size=8)), 1)
        figures.append(Figure(f"P7 eval {size // 1000} KB", result.tokens / seconds, None, "tok/s",
                              note="flat tok/s = cost linear in text size"))
    return figures


def data_parallel(bert: Path, workdir: Path, quick: bool, device: str) -> list[Figure]:
    """P10: whole commands with --num-processes N against one process, wall time of the command as the
    user runs it (worker start-up included). N: 2 on the CPU (each worker gets half the cores), one per
    GPU on CUDA."""
    import torch

    count = torch.cuda.device_count() if device == "cuda" else 2
    lines = [line.strip() for line in GPL3.read_text().splitlines() if len(line.split()) > 6]
    prompts, masks, text = workdir / "prompts.txt", workdir / "masks.txt", workdir / "eval.txt"
    prompts.write_text("\n".join(lines[:8 if quick else 16]))
    masks.write_text("\n".join(" ".join("[MASK]" if i == 3 else w for i, w in enumerate(line.split()))
                               for line in lines[:256 if quick else 1024]))
    text.write_text(GPL3.read_text()[:15_000 if quick else 30_000])
    jobs = {
        f"generate {len(prompts.read_text().splitlines())} prompts -n 64 on hf (embedded)":
            ["generate", "-f", prompts, "-n", "64", "--json", "--engine", "hf"],
        f"generate {len(prompts.read_text().splitlines())} prompts -n 64 on llama.cpp (embedded)":
            ["generate", "-f", prompts, "-n", "64", "--json"],
        f"eval {len(text.read_text()) // 1000} kB on llama.cpp (embedded)": ["eval", "-d", text, "--json"],
        f"fill-mask {len(masks.read_text().splitlines())} lines (small BERT)":
            ["fill-mask", "-f", masks, "-m", bert, "--json"],
    }
    for engine in ("hf", "llama.cpp"):  # build the cache entries outside the timings
        subprocess.run([sys.executable, "-m", "llmcli", "generate", "hi", "-n", "1", "--engine", engine],
                       capture_output=True)
    figures = []
    for name, args in jobs.items():
        def run(*extra: str) -> float:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "llmcli", *map(str, args), "--device", device, *extra],
                           capture_output=True, check=True)
            return time.perf_counter() - start

        one = run()
        many = run("--num-processes", str(count))
        figures.append(Figure(f"P10 {name}: {count} processes vs 1", many, one, "s", higher_is_better=False,
                              note="whole command, worker start-up included; one run each"))
    return figures


def llama_batching(prompt_count: int, new_tokens: int) -> list[Figure]:
    """P13: `generate -f` with `prompt_count` prompts on llama.cpp (the embedded model's default F16
    weights), every prompt in one batch (the default) against --batch-size 1; whole commands, one run
    each. Also how many greedy outputs are identical both ways, and where the others first differ:
    batched steps run matrix-matrix kernels, one sequence matrix-vector ones."""
    lines = [line.strip() for line in GPL3.read_text().splitlines() if len(line.split()) > 6][:prompt_count]
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(f"Explain in plain words: {line}" for line in lines) + "\n")

        def run(*extra: str) -> tuple[float, list[dict]]:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "llmcli", "generate", "-f", str(prompts), "-n", str(new_tokens),
                                   "--json", *extra], capture_output=True, text=True, check=True)
            return time.perf_counter() - start, [json.loads(line) for line in done.stdout.splitlines()]

        run("-n", "1")  # the F16 conversion, outside the timings
        (batched, together), (single, alone) = run(), run("--batch-size", "1")
    tokens = sum(r["generated_tokens"] for r in together)
    firsts = [next((i for i, (a, b) in enumerate(zip(x["token_ids"], y["token_ids"])) if a != b),
                   min(len(x["token_ids"]), len(y["token_ids"])))
              for x, y in zip(together, alone) if x["token_ids"] != y["token_ids"]]
    agreement = (f"{len(together) - len(firsts)} of {len(together)} greedy outputs identical to --batch-size 1"
                 + (f"; the others first differ at new tokens {sorted(firsts)}" if firsts else ""))
    return [Figure(f"P13 generate -f, {prompt_count} prompts x {new_tokens} tokens on llama.cpp (F16), batched vs "
                   "--batch-size 1", tokens / batched, sum(r["generated_tokens"] for r in alone) / single, "tok/s",
                   goal=2.5, note=f"whole commands, one run each; {agreement}",
                   raw={"batched_s": batched, "single_s": single, "differ_at": sorted(firsts)})]


def serving_batches(clients: int, requests: int) -> Figure:
    """P12: `llmcli serve --engine hf` under `clients` concurrent non-streamed greedy requests (32
    tokens): throughput with waiting requests batched (--max-batch 8) against one at a time (1), and
    how many texts differ from the unbatched answer (left padding changes the float sums)."""
    rates, texts = {}, {}
    for max_batch in (1, 8):
        with serving_process(["--engine", "hf", "--max-batch", str(max_batch), "--queue-size", str(clients * 2)]) as (
                client, model):
            prompts = [" ".join(line.split()[:6]) for line in GPL3.read_text().splitlines()
                       if len(line.split()) > 6][:clients]
            answers: dict[int, str] = {}

            def user(number: int) -> None:
                for round_ in range(requests // clients):
                    answer = client.completions.create(model=model, prompt=prompts[number], max_tokens=32,
                                                       temperature=0)
                    answers[number * 1000 + round_] = answer.choices[0].text

            began = time.perf_counter()
            run_threads(user, clients)
            rates[max_batch] = len(answers) / (time.perf_counter() - began)
            texts[max_batch] = answers
    differing = sum(texts[1][k] != texts[8][k] for k in texts[1])
    return Figure("P12 serve (hf) batched vs one at a time", rates[8], rates[1], "req/s",
                  note=f"{clients} clients, {len(texts[8])} greedy requests of 32 tokens; {differing} texts differ "
                       "from the unbatched ones")


def run_threads(target: Callable[[int], None], count: int) -> None:
    import threading

    threads = [threading.Thread(target=target, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@contextlib.contextmanager
def serving_process(extra: list[str]):
    """`llmcli serve` on the embedded model on a free port; yields an openai client and the model id."""
    import urllib.request

    from openai import OpenAI

    from llmcli.distributed import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llmcli", "serve", "--port", str(port), *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("llmcli serve did not start")
                time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
        yield client, client.models.list().data[0].id
    finally:
        server.terminate()
        server.wait(timeout=60)


def serving_load(clients: int, requests: int) -> list[Figure]:
    """P11: `llmcli serve` on the embedded model under `clients` concurrent streaming clients sending
    `requests` requests in all (greedy, 16 tokens, 8 prompts); each client checks that its text is the
    greedy answer to its own prompt. Latency is per request, first byte to [DONE]."""
    import threading

    with serving_process(["--queue-size", str(clients * 2)]) as (client, model):
        prompts = [" ".join(line.split()[:6]) for line in GPL3.read_text().splitlines() if len(line.split()) > 6][:8]
        expected = {p: client.completions.create(prompt=p, model=model, max_tokens=16,
                                                 temperature=0).choices[0].text for p in prompts}
        latencies: list[float] = []
        wrong = []
        counter = iter(range(requests))
        lock = threading.Lock()

        def user(number: int) -> None:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                prompt = prompts[number % len(prompts)]
                began = time.perf_counter()
                stream = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0,
                                                   stream=True)
                text = "".join(c.choices[0].text for c in stream if c.choices)
                latencies.append(time.perf_counter() - began)
                if text != expected[prompt]:
                    wrong.append(prompt)

        began = time.perf_counter()
        run_threads(user, clients)
        seconds = time.perf_counter() - began
    latencies.sort()
    note = f"{clients} streaming clients, {len(latencies)} requests, {len(wrong)} wrong texts"
    return [Figure("P11 serve p50 latency", latencies[len(latencies) // 2], None, "s", higher_is_better=False,
                   note=note),
            Figure("P11 serve p99 latency", latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], None, "s",
                   higher_is_better=False, note=note),
            Figure("P11 serve throughput", len(latencies) / seconds, None, "req/s", note=note,
                   raw={"tokens_per_s": 16 * len(latencies) / seconds, "wrong": len(wrong)})]


def llama_serving(client_counts: list[int], new_tokens: int) -> list[Figure]:
    """P14: `llmcli serve` on llama.cpp (the embedded model's F16 weights) under 1, 4, 8, 16 concurrent
    streaming chat clients, greedy, `new_tokens` tokens each (serve_load.py's load): continuous
    batching (--parallel 8, the default) against one sequence at a time (--parallel 1, what the server
    did before). Aggregate generated tok/s, time to first token p50/p99, and how many texts equal the
    one-at-a-time ones."""
    from serve_load import chat_load, stream_chat, summary

    figures = []
    for clients in client_counts:
        requests = max(16, 2 * clients)
        runs, texts = {}, {}
        for parallel in (8, 1):
            with serving_process(["--parallel", str(parallel), "--queue-size", str(requests)]) as (client, model):
                stream_chat(client, model, [{"role": "user", "content": "Hi"}], 4)  # warm-up
                seconds, results = chat_load(client, model, clients, requests, new_tokens)
            runs[parallel], texts[parallel] = summary(seconds, results), {n: r[0] for n, r in results.items()}
        same = sum(texts[8][n] == texts[1][n] for n in texts[8])
        batched, single = runs[8], runs[1]
        note = (f"{clients} clients, {requests} greedy chat requests of {new_tokens} tokens; TTFT p50/p99 "
                f"{batched['ttft_p50_s']:.2f}/{batched['ttft_p99_s']:.2f} s batched, "
                f"{single['ttft_p50_s']:.2f}/{single['ttft_p99_s']:.2f} s one at a time; "
                f"{same} of {requests} texts identical")
        figures.append(Figure(f"P14 serve (llama.cpp) {clients} clients, --parallel 8 vs 1", batched["tok_per_s"],
                              single["tok_per_s"], "tok/s", goal=2.5 if clients == 8 else None, note=note,
                              raw={"batched": batched, "single": single, "same_texts": same}))
    return figures


def adapter_serving(engine: str, clients: int, requests: int, new_tokens: int, workdir: Path) -> Figure:
    """P27: one `llmcli serve` of the embedded model with two LoRA adapters (--adapter NAME=DIR), under
    `clients` streaming chat clients whose requests name the base and the two adapters in turn, against
    the same clients all on the base. Aggregate generated tok/s (serve_load.py's load). On llama.cpp the
    sequences of each adapter decode in their own steps (one adapter set per llama_decode); on hf peft
    mixes them in one batch."""
    from serve_load import chat_load, stream_chat, summary
    from test_adapters import make_adapter

    from llmcli.models import EMBEDDED_ALIAS

    adapters = [make_adapter(None, workdir / f"lora-{n}", seed=n, alpha=16, base_reference=EMBEDDED_ALIAS)
                for n in (1, 2)]
    flags = [f for n, path in enumerate(adapters) for f in ("--adapter", f"tuned{n}={path}")]
    with serving_process(["--engine", engine, *flags, "--queue-size", str(requests)]) as (client, model):
        stream_chat(client, model, [{"role": "user", "content": "Hi"}], 4)  # warm-up
        mixed = summary(*chat_load(client, [model, "tuned0", "tuned1"], clients, requests, new_tokens))
        base = summary(*chat_load(client, model, clients, requests, new_tokens))
    note = (f"{clients} clients, {requests} greedy chat requests of {new_tokens} tokens, base and 2 adapters in turn "
            f"against all on the base; TTFT p50 {mixed['ttft_p50_s']:.2f} vs {base['ttft_p50_s']:.2f} s")
    return Figure(f"P27 serve ({engine}) base + 2 adapters vs base alone", mixed["tok_per_s"], base["tok_per_s"],
                  "tok/s", goal=0.8 if engine == "llama.cpp" else 0.9, note=note, raw={"mixed": mixed, "base": base})


def chat_prefix_reuse(turns: int, new_tokens: int) -> Figure:
    """P15: a `turns`-turn chat through `llmcli serve` on llama.cpp, each turn resending the whole
    conversation: time to the first token of the last turn with the prefix cache (default) and
    without (--no-prefix-cache); and whether the two conversations are the same."""
    from serve_load import TOPICS, stream_chat

    ttft, texts = {}, {}
    for flag in ("--prefix-cache", "--no-prefix-cache"):
        with serving_process([flag]) as (client, model):
            messages: list[dict] = []
            answers = []
            for turn in range(turns):
                messages.append({"role": "user", "content": f"Tell me one more fact about {TOPICS[turn]}."})
                text, first, _, _ = stream_chat(client, model, messages, new_tokens)
                messages.append({"role": "assistant", "content": text})
                answers.append(text)
            ttft[flag], texts[flag] = first, answers
    same = sum(a == b for a, b in zip(texts["--prefix-cache"], texts["--no-prefix-cache"]))
    return Figure(f"P15 serve (llama.cpp) {turns}-turn chat: TTFT of the last turn, prefix cache vs none",
                  ttft["--prefix-cache"], ttft["--no-prefix-cache"], "s", higher_is_better=False,
                  note=f"{new_tokens} tokens a turn; {same} of {turns} answers identical with and without")


PEOPLE_SCHEMA = {"type": "object", "properties": {"people": {
    "type": "array", "minItems": 6, "maxItems": 6, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                         "city": {"type": "string", "maxLength": 24},
                                         "pet": {"enum": ["cat", "dog", "none"]}},
        "required": ["name", "age", "city", "pet"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}
COMPILED_SCHEMAS = {
    "any JSON object": {"type": "object"},
    "6 people (nested, enum, bounds)": PEOPLE_SCHEMA,
    "string patterns and formats": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "email": {"type": "string", "format": "email"},
        "when": {"type": "string", "format": "date-time"}}, "required": ["id", "email", "when"]},
}


def constrained_decoding(loaded, repeats: int) -> list[Figure]:
    """P16: tok/s of schema-constrained greedy decoding against the same decoding unconstrained, on
    each engine (the embedded model: F16 on llama.cpp, float32 on hf), runs alternating; and the
    compile time of a few schemas (llguidance's tokenizer of the vocabulary is built once per engine,
    before these, and shown apart). Rates are tokens over whole `generate` calls, matcher set-up
    included."""
    from llmcli.constraints import Constraint, Constraints
    from llmcli.data import Prompt
    from llmcli.engines import choose_engine
    from llmcli.engines.hf import HFEngine
    from llmcli.tasks.generate import GenerateOptions, generate

    prompt = [Prompt(text="List six people with their name, age, city and pet, as JSON.")]
    constraint = Constraint("schema", json.dumps(PEOPLE_SCHEMA))
    figures = []
    engines = [HFEngine(loaded)]
    if importlib.util.find_spec("llama_cpp"):
        engines.insert(0, choose_engine(None, "llama.cpp"))
    for engine in engines:
        constrained = GenerateOptions(max_new_tokens=400, constraint=constraint)
        [sample] = generate(engine, prompt, constrained)  # also the warm-up; its length sets the free run's
        free = GenerateOptions(max_new_tokens=sample.generated_tokens)

        def run(options):
            return lambda: sum(g.generated_tokens for g in generate(engine, prompt, options))

        (seconds, count), (base_seconds, base_count) = paired_median_times(run(constrained), run(free), repeats)
        valid = sample.finish_reason == "eos" and bool(json.loads(sample.text)["people"])
        figures.append(Figure(f"P16 {engine.name} ({engine.weights}): schema-constrained vs free greedy decoding",
                              count / seconds, base_count / base_seconds, "tok/s",
                              goal=0.9 if engine.name == "llama.cpp" else None,
                              note=f"{count} tokens of a 6-person JSON array, {'valid' if valid else 'INVALID'}; "
                                   "the free run decodes as many tokens"))
        if engine.name == "llama.cpp":  # 8 sequences decoded together, each with its own matcher
            anything = GenerateOptions(max_new_tokens=64, temperature=0.8, seed=1, num_return_sequences=8,
                                       constraint=Constraint("regex", "(?s:.*)"))
            free = replace(anything, constraint=None)
            (seconds, count), (base_seconds, base_count) = paired_median_times(run(anything), run(free), repeats)
            figures.append(Figure("P16 llama.cpp (F16): 8 sampled sequences with a constraint that allows every "
                                  "token vs none", count / seconds, base_count / base_seconds, "tok/s", goal=0.9,
                                  note="the matchers' whole per-step cost (a mask per row, filled and applied, "
                                       "the token followed); the texts are the same both ways"))
        fresh = Constraints(engine.constraints.make_tokenizer, engine.constraints.n_vocab)
        fresh.matcher(Constraint("regex", "a"))
        tokenizer_seconds = fresh.seconds
        for label, schema in COMPILED_SCHEMAS.items():
            began = time.perf_counter()
            fresh.matcher(Constraint("schema", json.dumps(schema))).allowed()
            figures.append(Figure(f"P16 {engine.name}: compile {label}", (time.perf_counter() - began) * 1000, None,
                                  "ms", higher_is_better=False,
                                  note=f"a new schema's set-up: compiled, a matcher made, its first mask "
                                       f"computed; the vocabulary's tokenizer took {tokenizer_seconds * 1000:.0f} "
                                       "ms, once per engine"))
    return figures


STORY_TOOL = [{"type": "function", "function": {
    "name": "write_story", "description": "Publish a story.",
    "parameters": {"type": "object", "properties": {"story": {"type": "string", "maxLength": 4000}},
                   "required": ["story"]}}}]


def tool_calling(new_tokens: int, repeats: int, clients: int) -> list[Figure]:
    """P19: `llmcli serve` on the embedded model, each engine: a chat request that must call a tool
    (write_story, its one string argument the story) against the same request without tools, greedy,
    `new_tokens` tokens, runs alternating; tok/s counts the generated tokens over the whole request, so
    the longer prompt (the tools described) and the grammar are both in it. On llama.cpp also
    `clients` concurrent tool-calling clients against as many plain ones (aggregate tok/s)."""
    messages = [{"role": "user", "content": STORY}]
    figures = []
    engines = (["llama.cpp"] if importlib.util.find_spec("llama_cpp") else []) + ["hf"]
    for engine in engines:
        with serving_process(["--engine", engine, "--queue-size", str(4 * clients)]) as (client, model):
            def ask(tools: bool) -> Callable[[], int]:
                fields = {"tools": STORY_TOOL, "tool_choice": "required"} if tools else {}
                return lambda: client.chat.completions.create(model=model, messages=messages, max_tokens=new_tokens,
                                                              temperature=0, **fields).usage.completion_tokens

            (seconds, tokens), (base_seconds, base_tokens) = paired_median_times(ask(True), ask(False), repeats)
            figures.append(Figure(f"P19 serve ({engine}): a tool-calling request vs the same without tools",
                                  tokens / seconds, base_tokens / base_seconds, "tok/s", goal=0.9,
                                  note=f"greedy chat, {new_tokens} tokens: a required write_story call "
                                       f"({tokens} tokens) vs a plain answer ({base_tokens})"))
            if engine != "llama.cpp":
                continue

            def load(tools: bool) -> Callable[[], int]:
                one = ask(tools)
                counts: list[int] = []
                return lambda: (counts.clear(), run_threads(lambda _: counts.append(one()), clients), sum(counts))[-1]

            (seconds, tokens), (base_seconds, base_tokens) = paired_median_times(load(True), load(False), repeats)
            figures.append(Figure(f"P19 serve (llama.cpp): {clients} concurrent tool-calling clients vs {clients} "
                                  "plain ones", tokens / seconds, base_tokens / base_seconds, "tok/s", goal=0.9,
                                  note=f"aggregate; each client one request of {new_tokens} tokens, decoded together "
                                       "(8 prompts with the tools described to prefill, none cached yet)"))
    return figures


def embedding(lines_count: int, repeats: int) -> list[Figure]:
    """P20: `embed`'s task on the embedded all-MiniLM-L6-v2 against sentence-transformers' `encode` on
    the same directory, threads and batch size (32), runs alternating, over lines of license text;
    the vectors compared too."""
    import numpy
    from sentence_transformers import SentenceTransformer

    from llmcli.sentence_models import embedded_model_dir, load_sentence_model
    from llmcli.tasks.embed import EmbedOptions, embed_texts

    from llmcli.engines import llama_cpp_installed, physical_cores

    texts = [line.strip() for path in sorted(Path("/usr/share/common-licenses").iterdir()) if path.is_file()
             for line in path.read_text(errors="replace").splitlines() if line.strip()][:lines_count]
    theirs = SentenceTransformer(str(embedded_model_dir()), device="cpu")
    figures = []
    for engine in ("hf", "llama.cpp") if llama_cpp_installed() else ("hf",):
        ours = load_sentence_model(None, engine=engine)
        (seconds, mine), (base_seconds, reference) = paired_median_times(
            lambda: embed_texts(ours, texts, EmbedOptions()).vectors,
            lambda: theirs.encode(texts, batch_size=32, convert_to_numpy=True), repeats)
        difference = float(numpy.abs(mine - reference).max())
        threads = torch_threads() if engine == "hf" else physical_cores()
        figures.append(Figure(f"P20 embed --engine {engine} vs sentence-transformers encode (all-MiniLM-L6-v2)",
                              len(texts) / seconds, len(texts) / base_seconds, "lines/s", goal=1.0,
                              note=f"{len(texts)} license lines, batch 32, {threads} threads (encode: "
                                   f"{torch_threads()}); max abs difference {difference:.1e}"))
    script = ("import sys; from sentence_transformers import SentenceTransformer; "
              "SentenceTransformer(sys.argv[1], device='cpu').encode(['one line'])")
    cold, walls = {}, {}
    for side, command in (("llmcli", [str(ROOT / "peak_rss.py"), "{rss}", "embed", "one line"]),
                          ("st", ["-c", script, str(embedded_model_dir())])):
        times, peaks = [], []
        for _ in range(repeats):
            with tempfile.NamedTemporaryFile(suffix=".json") as rss:
                began = time.perf_counter()
                subprocess.run([sys.executable, *[part.replace("{rss}", rss.name) for part in command]],
                               capture_output=True, check=True)
                times.append(time.perf_counter() - began)
                if side == "llmcli":
                    peaks.append(json.loads(Path(rss.name).read_text())["peak_rss_mb"])
        walls[side], cold[side] = statistics.median(times), peaks
    figures.append(Figure("P20 cold embed of one line vs sentence-transformers", walls["llmcli"], walls["st"], "s",
                          higher_is_better=False, note=f"new process each time; llmcli's peak RSS "
                                                       f"{statistics.median(cold['llmcli']):.0f} MB; goal ~1 s"))
    return figures


def realistic_cross_encoder(workdir: Path) -> Path:
    """A cross-encoder of ms-marco-MiniLM-L6-v2's shape and tokenizer, built offline: the embedded
    all-MiniLM-L6-v2's encoder under a seeded random one-label head, saved by CrossEncoder itself (its
    scores mean nothing; its speed is a real reranker's)."""
    import torch
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmcli.sentence_models import embedded_model_dir

    plain, saved = workdir / "minilm-classifier", workdir / "minilm-cross-encoder"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(embedded_model_dir(), num_labels=1).save_pretrained(plain)
    AutoTokenizer.from_pretrained(embedded_model_dir()).save_pretrained(plain)
    CrossEncoder(str(plain), max_length=512, device="cpu").save(str(saved))
    return saved


def reranking(workdir: Path, pairs: int, repeats: int) -> Figure:
    """P23: `rerank`'s task (the command's code path, in this process) against sentence-transformers'
    CrossEncoder.predict on the same directory, threads and batch size (32), runs alternating: one query
    and `pairs` lines of license text; the scores compared too."""
    import numpy
    from sentence_transformers import CrossEncoder

    from llmcli.cross_encoders import load_cross_encoder
    from llmcli.tasks.rerank import RerankOptions, rerank_documents

    model = realistic_cross_encoder(workdir)
    query = "May I distribute modified copies of the program?"
    documents = [line.strip() for path in sorted(Path("/usr/share/common-licenses").iterdir()) if path.is_file()
                 for line in path.read_text(errors="replace").splitlines() if line.strip()][:pairs]
    ours, theirs = load_cross_encoder(str(model)), CrossEncoder(str(model), device="cpu")
    rank = lambda texts: rerank_documents(ours, query, texts, RerankOptions()).scores  # noqa: E731
    predict = lambda texts: theirs.predict([(query, text) for text in texts], batch_size=32)  # noqa: E731
    rank(documents[:64]), predict(documents[:64])  # a short warm-up: a whole run takes 15-50 s on 2 cores
    (seconds, mine), (base_seconds, reference) = paired_median_times(
        lambda: rank(documents), lambda: predict(documents), repeats, warmup=False)
    difference = float(numpy.abs(mine - reference).max())
    return Figure("P23 rerank vs sentence-transformers CrossEncoder.predict (MiniLM-L6 cross-encoder)",
                  len(documents) / seconds, len(documents) / base_seconds, "pairs/s", goal=1.0,
                  note=f"{len(documents)} (query, license line) pairs, batch 32, {torch_threads()} threads; "
                       f"max abs score difference {difference:.1e}")


def license_questions(folder: Path, count: int, shots: int = 0) -> Path:
    """A multiple-choice task of `count` questions from license text: each line's last word among three
    other words of the text; the task YAML (lm-eval's format) reading them is returned. With `shots`,
    that many more questions are its few-shot examples, the same ones before every question (MMLU's
    set-up: a dev split and lm-eval's first_n sampler)."""
    import random

    rng = random.Random(0)
    lines = [" ".join(line.split()) for path in sorted(Path("/usr/share/common-licenses").iterdir())
             if path.is_file() for line in path.read_text(errors="replace").splitlines() if len(line.split()) > 6]
    words = sorted({word for line in lines for word in line.split()})
    records = []
    for line in rng.sample(lines, count + shots):
        head, answer = line.rsplit(" ", 1)
        choices = [answer] + rng.sample([w for w in words if w != answer], 3)
        rng.shuffle(choices)
        records.append(json.dumps({"context": head, "choices": choices, "label": choices.index(answer)}) + "\n")
    (folder / "questions.jsonl").write_text("".join(records[shots:]))
    (folder / "shots.jsonl").write_text("".join(records[:shots]))
    few_shot = (f"    dev: {folder / 'shots.jsonl'}\n", f"fewshot_split: dev\nfewshot_config:\n  sampler: first_n\n"
                f"num_fewshot: {shots}\n") if shots else ("", "")
    task = folder / "license_choice.yaml"
    task.write_text(f"task: license_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{few_shot[0]}    test: "
                    f"{folder / 'questions.jsonl'}\ntest_split: test\n{few_shot[1]}output_type: multiple_choice\n"
                    "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: label\n"
                    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
                    "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return task


def benchmark_tasks(count: int, repeats: int) -> list[Figure]:
    """P21: `eval --tasks` on a multiple-choice task of license lines, each engine, against lm-eval's own
    hf model (`lm_eval --model hf`) on the embedded model, in this process after loading (batch 32 on
    both hf sides, llmcli's default; lm-eval's is 1); the llama.cpp engine also 5-shot, the same five
    examples before every question (MMLU's shape), on half as many questions; and its shared tokens
    against scoring each answer alone, the same requests."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    from llmcli import models
    from llmcli.engines import choose_engine
    from llmcli.tasks.benchmark import TaskOptions, run_tasks

    figures = []
    converted = models.local_model_dir(models.resolve_model(None))
    reference = get_model("hf")(pretrained=str(converted), dtype="float32", batch_size=32, device="cpu")
    engines = ("hf", "llama.cpp") if importlib.util.find_spec("llama_cpp") else ("hf",)
    runs = [(name, 0, count, goal) for name, goal in zip(engines, (1.0, 3.0))]
    if "llama.cpp" in engines:
        runs.append(("llama.cpp", 5, count // 2, None))
    for name, shots, questions, goal in runs:
        engine = choose_engine(None, name, command="eval --tasks")  # its weights: F16 on llama.cpp
        with tempfile.TemporaryDirectory() as tmp:
            task = license_questions(Path(tmp), questions, shots)
            manager = TaskManager(include_path=tmp, include_defaults=False)  # what run_tasks uses for a file

            def theirs():
                return lm_eval.simple_evaluate(model=reference, tasks=["license_choice"], task_manager=manager,
                                               batch_size=32)["results"]["license_choice"]["acc,none"]

            def ours():
                return run_tasks(engine, TaskOptions(tasks=[str(task)])).results["results"][
                    "license_choice"]["acc,none"]

            (seconds, accuracy), (base_seconds, base_accuracy) = paired_median_times(ours, theirs, repeats)
            shape = f"{questions} questions" + (f", {shots}-shot" if shots else "")
            figures.append(Figure(f"P21 eval --tasks --engine {name} vs lm_eval --model hf ({shape})",
                                  questions / seconds, questions / base_seconds, "questions/s", goal=goal,
                                  note=f"{engine.weights}: acc {accuracy:.4f} vs lm-eval's {base_accuracy:.4f}"))
            if name == "llama.cpp" and not shots:
                figures.append(shared_contexts(engine, task, manager, repeats))
    return figures


def shared_contexts(engine, task: Path, manager, repeats: int) -> Figure:
    """The llama.cpp engine's answers as `eval --tasks` scores them (prefix trees: each shared token
    decoded once, many questions at once) against each answer scored as one sequence (the engine's
    token_logprobs, which eval's perplexity uses), on the same requests."""
    from llmcli.engines import Window
    from llmcli.tasks.benchmark import engine_lm

    lm = engine_lm(engine, 8)
    [built] = manager.load_task_or_group(["license_choice"]).values()
    built.build_all_requests(rank=0, world_size=1)
    pairs = [lm._encode_pair(*instance.args) for instance in built.instances]
    sequences = [context + continuation for context, continuation in pairs]
    starts = [len(context) for context, _ in pairs]
    (together, grouped), (alone, single) = paired_median_times(
        lambda: engine.continuation_scores(sequences, starts, 8),
        lambda: [sum(engine.token_logprobs(Window(s, len(s) - t), 0)[0]) for s, t in zip(sequences, starts)],
        repeats)
    apart = max(abs(a[0] - b) for a, b in zip(grouped, single))
    return Figure("P21 llama.cpp answers sharing their tokens vs each alone", len(sequences) / together,
                  len(sequences) / alone, "answers/s",
                  note=f"{len(sequences)} answers on {engine.weights}; log-likelihoods at most {apart:.1e} apart "
                       "(absolute: the kernels' batch shapes differ)")


def speculative_decoding(new_tokens: int, repeats: int, client_counts: list[int]) -> list[Figure]:
    """P22 (benchmarks/speculation.py): n-gram speculation (`--speculative auto`, the default) against
    plain decoding on llama.cpp, the embedded model's F16 weights: each input-grounded task and free
    generation in-process (decode tok/s, runs alternating), then the grounded tasks through `llmcli
    serve` at each client count (aggregate completion tok/s, whole requests)."""
    from speculation import STORY, chat_load, grounded_tasks, paired

    from llmcli.engines import choose_engine

    engine = choose_engine(None, "llama.cpp")
    figures = []
    for name, (message, schema) in [*grounded_tasks().items(), ("free generation (a story)", (STORY, None))]:
        run = paired(engine, message, schema, new_tokens, repeats)
        same = "same greedy tokens" if run["same"] else f"greedy tokens differ from token {run['first_difference']}"
        figures.append(Figure(f"P22 llama.cpp (F16) speculative auto vs off: {name}", run["auto"], run["off"],
                              "tok/s", goal=0.97 if name.startswith("free") else 1.5,
                              note=f"{run['tokens']} tokens, {run['accepted']} of {run['drafted']} drafted kept; {same}",
                              raw=run))
    for clients in client_counts:
        rates, texts = {}, {}
        for mode in ("auto", "off"):
            with serving_process(["--speculative", mode, "--queue-size", "64"]) as (client, model):
                chat_load(client, model, 1, 8, 1)  # warm-up
                seconds, tokens, texts[mode] = chat_load(client, model, clients, new_tokens, 1)
                rates[mode] = tokens / seconds
        same = sum(a == b for a, b in zip(texts["auto"], texts["off"]))
        figures.append(Figure(f"P22 serve (llama.cpp) {clients} client{'s' if clients > 1 else ''}, grounded tasks, "
                              "speculative auto vs off", rates["auto"], rates["off"], "tok/s",
                              note=f"{len(texts['auto'])} requests of client 0: {same} texts identical; whole "
                                   "requests, prefill included"))
    return figures


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def machine() -> dict:
    from importlib.metadata import version

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu, "gpu": gpu,
            "cores": os.cpu_count(), "versions": {p: version(p) for p in ("torch", "transformers", "accelerate")}}


def report(figures: list[Figure], path: Path, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    host = machine()["cpu"]  # a figure holds only beside others from the same host kind (AVX2 / AVX-512)
    table = Table(title=f"llmcli vs plain Hugging Face ({args.device}, {host}{', quick' if args.quick else ''})")
    for column in ("benchmark", "llmcli", "baseline", "ratio", "goal", ""):
        table.add_column(column, justify="left" if column == "benchmark" else "right")
    for f in figures:
        met = "" if f.goal is None or f.ratio is None else ("pass" if f.ratio >= f.goal else "miss")
        table.add_row(f.name, f"{f.ours:.3g} {f.unit}", "-" if f.baseline is None else f"{f.baseline:.3g} {f.unit}",
                      "-" if f.ratio is None else f"{f.ratio:.2f}x", "-" if f.goal is None else f"≥{f.goal}x",
                      met, style="green" if met == "pass" else "red" if met == "miss" else None)
    console = Console(width=140)
    console.print(table)
    for f in figures:
        if f.note:
            console.print(f"  {f.name}: {f.note}", style="dim")
    path.write_text(json.dumps({"machine": machine(), "device": args.device, "quick": args.quick,
                                "figures": [{**asdict(f), "ratio": f.ratio} for f in figures]}, indent=2))
    plot(figures, path.with_suffix(".png"))


def plot(figures: list[Figure], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compared = [f for f in figures if f.ratio is not None]
    scaled = [f for f in figures if f.ratio is None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    left.barh([f.name for f in compared], [f.ratio for f in compared],
              color=["tab:green" if f.goal is None or f.ratio >= f.goal else "tab:red" for f in compared])
    for i, f in enumerate(compared):
        if f.goal:
            left.plot([f.goal, f.goal], [i - 0.4, i + 0.4], "k--", linewidth=1)
    left.axvline(1, color="gray", linewidth=0.8)
    left.set_xscale("log")
    left.set_xlabel("ratio vs Hugging Face baseline (log; dashed = goal)")
    left.invert_yaxis()
    right.bar([f.name.replace("P7 ", "") for f in scaled], [f.ours for f in scaled], color="tab:blue")
    right.set_ylabel("tokens/s")
    right.set_title("P7 scaling")
    right.tick_params(axis="x", rotation=45)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smaller run (under 3 minutes on 2 cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="run only these benchmarks, e.g. P2 P6")
    parser.add_argument("--long", action="store_true",
                        help="P24/P25 (DPO, GRPO vs TRL): more steps, 3 alternating runs each, DPO also with "
                             "gradient checkpointing (an hour or more on 2 cores)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    repeats = 3
    from llmcli import models

    models.quiet_libraries()
    wanted = lambda key: args.only is None or key in args.only  # noqa: E731
    figures = [startup(3 if args.quick else 5)] if wanted("P1") else []
    needs_embedded = any(wanted(key) for key in ("P2", "P3", "P7", "P8"))
    loaded = models.load_model(None, device=args.device) if needs_embedded else None
    if wanted("P2"):
        figures += generation(loaded, 32 if args.quick else 128, repeats, args.device)
    if wanted("P3"):
        figures.append(loading(1 if args.quick else repeats, args.device))
    if wanted("P8") and importlib.util.find_spec("llama_cpp") and args.device == "cpu":
        figures += llama_engine(loaded, 32 if args.quick else 128, repeats)
    if wanted("P9") and importlib.util.find_spec("llama_cpp"):
        figures += cold_start(3 if args.quick else 5)
    if wanted("P11") and args.device == "cpu":
        figures += serving_load(32, 64 if args.quick else 200)
    if wanted("P13") and importlib.util.find_spec("llama_cpp") and args.device == "cpu":
        figures += llama_batching(8 if args.quick else 16, 32 if args.quick else 64)
    if wanted("P14") and importlib.util.find_spec("llama_cpp") and args.device == "cpu":
        figures += llama_serving([1, 8] if args.quick else [1, 4, 8, 16], 32 if args.quick else 64)
    if wanted("P15") and importlib.util.find_spec("llama_cpp") and args.device == "cpu":
        figures.append(chat_prefix_reuse(10, 32 if args.quick else 64))
    if wanted("P16") and args.device == "cpu":
        figures += constrained_decoding(loaded or models.load_model(None, device=args.device), repeats)
    if wanted("P20") and args.device == "cpu" and importlib.util.find_spec("sentence_transformers"):
        figures += embedding(500 if args.quick else 3000, 1 if args.quick else repeats)
    if wanted("P19") and args.device == "cpu":
        figures += tool_calling(32 if args.quick else 128, 1 if args.quick else repeats, 8)
    if wanted("P21") and args.device == "cpu" and importlib.util.find_spec("lm_eval"):
        figures += benchmark_tasks(100 if args.quick else 400, 1 if args.quick else repeats)
    if wanted("P22") and importlib.util.find_spec("llama_cpp") and args.device == "cpu":
        figures += speculative_decoding(64 if args.quick else 256, 1 if args.quick else repeats,
                                        [1] if args.quick else [1, 8])
    if wanted("P17") and importlib.util.find_spec("llama_cpp") and args.device == "cpu":
        figures.append(causal_fill_mask(1 if args.quick else repeats))
    if wanted("P12") and args.device == "cpu":
        figures.append(serving_batches(16, 32 if args.quick else 64))
    if (wanted("P24") or wanted("P25")) and args.device == "cpu" and importlib.util.find_spec("trl"):
        from preferences import dpo_figures, grpo_figures

        with tempfile.TemporaryDirectory() as tmp:
            if wanted("P24"):  # the first step of each run is its warm-up: 4 steps time 3
                figures += dpo_figures(Path(tmp), 20 if args.long else 4 if args.quick else 6,
                                       3 if args.long else 1, lora=not args.quick, checkpointing=args.long)
            if wanted("P25"):
                figures += grpo_figures(Path(tmp), 12 if args.long else 3 if args.quick else 5, 3 if args.long else 1)
    if wanted("P26") and args.device == "cpu" and importlib.util.find_spec("mcp"):
        from mcp_roundtrip import mcp_figures

        figures += mcp_figures(3 if args.quick else 10, 20 if args.quick else 100)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bert, gpt2 = small_models(workdir)
        if wanted("P4"):
            figures.append(fill_mask(bert, 64 if args.quick else 256, repeats, args.device))
        if wanted("P5"):
            figures.append(perplexity(gpt2, repeats, args.device, 30_000 if args.quick else 100_000))
        if wanted("P18"):
            figures.append(pseudo_perplexity(bert, 1 if args.quick else repeats, args.device,
                                             1000 if args.quick else 3000))
        if wanted("P6"):
            figures += finetune(gpt2, 10 if args.quick else 40, 1 if args.quick else repeats, workdir, args.device)
        if wanted("P10") and args.device in ("cpu", "cuda"):
            figures += data_parallel(bert, workdir, args.quick, args.device)
        if wanted("P23") and args.device == "cpu" and importlib.util.find_spec("sentence_transformers"):
            figures.append(reranking(workdir, 1000, 1 if args.quick else repeats))
        if wanted("P27") and args.device == "cpu":
            for engine in ("hf", "llama.cpp") if importlib.util.find_spec("llama_cpp") else ("hf",):
                figures.append(adapter_serving(engine, 8, 16 if args.quick else 48, 32 if args.quick else 64, workdir))
        if wanted("P7"):
            figures += scaling(loaded, gpt2, [1, 4] if args.quick else [1, 4, 16],
                               [10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000], args.device)
    RESULTS.mkdir(exist_ok=True)
    name = "latest" if args.device == "cpu" else f"latest-{args.device}"
    partial = "-partial" if args.only else ""
    report(figures, RESULTS / f"{name}{'-quick' if args.quick else ''}{partial}.json", args)


if __name__ == "__main__":
    main()
