"""Request bodies of the OpenAI API as OpenAI documents them, checked by pydantic.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send fields such as `user`).
Responses are plain dicts built in `app.py`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_CHOICES = 16  # n above this is refused: every choice is a full generation


# field -> the values that change nothing (accepted); any other value is refused
UNSUPPORTED = {
    "suffix": lambda value: not value,  # insertion: no fill-in-the-middle here
    "best_of": lambda value: value in (None, 1),  # server-side choice of the best of several samples
    "audio": lambda value: value is None,
    "modalities": lambda value: value in (None, ["text"]),
    "prediction": lambda value: value is None,  # predicted outputs
    "web_search_options": lambda value: value is None,
    "function_call": lambda value: value in (None, "none"),
}


class StreamOptions(BaseModel):
    include_usage: bool = False  # a last chunk with the usage, as OpenAI sends it only when asked


class JsonSchemaFormat(BaseModel):
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")  # OpenAI's rule for the name
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: Optional[bool] = None  # the schema is always enforced here, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's structured outputs: free text, any JSON object, or JSON valid for a schema."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None

    @model_validator(mode="after")
    def schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema: {name, schema}")
        return self


class Sampling(BaseModel):
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    response_format: Optional[ResponseFormat] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, as JSON keys are) -> bias in [-100, 100]
    # beyond OpenAI, as vLLM and llama-server take them
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, ge=0.01, le=100)  # as `generate` takes it
    tools: Optional[list[Any]] = None  # refused: no tool calling yet (a 200 would pretend to call them)
    functions: Optional[list[Any]] = None

    @field_validator("tools", "functions")
    @classmethod
    def no_tools(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("tool calling is not supported by this server; send the request without tools")
        return None

    @model_validator(mode="before")
    @classmethod
    def nothing_silently_ignored(cls, data: Any) -> Any:
        """OpenAI fields that would change the answer and that this server does not do: a 400 naming
        the field, never a 200 that pretends (metadata such as `user` or `store` is ignored, as elsewhere)."""
        if not isinstance(data, dict):
            return data
        for name, fine in UNSUPPORTED.items():
            if name in data and not fine(data[name]):
                raise PydanticCustomError("unsupported_field", "{field} is not supported by this server; send the "
                                          "request without it", {"field": name})  # ctx: the error's param
        return data

    @field_validator("logit_bias")
    @classmethod
    def token_ids_and_biases(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias {token}: a bias must be in [-100, 100], got {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(Sampling):
    # text, texts, token ids or lists of token ids, as OpenAI takes them (lm-eval sends ids)
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=0)  # None: OpenAI's default of 16, capped by --max-tokens-limit
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("logprobs", mode="before")
    @classmethod
    def false_is_none(cls, value: Any) -> Any:
        """`logprobs: false` asks for none (pydantic would read it as 0, the chosen tokens' own), `true`
        for the chosen tokens' own (0 alternatives)."""
        if value is False:
            return None
        return 0 if value is True else value

    @field_validator("prompt")
    @classmethod
    def some_prompt(cls, value: Any) -> list[str | list[int]]:
        """Always a list of prompts, each a text or a list of token ids."""
        prompts = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        if not prompts or any(not prompt for prompt in prompts):
            raise ValueError("prompt must not be empty")
        return prompts


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[dict[str, Any]]]

    @field_validator("content")
    @classmethod
    def text_parts(cls, value: str | list[dict[str, Any]]) -> str:
        """A list of content parts (what the OpenAI SDK and LangChain send) is joined from its text
        parts; images, audio and files are refused by name."""
        if isinstance(value, str):
            return value
        texts = []
        for part in value:
            kind = part.get("type")
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content parts of type {kind!r} are not supported; this model reads text parts "
                                 "({'type': 'text', 'text': ...}) only")
            texts.append(part["text"])
        return "".join(texts)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
