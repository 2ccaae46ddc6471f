"""`/tokenize`, `/detokenize` and `/tokenizer_info` in vLLM's shapes (llama-server serves the first two
too): a client counts, cuts and scores prompts with the very tokenizer generation uses, without a
local copy of it. lm-evaluation-harness's `tokenizer_backend=remote` reads exactly these
(`lm_eval.utils.RemoteTokenizer`: `eos_token` from /tokenizer_info, ids from /tokenize with
`add_special_tokens: false`, text from /detokenize).

A text is tokenized as /v1/completions tokenizes its prompt, and messages as /v1/chat/completions
renders and tokenizes them (with `add_generation_prompt` and without added special tokens, vLLM's
defaults, the very ids the chat is generated from)."""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from fastapi import FastAPI
from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from llmcli import tools
from llmcli.engines import Engine
from llmcli.errors import LlmcliError
from llmcli.serve.errors import ApiError
from llmcli.serve.schemas import Message
from llmcli.serve.router import Router, Served
from llmcli.tasks.generate import outside_vocabulary

PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")  # at the root, as vLLM and llama-server serve them


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) and TokenizeChatRequest (`messages`) as one body:
    exactly one of the two. `add_special_tokens` defaults as vLLM's do: true for a prompt (the BOS a
    completion's prompt gets), false for messages (the template writes its own)."""

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = Field(None, min_length=1)
    add_special_tokens: Optional[bool] = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    tools: Optional[list[Any]] = None

    @model_validator(mode="after")
    def prompt_or_messages(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("value_error", "send either prompt (a text) or messages (a chat), not both "
                                      "and not neither", {"field": "prompt"})
        # what /v1/chat/completions does not do either: tokens for it would match no generation here
        for name in ("tools", "continue_final_message"):
            if getattr(self, name):
                raise PydanticCustomError("unsupported_field", "{field} is not supported by this server; send the "
                                          "request without it", {"field": name})
        return self


class DetokenizeRequest(BaseModel):
    model: Optional[str] = None
    tokens: list[int]


def tokenize(engine: Engine, body: TokenizeRequest) -> list[int]:
    """The ids generation would use for this prompt or chat."""
    if body.messages is None:
        return engine.encode(body.prompt, add_special=body.add_special_tokens is not False)
    if not engine.chat_template:
        raise ApiError(400, "this model has no chat template, so messages cannot be tokenized; send prompt "
                       "(a text) instead", param="messages")
    # the chat endpoint's own rendering: tool calls and results in the messages as its template takes them
    messages, _ = tools.prompt_messages([m.plain() for m in body.messages], None,
                                        tools.call_format(engine.chat_template))
    from jinja2 import TemplateError

    try:
        text = engine.render_chat(messages, add_generation_prompt=body.add_generation_prompt)
    except (LlmcliError, TemplateError) as exc:  # the template refuses these messages (raise_exception)
        raise ApiError(400, f"the model's chat template failed: {getattr(exc, 'message', exc)}",
                       param="messages") from exc
    return engine.encode(text, add_special=bool(body.add_special_tokens))


def tokenizer_info(engine: Engine, max_model_len: int | None) -> dict[str, Any]:
    """What vLLM's /tokenizer_info gives (the tokenizer's config) that a client needs: its special tokens
    as text, whether a BOS is added, the vocabulary's size, the context and the chat template."""
    if engine.name == "hf":
        tokenizer = engine.tokenizer
        kind, pad = type(tokenizer).__name__, tokenizer.pad_token
    else:  # the GGUF's own tokenizer metadata
        from llmcli.engines.llamacpp import meta_value

        kind = f"llama.cpp {meta_value(engine.lib, engine.model, 'tokenizer.ggml.model') or 'unknown'} vocabulary"
        pad_id = meta_value(engine.lib, engine.model, "tokenizer.ggml.padding_token_id")
        pad = engine.token_text(int(pad_id)) if pad_id is not None else None
    special = {name: engine.token_text(token) if token is not None else None
               for name, token in (("bos_token", engine.bos_id), ("eos_token", engine.eos_id))}
    return {"tokenizer_class": kind, **special, "pad_token": pad, "add_bos_token": engine.adds_bos,
            "vocab_size": engine.constraints.n_vocab, "model_max_length": max_model_len,
            "chat_template": engine.chat_template}


def add_routes(app: FastAPI, router: Router) -> None:
    """The three routes; tokenizing runs off the event loop (a long prompt or a chat template takes a while)
    but beside generation, as vLLM and llama-server do: tokenizers are safe to share."""

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> dict[str, Any]:
        async with router.use(body.model) as model:
            engine = model.engine
            ids = await asyncio.to_thread(tokenize, engine, body)
            strings = [engine.token_text(token) for token in ids] if body.return_token_strs else None
            return {"count": len(ids), "max_model_len": max_model_len_of(model), "tokens": ids, "token_strs": strings}

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> dict[str, str]:
        async with router.use(body.model) as model:
            engine = model.engine
            outside = outside_vocabulary(body.tokens, engine)
            if outside is not None:
                raise ApiError(400, f"token {outside} is outside this model's vocabulary of "
                               f"{engine.constraints.n_vocab} tokens", param="tokens")
            # special tokens keep their text, as vLLM's and llama-server's /detokenize give them
            return {"prompt": await asyncio.to_thread(engine.decode, body.tokens, True)}

    @app.get("/tokenizer_info")
    async def tokenizer_info_route(model: str | None = None) -> dict[str, Any]:
        async with router.use(model) as served:
            return tokenizer_info(served.engine, max_model_len_of(served))


def max_model_len_of(model: Served) -> int | None:
    """The most tokens a request may hold: the KV cells its sequences share (llama.cpp), or the context."""
    return model.scheduler.cells if model.scheduler else model.engine.context_length
