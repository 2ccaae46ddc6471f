"""Request bodies of the OpenAI API as OpenAI documents them, checked by pydantic.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send fields such as `user`).
Responses are plain dicts built in `app.py`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator

MAX_CHOICES = 16  # n above this is refused: every choice is a full generation


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
    tools: Optional[list[Any]] = None  # refused: no tool calling yet (a 200 would pretend to call them)
    functions: Optional[list[Any]] = None

    @field_validator("tools", "functions")
    @classmethod
    def no_tools(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("tool calling is not supported by this server; send the request without tools")
        return None

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    max_tokens: Optional[int] = Field(None, ge=0)  # None: OpenAI's default of 16, capped by --max-tokens-limit
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def some_prompt(cls, value: str | list[str]) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
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
