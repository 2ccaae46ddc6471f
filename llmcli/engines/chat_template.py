"""Chat templates rendered with jinja2 exactly as transformers renders them (same environment, same
globals), so the llama.cpp engine formats a chat into the same text, and so the same ids, without
importing transformers."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from llmcli.errors import DataError


# `chat` on a model whose tokenizer has no template (a base model): plain "User:"/"Assistant:" lines,
# which a base model continues better than special tokens it never saw; the caller stops replies at
# FALLBACK_STOP, where such a model would go on to write the user's next turn.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% else %}Assistant: {{ message['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = "\nUser:"


def raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
           sort_keys: bool = False) -> str:
    # transformers' own filter: jinja's built-in tojson escapes HTML characters and sorts keys
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=4)
def compile_template(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = strftime_now
    return environment.from_string(source)


# the variables a template is rendered with already: a request's chat_template_kwargs cannot replace them
RESERVED = ("messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token")


def template_variables(given: dict[str, Any] | None) -> dict[str, Any]:
    """Extra template variables (enable_thinking, a request's chat_template_kwargs), the reserved ones left out."""
    return {name: value for name, value in (given or {}).items() if name not in RESERVED}


def render(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
           tools: list[dict[str, Any]] | None = None, **special: Any) -> str:
    """The template's text for `messages` (and `tools`, OpenAI function specs, as transformers passes
    them); `special` gives bos_token, eos_token and the like."""
    from jinja2.exceptions import TemplateError

    try:
        return compile_template(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                               tools=tools, documents=None, **special)
    except TemplateError as exc:
        raise DataError(f"the model's chat template failed: {exc}", "Pass plain prompts with --no-chat.") from exc
