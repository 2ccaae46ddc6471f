"""Which weight format should the llama.cpp engine run by default? Measured, not chosen by taste.

For the embedded model as it is (Q4_1) and requantized to Q8_0, F16 and F32 (llama_model_quantize
with allow_requantize), against Hugging Face float32 on the dequantized weights:
- top-1 agreement: the share of positions of a real text (GPL-3, windows of 512) where both engines'
  most likely next token is the same;
- the largest and mean difference of the log-probability of the text's actual next token;
- greedy decode tok/s of the same chat prompt, 128 tokens, on the llama.cpp engine;
- what each answers to "What is the capital of France?".

Usage: python benchmarks/weight_formats.py [--tokens 4096] [--out benchmarks/results/weight_formats.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def llama_logits(engine, ids: list[int]) -> np.ndarray:
    """Logits at every position of one window, from the llama.cpp engine's own context."""
    engine.use_context(len(ids))
    engine.feed(ids, 0, outputs=len(ids))
    lib = engine.lib
    return np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(engine.context, i), shape=(engine.n_vocab,))
                     for i in range(len(ids))]).astype(np.float64)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/weight_formats.json")
    args = parser.parse_args()

    import torch

    from llmcli import models
    from llmcli.data import Prompt
    from llmcli.engines import physical_cores
    from llmcli.engines.llamacpp import LlamaCppEngine, import_llama_cpp
    from llmcli.tasks.generate import GenerateOptions, generate

    lib = import_llama_cpp()
    original = models.embedded_gguf_path()
    hf = models.load_model(None, device="cpu", dtype="float32")
    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    ids = hf.tokenizer(text)["input_ids"][: args.tokens + 1]
    windows = [ids[i:i + args.window + 1] for i in range(0, len(ids) - 1, args.window)]
    reference = []
    with torch.inference_mode():
        for window in windows:
            logits = hf.model(torch.tensor([window[:-1]])).logits[0].double().numpy()
            reference.append(log_softmax(logits))
    threads = physical_cores()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"Q4_1 (file as it is)": original}
        for name, ftype in (("Q8_0", lib.LLAMA_FTYPE_MOSTLY_Q8_0), ("F16", lib.LLAMA_FTYPE_MOSTLY_F16),
                            ("F16, Q8_0 embeddings", lib.LLAMA_FTYPE_MOSTLY_F16), ("F32", lib.LLAMA_FTYPE_ALL_F32)):
            params = lib.llama_model_quantize_default_params()
            params.ftype, params.allow_requantize, params.nthread = ftype, True, threads
            if "embeddings" in name:  # smaller (less memory) but the tied output layer then runs in Q8_0
                params.token_embedding_type = params.output_tensor_type = lib.GGML_TYPE_Q8_0
            files[name] = Path(tmp) / f"{name.replace(' ', '_').replace(',', '')}.gguf"
            assert lib.llama_model_quantize(str(original).encode(), str(files[name]).encode(), ctypes.byref(params)) == 0
        for name, path in files.items():
            source = models.ModelSource("gguf", str(path), path.name)
            engine = LlamaCppEngine.load(source, "as-is", threads, False, print)
            agree = total = 0
            gaps = []
            for window, ref in zip(windows, reference):
                mine = log_softmax(llama_logits(engine, window[:-1]))
                agree += int((mine.argmax(-1) == ref.argmax(-1)).sum())
                total += len(ref)
                targets = np.array(window[1:])
                rows = np.arange(len(targets))
                gaps.extend(np.abs(mine[rows, targets] - ref[rows, targets]).tolist())
            options = GenerateOptions(max_new_tokens=128)
            prompt = Prompt(text="Write a short story about a lighthouse keeper.")
            list(generate(engine, [prompt], options))  # warm-up
            began = time.perf_counter()
            [story] = generate(engine, [prompt], options)
            seconds = time.perf_counter() - began
            [answer] = generate(engine, [Prompt(text="What is the capital of France?")], GenerateOptions(max_new_tokens=32))
            results[name] = {"top1_agreement": agree / total, "positions": total,
                             "max_abs_logprob_diff": max(gaps), "mean_abs_logprob_diff": float(np.mean(gaps)),
                             "tokens_per_second": story.generated_tokens / seconds,
                             "generated_tokens": story.generated_tokens, "capital_of_france": answer.text,
                             "file_mb": round(path.stat().st_size / 2**20, 1)}
            print(name, json.dumps(results[name], ensure_ascii=False))
            del engine
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": models.EMBEDDED_NAME, "threads": threads, "text": "GPL-3",
                                          "window": args.window, "results": results}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
