"""GRPO's rollouts: completions sampled from the policy being trained, on its current weights.

The hf engine's way (a left-padded batch through `model.generate`, as `llmcli generate` and TRL's
GRPOTrainer without vLLM do), with the sampling RNG derived from (seed, step, micro-batch, rank) and
forked, so that a run resumed after a kill samples exactly what the uninterrupted run sampled, and the
training RNG (dropout) is untouched by sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SamplingSettings:
    """TRL 1.16 GRPOConfig's names and defaults (max_completion_length there is 512; llmcli's 256 fits
    small models' contexts and CPU time)."""

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off


def rollout_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """One seed per (run seed, optimizer step, micro-batch, process): different samples everywhere, the same
    samples again on resume. A fixed mixing, not Python's salted hash."""
    return (seed * 1_000_003 + step * 10_007 + micro * 101 + rank) % 2**63


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the model's generation_config EOS ids and the tokenizer's (TRL's)."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids


def sample_completions(model: Any, tokenizer: Any, prompt_ids: list[list[int]], settings: SamplingSettings,
                       seed: int) -> list[list[int]]:
    """One sampled completion per row of `prompt_ids` (repeat a prompt G times for its group): token ids up
    to and including the first EOS, at most max_completion_length. `model` is the unwrapped policy (under
    LoRA the peft model, adapter on); it is sampled in eval mode (no dropout) without grad."""
    import torch
    from transformers import GenerationConfig

    from llmcli.tasks.objectives import pad_rows

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stop = eos_ids(model, tokenizer)
    width = max(len(ids) for ids in prompt_ids)
    device = next(model.parameters()).device
    input_ids = pad_rows(prompt_ids, pad, left=True).to(device)
    attention_mask = pad_rows([[1] * len(ids) for ids in prompt_ids], 0, left=True).to(device)
    config = GenerationConfig(max_new_tokens=settings.max_completion_length, do_sample=True,
                              temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                              pad_token_id=pad, bos_token_id=tokenizer.bos_token_id, eos_token_id=stop,
                              disable_compile=True)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    finally:
        model.train(was_training)
    completions = []
    for row in output[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stop), len(row))
        completions.append(row[:end])
    return completions
