"""Request bodies of the OpenAI API as OpenAI documents them, checked by pydantic.

Unknown fields are ignored, as OpenAI-compatible servers do (clients send fields such as `user`).
Responses are plain dicts built by the endpoint modules.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llmcli.constraints import closed_objects
from llmcli.tools import Tool, ToolUse

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
    strict: Optional[bool] = None  # the schema is always enforced; strict also closes its objects

    def enforced(self) -> dict[str, Any]:
        """The schema the reply is held to: with strict, OpenAI's strict mode, where an object has no
        keys but its properties (a small model otherwise adds keys until max_tokens)."""
        return closed_objects(self.schema_) if self.strict else self.schema_


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
    functions: Optional[list[Any]] = None  # OpenAI's deprecated form of tools: refused, naming the new one
    # ollama's: how long the model stays loaded once idle after this request (seconds, "5m"; -1 always)
    keep_alive: Optional[Union[str, float]] = None

    @field_validator("functions")
    @classmethod
    def no_functions(cls, value: list[Any] | None) -> None:
        if value:
            raise ValueError("functions is OpenAI's deprecated form; send tools: [{type: function, function: ...}]")
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

    @field_validator("keep_alive")
    @classmethod
    def a_duration(cls, value: str | float | None) -> float | None:
        from llmcli.errors import UsageError
        from llmcli.serve.offers import parse_keep_alive

        if value is None:
            return None
        try:
            return parse_keep_alive(value, "keep_alive")
        except UsageError as exc:
            raise ValueError(f"{exc.message}; use seconds or a duration such as 30s, 5m, 1h") from None

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


class FunctionCall(BaseModel):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"  # a JSON string, as OpenAI sends it, or an object


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Optional[Union[str, list[dict[str, Any]]]] = None  # None: an assistant message that called tools
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = None  # which call a `tool` message answers

    @field_validator("content")
    @classmethod
    def text_parts(cls, value: str | list[dict[str, Any]] | None) -> str | None:
        """A list of content parts (what the OpenAI SDK and LangChain send) is joined from its text
        parts; images, audio and files are refused by name."""
        if value is None or isinstance(value, str):
            return value
        texts = []
        for part in value:
            kind = part.get("type")
            if kind not in ("text", "input_text", "output_text") or not isinstance(part.get("text"), str):
                raise ValueError(f"content parts of type {kind!r} are not supported; this model reads text parts "
                                 "({'type': 'text', 'text': ...}) only")
            texts.append(part["text"])
        return "".join(texts)

    @model_validator(mode="after")
    def complete(self) -> "Message":
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("value_error", "a tool message needs tool_call_id, the id of the call it "
                                      "answers", {"field": "tool_call_id"})
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (it may be null only on an assistant message with tool_calls)")
        return self

    def plain(self) -> dict[str, Any]:
        """The message as the tool layer reads it: calls flattened to {id, name, arguments}."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
                                     for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionTool(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function's name
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: Optional[bool] = None  # strict or not, the arguments are held to the schema with its objects closed

    @field_validator("parameters")
    @classmethod
    def object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("type", "object") != "object":
            raise ValueError(f"parameters must be a JSON schema of type object, got type {value.get('type')!r}")
        return value


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionTool


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    tools: Optional[list[ToolSpec]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: bool = True
    # thinking models: OpenAI's effort ("none" turns thinking off; passed to the template too, as vLLM does)
    # and vLLM's and llama-server's extra chat-template variables (Qwen3's enable_thinking)
    reasoning_effort: Optional[Literal["none", "minimal", "low", "medium", "high"]] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def choice_among_tools(self) -> "ChatRequest":
        names = [tool.function.name for tool in self.tools or []]
        chosen = self.tool_choice
        if isinstance(chosen, NamedToolChoice) and chosen.function.name not in names:
            raise PydanticCustomError("value_error", "tool_choice names '{name}', which is not among the tools given "
                                      "({given})", {"field": "tool_choice", "name": chosen.function.name,
                                                    "given": ", ".join(names) or "none"})
        if chosen == "required" and not names:
            raise PydanticCustomError("value_error", "tool_choice required needs tools", {"field": "tool_choice"})
        if len(set(names)) < len(names):
            raise PydanticCustomError("value_error", "two tools have one name; give each its own",
                                      {"field": "tools"})
        return self

    def tool_use(self) -> ToolUse | None:
        """The request's tools as the tool layer takes them; None without tools."""
        if not self.tools:
            return None
        chosen = self.tool_choice or "auto"
        answer = None
        if self.response_format is not None and self.response_format.type != "text":
            chosen_format = self.response_format.json_schema
            answer = chosen_format.enforced() if chosen_format else {"type": "object"}
        return ToolUse(tuple(Tool(t.function.name, t.function.description, t.function.parameters) for t in self.tools),
                       chosen if isinstance(chosen, str) else chosen.function.name, self.parallel_tool_calls, answer)
