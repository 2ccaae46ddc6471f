"""Engines: one small interface over Hugging Face transformers and llama.cpp, and the one place where
the engine, weight format, dtype, device and threads are decided (`choose_engine`).

Tasks talk to an `Engine`, never to transformers' generate or llama_cpp directly. Nothing heavy is
imported here: the llama.cpp path must never import torch or transformers.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Container, Iterator, Protocol, Sequence

from llmcli.errors import UsageError

ENGINE_NAMES = ("auto", "hf", "llama.cpp")
LLAMA_INSTALL_HINT = ("Install the llama.cpp engine with: pip install 'llmcli[llama]' (or make install; "
                      "its first install compiles llama.cpp, about 10 minutes).")

TokensCallback = Callable[[list[int]], None]  # new token ids of one decoding step
ProgressCallback = Callable[[int], None]  # windows just scored


@dataclass
class Window:
    """One forward pass: the window's tokens, of which the last `scored` are predicted and scored.

    The forward pass reads ids[:-1]: the last token is only ever a target, and leaving it out gives
    the same logits for a causal model and keeps an lm-eval window within the context."""

    ids: list[int]
    scored: int


class Engine(Protocol):
    """What tasks need of a loaded causal model, whatever runs it."""

    name: str  # "hf" | "llama.cpp"
    weights: str  # what runs: "float32", "bfloat16", ... (hf) or "Q4_1", "F16", ... (llama.cpp)
    source: Any  # models.ModelSource
    kind: str  # "causal" | "masked"
    context_length: int | None  # the model's trained context, in tokens
    chat_template: str | None
    eos_ids: Container[int]  # end-of-generation token ids (membership is all tasks ask)
    eos_id: int | None  # the tokenizer's own EOS
    bos_id: int | None
    adds_bos: bool  # whether encode() puts a BOS token first
    default_batch_size: int  # generate's prompts per engine.generate call when --batch-size is not given
    constraints: Any  # llmcli.constraints.Constraints: structured output's compiled grammars

    def encode(self, text: str, add_special: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Ids of the chat template rendered with a generation prompt (its special tokens parsed); `tools`
        (OpenAI function specs) go to the template's `tools`, `template_kwargs` are more of its variables
        (enable_thinking)."""

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        """Text of the ids, special tokens left out unless `keep_special` (their text kept, as /detokenize
        gives it)."""

    def token_text(self, token: int | None) -> str:
        """One token's own text (a special token's too)."""

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, template_kwargs: dict[str, Any] | None = None) -> str:
        """The chat template's text for `messages`."""

    def set_seed(self, seed: int) -> None: ...

    def generate(self, batch: list[list[int]], options: Any, on_tokens: TokensCallback,
                 should_stop: Callable[[], bool]) -> list[list[int]]:
        """New token ids for each prompt of the batch (options.num_return_sequences rows per prompt).

        `on_tokens` gets each step's new ids; `should_stop` is asked after each step (stop strings)."""

    def token_nlls(self, windows: list[Window], batch_size: int,
                   on_progress: ProgressCallback | None = None) -> list[float]:
        """Negative log-likelihood of every scored token, in order."""

    def continuation_scores(self, sequences: list[list[int]], starts: list[int],
                            batch_size: int) -> list[tuple[float, bool]]:
        """Each sequence's summed log-probability of its tokens from `start` on, and whether every one of
        them was the likeliest (lm-eval's loglikelihood)."""

    def token_logprobs(self, window: Window, top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """Log-probability of each scored token (the numbers token_nlls negates), and the `top` likeliest
        tokens with theirs at each scored position (the server's `logprobs`)."""

    def peak_memory_mb(self) -> float: ...


def process_peak_rss_mb() -> float:
    """This process's peak resident set: VmHWM, since Linux carries getrusage's ru_maxrss across
    fork+exec (a child of a big process would report its parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # where there is no /proc: KiB on Linux


def same_shape_batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Runs of windows with equal length and scored count, so batches need no padding."""
    run: list[Window] = []
    for window in windows:
        if run and (len(run) == batch_size or (len(window.ids), window.scored) != (len(run[0].ids), run[0].scored)):
            yield run
            run = []
        run.append(window)
    if run:
        yield run


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def physical_cores() -> int:
    """Physical cores this process may use: llama.cpp's own default, and what measures fastest
    (hyper-threads share the vector units that the matmuls saturate). Workers launched together on
    one machine (LOCAL_WORLD_SIZE) share them out."""
    import os

    return max(1, machine_physical_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def machine_physical_cores() -> int:
    import os

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo") as info:
            text = info.read()
    except OSError:
        return max(1, usable)
    # one (physical id, core id) pair per core; a container may see the host's cores but use fewer
    cores = set(re.findall(r"physical id\s*:\s*(\d+)\s*\n(?:.*\n)*?core id\s*:\s*(\d+)", text))
    return max(1, min(len(cores), usable)) if cores else max(1, usable)


def resolve_engine_name(requested: str, source: Any, hf_only: list[str]) -> str:
    """`auto`: llama.cpp for a .gguf model when it is installed, Hugging Face otherwise, or when an
    option only Hugging Face has (`hf_only`, e.g. --draft-model) is given."""
    if requested not in ENGINE_NAMES:
        raise UsageError(f"unknown --engine {requested!r}", "Use auto, hf or llama.cpp.")
    if requested == "hf":
        return "hf"
    if requested == "llama.cpp":
        if hf_only:
            raise UsageError(f"{hf_only[0]} runs on the hf engine only", "Drop it, or pass --engine hf.")
        if source.kind not in ("gguf", "adapter"):  # an adapter runs on its base's GGUF (llama_adapters)
            raise UsageError(f"--engine llama.cpp runs .gguf files and LoRA adapters, and {source.name} is neither",
                             "Pass a .gguf model, or use --engine hf.")
        if not llama_cpp_installed():
            raise UsageError("the llama.cpp engine is not installed", LLAMA_INSTALL_HINT)
        return "llama.cpp"
    return "llama.cpp" if source.kind == "gguf" and not hf_only and llama_cpp_installed() else "hf"


def choose_engine(model: str | None, requested: str = "auto", *, command: str = "generate", kind: str = "causal",
                  device: str | None = None, dtype: str = "auto", fast: bool = False, threads: int | None = None,
                  hf_only: list[str] | None = None, draft_model: str | None = None,
                  trust_remote_code: bool = False, allow_pickle: bool = False, placement: Any = None,
                  on_notice: Callable[[str], None] | None = None) -> Engine:
    """Load `model` on the engine that should run it, with its weight format, dtype, device and threads."""
    from llmcli import models

    notice = on_notice or (lambda message: None)
    source = models.resolve_model(model)
    name = resolve_engine_name(requested, source, [*(hf_only or []), *(["--device-map"] if placement else [])])
    if threads is not None and threads <= 0:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    if name == "llama.cpp":
        engine = load_llama_cpp(source, model is None, command, kind, device, dtype, fast, threads, notice)
        if draft_model is not None:  # its own weights as they are: a draft need only be close, and fast
            engine.attach_draft(load_llama_cpp(gguf_draft(draft_model), False, command, kind, device, dtype, True,
                                               threads, notice))
    else:
        engine = load_hf(model, kind, device, dtype, fast, threads, draft_model, trust_remote_code, allow_pickle,
                         notice, placement)
    return engine


def add_adapter_dir(engine: Engine, name: str, directory: str, notice: Callable[[str], None]) -> None:
    """A LoRA adapter directory (`finetune --lora`'s output) loaded beside the engine's model as `name`:
    peft's on the hf engine, its LoRA GGUF (made once into the cache) on llama.cpp."""
    from llmcli import models

    source = models.resolve_model(directory)
    if source.kind != "adapter":
        raise UsageError(f"--adapter {name}={directory}: not a LoRA adapter directory (no adapter_config.json)",
                         "Pass the --output directory of `llmcli finetune --lora`.")
    base = models.resolve_model(models.adapter_base(source.location))
    runs = engine.source if engine.source.kind != "adapter" else models.resolve_model(models.adapter_base(engine.source.location))
    if Path(base.location).resolve() != Path(runs.location).resolve():  # an export of the same weights is fine
        notice(f"The adapter {name} was finetuned on {base.name}, and this runs {runs.name}: its output is only "
               "right on the same weights.")
    if engine.name == "llama.cpp":
        from llmcli.engines.llama_adapters import adapter_gguf

        engine.add_adapter(name, adapter_gguf(source, notice))
    else:
        engine.add_adapter(name, source.location)


def gguf_draft(draft_model: str) -> Any:
    """The --draft-model of the llama.cpp engine: a .gguf file."""
    from llmcli import models

    source = models.resolve_model(draft_model)
    if source.kind != "gguf":
        raise UsageError(f"--draft-model {draft_model} is not a .gguf file, and the llama.cpp engine drafts with one",
                         "Pass a .gguf draft model, or --engine hf.")
    return source


def embedded_notice(notice: Callable[[str], None]) -> None:
    """Said once the options are known to be valid, so a bad option's error stays the only output."""
    from llmcli import models

    notice(f"Using the embedded model {models.EMBEDDED_NAME} (pass --model, or set LLMCLI_MODEL, to choose another).")


def load_llama_cpp(source: Any, embedded: bool, command: str, kind: str, device: str | None, dtype: str,
                   fast: bool, threads: int | None, notice: Callable[[str], None]) -> Engine:
    """Weights: the format that agrees with Hugging Face's float32 at >= 99% of positions (F16 for a
    quantized file; measured, see docs/engines.md), or with --fast the file as it is. eval --data
    scores the file as it is, so that its numbers are llama-perplexity's for that file; eval --tasks
    (command "eval --tasks") the F16 weights, whose scores are lm-eval's hf numbers."""
    if kind == "masked":
        raise UsageError("the llama.cpp engine runs causal LMs only", "Use --engine hf.")
    if dtype not in ("auto", "float32", "fp32"):
        raise UsageError(f"--dtype {dtype} is for the hf engine; llama.cpp runs the GGUF's own weight format",
                         "Drop --dtype, or pass --engine hf.")
    if device not in (None, "auto", "cpu") and not device.startswith("cuda"):
        raise UsageError(f"the llama.cpp engine runs on the CPU or CUDA, not {device}", "Use --engine hf.")
    from llmcli.engines import llama_host
    from llmcli.engines.llamacpp import LlamaCppEngine

    llama_host.setting()  # a bad LLMCLI_LLAMA_EXTRA_BUFFERS is the only output, before any notice
    if embedded:
        embedded_notice(notice)
    adapter = None
    if source.kind == "adapter":
        from llmcli.engines import llama_adapters

        adapter = source
        source = llama_adapters.base_gguf(llama_adapters.adapter_base_source(adapter), notice)
    engine = LlamaCppEngine.load(source, weights="as-is" if fast or command == "eval" else "default",
                                 threads=threads or physical_cores(),
                                 gpu=None if device in (None, "auto") else device != "cpu", on_notice=notice)
    if adapter is not None:
        engine.add_adapter(adapter.name, llama_adapters.adapter_gguf(adapter, notice))
        engine.use_adapter(adapter.name)
        engine.source = adapter  # what runs is named by the adapter, as on the hf engine
    return engine


def load_hf(model: str | None, kind: str, device: str | None, dtype: str, fast: bool, threads: int | None,
            draft_model: str | None, trust_remote_code: bool, allow_pickle: bool,
            notice: Callable[[str], None], placement: Any = None) -> Engine:
    """--fast: bfloat16 weights on the CPU (measured ~1.5x); on CUDA a static KV cache, which
    transformers compiles into one decode step (~8x on an H100, after 40-50 s of compiling)."""
    from llmcli import models
    from llmcli.engines.hf import HFEngine

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    on_cuda = models.choose_device(device).type == "cuda"
    if fast and not on_cuda and dtype != "auto":
        raise UsageError("--fast on the CPU sets the dtype (bfloat16)", "Drop --dtype or --fast.")
    static_cache = fast and on_cuda
    if static_cache:
        notice("--fast: the first generation compiles the decode step (40-50 s measured on an H100).")
    weights = "bfloat16" if fast and not on_cuda else dtype
    if model is None:
        embedded_notice(notice)

    def load(name: str | None) -> models.LoadedModel:
        source = models.resolve_model(name)
        if not models.is_cached(source):
            models.read_gguf_metadata(Path(source.location))  # a damaged file fails here, before the notice
            notice(f"Converting {source.name} to safetensors once; later loads skip this (about 20 s).")
        return models.load_model(name, kind=kind, device=device, dtype=weights, trust_remote_code=trust_remote_code,
                                 allow_pickle=allow_pickle, placement=placement)

    loaded = load(model)
    if placement is not None:
        notice(placement_summary(loaded.model.hf_device_map))
    return HFEngine(loaded, static_cache=static_cache, draft=load(draft_model) if draft_model else None)


def placement_summary(device_map: dict[str, Any]) -> str:
    """'--device-map: 1 module on cpu, 4 on disk' (a GPU is its number, as in accelerate's maps)."""
    counts: dict[str, int] = {}
    for where in device_map.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[name] = counts.get(name, 0) + 1
    parts = [f"{count} on {name}" for name, count in counts.items()]
    first_count = next(iter(counts.values()))
    parts[0] = parts[0].replace(" on", f" module{'s' if first_count > 1 else ''} on", 1)
    return "--device-map: " + ", ".join(parts)


def as_engine(model: Any) -> Engine:
    """An engine for a task: engines pass through; a models.LoadedModel gets the Hugging Face engine."""
    if hasattr(model, "token_nlls"):
        return model
    from llmcli.engines.hf import HFEngine

    return HFEngine(model)
