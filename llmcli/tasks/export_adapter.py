"""`llmcli export --adapter DIR`: a peft LoRA adapter (a `llmcli finetune --lora` output) as llama.cpp's
LoRA adapter GGUF, which `llama-cli --lora`, llama-server and the llama.cpp engine apply to the base GGUF
at run time.

The file is what llama.cpp's `convert_lora_to_gguf.py` writes: general.type "adapter", adapter.type
"lora", adapter.lora.alpha, and for each adapted base weight `<its GGUF name>.lora_a` (rank x in) and
`.lora_b` (out x rank), named and laid out by the same map as the base model's export (export.py), with
the query and key rows of lora_b permuted as the base weights are. llama.cpp scales the product by
alpha / rank, as peft does.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import UsageError
from llmcli.tasks.export import (ProgressCallback, SUPPORTED, check_request, gguf_name, rotary_heads, stored,
                                 tensor_names, unpermute_rotary, write_atomically, write_tensors)

ADAPTER_TYPES = ("f32", "f16", "bf16")


@dataclass
class ExportedAdapter:
    path: Path
    type: str
    architecture: str
    tensors: int
    rank: int
    alpha: float
    size_mb: float
    seconds: float


def export_adapter(adapter: str, output: str, type_name: str = "f16", overwrite: bool = False,
                   on_progress: ProgressCallback | None = None) -> ExportedAdapter:
    began = time.perf_counter()
    if type_name not in ADAPTER_TYPES:
        raise UsageError(f"--type {type_name} is not written for adapters", f"Use one of: {', '.join(ADAPTER_TYPES)}.")
    target = check_request(output, type_name, overwrite)
    directory = adapter_directory(adapter)
    settings = json.loads((directory / "adapter_config.json").read_text())
    alpha, rank = llama_cpp_alpha(settings, directory)
    config = base_config(directory)
    architecture = SUPPORTED.get((config.architectures or [""])[0])
    if architecture is None:
        raise UsageError(f"export writes adapters of Llama-family and GPT-2 models; the base of {adapter} is "
                         f"{(config.architectures or [config.model_type])[0]}",
                         "Export an adapter of a LlamaForCausalLM or GPT2LMHeadModel.")
    tensors = list(lora_tensors(directory, architecture, config, type_name))

    def write(temporary: Path) -> int:
        import gguf

        writer = gguf.GGUFWriter(str(temporary), architecture)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(directory.name)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16}[type_name])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        return write_tensors(writer, tensors, on_progress)

    written = write_atomically(target, write)
    return ExportedAdapter(target, type_name, architecture, written, rank, alpha, target.stat().st_size / 2**20,
                           time.perf_counter() - began)


def adapter_directory(adapter: str) -> Path:
    directory = Path(adapter).expanduser()
    if not (directory / "adapter_config.json").is_file():
        raise UsageError(f"--adapter {adapter} is not a LoRA adapter directory (no adapter_config.json)",
                         "Pass the --output directory of `llmcli finetune --lora`, or a peft adapter folder.")
    if not (directory / "adapter_model.safetensors").is_file():
        raise UsageError(f"--adapter {adapter} has no adapter_model.safetensors",
                         "Save the adapter with safetensors (peft's default).")
    return directory


def llama_cpp_alpha(settings: dict[str, Any], directory: Path) -> tuple[float, int]:
    """The alpha that makes llama.cpp's scale (alpha / rank) peft's: lora_alpha, or with rsLoRA (scale
    alpha / sqrt(rank)) lora_alpha * sqrt(rank). Per-module ranks and DoRA have no llama.cpp form."""
    if settings.get("peft_type", "LORA") != "LORA" or settings.get("use_dora"):
        raise UsageError(f"{directory} is not a plain LoRA adapter ({settings.get('peft_type')}, DoRA "
                         f"{bool(settings.get('use_dora'))}); llama.cpp's adapters are LoRA",
                         "Merge it instead: llmcli export DIR -o model.gguf.")
    if settings.get("rank_pattern") or settings.get("alpha_pattern"):
        raise UsageError(f"{directory} sets a rank or alpha per module, which llama.cpp's adapter file cannot hold",
                         "Merge it instead: llmcli export DIR -o model.gguf.")
    rank, alpha = int(settings["r"]), float(settings["lora_alpha"])
    return (alpha * math.sqrt(rank) if settings.get("use_rslora") else alpha), rank


def base_config(directory: Path) -> Any:
    """What the tensor names and layouts depend on, of the adapter's base: its transformers config, or for
    a GGUF base (whose Hugging Face conversion the adapter was trained on) the same values from its
    metadata, without converting it."""
    from llmcli import models

    source = models.resolve_model(models.adapter_base(directory))
    if source.kind == "gguf":
        return gguf_config(Path(source.location))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(models.local_model_dir(source))


def gguf_config(path: Path) -> Any:
    from types import SimpleNamespace

    from llmcli import models

    reader = models.gguf_reader(path)
    value = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default  # noqa: E731
    arch = value("general.architecture")
    classes = {architecture: name for name, architecture in SUPPORTED.items()}
    heads = value(f"{arch}.attention.head_count")
    blocks = value(f"{arch}.block_count")
    return SimpleNamespace(architectures=[classes.get(arch, arch)], model_type=arch, num_hidden_layers=blocks,
                           n_layer=blocks, num_attention_heads=heads,
                           num_key_value_heads=value(f"{arch}.attention.head_count_kv", heads),
                           tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors))


def lora_tensors(directory: Path, architecture: str, config: Any, type_name: str):
    """(name, array, raw type) of each lora_a and lora_b, in the order of the adapter's weights."""
    from safetensors.torch import load_file

    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in load_file(directory / "adapter_model.safetensors").items():
        part = "a" if ".lora_A." in key else "b" if ".lora_B." in key else None
        if part is None:  # modules_to_save (a fully trained head or embedding), biases...
            raise UsageError(f"{directory} holds {key}, which is not a LoRA factor; llama.cpp's adapter file "
                             "holds only LoRA factors", "Merge it instead: llmcli export DIR -o model.gguf.")
        base = key.removeprefix("base_model.model.").replace(f".lora_{part.upper()}.weight", ".weight")
        pairs.setdefault(base, {})[part] = tensor.float()
    names = tensor_names(architecture, config)
    tied = getattr(config, "tie_word_embeddings", False)
    for base, factors in pairs.items():
        if tied and base == "lm_head.weight":
            raise UsageError(f"{directory} adapts lm_head, which this base ties to its embedding (llama.cpp reads "
                             "one tensor for both)", "Merge it instead: llmcli export DIR -o model.gguf.")
        name = gguf_name(names, base, architecture)
        lora_a, lora_b = factors["a"], factors["b"]
        heads = rotary_heads(base, architecture, config)
        if heads:  # B's rows are the weight's output rows, permuted as export permutes the weight's
            lora_b = unpermute_rotary(lora_b, heads)
        # GPT-2's Conv1D weights are transposed on export, but peft's factors of a fan_in_fan_out layer are
        # already (rank, in) and (out, rank): as llama.cpp multiplies them
        yield stored(f"{name}.lora_a", lora_a, type_name)
        yield stored(f"{name}.lora_b", lora_b, type_name)
