"""GRPO's rollouts on llama.cpp, on the weights being trained (`finetune --rollout-engine llama`).

The policy is written once, in-process, as an F16 GGUF by export's writer into a temporary directory
(tmpfs where there is one), and llama.cpp loads it with its memory map: llama.cpp 0.3.36 maps the file
MAP_SHARED and points every CPU weight into the map, unless a repacking buffer type copies it out, so
those are turned off here. Each step the weights training changed (the trainable ones; under LoRA the
adapted ones, merged) are converted again and written into the same file through a writable map of it:
llama.cpp reads them at once, with no reload, no re-import and no subprocess.

The step's completions are decoded together by the engine's batched path (SequenceSet: a prompt's G
samples share its prefill), row i seeded with the step's rollout seed + i, as `generate --seed` seeds
its rows. llama.cpp's sampler is not torch's, so for the same seed the samples differ from the hf
engine's; they come from the same distribution up to the F16 rounding of the weights. The loss scores
them with the hf model, so the update given the completions is exact.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from llmcli.errors import LlmcliError, UsageError

ROLLOUT_ENGINES = ("auto", "hf", "llama")


def policy_weights(model: Any, changed_only: bool) -> tuple[Any, dict[str, Any]]:
    """The Hugging Face model llama.cpp runs (under LoRA the base model peft wraps) and its weights by
    their names there, the LoRA adapter merged in: all of them, or only those training changes."""
    import torch

    with torch.no_grad():
        if not hasattr(model, "get_base_model"):
            trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
            return model, {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()
                           if not changed_only or name in trained}
        from peft.tuners.lora import LoraLayer

        base = model.get_base_model()
        merged = {}
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight.detach()
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight = weight + module.get_delta_weight(adapter)
                merged[f"{name}.weight"] = weight.cpu()
        if changed_only:
            return base, merged
        weights = {name.replace(".base_layer.", "."): tensor.detach().cpu()
                   for name, tensor in base.state_dict().items() if "lora_" not in name}
        return base, {**weights, **merged}


def tensor_views(path: Path, tensors: Any) -> dict[str, Any]:
    """Writable views of each tensor's data in the GGUF file that gguf's writer made of `tensors` (gguf name,
    array, raw type), in their order: each at an offset aligned to GGUF_DEFAULT_ALIGNMENT, padded, the last
    one ending the file. numpy's r+ memmap is MAP_SHARED, as llama.cpp's. (gguf.GGUFReader finds the same
    offsets but parses the whole vocabulary first: 18 s for SmolLM2's on a busy 2-core host.)"""
    import gguf
    import numpy

    arrays = [(name, data) for name, data, _ in tensors]
    padded = lambda size: gguf.GGUFWriter.ggml_pad(size, gguf.GGUF_DEFAULT_ALIGNMENT)  # noqa: E731
    mapped = numpy.memmap(path, mode="r+")
    offset = len(mapped) - sum(padded(data.nbytes) for _, data in arrays)
    views = {}
    for name, data in arrays:
        views[name] = mapped[offset:offset + data.nbytes].view(data.dtype).reshape(data.shape)
        offset += padded(data.nbytes)
    return views


class LlamaRollouts:
    """The policy on llama.cpp, its weights kept equal to the hf model's (in F16) by `sync`."""

    def __init__(self, model: Any, tokenizer: Any, stop: list[int]) -> None:
        from llmcli.engines import physical_cores
        from llmcli.engines.llamacpp import LlamaCppEngine, import_llama_cpp
        from llmcli.tasks.export import architecture_of, converted_tensors, llama_cpp_pre_tokenizer, write_gguf

        lib = import_llama_cpp()
        base, weights = policy_weights(model, changed_only=False)
        self.architecture = architecture_of(base)
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # RAM: the file is rewritten every step
        self.directory = tempfile.TemporaryDirectory(prefix="llmcli-rollouts-", dir=shm)
        self.path = Path(self.directory.name) / "policy.f16.gguf"
        loaded = SimpleNamespace(model=base, tokenizer=tokenizer, source=SimpleNamespace(name="policy"))
        write_gguf(loaded, self.architecture, llama_cpp_pre_tokenizer(tokenizer), self.path, "f16", None, weights)
        self.views = tensor_views(self.path, converted_tensors(base, self.architecture, "f16", weights))
        self.engine = LlamaCppEngine(lib, None, self.path, physical_cores(), 0, extra_buffers=False)
        self.engine.eos_ids = frozenset(stop)  # the hf path's stops (llama.cpp's end-of-generation set may differ)

    def sync(self, model: Any) -> None:
        """The weights training changed, written into the file llama.cpp maps."""
        from llmcli.tasks.export import converted_tensors

        base, weights = policy_weights(model, changed_only=True)
        for name, data, _ in converted_tensors(base, self.architecture, "f16", weights):
            self.views[name][...] = data

    def sample(self, prompts: list[list[int]], group: int, settings: Any, seed: int) -> list[list[int]]:
        """`group` completions of each prompt, in order: token ids up to and including the first stop,
        at most settings.max_completion_length."""
        from llmcli.tasks.generate import GenerateOptions

        options = GenerateOptions(max_new_tokens=settings.max_completion_length, temperature=settings.temperature,
                                  top_k=settings.top_k, top_p=settings.top_p, num_return_sequences=group)
        self.engine.set_seed(seed % 2**32)
        return self.engine.generate(prompts, options, lambda tokens: None, lambda: False)


def open_or_sync(rollouts: LlamaRollouts | None, model: Any, tokenizer: Any, stop: list[int]) -> tuple[LlamaRollouts, float]:
    """The rollouts engine with the model's current weights (made at the first step), and the seconds it took."""
    began = time.perf_counter()
    if rollouts is None:
        rollouts = LlamaRollouts(model, tokenizer, stop)
    else:
        rollouts.sync(model)
    return rollouts, time.perf_counter() - began


def llama_problem(model: Any, tokenizer: Any) -> LlmcliError | None:
    """Why llama.cpp cannot run this model's rollouts, or None."""
    from llmcli.engines import LLAMA_INSTALL_HINT, llama_cpp_installed
    from llmcli.tasks.export import architecture_of, llama_cpp_pre_tokenizer

    if not llama_cpp_installed():
        return UsageError("--rollout-engine llama needs the llama.cpp engine, which is not installed",
                          LLAMA_INSTALL_HINT)
    try:
        architecture_of(model)
        llama_cpp_pre_tokenizer(tokenizer)
        from llmcli.engines.llamacpp import import_llama_cpp

        import_llama_cpp()  # this host runs the build (a probe the first time)
    except LlmcliError as exc:
        return UsageError(f"--rollout-engine llama: {exc.message}", exc.hint or "Use --rollout-engine hf.")
    return None


def resolve_rollout_engine(requested: str, model: Any, tokenizer: Any, on_cpu: bool) -> str:
    """"hf" or "llama". auto: llama.cpp where it can run the model and training is on the CPU, where it
    measured faster (docs/finetune.md, "Rollout engines"); on a GPU the hf engine generates there."""
    if requested == "hf":
        return "hf"
    problem = llama_problem(model, tokenizer)
    if requested == "llama":
        if problem is not None:
            raise problem
        return "llama"
    return "llama" if problem is None and on_cpu else "hf"
