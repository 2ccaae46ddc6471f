"""`llmcli serve`."""


from typing import Annotated, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import load_engine
from llmcli.cli.options import (ModelOption, DeviceOption, DtypeOption, TrustOption, PickleOption, EngineOption,
                                 ThreadsOption, ChatTemplateOption, ReasoningFormatOption, ReasoningOption,
                                 ReasoningBudgetOption, SpeculativeOption, DraftMaxOption, DraftModelOption)
from llmcli.errors import UsageError


@app.command()
def serve(
    model: ModelOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes the model to the network "
                                      "(set --api-key then).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="LLMCLI_API_KEY", show_envvar=True, show_default=False,
                                                   help="Require 'Authorization: Bearer KEY' on /v1.")] = None,
    max_tokens_limit: Annotated[Optional[int], typer.Option(help="The most max_tokens one request may ask for.",
                                                            show_default=False)] = None,
    queue_size: Annotated[int, typer.Option(help="Requests that may wait for the model; more get 503.")] = 64,
    max_batch: Annotated[int, typer.Option(help="hf engine: waiting requests with the same settings (one choice, "
                                           "no seed, not streamed) generated as one batch, up to this many; 1 "
                                           "never batches.")] = 8,
    parallel: Annotated[int, typer.Option(help="llama.cpp: requests' sequences decoded together, each step "
                                          "(llama-server's -np); requests join and leave between steps.")] = 8,
    ctx_size: Annotated[Optional[int], typer.Option(help="llama.cpp: KV-cache tokens the running sequences share "
                                                    "(default: the model's context, at most 16384).", show_default=False)] = None,
    prefix_cache: Annotated[bool, typer.Option(help="llama.cpp: a prompt that starts with tokens still cached (a "
                                               "chat's earlier turns) decodes only the rest.")] = True,
    max_body: Annotated[int, typer.Option(help="Largest request body in bytes (413 above).")] = 1 << 20,
    served_model_name: Annotated[Optional[str], typer.Option(help="The model's id in /v1/models (default: the "
                                                             "alias, file or directory name).", show_default=False)] = None,
    json_logs: Annotated[bool, typer.Option("--json-logs", help="Access log lines as JSON.")] = False,
    chat_template: ChatTemplateOption = None,
    reasoning_format: ReasoningFormatOption = "auto",
    reasoning: ReasoningOption = "auto",
    reasoning_budget: ReasoningBudgetOption = None,
    embedding_model: Annotated[Optional[str], typer.Option(
        help="/v1/embeddings' model: a sentence-transformers or encoder directory (default: the embedded "
        "all-MiniLM-L6-v2, loaded at the first request).", show_default=False)] = None,
    rerank_model: Annotated[Optional[str], typer.Option(
        help="/v1/rerank's cross-encoder: a sentence-transformers CrossEncoder directory or a sequence-"
        "classification model with one label (loaded at the first request).", show_default=False)] = None,
    adapter: Annotated[Optional[list[str]], typer.Option(
        "--adapter", help="NAME=DIR: a LoRA adapter of the model (`finetune --lora`'s output), offered as model NAME "
        "and run on the loaded model per request (repeatable).", show_default=False)] = None,
    speculative: SpeculativeOption = "auto",
    draft_max: DraftMaxOption = 12,
    draft_model: DraftModelOption = None,
    engine: EngineOption = "auto",
    threads: ThreadsOption = None,
    device: DeviceOption = None,
    dtype: DtypeOption = "auto",
    trust_remote_code: TrustOption = False,
    allow_pickle: PickleOption = False,
) -> None:
    """Serve the model over the OpenAI HTTP API (/v1/completions, /v1/chat/completions, /v1/responses,
    /v1/embeddings, /v1/rerank, /v1/models, /health, /metrics; the schema at /openapi.json), streaming as
    server-sent events. Ctrl-C or SIGTERM: stop accepting, let requests in flight finish for up to 5 s, then
    cut their generations, exit 0."""
    for name, value in (("--port", port), ("--queue-size", queue_size), ("--max-body", max_body),
                        ("--max-batch", max_batch), ("--parallel", parallel), ("--ctx-size", 1 if ctx_size is None else ctx_size)):
        if value <= 0 or (name == "--port" and value > 65535):
            raise UsageError(f"{name} must be {'in 1..65535' if name == '--port' else 'at least 1'}, got {value}")
    if max_tokens_limit is not None and max_tokens_limit <= 0:
        raise UsageError(f"--max-tokens-limit must be at least 1, got {max_tokens_limit}")
    if parallel > 128:  # llama.cpp's 256 sequence ids hold the live ones and as many cached prefixes
        raise UsageError(f"--parallel must be at most 128, got {parallel}")
    from llmcli.cli.generate import check_speculation
    from llmcli.tasks.generate import GenerateOptions, validate

    from llmcli.reasoning import check_controls, markers

    markers(None, reasoning_format)  # an unknown format is refused before the model loads
    check_controls(reasoning, reasoning_budget)
    speculation = GenerateOptions(speculative=speculative, draft_max=draft_max)
    validate(speculation)
    check_speculation(speculation, draft_model)
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty", "Pass a secret, or drop --api-key.")
    from llmcli.serve.embeddings import check_embedding_model

    from llmcli.serve.rerank import check_rerank_model

    embedding_unavailable = check_embedding_model(embedding_model)
    check_rerank_model(rerank_model)
    if embedding_unavailable:
        render.notice(f"/v1/embeddings is off: {embedding_unavailable} (pass --embedding-model DIR, or install it).")
    adapters = adapter_options(adapter or [])
    import socket

    with socket.socket() as probe:  # a taken port is a one-line error before the slow model load
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                             "Pick another --port, or stop what is using it.") from exc
    runner = load_engine(model, engine, chat_template=chat_template, command="generate", device=device, dtype=dtype,
                         threads=threads, draft_model=draft_model,
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if (draft_model or speculative == "on") and runner.name != "llama.cpp":
        raise UsageError(f"serve's {'--draft-model' if draft_model else '--speculative on'} is for the llama.cpp "
                         "engine", "Serve a .gguf model, or drop it.")
    from llmcli.engines import add_adapter_dir
    from llmcli.serve import exposure_warning, run_server

    for name, directory in adapters.items():
        add_adapter_dir(runner, name, directory, render.notice)

    warning = exposure_warning(host, api_key)
    if warning:
        render.notice(warning)
    run_server(runner, host, port, api_key=api_key, max_tokens_limit=max_tokens_limit, queue_size=queue_size,
               max_batch=max_batch, parallel=parallel, ctx_size=ctx_size, prefix_cache=prefix_cache,
               speculative=speculative, draft_max=draft_max, reasoning_format=reasoning_format,
               reasoning=reasoning, reasoning_budget=reasoning_budget,
               max_body_bytes=max_body, json_logs=json_logs, served_name=served_model_name, on_notice=render.notice,
               embedding_model=embedding_model, embedding_unavailable=embedding_unavailable, rerank_model=rerank_model,
               adapters=tuple(adapters))


def adapter_options(values: list[str]) -> dict[str, str]:
    """--adapter NAME=DIR options as {NAME: DIR}, checked before the slow load."""
    from pathlib import Path

    adapters: dict[str, str] = {}
    for value in values:
        name, _, directory = value.partition("=")
        if not name.strip() or not directory.strip():
            raise UsageError(f"--adapter {value!r} is not NAME=DIR", "e.g. --adapter support=out/support-lora.")
        if name in adapters:
            raise UsageError(f"--adapter {name} is given twice", "Give each adapter its own name.")
        if not (Path(directory).expanduser() / "adapter_config.json").is_file():
            raise UsageError(f"--adapter {value}: {directory} is not a LoRA adapter directory (no adapter_config.json)",
                             "Pass the --output directory of `llmcli finetune --lora`.")
        adapters[name.strip()] = directory
    return adapters
