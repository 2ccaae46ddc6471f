"""Errors users can act on. Each carries its exit code and an optional hint; `cli.main` formats them."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class LlmcliError(Exception):
    """An error caused by the user's input or environment, shown as one `Error:` line and a hint."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(LlmcliError):
    """A bad option value or a contradictory combination of options."""


class DataError(LlmcliError):
    """A missing, unreadable, empty or malformed input file or prompt."""


class ContextOverflow(DataError):
    """A prompt and its new tokens that do not fit the model's context (a server says
    context_length_exceeded, as OpenAI does)."""


class ModelNotFound(LlmcliError):
    """A model argument that names no file, directory, alias or reachable hub repository."""


class ModelLoadError(LlmcliError):
    """Something that exists but is not a model llmcli can load."""


class WrongModelKind(ModelLoadError):
    """The model is a masked LM where a causal one was asked for, or the other way round."""


class DownloadError(LlmcliError):
    """`llmcli pull` could not fetch or verify a model: the hub out of reach, a missing repository or
    quantization, a file whose hash is not the hub's, a disk that cannot take it."""
