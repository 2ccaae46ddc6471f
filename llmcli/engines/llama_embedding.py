"""Sentence embeddings on the llama.cpp engine, for a cold `embed` without torch or transformers.

A BERT sentence-transformers model (the embedded all-MiniLM-L6-v2 among them) is written once into the
cache as an F32 GGUF of llama.cpp's `bert` architecture (read with safetensors' NumPy loader, names
from the `gguf` package's tensor map, the vocabulary as llama.cpp's converter writes it). llama.cpp
returns each token's last hidden state; pooling, Normalize, truncation and the rest are the same
steps as on the hf engine. Token ids come from the model's own tokenizer.json through the
`tokenizers` library (what transformers' fast tokenizer runs), so they are sentence-transformers' ids;
only the encoder's arithmetic is llama.cpp's. Its GELU is the tanh approximation through a
half-precision table where BERT's is erf, so vectors differ from sentence-transformers' by up to a few
1e-4 (measured, docs/embed.md); `--engine hf` is the exact path.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import ModelLoadError
from llmcli.sentence_models import SentenceModel

SEQUENCES = 64  # sequences encoded together (llama.cpp's n_seq_max)
TOKENS = 4096  # tokens encoded together: every sequence of a call, whole (a non-causal model needs that)
CONVERSION = 1  # bump when the written file changes, so older cache entries are not read


def unsupported(recipe: Any) -> str | None:
    """Why this model cannot run on llama.cpp here, or None when it can."""
    location = recipe.location
    if recipe.adapter is not None:
        return "it is a LoRA adapter"
    config = json.loads((location / "config.json").read_text())
    if config.get("model_type") != "bert":
        return f"its architecture is {config.get('model_type')!r}, and the llama.cpp path runs BERT models"
    if config.get("position_embedding_type", "absolute") != "absolute":
        return "it uses relative position embeddings"
    if config.get("hidden_act", "gelu") != "gelu":
        return f"its activation is {config.get('hidden_act')!r}"
    for needed in ("model.safetensors", "tokenizer.json"):
        if not (location / needed).is_file():
            return f"it has no {needed}"
    if recipe.dense:
        return "it has Dense modules"
    return None


def bert_gguf(location: Path) -> Path:
    """The model as an F32 GGUF in the cache, written once (under a temporary name, then renamed)."""
    from llmcli import models

    weights = location / "model.safetensors"
    target = models.cache_root() / "embedding" / f"{location.name}-{models.content_key(weights)}-v{CONVERSION}.gguf"
    if target.is_file():
        return target
    lock = models.acquire_conversion_lock(target)
    try:
        if target.is_file():
            return target
        partial = target.with_name(f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            write_bert_gguf(location, partial)
            target.with_suffix(".json").write_text(json.dumps({"source": str(location)}))  # for cache list
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    finally:
        lock.close()
    models.announce_cache_entry(target, f"llama.cpp's copy of {location.name}")
    return target


def write_bert_gguf(location: Path, path: Path) -> None:
    """The keys and tensors llama.cpp's `bert` loader reads, as convert_hf_to_gguf.py's BertModel
    writes them; pooling is left to llmcli (per-token outputs)."""
    import gguf
    import numpy
    from safetensors.numpy import load_file

    config = json.loads((location / "config.json").read_text())
    arch = gguf.MODEL_ARCH.BERT
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(location.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.NONE)
    writer.add_token_type_count(config.get("type_vocab_size", 2))
    write_wordpiece_vocab(writer, location, config["vocab_size"])
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    for hf_name, tensor in load_file(str(location / "model.safetensors")).items():
        if hf_name.endswith("position_ids") or hf_name.removeprefix("bert.").startswith(("pooler.", "cls.")):
            continue  # a buffer, and the heads (pooler, masked LM) that sentence-transformers does not use
        name = names.get_name(hf_name.removeprefix("bert."), try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelLoadError(f"{location}: the tensor {hf_name} has no place in a llama.cpp BERT file",
                                 "Use --engine hf.")
        writer.add_tensor(name, tensor.astype(numpy.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_wordpiece_vocab(writer: Any, location: Path, n_vocab: int) -> None:
    """llama.cpp's WordPiece form: a word-initial piece gets a leading '▁', a '##' piece loses it.
    (llmcli tokenizes with tokenizer.json itself; llama.cpp needs the vocabulary to load.)"""
    import gguf

    tokenizer = json.loads((location / "tokenizer.json").read_text())
    by_id = {index: token for token, index in tokenizer["model"]["vocab"].items()}
    special = {added["content"] for added in tokenizer.get("added_tokens", []) if added.get("special")}

    def phantom(token: str) -> str:
        if token in special or (token.startswith("[") and token.endswith("]")):
            return token
        return token[2:] if token.startswith("##") else "\u2581" + token

    tokens = [phantom(by_id.get(index, f"[PAD{index}]")) for index in range(n_vocab)]
    types = [gguf.TokenType.CONTROL if by_id.get(index) in special else
             gguf.TokenType.UNUSED if index not in by_id else gguf.TokenType.NORMAL for index in range(n_vocab)]
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)


class LlamaEncoder:
    """A BERT GGUF on llama.cpp: token ids in, each token's last hidden state out."""

    def __init__(self, path: Path, threads: int) -> None:
        from llmcli.engines.llamacpp import import_llama_cpp, load_model_file

        self.lib = lib = import_llama_cpp()
        self.model = load_model_file(lib, path, 0)
        self.width = lib.llama_model_n_embd(self.model)
        self.context_length = lib.llama_model_n_ctx_train(self.model)
        params = lib.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = TOKENS
        params.n_seq_max = SEQUENCES
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE
        params.no_perf = True
        self.context = lib.llama_init_from_model(self.model, params)
        if not self.context:
            raise ModelLoadError(f"llama.cpp could not make an embedding context for {path}", "Use --engine hf.")
        self.batch = lib.llama_batch_init(TOKENS, 0, 1)

    def __del__(self) -> None:
        from llmcli.engines.llamacpp import free_llama

        free_llama(self)

    def hidden_states(self, sequences: list[list[int]]) -> list[Any]:
        """Each sequence's (tokens, width) float32 array; sequences are packed into as few encodes as
        fit (each sequence attends only to itself)."""
        out: list[Any] = []
        group: list[list[int]] = []
        for ids in sequences:
            if group and (len(group) == SEQUENCES or sum(map(len, group)) + len(ids) > TOKENS):
                out.extend(self.encode_group(group))
                group = []
            group.append(ids)
        if group:
            out.extend(self.encode_group(group))
        return out

    def encode_group(self, group: list[list[int]]) -> list[Any]:
        import numpy

        lib, batch = self.lib, self.batch
        batch.n_tokens = 0
        for sequence, ids in enumerate(group):
            for position, token in enumerate(ids):
                i = batch.n_tokens
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
                batch.seq_id[i][0], batch.logits[i] = sequence, True
                batch.n_tokens += 1
        code = lib.llama_encode(self.context, batch)
        if code != 0:
            raise ModelLoadError(f"llama.cpp could not encode the inputs (llama_encode returned {code})",
                                 "Use --engine hf.")
        rows = numpy.ctypeslib.as_array(lib.llama_get_embeddings(self.context), shape=(batch.n_tokens, self.width))
        rows = rows.copy()  # the context's buffer is reused by the next encode
        starts = numpy.cumsum([0] + [len(ids) for ids in group])
        return [rows[begin:end] for begin, end in zip(starts[:-1], starts[1:])]


def pool_rows(rows: Any, modes: tuple[str, ...]) -> Any:
    """sentence-transformers' Pooling over one unpadded sequence's rows (every token counts)."""
    import numpy

    outputs = []
    for mode in modes:
        if mode == "cls":
            outputs.append(rows[0])
        elif mode == "max":
            outputs.append(rows.max(axis=0))
        elif mode == "mean":
            outputs.append(rows.mean(axis=0))
        elif mode == "mean_sqrt_len_tokens":
            outputs.append(rows.sum(axis=0) / numpy.sqrt(numpy.float32(len(rows))))
        elif mode == "weightedmean":
            weights = numpy.arange(1, len(rows) + 1, dtype=numpy.float32)[:, None]
            outputs.append((rows * weights).sum(axis=0) / weights.sum())
        elif mode == "lasttoken":
            outputs.append(rows[-1])
    return numpy.concatenate(outputs)


@dataclass
class LlamaSentenceModel(SentenceModel):
    """A SentenceModel whose encoder is a LlamaEncoder and whose tokenizer is tokenizers' own."""

    engine: str = "llama.cpp"

    @property
    def dimension(self) -> int:
        return self.encoder.width * len(self.pooling)

    @property
    def positions(self) -> int:
        return self.encoder.context_length

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_ids(self, texts: list[str], limit: int | None) -> list[list[int]]:
        if self.lower_case:
            texts = [text.lower() for text in texts]
        if limit is None:
            self.tokenizer.no_truncation()
        else:
            self.tokenizer.enable_truncation(limit)
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts)]

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.token_ids(texts, None)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def encode_batch(self, texts: list[str]) -> tuple[Any, list[int]]:
        import numpy

        sequences = self.token_ids(texts, self.max_length)
        vectors = numpy.stack([pool_rows(rows, self.pooling) for rows in self.encoder.hidden_states(sequences)])
        if self.normalized:
            vectors = vectors / numpy.maximum(numpy.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(numpy.float32), [len(ids) for ids in sequences]


def load(recipe: Any, threads: int | None) -> LlamaSentenceModel:
    from tokenizers import Tokenizer

    from llmcli.engines import physical_cores

    location = recipe.location
    encoder = LlamaEncoder(bert_gguf(location), threads or physical_cores())
    tokenizer = Tokenizer.from_file(str(location / "tokenizer.json"))
    tokenizer.no_padding()  # tokenizer.json may pad every input to a fixed length (all-MiniLM's pads to 128)
    settings = location / "tokenizer_config.json"
    limit = json.loads(settings.read_text()).get("model_max_length") if settings.is_file() else None
    positions = encoder.context_length
    # as sentence-transformers' Transformer: max_seq_length, else the tokenizer's limit capped by the positions
    max_length = recipe.max_seq_length or min(int(limit or positions), positions)
    return LlamaSentenceModel(encoder, tokenizer, recipe.name, pooling=recipe.pooling, normalized=recipe.normalized,
                              max_length=max_length, lower_case=recipe.lower_case, prompts=recipe.prompts,
                              default_prompt=recipe.default_prompt, notices=recipe.notices)
