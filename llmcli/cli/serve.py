"""`llmcli serve`."""


from typing import Annotated, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import load_engine
from llmcli.cli.options import (DeviceOption, DtypeOption, TrustOption, PickleOption, EngineOption,
                                 ThreadsOption, ChatTemplateOption, ReasoningFormatOption, ReasoningOption,
                                 ReasoningBudgetOption, SpeculativeOption, DraftMaxOption, DraftModelOption)
from llmcli.errors import UsageError


@app.command()
def serve(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", envvar="LLMCLI_MODEL", show_envvar=True, show_default=False,
        help="Hub id (org/name, or org/name:QUANT for a GGUF file; from the cache, see 'llmcli pull'), local "
        "save_pretrained dir, .gguf file, or 'smollm2'. Default: the embedded SmolLM2-135M-Instruct. Repeat it to "
        "offer several models (each loaded at its first request).")] = None,
    models_dir: Annotated[Optional[str], typer.Option(
        help="Offer every .gguf file and model or adapter directory in DIR, named by its file or folder name.",
        show_default=False)] = None,
    models_file: Annotated[Optional[str], typer.Option(
        "--models", help="A TOML file of [[model]] tables (name, model, engine, ctx_size, threads, parallel, "
        "keep_alive, aliases) to offer.", show_default=False)] = None,
    max_loaded: Annotated[Optional[int], typer.Option(
        help="Models loaded at once at most; loading another unloads the least recently used idle one "
        "(default: no limit).", show_default=False)] = None,
    keep_alive: Annotated[Optional[str], typer.Option(
        help="How long an idle model stays loaded: seconds or 30s, 5m, 1h; -1 always, 0 unloaded once idle "
        "(default: 5m when several models are offered, always for one).", show_default=False)] = None,
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
    if max_loaded is not None and max_loaded <= 0:
        raise UsageError(f"--max-loaded must be at least 1, got {max_loaded}")
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
    from llmcli.serve.offers import FOREVER, parse_keep_alive

    idle = None if keep_alive is None else parse_keep_alive(keep_alive)
    offers = offered_models(model or [], models_dir, models_file)
    preloaded = None
    if len(offers) == 1 and not (models_dir or models_file):  # one -m: loaded now, as serve always did
        preloaded = load_engine(model[0] if model else None, engine, chat_template=chat_template, command="generate",
                                device=device, dtype=dtype, threads=threads, draft_model=draft_model,
                                trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        if (draft_model or speculative == "on") and preloaded.name != "llama.cpp":
            raise UsageError(f"serve's {'--draft-model' if draft_model else '--speculative on'} is for the llama.cpp "
                             "engine", "Serve a .gguf model, or drop it.")
        offers = [single_offer(offers[0], preloaded, served_model_name)]
    else:
        for option, value in (("--served-model-name", served_model_name), ("--draft-model", draft_model)):
            if value:
                raise UsageError(f"{option} is for a server of one model",
                                 "Name models (and their options) in a --models file, or serve one model.")
        idle = 5 * 60 if idle is None else idle  # ollama's default keep-alive
    load = on_demand_loader(engine, chat_template, device=device, dtype=dtype, threads=threads,
                            trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    from llmcli.serve import exposure_warning, run_server
    from llmcli.serve.offers import Offer, check_names

    # each --adapter is a model of its own, run on the first model (loaded beside it, once for all)
    offers += [Offer(name, directory, parent=offers[0].name, on_parent=True) for name, directory in adapters.items()]
    check_names(offers)
    warning = exposure_warning(host, api_key)
    if warning:
        render.notice(warning)
    run_server(offers, load, host, port, preloaded=preloaded, max_loaded=max_loaded,
               keep_alive=FOREVER if idle is None else idle, api_key=api_key, max_tokens_limit=max_tokens_limit,
               queue_size=queue_size, max_batch=max_batch, parallel=parallel, ctx_size=ctx_size,
               prefix_cache=prefix_cache, speculative=speculative, draft_max=draft_max,
               reasoning_format=reasoning_format, reasoning=reasoning, reasoning_budget=reasoning_budget,
               max_body_bytes=max_body, json_logs=json_logs, on_notice=render.notice,
               embedding_model=embedding_model, embedding_unavailable=embedding_unavailable, rerank_model=rerank_model)


def offered_models(models: list[str], models_dir: str | None, models_file: str | None) -> list:
    """-m values, then --models-dir's models, then --models' (checked: each exists, names are unique);
    none of them: the embedded model. Each runs on --engine unless its table in the file names one."""
    from llmcli.serve.offers import check_names, offer_for, offers_in_directory, offers_in_file

    offers = [offer_for(value) for value in models]
    offers += offers_in_directory(models_dir) if models_dir else []
    offers += offers_in_file(models_file) if models_file else []
    if not offers:
        offers = [offer_for(None)]
    check_names(offers)
    return offers


def single_offer(offer, engine, served_name: str | None):
    """The one model's offer, named as serve always named it (--served-model-name, else its id)."""
    from dataclasses import replace

    from llmcli.serve import model_aliases, model_id

    return replace(offer, name=model_id(engine, served_name), aliases=model_aliases(engine) | offer.aliases,
                   engine=engine.name)


def on_demand_loader(engine: str, chat_template: str | None, **choices):
    """How the server loads an offered model at its first request: its engine and threads if it names
    them, else the command line's (--chat-template read and checked now, before the server starts)."""
    from llmcli.cli.common import read_chat_template

    template = read_chat_template(chat_template) if chat_template is not None else None

    def load(offer):
        from llmcli.engines import choose_engine

        options = {**choices, "threads": offer.threads or choices["threads"]}
        runner = choose_engine(offer.model, offer.engine if offer.engine != "auto" else engine, command="generate",
                               on_notice=render.notice, **options)
        if template is not None:
            runner.chat_template = template
        return runner

    return load


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
