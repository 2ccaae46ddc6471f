"""Cross-encoders for `rerank`: a sentence-transformers CrossEncoder directory or a transformers
sequence-classification model with one label, run as sentence-transformers' `CrossEncoder.predict`
runs it (read from its own files, not imported: sentence-transformers takes 12-15 s to import here,
see sentence_models.py; every score is tested equal to `predict`'s):

- the model's default prompt (config_sentence_transformers.json) put before the query, as `predict`
  puts it before a pair's first text;
- each (query, document) pair tokenized together, padded per batch, truncated "longest_first" to the
  model's limit: `max_seq_length` in sentence_bert_config.json, else the tokenizer's `model_max_length`
  capped by the model's position embeddings, as its Transformer module sets it;
- the classifier's one logit per pair, then the activation sentence-transformers 6.2 picks: the one
  saved in config_sentence_transformers.json (`activation_fn`), else in config.json
  (`sentence_transformers.activation_fn`, or the pre-4.0 `sbert_ce_default_activation_function`), else
  Sigmoid. A saved activation outside torch is skipped (sentence-transformers warns and does the same
  without trust_remote_code).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.errors import ModelLoadError, UsageError
from llmcli.sentence_models import read_json

DEFAULT_ACTIVATION = "torch.nn.modules.activation.Sigmoid"  # CrossEncoder's default for one label


@dataclass
class CrossEncoderRecipe:
    """What a model directory says about scoring, read without torch (so `serve` checks it at startup)."""

    location: Path
    name: str
    activation: str = DEFAULT_ACTIVATION  # a dotted torch path
    max_seq_length: int | None = None
    lower_case: bool = False
    prompt: str = ""  # the model's default prompt, put before each query (as predict does with no prompt given)
    notices: list[str] = field(default_factory=list)


@dataclass
class CrossEncoderModel:
    model: Any  # a transformers *ForSequenceClassification
    tokenizer: Any
    name: str
    activation: Any  # a torch.nn module, applied to the logits
    max_length: int | None
    lower_case: bool = False
    prompt: str = ""
    notices: list[str] = field(default_factory=list)
    engine: str = "hf"

    @property
    def activation_name(self) -> str:
        return type(self.activation).__name__

    def pairs(self, query: str, documents: list[str]) -> tuple[list[str], list[str]]:
        """The texts the model reads: the prompt before the query (sentence-transformers puts it before a
        pair's first text), lower-cased if the model says so."""
        query = self.prompt + query
        if self.lower_case:
            query, documents = query.lower(), [document.lower() for document in documents]
        return [query] * len(documents), documents

    def tokenize(self, query: str, documents: list[str]) -> dict[str, list[list[int]]]:
        """Each (query, document) pair's ids, unpadded, cut to the limit as sentence-transformers cuts them."""
        return self.tokenizer(*self.pairs(query, documents), truncation="longest_first", max_length=self.max_length)

    def full_lengths(self, query: str, documents: list[str]) -> list[int]:
        """Each pair's token count before truncation (to count the cut ones)."""
        return [len(ids) for ids in self.tokenizer(*self.pairs(query, documents))["input_ids"]]

    def score_batch(self, features: dict[str, list[list[int]]]) -> Any:
        """One batch of tokenized pairs (rows of `tokenize`'s output): a float32 NumPy score per pair."""
        import torch

        padded = self.tokenizer.pad(features, padding=True, return_tensors="pt")
        padded = {key: value.to(self.model.device) for key, value in padded.items()}
        with torch.inference_mode():
            logits = self.model(**padded).logits
            if torch.finfo(logits.dtype).bits < 32:  # as predict: half-precision logits upcast before the activation
                logits = logits.float()
            scores = self.activation(logits).squeeze(-1)
        return scores.float().cpu().numpy()


def import_torch_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ModelLoadError(f"the saved activation {path} is not in this torch ({exc})",
                             "Save the model with a torch.nn activation.") from exc


def saved_activation(location: Path, config: dict[str, Any]) -> str | None:
    """The activation sentence-transformers would read from the model's files, in its order."""
    extra = location / "config_sentence_transformers.json"
    if extra.is_file() and read_json(extra).get("activation_fn"):
        return read_json(extra)["activation_fn"]
    return (config.get("sentence_transformers") or {}).get("activation_fn") or \
        config.get("sbert_ce_default_activation_function")


def label_count(config: dict[str, Any]) -> int:
    """num_labels as transformers' PretrainedConfig reads it: id2label's size, else 2."""
    return len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))


def read_cross_encoder_recipe(model: str) -> CrossEncoderRecipe:
    """The model's location and scoring settings; anything rerank cannot run exactly is an error here."""
    from llmcli.models import local_model_dir, resolve_model

    source = resolve_model(model)
    if source.kind == "gguf":
        raise UsageError(f"{model} is a GGUF file; rerank runs cross-encoders on the hf engine",
                         "Pass a sentence-transformers CrossEncoder directory or a sequence-classification model.")
    if source.kind == "adapter":
        raise UsageError(f"{model} is a LoRA adapter; rerank runs whole cross-encoder models",
                         "Pass a cross-encoder model directory.")
    location = Path(local_model_dir(source))
    config = read_json(location / "config.json")
    architectures = config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        kind = ", ".join(architectures) or "no architectures entry"
        raise ModelLoadError(f"{source.name} is not a sequence-classification model ({kind}), so it has no "
                             "relevance head", "Pass a cross-encoder (e.g. a sentence-transformers CrossEncoder "
                             "directory); for embedding models use llmcli similar.")
    labels = label_count(config)
    if labels != 1:
        raise ModelLoadError(f"{source.name} has {labels} labels; rerank needs one relevance score per pair",
                             "Pass a cross-encoder with one label, as CrossEncoder.rank needs.")
    modules = location / "modules.json"
    for module in read_json(modules) if modules.is_file() else []:
        if not module.get("type", "").endswith("Transformer"):
            raise ModelLoadError(f"{source.name}: the module {module.get('type')} is not supported (a Transformer "
                                 "alone is)", "Use sentence-transformers itself for this model.")
    recipe = CrossEncoderRecipe(location, source.name)
    extra = location / "config_sentence_transformers.json"
    extras = read_json(extra) if extra.is_file() else {}
    recipe.prompt = (extras.get("prompts") or {}).get(extras.get("default_prompt_name") or "", "")
    saved = saved_activation(location, config)
    if saved and saved.startswith("torch."):
        recipe.activation = saved
    elif saved:
        recipe.notices.append(f"{source.name} names the activation {saved}, which is not torch's: Sigmoid instead, "
                              "as sentence-transformers does without trust_remote_code")
    settings = location / "sentence_bert_config.json"
    settings_config = read_json(settings) if settings.is_file() else {}
    recipe.max_seq_length = settings_config.get("max_seq_length")
    recipe.lower_case = bool(settings_config.get("do_lower_case", False))
    return recipe


def load_cross_encoder(model: str, device: str | None = None, trust_remote_code: bool = False,
                       threads: int | None = None) -> CrossEncoderModel:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from llmcli.models import check_no_missing_weights, quiet_libraries

    recipe = read_cross_encoder_recipe(model)
    quiet_libraries()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        classifier, report = AutoModelForSequenceClassification.from_pretrained(
            recipe.location, trust_remote_code=trust_remote_code, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(recipe.location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{recipe.name} cannot be loaded as a cross-encoder ({exc})",
                             "Pass a sequence-classification model directory.") from exc
    check_no_missing_weights(report, recipe.name)  # a missing head would score at random
    classifier = classifier.to(torch.device(device or "cpu")).eval()
    positions = getattr(classifier.config, "max_position_embeddings", None)
    limit = recipe.max_seq_length or tokenizer.model_max_length
    if recipe.max_seq_length is None and positions not in (None, -1):  # as its Transformer caps it
        limit = min(limit, positions)
    return CrossEncoderModel(classifier, tokenizer, recipe.name, import_torch_class(recipe.activation)(),
                             max_length=limit, lower_case=recipe.lower_case, prompt=recipe.prompt,
                             notices=recipe.notices)
