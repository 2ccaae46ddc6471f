"""hf engine, by hand: transformers' continuous batching (`generate_batch`, paged attention) against
static batches of `model.generate` (what `llmcli serve --engine hf` and `generate --batch-size` run),
16 chat prompts x 64 greedy tokens, the embedded model in fp32 on the CPU, alternating.

    .venv/bin/python benchmarks/hf_continuous.py
"""
import time, sys, torch
from transformers import GenerationConfig
from llmcli import models
loaded = models.load_model(None, device="cpu")
model, tok = loaded.model, loaded.tokenizer
lines = [l.strip() for l in open("/usr/share/common-licenses/GPL-3").read().splitlines() if len(l.split()) > 6][:16]
prompts = [tok.apply_chat_template([{"role": "user", "content": f"Explain in plain words: {l}"}], add_generation_prompt=True, tokenize=False) for l in lines]
ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
N = 64
def static(batch):
    tok.padding_side = "left"
    outs = []
    for b in range(0, len(prompts), batch):
        enc = tok(prompts[b:b+batch], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, do_sample=False, max_new_tokens=N, min_new_tokens=N, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        outs += [row[enc["input_ids"].shape[1]:].tolist() for row in out]
    return outs
def continuous():
    cfg = GenerationConfig(max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=-1, pad_token_id=tok.pad_token_id or 0)
    res = model.generate_batch(ids, generation_config=cfg, progress_bar=False)
    return [r.generated_tokens for r in sorted(res.values(), key=lambda r: int(r.request_id.split("_")[-1]))]
for name, fn in [("static 8", lambda: static(8)), ("static 16", lambda: static(16)), ("continuous", continuous), ("static 8", lambda: static(8)), ("continuous", continuous)]:
    t = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    dt = time.perf_counter() - t
    print(f"{name}: {sum(len(o) for o in out)/dt:.1f} tok/s ({dt:.1f} s)", flush=True)
