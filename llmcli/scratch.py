"""Models trained from scratch: a named architecture with config overrides, and a tokenizer trained
on the training data (the "custom transformer: n layers, heads, d_model, d_ff, dropout" use case)."""

from __future__ import annotations

from typing import Any, Iterator

from llmcli.errors import UsageError

ARCHITECTURES = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "bert": "BertConfig"}


def parse_overrides(text: str) -> dict[str, Any]:
    """`n_layer=2,n_embd=128,resid_pdrop=0.1,tie_word_embeddings=false` -> typed values."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise UsageError(f"bad --config-overrides item {item!r}", "Write key=value pairs: n_layer=2,n_embd=128.")
        overrides[key.strip()] = typed_value(raw.strip())
    return overrides


def typed_value(raw: str) -> Any:
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def apply_overrides(config: Any, overrides: dict[str, Any]) -> None:
    for key, value in overrides.items():
        if not hasattr(config, key):
            known = sorted(k for k in config.to_dict() if not k.startswith("_"))[:40]
            raise UsageError(f"--config-overrides: {type(config).__name__} has no setting {key!r}",
                             f"Known settings include: {', '.join(known)}.")
        try:
            setattr(config, key, value)
        except invalid_config_errors() as exc:  # transformers 5 configs are strict dataclasses: checked here
            raise UsageError(f"--config-overrides: {key}={value!r} is not valid for {type(config).__name__}"
                             f"{needed_type(config, key)}", "Give that setting a value of its type.") from exc


def invalid_config_errors() -> tuple[type[Exception], ...]:
    """What a config raises for a bad value: huggingface_hub's strict-dataclass errors (transformers 5),
    or the TypeError/ValueError of older configs."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return (TypeError, ValueError)
    return (StrictDataclassError, TypeError, ValueError)


def needed_type(config: Any, key: str) -> str:
    """': it needs int' from the config's dataclass field, or nothing where the config declares none."""
    import dataclasses

    if not dataclasses.is_dataclass(config):
        return ""
    field = next((f for f in dataclasses.fields(config) if f.name == key), None)
    if field is None:
        return ""
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return f": it needs {kind}"


def training_texts(dataset: Any, data_format: str) -> Iterator[str]:
    for row in dataset:
        if data_format == "text":
            yield row["text"]
        elif data_format == "prompt-completion":
            yield row["prompt"] + row["completion"]
        else:
            yield "\n".join(m["content"] for m in row["messages"])


def train_tokenizer(texts: Iterator[str], vocab_size: int, arch: str) -> Any:
    """WordPiece for BERT, byte-level BPE (no unknown tokens) for GPT-2 and Llama."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if arch == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        tokenizer.train_from_iterator(texts, trainer)
        cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def build_from_scratch(arch: str | None, base_config: Any, base_tokenizer: Any, overrides: str,
                       vocab_size: int | None, dataset: Any, data_format: str) -> tuple[Any, Any, str]:
    """A randomly initialised model, its tokenizer and its kind ("causal" or "masked")."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    settings = parse_overrides(overrides)
    if base_config is None:
        if arch not in ARCHITECTURES:
            raise UsageError(f"unknown --arch {arch!r}", f"Use one of {', '.join(ARCHITECTURES)}, or --model.")
        config_class = getattr(transformers, ARCHITECTURES[arch])
        apply_overrides(config_class(), settings)  # checks the names
        # built with the overrides, so that settings derived from them follow (Llama's
        # num_key_value_heads and head_dim from num_attention_heads and hidden_size)
        try:
            config = config_class(**settings)
        except invalid_config_errors() as exc:  # values valid alone, not together (heads not dividing the width)
            raise UsageError(f"--config-overrides: these settings do not make a valid {config_class.__name__}: "
                             f"{' '.join(str(exc).split())}", "Check --config-overrides.") from exc
    else:
        config = base_config
        apply_overrides(config, settings)
    arch_name = arch or ("bert" if config.model_type in ("bert", "roberta", "distilbert") else config.model_type)
    if vocab_size is not None:
        if vocab_size < 300:  # byte-level BPE starts from 256 byte tokens
            raise UsageError(f"--tokenizer-vocab-size must be at least 300, got {vocab_size}")
        tokenizer = train_tokenizer(training_texts(dataset, data_format), vocab_size, arch_name)
    elif base_tokenizer is not None:
        tokenizer = base_tokenizer
    else:
        raise UsageError("--from-scratch needs a tokenizer", "Add --tokenizer-vocab-size N, or --model to take its.")
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name)
        if token_id is not None:
            setattr(config, name, token_id)
    masked = arch_name == "bert" or config.model_type in ("bert", "roberta", "distilbert")
    model_class = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    try:
        model = model_class.from_config(config)
    except (ValueError, TypeError, RuntimeError, AssertionError) as exc:
        raise UsageError(f"cannot build the model from this config: {exc}", "Check --config-overrides.") from exc
    return model, tokenizer, "masked" if masked else "causal"
