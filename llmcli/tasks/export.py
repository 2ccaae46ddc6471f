"""`llmcli export`: a Hugging Face causal LM (a `save_pretrained` directory, a LoRA adapter, which is
merged first, or anything else `--model` accepts) to one GGUF file that llama.cpp, ollama and LM Studio
load.

Written with the `gguf` package that llama.cpp maintains: its writer, its tensor-name maps and its
`SpecialVocab` (merges, special token ids, the chat template). What a loader expects of the metadata
and of the tensors (Llama's query and key rows permuted back to Meta's rotary layout, GPT-2's Conv1D
weights transposed, norms kept in F32) follows llama.cpp's own `convert_hf_to_gguf.py`. F32, F16 and
BF16 are written directly; quantized types are made from an F32 file by llama.cpp's
`llama_model_quantize`, so they are exactly what `llama-quantize` makes.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmcli.errors import UsageError

SUPPORTED = {"LlamaForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}  # HF class -> gguf architecture
WRITTEN = ("f32", "f16", "bf16")
QUANTIZED = ("q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1", "q4_0", "q3_k_l",
             "q3_k_m", "q3_k_s", "q2_k", "iq4_nl", "iq4_xs")
TYPES = WRITTEN + QUANTIZED

ProgressCallback = Callable[[int, int], None]  # (tensors written, tensors in all)


@dataclass
class Exported:
    path: Path
    type: str
    architecture: str
    tensors: int
    size_mb: float
    seconds: float
    merged_adapter: bool


def check_request(output: str, type_name: str, overwrite: bool, model: str | None = None,
                  allow_requantize: bool = False, option: str = "--output") -> Path:
    """The output path, once the type is known, nothing would be overwritten unasked and no quantized
    model would be quantized again unasked."""
    if type_name not in TYPES:
        raise UsageError(f"unknown --type {type_name!r}", f"Use one of: {', '.join(TYPES)}.")
    if model is not None and type_name in QUANTIZED and not allow_requantize:
        check_not_requantizing(model, type_name)
    path = Path(output).expanduser()
    if path.is_dir():
        raise UsageError(f"{option} {output} is a directory", "Name the .gguf file to write.")
    if path.exists() and not overwrite:
        hint = ("Pass --overwrite to replace it, or choose another --output." if option == "--output" else
                f"Choose another {option} file, or remove this one (finetune's --overwrite would also empty "
                "its --output directory).")
        raise UsageError(f"{option} {output} exists", hint)
    if not path.parent.is_dir():
        raise UsageError(f"the folder of {option} {output} does not exist", "Create it first.")
    return path


def check_not_requantizing(model: str, type_name: str) -> None:
    """llama-quantize's rule: quantizing weights that are already quantized adds the second rounding's
    error to the first's, so it needs --allow-requantize."""
    from llmcli import models

    source = models.resolve_model(model)
    if source.kind != "gguf":
        return
    already = models.quantized_types(Path(source.location))
    if already:
        raise UsageError(f"{source.name} is already quantized ({', '.join(already)}); quantizing it to "
                         f"{type_name.upper()} rounds its weights a second time and loses more than quantizing "
                         "the original weights once",
                         "Export from the full-precision model, or pass --allow-requantize to accept the loss.")


def export(model: str, output: str, type_name: str = "f16", overwrite: bool = False,
           on_progress: ProgressCallback | None = None, on_notice: Callable[[str], None] | None = None,
           allow_requantize: bool = False) -> Exported:
    began = time.perf_counter()
    target = check_request(output, type_name, overwrite, model, allow_requantize)
    loaded, merged = load_full_precision(model)
    architecture = architecture_of(loaded.model)
    pre = llama_cpp_pre_tokenizer(loaded.tokenizer)  # unsupported tokenizers fail before any writing

    def write(temporary: Path) -> int:
        if type_name in WRITTEN:
            return write_gguf(loaded, architecture, pre, temporary, type_name, on_progress)
        with tempfile.NamedTemporaryFile(suffix=".f32.gguf", dir=target.parent, delete=True) as full:
            tensors = write_gguf(loaded, architecture, pre, Path(full.name), "f32", on_progress)
            if on_notice:
                on_notice(f"Quantizing to {type_name.upper()} with llama.cpp.")
            quantize(Path(full.name), temporary, type_name)
        return tensors

    tensors = write_atomically(target, write)
    return Exported(target, type_name, architecture, tensors, target.stat().st_size / 2**20,
                    time.perf_counter() - began, merged)


def write_atomically(target: Path, write: Callable[[Path], int]) -> int:
    """`write` into a temporary file beside the target, renamed into place only when complete."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(handle)
    try:
        written = write(Path(temporary))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's file is private; the export is an ordinary file
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written


def load_full_precision(model: str) -> tuple[Any, bool]:
    """The model in float32 on the CPU; a LoRA adapter merged into its base (peft's merge_and_unload)."""
    from llmcli import models

    loaded = models.load_model(model, kind="auto", device="cpu", dtype="float32")
    merged = hasattr(loaded.model, "merge_and_unload")
    if merged:
        loaded.model = loaded.model.merge_and_unload()
    return loaded, merged


def architecture_of(model: Any) -> str:
    name = type(model).__name__
    if name not in SUPPORTED:
        raise UsageError(f"export writes Llama-family and GPT-2 causal LMs; this model is {name} "
                         f"({model.config.model_type})", "Export a LlamaForCausalLM or GPT2LMHeadModel directory.")
    config = model.config
    if name == "LlamaForCausalLM":
        rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        if rope.get("rope_type", "default") != "default":
            raise UsageError(f"export does not yet write RoPE scaling ({rope.get('rope_type')})",
                             "Export a model with the default rotary embedding.")
    elif getattr(config, "activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UsageError(f"llama.cpp's GPT-2 uses tanh GELU; this model uses {config.activation_function}")
    return SUPPORTED[name]


# ---------------------------------------------------------------- tokenizer


def llama_cpp_pre_tokenizer(tokenizer: Any) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: what its BPE needs to tokenize as the Hugging
    Face tokenizer does. Byte-level BPE only; the pre-tokenizer is recognised by its structure (llama.cpp's converter hashes the ids of a
    test string against a table of known models instead, which fails for any model not in the table).
    Both kinds are checked by tests that compare llama.cpp's ids with the tokenizer's on real text."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError("export needs a fast tokenizer (tokenizer.json)", "Save the model with a fast tokenizer.")
    spec = json.loads(backend.to_str())
    model, decoder, normalizer = spec.get("model", {}), spec.get("decoder") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel" or normalizer is not None:
        raise UsageError("export writes byte-level BPE tokenizers (GPT-2's and SmolLM2's kind); this one is "
                         f"{model.get('type')} with a {decoder.get('type')} decoder",
                         "Export a model with a byte-level BPE tokenizer.")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer") or {})
    if pre is None:
        raise UsageError(f"export does not know llama.cpp's name for this pre-tokenizer: "
                         f"{json.dumps(spec.get('pre_tokenizer'))[:200]}",
                         "Supported: GPT-2's (ByteLevel) and SmolLM2's (single digits, then ByteLevel).")
    return pre


def pre_tokenizer_name(pre: dict[str, Any]) -> str | None:
    """llama.cpp's name for a Hugging Face pre-tokenizer it implements the same way (llama-vocab.cpp)."""
    def byte_level(step: dict[str, Any]) -> bool:
        return step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space")

    if byte_level(pre):
        return "gpt-2"  # GPT-2's regex
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")
            and byte_level(steps[1])):
        return "smollm"  # each digit apart, then GPT-2's regex
    return None


def write_vocab(writer: Any, tokenizer: Any, pre: str, n_vocab: int, eos_ids: list[int],
                workdir: Path) -> None:
    """Tokens, their types, merges, special ids, BOS/EOS adding and the chat template."""
    import gguf

    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    vocab = tokenizer.get_vocab()
    by_id = {index: token for token, index in vocab.items()}
    if max(by_id) >= n_vocab:
        raise UsageError(f"the tokenizer has ids up to {max(by_id)}, beyond the model's vocabulary of {n_vocab}")
    tokens, types = [], []
    for index in range(n_vocab):  # ids the tokenizer lacks pad the embedding matrix: unused
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    tokenizer.save_pretrained(workdir)  # SpecialVocab reads the saved files, as llama.cpp's converter does
    special = gguf.SpecialVocab(workdir, load_merges=True, n_vocab=n_vocab)
    probe = tokenizer("a")["input_ids"]
    # what the tokenizer itself does, rather than SpecialVocab's reading of its post-processor
    special.add_special_token = {"bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
                                 "eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]}
    if eos_ids:  # generation stops at the model's generation EOS, which may differ from the tokenizer's
        special.special_token_ids["eos"] = eos_ids[0]
    special.chat_template = tokenizer.chat_template or None
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------- tensors


def write_gguf(loaded: Any, architecture: str, pre: str, path: Path, type_name: str,
               on_progress: ProgressCallback | None, weights: dict[str, Any] | None = None) -> int:
    """`weights`: the tensors by Hugging Face name, when not the model's state_dict (GRPO's llama.cpp
    rollouts pass a LoRA policy's weights with the adapter merged)."""
    import gguf

    model, config = loaded.model, loaded.model.config
    n_vocab = model.get_output_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(str(path), architecture)  # gguf's MODEL_ARCH_NAMES spell them so
    writer.add_name(Path(loaded.source.name).name)
    write_hyperparameters(writer, architecture, config, n_vocab, type_name)
    eos = loaded.model.generation_config.eos_token_id
    eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    with tempfile.TemporaryDirectory() as workdir:
        write_vocab(writer, loaded.tokenizer, pre, n_vocab, eos_ids, Path(workdir))
    return write_tensors(writer, list(converted_tensors(model, architecture, type_name, weights)), on_progress)


def write_tensors(writer: Any, tensors: list[tuple[str, Any, Any]], on_progress: ProgressCallback | None) -> int:
    """The header, the metadata already added, then (name, array, raw type) tensors, and close."""
    for name, data, raw_type in tensors:
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=raw_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, (_, data, _) in enumerate(tensors, 1):
        writer.write_tensor_data(data)
        if on_progress:
            on_progress(done, len(tensors))
    writer.close()
    return len(tensors)


def write_hyperparameters(writer: Any, architecture: str, config: Any, n_vocab: int, type_name: str) -> None:
    """The keys llama.cpp's loader reads for the architecture (as convert_hf_to_gguf.py writes them)."""
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16}
    writer.add_file_type(file_types[type_name])
    writer.add_vocab_size(n_vocab)
    if architecture == "gpt2":
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def converted_tensors(model: Any, architecture: str, type_name: str, weights: dict[str, Any] | None = None):
    """(gguf name, array, raw type) for each weight (of `weights` if given, else of the model's state_dict),
    in the layout and type llama.cpp expects."""
    config = model.config
    names = tensor_names(architecture, config)
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in (model.state_dict() if weights is None else weights).items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the token embedding for the output when output.weight is absent
        if hf_name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
            continue  # buffers, not weights
        name = gguf_name(names, hf_name, architecture)
        data = tensor.detach().float()
        heads = rotary_heads(hf_name, architecture, config)
        if heads:
            data = unpermute_rotary(data, heads)
        elif architecture == "gpt2" and hf_name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            data = data.T  # Conv1D stores (in, out)
        keep_f32 = data.dim() <= 1 or name.endswith("_norm.weight")  # as convert_hf_to_gguf.py keeps them
        yield stored(name, data, "f32" if keep_f32 else type_name)


def stored(name: str, data: Any, type_name: str) -> tuple[str, Any, Any]:
    """(name, array, raw type) of a float32 tensor written as f32, f16 or bf16."""
    import gguf
    import torch

    if type_name == "f32":
        return name, data.contiguous().numpy(), None
    if type_name == "f16":
        return name, data.to(torch.float16).contiguous().numpy(), None
    # bf16, rounded by torch as llama.cpp's converter does, stored as its 16-bit patterns
    return name, data.to(torch.bfloat16).contiguous().view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16


def tensor_names(architecture: str, config: Any) -> Any:
    """gguf's map from Hugging Face tensor names to GGUF ones for this architecture and depth."""
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[architecture]
    return gguf.get_tensor_name_map(arch, config.n_layer if architecture == "gpt2" else config.num_hidden_layers)


def gguf_name(names: Any, hf_name: str, architecture: str) -> str:
    """The GGUF name of a Hugging Face weight (gguf's tensor-name map, as convert_hf_to_gguf.py uses it)."""
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise UsageError(f"export does not know where the tensor {hf_name} goes in a GGUF {architecture} file")
    return name


def rotary_heads(hf_name: str, architecture: str, config: Any) -> int | None:
    """The head count whose rotary layout a Llama query or key weight (or bias) is permuted with; None for
    any other tensor."""
    if architecture != "llama":
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def unpermute_rotary(weights: Any, heads: int) -> Any:
    """Hugging Face's Llama interleaves each head's rotary halves differently from Meta's layout, which
    llama.cpp's rope expects: convert_hf_to_gguf.py's LlamaModel.permute."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def quantize(source: Path, target: Path, type_name: str) -> None:
    """llama.cpp's own quantizer (what llama-quantize runs), from the F32 file."""
    import ctypes

    from llmcli.engines import physical_cores
    from llmcli.engines.llamacpp import import_llama_cpp

    lib = import_llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    params.nthread = physical_cores()
    if lib.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) != 0:
        raise UsageError(f"llama.cpp could not quantize the model to {type_name.upper()}",
                         "Try another --type (f16 always works).")
