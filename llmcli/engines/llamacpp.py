"""The llama.cpp engine: GGUF files on llama.cpp's own kernels, through llama-cpp-python's binding of
the llama.cpp C API. It imports neither torch nor transformers: llama.cpp tokenizes, and the GGUF's
chat template is rendered with jinja2 as transformers renders it.

The C API is used directly (model, context, batch, sampler chain) rather than the `Llama` class, so
that the model loads once while contexts are sized to each job (a generation's prompt plus its new
tokens; an evaluation's window), the sampler chain follows Hugging Face's order, and logits are read
only where they are scored.
"""

from __future__ import annotations

import ctypes
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from llmcli import models
from llmcli.engines import ProgressCallback, TokensCallback, Window, llama_host, process_peak_rss_mb
from llmcli.errors import DataError, ModelLoadError, UsageError

# general.file_type values (llama_ftype) whose weights are full precision: run as they are
FULL_PRECISION = {0: "F32", 1: "F16", 32: "BF16"}
FILE_TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M",
                   13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K",
                   **FULL_PRECISION}
BATCH = 512  # llama.cpp's default physical batch (n_ubatch): llama-perplexity's numbers need the same split
HF_DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, so unset options sample the same distribution

_silent_log = None  # the ctypes callback must outlive every llama.cpp call


def import_llama_cpp() -> Any:
    """llama_cpp with llama.cpp's own logging silenced (unless --debug), once this host is known to run
    the build (llama_host: a child process probes a new host and build first)."""
    global _silent_log
    llama_host.require_runnable(host_check())
    llama_host.report_illegal_instructions()
    from llmcli.engines.llama_import import gentle_openmp

    gentle_openmp()
    try:
        from llmcli.engines.llama_import import bindings

        llama_cpp = bindings()
    except ImportError as exc:
        from llmcli.engines import LLAMA_INSTALL_HINT

        raise UsageError(f"the llama.cpp engine is not installed ({exc})", LLAMA_INSTALL_HINT) from exc
    if _silent_log is None and not os.environ.get("LLMCLI_DEBUG"):
        _silent_log = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
        llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


def log_softmax(row: Any) -> Any:
    """A row of logits as log-probabilities, in float64 (every score the engine reports)."""
    import numpy as np

    row = row.astype(np.float64)
    top = row.max()
    return row - (np.log(np.exp(row - top).sum()) + top)


_host_checks: dict[str, llama_host.HostCheck] = {}


def host_check() -> llama_host.HostCheck:
    """This process's decision, per value of the override (tests change it)."""
    setting = llama_host.setting()
    if setting not in _host_checks:
        _host_checks[setting] = llama_host.check()
    return _host_checks[setting]


def model_params(lib: Any, gpu_layers: int, vocab_only: bool = False, extra_buffers: bool | None = None) -> Any:
    """extra_buffers None: the host's choice. False keeps every CPU weight in the file's memory map (the
    repacking buffer types copy weights out of it), which GRPO's rollouts rewrite in place."""
    params = lib.llama_model_default_params()
    params.n_gpu_layers = gpu_layers
    params.vocab_only = vocab_only
    params.use_extra_bufts = host_check().extra_buffers if extra_buffers is None else extra_buffers
    return params


def load_model_file(lib: Any, path: Path, gpu_layers: int, vocab_only: bool = False,
                    extra_buffers: bool | None = None) -> Any:
    params = model_params(lib, gpu_layers, vocab_only, extra_buffers)
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelLoadError(f"{path} is not a readable GGUF model for llama.cpp",
                             "Check that the file is complete and of an architecture llama.cpp supports "
                             "(or use --engine hf).")
    return model


def meta_value(lib: Any, model: Any, key: str) -> str | None:
    size = 1 << 16
    buffer = ctypes.create_string_buffer(size)
    written = lib.llama_model_meta_val_str(model, key.encode(), buffer, size)
    if written < 0:
        return None
    if written >= size:  # a chat template longer than the buffer
        buffer = ctypes.create_string_buffer(written + 1)
        lib.llama_model_meta_val_str(model, key.encode(), buffer, written + 1)
    return buffer.value.decode("utf-8", errors="replace")


def file_type(lib: Any, path: Path) -> int | None:
    model = load_model_file(lib, path, 0, vocab_only=True)
    try:
        value = meta_value(lib, model, "general.file_type")
        return int(value) if value is not None else None
    finally:
        lib.llama_model_free(model)


CONVERSION_FORMAT = 2  # the F16 file's own version: models.CACHE_FORMAT moved on for the safetensors entry alone


def converted_path(path: Path, name: str) -> Path:
    return models.cache_root() / "gguf" / f"{path.stem}-{models.content_key(path)}-v{CONVERSION_FORMAT}.{name}.gguf"


def convert_to_f16(lib: Any, path: Path, threads: int, on_notice: Callable[[str], None]) -> Path:
    """Requantize a quantized GGUF to F16 once, into the cache (atomic rename; a lock for concurrent runs)."""
    target = converted_path(path, "F16")
    if target.is_file():
        return target
    lock = models.acquire_conversion_lock(target)
    try:
        if target.is_file():  # another process finished it while we waited
            return target
        on_notice(f"Converting {path.name} to F16 for llama.cpp once (a few seconds); --fast runs the file as it is.")
        tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        params = lib.llama_model_quantize_default_params()
        params.ftype = lib.LLAMA_FTYPE_MOSTLY_F16
        params.allow_requantize = True
        params.nthread = threads
        try:
            if lib.llama_model_quantize(str(path).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise ModelLoadError(f"llama.cpp could not convert {path} to F16", "Pass --fast to run it as it is.")
            target.with_suffix(".json").write_text(json.dumps({"source": str(path.resolve())}))  # for cache list
            tmp.rename(target)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        lock.close()
    models.announce_cache_entry(target, f"The F16 copy of {path.name}")
    for stale in target.parent.glob(f"{path.stem}-*.F16.gguf"):  # conversions of an older version of this file
        if stale != target:
            stale.unlink(missing_ok=True)
            stale.with_suffix(".json").unlink(missing_ok=True)
    return target


def free_llama(owner: Any) -> None:
    """Free what an object holds of llama.cpp's (its batch, context and model), whatever it got to
    before an error in its __init__."""
    lib = getattr(owner, "lib", None)
    if lib is None:
        return
    if getattr(owner, "batch", None) is not None:
        lib.llama_batch_free(owner.batch)
    if getattr(owner, "context", None):
        lib.llama_free(owner.context)
    if getattr(owner, "model", None):
        lib.llama_model_free(owner.model)


class EndOfGeneration:
    """The model's end-of-generation tokens (EOS, EOT, <|im_end|>...), as llama.cpp decides them."""

    def __init__(self, lib: Any, vocab: Any) -> None:
        self.lib, self.vocab = lib, vocab

    def __contains__(self, token: object) -> bool:
        return isinstance(token, int) and bool(self.lib.llama_vocab_is_eog(self.vocab, token))


class LlamaCppEngine:
    name = "llama.cpp"
    kind = "causal"
    default_batch_size = 16  # prompts decoded together: 2.7x one at a time; 32 gained nothing (docs/llama-batching.md)

    @classmethod
    def load(cls, source: Any, weights: str, threads: int, gpu: bool | None,
             on_notice: Callable[[str], None]) -> "LlamaCppEngine":
        """weights "default": a quantized file runs as F16 (converted once; see docs/engines.md: the quantized
        kernels multiply by 8-bit activations, which flips near-ties on small models); "as-is": the file.
        gpu: True (--device cuda), False (--device cpu) or None (a GPU build's choice)."""
        lib = import_llama_cpp()
        path = Path(source.location)
        if weights == "default":
            cached = converted_path(path, "F16")
            if cached.is_file():
                path = cached
            elif file_type(lib, path) not in FULL_PRECISION:
                path = convert_to_f16(lib, path, threads, on_notice)
        offload = bool(lib.llama_supports_gpu_offload())
        if gpu and not offload:
            raise UsageError("this llama-cpp-python build has no GPU support",
                             "Use --device cpu, --engine hf, or rebuild it with: make llama-rebuild LLAMA_CMAKE_ARGS=-DGGML_CUDA=on")
        gpu_layers = -1 if offload and gpu is not False else 0  # a GPU build offloads every layer, as ollama does
        return cls(lib, source, path, threads, gpu_layers)

    def __init__(self, lib: Any, source: Any, path: Path, threads: int, gpu_layers: int,
                 extra_buffers: bool | None = None) -> None:
        self.lib, self.source, self.path, self.threads = lib, source, path, threads
        self.model = load_model_file(lib, path, gpu_layers, extra_buffers=extra_buffers)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.context_length = lib.llama_model_n_ctx_train(self.model) or None
        kind = meta_value(lib, self.model, "general.file_type")
        self.weights = FILE_TYPE_NAMES.get(int(kind), f"type {kind}") if kind is not None else "unknown"
        self.chat_template = meta_value(lib, self.model, "tokenizer.chat_template") or None
        self.adds_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        bos, eos = lib.llama_vocab_bos(self.vocab), lib.llama_vocab_eos(self.vocab)
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos if eos >= 0 else None
        self.eos_ids = EndOfGeneration(lib, self.vocab)
        self.draft: LlamaCppEngine | None = None  # the draft model of speculative decoding (attach_draft)
        self.drafts_checked: list[tuple[int, int]] = []  # the last generate's (drafted, accepted) per row
        self.turns: Any = None  # a chat's SequenceSet, kept between turns when it speculates
        self.seed: int | None = None
        self.sequences = 0  # sampled sequences so far: each gets its own seed, so samples differ
        self.context = None
        self.context_size = 0
        self.cached: list[int] = []  # the tokens whose keys and values the context holds, in order
        self.adapters: dict[str, Any] = {}  # LoRA adapters loaded beside the model (add_adapter), by name
        self.adapter: str | None = None  # the one this engine's own generations and scores run with
        self.batch = lib.llama_batch_init(BATCH, 0, 1)
        from llmcli.constraints import Constraints

        self.constraints = Constraints(self.guidance_tokenizer, self.n_vocab)  # structured output

    def __del__(self) -> None:
        if getattr(self, "turns", None) is not None:
            self.turns.close()
        free_llama(self)

    def attach_draft(self, draft: "LlamaCppEngine") -> None:
        """A draft model for speculative decoding: it must tokenize as this model does (llama.cpp's
        common_speculative_are_compatible checks the same)."""
        if draft.n_vocab != self.n_vocab or (draft.bos_id, draft.eos_id) != (self.bos_id, self.eos_id):
            raise UsageError(f"the draft model {draft.path.name} has another vocabulary than {self.path.name} "
                             f"({draft.n_vocab} tokens against {self.n_vocab}, or other BOS/EOS tokens)",
                             "Pass a draft model of the same family (the same tokenizer).")
        different = next((token for token in range(0, self.n_vocab, 7)
                          if draft.token_text(token) != self.token_text(token)), None)
        if different is not None:
            raise UsageError(f"the draft model {draft.path.name} spells token {different} differently "
                             f"({draft.token_text(different)!r} against {self.token_text(different)!r})",
                             "Pass a draft model of the same family (the same tokenizer).")
        self.draft = draft

    # ------------------------------------------------------------ LoRA adapters

    def add_adapter(self, name: str, path: Path) -> None:
        """A LoRA adapter GGUF (`llmcli export --adapter`) loaded beside the model as `name`; llama.cpp
        frees it with the model."""
        handle = self.lib.llama_adapter_lora_init(self.model, str(path).encode())
        if not handle:
            raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {path} on {self.path.name}",
                                 "Pass an adapter finetuned on this base model (its GGUF from llmcli export --adapter).")
        self.adapters[name] = handle

    def use_adapter(self, name: str | None) -> None:
        """The adapter (None: the base model) this engine's generations and scores run with from now on.
        What its contexts hold was computed with the previous one, so it is not reused."""
        if name is not None and name not in self.adapters:
            raise KeyError(name)
        if name != self.adapter:
            self.adapter = name
            self.cached = []
            if self.turns is not None:
                self.turns.close()
                self.turns = None

    def apply_adapter(self, context: Any, name: str | None) -> None:
        """Sets `name`'s adapter (None: none) on a context: llama.cpp applies adapters per context, to every
        llama_decode on it (it changes nothing when they are already set)."""
        lib = self.lib
        if name is None:
            code = lib.llama_set_adapters_lora(context, None, 0, None)
        else:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(self.adapters[name])
            code = lib.llama_set_adapters_lora(context, adapters, 1, (ctypes.c_float * 1)(1.0))  # scale: alpha / rank
        if code != 0:
            raise ModelLoadError(f"llama.cpp could not set the LoRA adapter {name} on a context (code {code})",
                                 "Pass an adapter finetuned on this base model.")

    # ------------------------------------------------------------ tokens and text

    def encode(self, text: str, add_special: bool = True) -> list[int]:
        """llama.cpp's tokenizer; special-token text is parsed, as Hugging Face tokenizers do."""
        data = text.encode("utf-8")
        room = len(data) + 8
        tokens = (self.lib.llama_token * room)()
        count = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, room, add_special, True)
        if count < 0:
            tokens = (self.lib.llama_token * -count)()
            count = self.lib.llama_tokenize(self.vocab, data, len(data), tokens, -count, add_special, True)
        return list(tokens[:count])

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        """Text of the ids with special tokens left out (skip_special_tokens) unless `keep_special`; an
        incomplete UTF-8 character at the end becomes U+FFFD, which the streamer holds back."""
        if not ids:
            return ""
        array = (self.lib.llama_token * len(ids))(*ids)
        room = 16 * len(ids) + 16
        buffer = ctypes.create_string_buffer(room)
        size = self.lib.llama_detokenize(self.vocab, array, len(ids), buffer, room, False, keep_special)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = self.lib.llama_detokenize(self.vocab, array, len(ids), buffer, -size, False, keep_special)
        return buffer.raw[:size].decode("utf-8", errors="replace")

    def token_text(self, token: int | None) -> str:
        if token is None:
            return ""
        return self.lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        from llmcli.engines.chat_template import render, template_variables

        return render(self.chat_template, messages, add_generation_prompt, tools=tools,
                      **template_variables(template_kwargs),
                      bos_token=self.token_text(self.bos_id), eos_token=self.token_text(self.eos_id))

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        return self.encode(self.render_chat(messages, tools=tools, template_kwargs=template_kwargs),
                           add_special=False)

    # ------------------------------------------------------------ running the model

    def use_context(self, tokens: int, keep: int = 0) -> int:
        """A context of at least `tokens` (grown in steps of 256, never shrunk) whose memory holds the
        first `keep` tokens of what it held (0: cleared); returns how many it kept."""
        lib = self.lib
        if self.context is None or tokens > self.context_size:
            keep = 0
            if self.context is not None:
                lib.llama_free(self.context)
                self.context = None
            size = -(-tokens // 256) * 256
            if self.context_length:
                size = min(size, self.context_length)
            params = lib.llama_context_default_params()
            params.n_ctx = size
            params.n_batch = params.n_ubatch = BATCH
            params.n_seq_max = 1
            params.n_threads = params.n_threads_batch = self.threads
            params.no_perf = True
            # flash_attn_type stays AUTO (on, on the CPU), as in llama.cpp's own tools: llama-perplexity's
            # numbers need it. (llama-cpp-python's Llama class turns it off by default.)
            self.context = lib.llama_init_from_model(self.model, params)
            if not self.context:
                raise ModelLoadError(f"llama.cpp could not allocate a context of {size} tokens",
                                     "Use a shorter prompt or fewer new tokens.")
            self.context_size = size
        self.apply_adapter(self.context, self.adapter)
        memory = lib.llama_get_memory(self.context)
        if keep:
            lib.llama_memory_seq_rm(memory, 0, keep, -1)
        else:
            lib.llama_memory_clear(memory, True)
        self.cached = self.cached[:keep]
        return keep

    def feed(self, tokens: Sequence[int], start: int, outputs: int = 1,
             on_batch: Callable[[int, int], None] | None = None) -> None:
        """Decode tokens at positions start..., in batches of BATCH; logits for the last `outputs`.
        llama.cpp keeps only the last batch's logits: `on_batch(begin, size)` may read each batch's
        (`llama_get_logits_ith(context, i - begin)` for token i) before the next one replaces them."""
        lib, batch = self.lib, self.batch
        first_output = len(tokens) - outputs
        for begin in range(0, len(tokens), BATCH):
            chunk = tokens[begin:begin + BATCH]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + begin + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = begin + i >= first_output
            code = lib.llama_decode(self.context, batch)
            if code != 0:
                raise DataError(f"llama.cpp could not decode the input (llama_decode returned {code})",
                                "Use a shorter prompt or fewer new tokens.")
            self.cached.extend(chunk)
            if on_batch:
                on_batch(begin, len(chunk))

    def set_seed(self, seed: int) -> None:
        self.seed, self.sequences = seed, 0

    def sampler(self, options: Any, prompt: list[int], seed: int | None = None) -> Any:
        """A sampler chain in Hugging Face's order: repetition penalty, OpenAI's presence and frequency
        penalties, logit bias, temperature, top-k, top-p, min-p.
        (llama-cpp-python's own chain puts the temperature last, which changes what top-p keeps.)
        Its seed: `seed`, else the engine's (set_seed) plus the sequences sampled since, else random."""
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda sampler: lib.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        repetition = None
        if options.repetition_penalty is not None and options.repetition_penalty != 1:
            # over the sequence's whole history, prompt included, as transformers applies it
            history = len(prompt) + options.max_new_tokens
            repetition = lib.llama_sampler_init_penalties(self.n_vocab, history, options.repetition_penalty, 0.0, 0.0)
            add(repetition)
        presence, frequency = getattr(options, "presence_penalty", 0.0), getattr(options, "frequency_penalty", 0.0)
        if presence or frequency:
            # llama.cpp's penalties are OpenAI's (logit -= count * frequency + (count > 0) * presence); this
            # one never sees the prompt (below), so it counts the generated tokens only, as OpenAI does
            add(lib.llama_sampler_init_penalties(self.n_vocab, options.max_new_tokens, 1.0, frequency, presence))
        biases = getattr(options, "logit_bias", {})
        if biases:
            entries = (lib.llama_logit_bias * len(biases))(*(lib.llama_logit_bias(token, bias)
                                                            for token, bias in biases.items()))
            add(lib.llama_sampler_init_logit_bias(self.n_vocab, len(biases), entries))
        if options.temperature == 0:
            add(lib.llama_sampler_init_greedy())
        else:
            add(lib.llama_sampler_init_temp(options.temperature))
            top_k = HF_DEFAULT_TOP_K if options.top_k is None else options.top_k
            if top_k > 0:
                add(lib.llama_sampler_init_top_k(top_k))
            if options.top_p is not None and options.top_p < 1:
                add(lib.llama_sampler_init_top_p(options.top_p, 1))
            if options.min_p:
                add(lib.llama_sampler_init_min_p(options.min_p, 1))
            if seed is None:
                seed = lib.LLAMA_DEFAULT_SEED if self.seed is None else (self.seed + self.sequences) % 2**32
                self.sequences += 1
            add(lib.llama_sampler_init_dist(seed))
        if repetition is not None:
            for token in prompt:  # the repetition penalty's history starts with the prompt (the others' does not)
                lib.llama_sampler_accept(repetition, token)
        return chain

    def matcher(self, options: Any) -> Any:
        """A fresh matcher for one sequence (its constraint, a thinking model's budget), or None."""
        from llmcli.reasoning import sequence_matcher

        return sequence_matcher(self, options)

    def guidance_tokenizer(self) -> Any:
        """llguidance's tokenizer of this vocabulary."""
        import warnings

        from llguidance.llamacpp import lltokenizer_from_vocab

        with warnings.catch_warnings():  # llguidance 1.9 reads each token through a deprecated binding
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(self.vocab)

    def logits_row(self, context: Any, index: int) -> Any:
        """The logits llama.cpp will sample from at batch output `index` (-1: the last), writable in place."""
        import numpy

        return numpy.ctypeslib.as_array(self.lib.llama_get_logits_ith(context, index), shape=(self.n_vocab,))

    def generate(self, batch: list[list[int]], options: Any, on_tokens: TokensCallback,
                 should_stop: Callable[[], bool], adapters: Sequence[str | None] | None = None) -> list[list[int]]:
        """Every prompt and sample of the batch decoded together (one llama_decode per step), or, for one
        sequence or a chat's next turn (whose cached prefix lives in the engine's own context), alone.
        `adapters`: per prompt, an adapter (add_adapter's name) to run it with, None for the engine's own."""
        from llmcli.engines.llama_sequences import MAX_SEQUENCES

        if adapters and any(name is not None and name != self.adapter for name in adapters):
            return self.generate_per_adapter(batch, options, on_tokens, should_stop, adapters)

        samples = options.num_return_sequences
        self.drafts_checked = []
        speculating = self.speculation(options) != "off"
        if speculating and getattr(options, "reuse_prefix", False) and len(batch) * samples == 1:
            return [self.decode_next_turn(batch[0], options, on_tokens, should_stop)]
        alone = len(batch) * samples == 1 and not speculating  # speculation runs in a SequenceSet
        if alone or getattr(options, "reuse_prefix", False) or samples > MAX_SEQUENCES:
            return [self.decode_one(prompt, options, on_tokens, should_stop) for prompt in batch for _ in range(samples)]
        rows: list[list[int]] = []
        per_set = MAX_SEQUENCES // samples
        for begin in range(0, len(batch), per_set):
            rows.extend(self.decode_together(batch[begin:begin + per_set], options, on_tokens, should_stop))
        return rows

    def generate_per_adapter(self, batch: list[list[int]], options: Any, on_tokens: TokensCallback,
                             should_stop: Callable[[], bool], adapters: Sequence[str | None]) -> list[list[int]]:
        """The prompts of each adapter as one generate with that adapter (llama.cpp applies adapters to a
        whole context), rows back in the batch's order."""
        samples, own = options.num_return_sequences, self.adapter
        rows: list[list[list[int]]] = [[] for _ in batch]
        checked: list[list[tuple[int | None, int | None]]] = [[] for _ in batch]
        wanted = [name or own for name in adapters]
        try:
            for name in dict.fromkeys(wanted):
                members = [i for i, chosen in enumerate(wanted) if chosen == name]
                self.use_adapter(name)
                out = self.generate([batch[i] for i in members], options, on_tokens, should_stop)
                drafts = self.drafts_checked or [(None, None)] * len(out)
                for k, i in enumerate(members):
                    rows[i], checked[i] = out[k * samples:(k + 1) * samples], drafts[k * samples:(k + 1) * samples]
        finally:
            self.use_adapter(own)
        self.drafts_checked = [pair for prompt_pairs in checked for pair in prompt_pairs]
        return [row for prompt_rows in rows for row in prompt_rows]

    def decode_together(self, batch: list[list[int]], options: Any, on_tokens: TokensCallback,
                        should_stop: Callable[[], bool]) -> list[list[int]]:
        """Rows in order (each prompt's samples together); the samples of a prompt share its prefill.
        Sampler chains are made in row order, so each row gets the seed it gets alone."""
        from llmcli.engines.llama_sequences import SequenceSet

        samples = options.num_return_sequences
        cells = sum(len(prompt) for prompt in batch) + len(batch) * samples * options.max_new_tokens
        sequences = SequenceSet(self, cells, len(batch) * samples, BATCH)
        try:
            order = []
            for prompt in batch:
                leader = None
                for _ in range(samples):
                    live = sequences.add(prompt, self.sampler(options, prompt), options.max_new_tokens, leader,
                                         matcher=self.matcher(options), speculative=self.speculation(options),
                                         draft_max=options.prompt_lookup or options.draft_max)
                    leader = leader or live
                    order.append(live)
            stops = [stop for stop in getattr(options, "stop", None) or [] if stop]
            while sequences.live:
                sampled = sequences.step(self.eos_ids)
                if sampled:
                    on_tokens([token for _, tokens in sampled for token in tokens])
                for live, _ in sampled if stops else []:  # a row whose text has a stop string ends there
                    if not live.done and any(stop in self.decode(live.new) for stop in stops):
                        sequences.cancel(live)
                if should_stop():
                    break
            self.drafts_checked += [(live.speculation.drafted, live.speculation.accepted) if live.speculation
                                    else (None, None) for live in order]
            return [live.new for live in order]
        finally:
            sequences.close()

    def decode_next_turn(self, prompt: list[int], options: Any, on_tokens: TokensCallback,
                         should_stop: Callable[[], bool]) -> list[int]:
        """A chat's next turn, speculating: in a one-sequence set that the engine keeps between turns, whose
        idle entry (the conversation so far) gives the turn its cached prefix, as decode_one's context does."""
        from llmcli.engines.llama_sequences import SequenceSet

        cells = len(prompt) + options.max_new_tokens
        if self.turns is None or self.turns.n_ctx < cells:
            if self.turns is not None:
                self.turns.close()
            size = max(2 * cells, 2048)
            self.turns = SequenceSet(self, min(size, self.context_length or size), 1, BATCH, keep_idle=1)
        live = self.turns.add(prompt, self.sampler(options, prompt), options.max_new_tokens, reuse_prefix=True,
                              matcher=self.matcher(options), speculative=self.speculation(options),
                              draft_max=options.prompt_lookup or options.draft_max)
        try:
            while not live.done:
                for _, tokens in self.turns.step(self.eos_ids):
                    on_tokens(tokens)
                if should_stop():
                    break
        finally:
            self.turns.cancel(live)  # its cells stay, as the idle entry the next turn reuses
        self.drafts_checked = [(live.speculation.drafted, live.speculation.accepted) if live.speculation
                               else (None, None)]
        return live.new

    def speculation(self, options: Any) -> str:
        """The options' speculation on this engine: "off", "auto" or "on" (--prompt-lookup N is "on")."""
        mode = getattr(options, "speculative", "off")
        if getattr(options, "prompt_lookup", None):
            return "on"
        return mode

    def decode_one(self, prompt: list[int], options: Any, on_tokens: TokensCallback,
                   should_stop: Callable[[], bool]) -> list[int]:
        """With options.reuse_prefix (a chat's next turn), the part of the prompt the context already
        holds is not decoded again, as llama-cli and ollama do; otherwise every prompt starts afresh,
        so that its tokens do not depend on what ran before."""
        lib = self.lib
        shared = 0
        if getattr(options, "reuse_prefix", False):
            while shared < min(len(self.cached), len(prompt) - 1) and self.cached[shared] == prompt[shared]:
                shared += 1
        shared = self.use_context(len(prompt) + options.max_new_tokens, keep=shared)
        chain = self.sampler(options, prompt)
        matcher = self.matcher(options)
        try:
            self.feed(prompt[shared:], shared)
            new: list[int] = []
            while True:
                if matcher:
                    matcher.mask(self.logits_row(self.context, -1))
                token = lib.llama_sampler_sample(chain, self.context, -1)
                new.append(token)
                on_tokens([token])
                if matcher:
                    end = matcher.accept(token, self.eos_ids, self.eos_id, options.max_new_tokens - len(new))
                    if end is not None:
                        new.append(end)
                        return new
                if token in self.eos_ids or len(new) >= options.max_new_tokens or should_stop():
                    return new
                self.feed([token], len(prompt) + len(new) - 1)
        finally:
            lib.llama_sampler_free(chain)

    def token_nlls(self, windows: list[Window], batch_size: int,
                   on_progress: ProgressCallback | None = None) -> list[float]:
        """One window at a time; logits are read only at scored positions, so memory is one context
        of the window's size, whatever the text's length."""
        nlls: list[float] = []
        for window in windows:
            values, _ = self.token_logprobs(window, 0)
            nlls.extend(-value for value in values)
            if on_progress:
                on_progress(1)
        return nlls

    def continuation_scores(self, sequences: list[list[int]], starts: list[int],
                            batch_size: int) -> list[tuple[float, bool]]:
        """For each sequence, the summed log-probability of its tokens from `start` on and whether each was
        the likeliest. Tokens that sequences share (a question's context, before each of its answers) are
        decoded once, and many questions are decoded together (llama_scoring.AnswerScorer)."""
        from llmcli.engines.llama_scoring import AnswerScorer

        return AnswerScorer(self).score_answers([(sequence[:start], sequence[start:])
                                                 for sequence, start in zip(sequences, starts)])

    def token_logprobs(self, window: Window, top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Log-softmax in float64 of the logits at each scored position, read batch by batch: llama.cpp
        keeps only the last decode batch's logits."""
        import numpy as np

        inputs = window.ids[:-1]
        first = len(inputs) - window.scored  # the input whose logits predict the first scored token
        chosen: list[float] = []
        tops: list[list[tuple[int, float]]] = []

        def score_batch(begin: int, size: int) -> None:
            for i in range(max(first, begin), begin + size):
                logprobs = log_softmax(self.logits_row(self.context, i - begin))
                chosen.append(float(logprobs[window.ids[i + 1]]))
                if top:
                    best = np.argpartition(-logprobs, top - 1)[:top]
                    best = best[np.argsort(-logprobs[best])]
                    tops.append([(int(t), float(logprobs[t])) for t in best])
                else:
                    tops.append([])

        self.use_context(len(inputs))
        self.feed(inputs, 0, outputs=window.scored, on_batch=score_batch)
        return chosen, tops

    def peak_memory_mb(self) -> float:
        return process_peak_rss_mb()

