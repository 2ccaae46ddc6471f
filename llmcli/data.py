"""Read and validate user input files. Every error names the file and line and says how to fix it."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import DataError

STDIN = "-"


@dataclass
class Prompt:
    """One generation request: plain text, or chat messages (`[{"role", "content"}, ...]`)."""

    text: str | None = None
    messages: list[dict[str, str]] | None = None

    def display(self) -> str:
        """The prompt as reported in results: its text, or the last user message of a chat."""
        if self.text is not None:
            return self.text
        return next((m["content"] for m in reversed(self.messages or []) if m["role"] == "user"), "")


def read_text(path: str) -> str:
    """Whole file (or stdin for `-`) as text, with errors that name the file."""
    if path == STDIN:
        data = sys.stdin.buffer.read()
        name = "standard input"
    else:
        file = Path(path)
        if not file.exists():
            raise DataError(f"file {path} does not exist", "Check the path.")
        if file.is_dir():
            raise DataError(f"{path} is a directory, not a file", "Pass a file.")
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}", "Check the file's permissions.") from exc
        name = path
    if b"\x00" in data:
        raise DataError(f"{name} looks like a binary file (it contains NUL bytes)", "Pass a UTF-8 text file.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name} is not valid UTF-8 (byte {exc.start})", "Convert it, e.g. iconv -t UTF-8."
        ) from exc


def parse_messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: 'messages' must be a non-empty list", 'Use [{"role": "user", "content": "..."}].')
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise DataError(
                f"{where}: each message needs string 'role' and 'content' fields, got {json.dumps(message)[:80]}",
                'Use {"role": "user", "content": "..."}.',
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_json_object(line: str, where: str, example: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})", "Fix the line or remove it.") from exc
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}", f"Use {example}.")
    return record


def parse_prompt_line(line: str, where: str) -> Prompt:
    """One JSONL line with a `prompt` string or a `messages` list."""
    record = parse_json_object(line, where, '{"prompt": "..."}')
    if "messages" in record:
        return Prompt(messages=parse_messages(record["messages"], where))
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(
            f"{where}: expected a non-empty string 'prompt' field or a 'messages' list",
            'Use {"prompt": "..."} or {"messages": [...]}.',
        )
    return Prompt(text=prompt)


def numbered_lines(path: str, what: str) -> tuple[str, list[tuple[int, str]], bool]:
    """Display name, non-blank (line number, line) pairs, and whether the input is JSONL
    (a .jsonl file, or a first line starting with `{`)."""
    name = "standard input" if path == STDIN else path
    lines = [(n, line) for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{name} contains no {what}", f"Put one of the {what} per line.")
    jsonl = path.endswith(".jsonl") or lines[0][1].lstrip().startswith("{")
    return name, lines, jsonl


def read_prompts(path: str) -> list[Prompt]:
    """Prompts from a file or stdin: one per line, or JSONL records with `prompt` or `messages`."""
    name, lines, jsonl = numbered_lines(path, "prompts")
    if jsonl:
        return [parse_prompt_line(line, f"{name} line {n}") for n, line in lines]
    return [Prompt(text=line) for _, line in lines]


def read_texts(path: str) -> list[str]:
    """Texts from a file or stdin: one per line, or JSONL records with a `text` string."""
    name, lines, jsonl = numbered_lines(path, "texts")
    if not jsonl:
        return [line for _, line in lines]
    texts = []
    for n, line in lines:
        record = parse_json_object(line, f"{name} line {n}", '{"text": "..."}')
        if not isinstance(record.get("text"), str) or not record["text"].strip():
            raise DataError(f"{name} line {n}: expected a JSON object with a non-empty string 'text' field",
                            'Use {"text": "..."}.')
        texts.append(record["text"])
    return texts


def read_document(path: str) -> str:
    """One text to evaluate: a .jsonl file's `text` records joined by blank lines, else the whole file."""
    if path.endswith(".jsonl"):
        return "\n\n".join(read_texts(path))
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{'standard input' if path == STDIN else path} is empty", "Pass a file with some text.")
    return text
