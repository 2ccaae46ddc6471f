"""Read and validate user input files. Every error names the file and line and says how to fix it."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmcli.errors import DataError

STDIN = "-"


@dataclass
class Prompt:
    """One generation request: plain text, or chat messages (`[{"role", "content"}, ...]`), or token ids
    (`ids`, decoded as they are, with `text` their decoding for display)."""

    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None  # OpenAI function specs for the chat template's `tools`
    adapter: str | None = None  # a LoRA adapter the engine holds (its add_adapter name) to run it with

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
    if looks_like_utf16(data):
        target = "the file" if path == STDIN else path
        raise DataError(f"{name} is UTF-16 text, not UTF-8",
                        f"Convert it: iconv -f UTF-16 -t UTF-8 {target} > converted.txt")
    if b"\x00" in data:
        raise DataError(f"{name} looks like a binary file (it contains NUL bytes)", "Pass a UTF-8 text file.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{name} is not valid UTF-8 (byte {exc.start})", "Convert it, e.g. iconv -t UTF-8."
        ) from exc
    if not text.strip():
        raise DataError(f"{name} is empty" + (" (only whitespace)" if text else ""), "Pass a file with some text.")
    return text


def looks_like_utf16(data: bytes) -> bool:
    """A UTF-16 byte-order mark, or (no mark) text whose every other byte is NUL."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return True
    sample = data[:4096]
    return len(sample) >= 4 and (sample[1::2].count(0) > 0.9 * len(sample[1::2])
                                 or sample[0::2].count(0) > 0.9 * len(sample[0::2]))


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
        # json's messages for a place end in "at" ("Unterminated string starting at"): the column follows it
        raise DataError(f"{where}: invalid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno})",
                        "Fix the line or remove it.") from exc
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}", f"Use {example}.")
    return record


def parse_prompt_line(line: str, where: str) -> Prompt:
    """One JSONL line with a `prompt` (or `text`, as `embed` reads) string or a `messages` list."""
    record = parse_json_object(line, where, '{"prompt": "..."}')
    if "messages" in record:
        return Prompt(messages=parse_messages(record["messages"], where))
    prompt = text_field(record)
    if prompt is None:
        raise DataError(
            f"{where}: expected a non-empty string 'prompt' (or 'text') field or a 'messages' list",
            'Use {"prompt": "..."} or {"messages": [...]}.',
        )
    return Prompt(text=prompt)


def text_field(record: dict[str, Any]) -> str | None:
    """A record's text: its `text`, else its `prompt` (every command reads both keys), when a non-empty string."""
    value = record.get("text", record.get("prompt"))
    return value if isinstance(value, str) and value.strip() else None


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


@dataclass
class TextLines:
    texts: list[str]
    blank_lines: int  # blank lines skipped before the last text (the texts are the other lines, in order)


def read_texts(path: str) -> list[str]:
    """Texts from a file or stdin: one per line (blank lines skipped), or JSONL records with a `text` (or
    `prompt`) string."""
    return read_text_lines(path).texts


def read_text_lines(path: str) -> TextLines:
    """read_texts, and how many blank lines it skipped (for a notice: rows then match the other lines)."""
    name, lines, jsonl = numbered_lines(path, "texts")
    blank = lines[-1][0] - len(lines)
    if not jsonl:
        return TextLines([line for _, line in lines], blank)
    texts = []
    for n, line in lines:
        text = text_field(parse_json_object(line, f"{name} line {n}", '{"text": "..."}'))
        if text is None:
            raise DataError(f"{name} line {n}: expected a JSON object with a non-empty string 'text' (or 'prompt') "
                            "field", 'Use {"text": "..."}.')
        texts.append(text)
    return TextLines(texts, blank)


@dataclass
class Completion:
    """An eval record scored as `completion` given `prompt` (text), or given the conversation
    `messages` (then rendered with the chat template and its generation prompt)."""

    completion: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None


def read_eval_records(path: str) -> list[str | Completion]:
    """--per-record data: lines of text, or JSONL records in any format `finetune` reads: `text`,
    `prompt`/`completion` and chat `messages` whose last message is the assistant's (the scored part)."""
    name, lines, jsonl = numbered_lines(path, "texts")
    if not jsonl:
        return [line for _, line in lines]
    records: list[str | Completion] = []
    for n, line in lines:
        where = f"{name} line {n}"
        record = parse_json_object(line, where, '{"text": "..."}')
        found = record_format(record)
        if found == "prompt-completion":
            if not all(isinstance(record[k], str) for k in ("prompt", "completion")) or not record["completion"]:
                raise DataError(f"{where}: 'prompt' and 'completion' must be strings, the completion not empty")
            records.append(Completion(record["completion"], prompt=record["prompt"]))
        elif found == "chat":
            messages = parse_messages(record["messages"], where)
            if len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: a chat record is scored on its last message, which must be the "
                                "assistant's, after at least one other", 'End "messages" with {"role": "assistant", ...}.')
            records.append(Completion(messages[-1]["content"], messages=messages[:-1]))
        elif found == "text" and isinstance(record["text"], str) and record["text"].strip():
            records.append(record["text"])
        else:
            raise DataError(f"{where}: no non-empty 'text', 'prompt'/'completion' or 'messages' field "
                            f"(keys: {', '.join(sorted(record)) or 'none'})", TRAINING_HINT)
    return records


def read_document(path: str) -> str:
    """One text to evaluate: a .jsonl file's `text` records joined by blank lines, else the whole file."""
    if path.endswith(".jsonl"):
        return "\n\n".join(read_texts(path))
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{'standard input' if path == STDIN else path} is empty", "Pass a file with some text.")
    return text


# ---------------------------------------------------------------- training data

# Preference formats first: their records also hold a prompt (and a completion), so they must be
# recognised before prompt-completion (TRL's "preference" and "unpaired preference" formats)
TRAINING_FORMATS = {"preference": ("prompt", "chosen", "rejected"), "unpaired-preference": ("prompt", "completion", "label"),
                    "text": ("text",), "prompt-completion": ("prompt", "completion"), "chat": ("messages",),
                    "prompt-only": ("prompt",)}
TRAINING_HINT = 'Use {"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [...]} on every line.'
PREFERENCE_HINT = ('Use {"prompt": ..., "chosen": ..., "rejected": ...} on every line (strings, or a list of '
                   'messages for prompt and lists of assistant messages for chosen and rejected).')
UNPAIRED_HINT = 'Use {"prompt": ..., "completion": ..., "label": true|false} on every line.'
PROMPT_HINT = 'Use {"prompt": ..., ...} on every line: a string or a list of messages, other fields go to the rewards.'


def record_format(record: dict[str, Any]) -> str | None:
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "label" in record and ("prompt" in record or "completion" in record):
        return "unpaired-preference"
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt-completion"
    if "text" in record:
        return "text"
    if "prompt" in record:
        return "prompt-only"
    return None


def check_training_record(record: dict[str, Any], expected: str, where: str) -> dict[str, Any]:
    """The record's fields for `expected` format, or a DataError naming the line."""
    found = record_format(record)
    if found is None or found == "prompt-only":  # a prompt alone is GRPO's format, read by check_prompt_record
        raise DataError(f"{where}: no 'text', 'prompt'/'completion' or 'messages' field "
                        f"(keys: {', '.join(sorted(record)) or 'none'})", TRAINING_HINT)
    if found != expected:
        raise DataError(f"{where}: a {found} record in a {expected} file (formats must not be mixed; "
                        "the first record sets the format)", TRAINING_HINT)
    if expected in ("preference", "unpaired-preference"):
        return check_preference_record(record, expected, where)
    if expected == "chat":
        return {"messages": parse_messages(record["messages"], where)}
    for key in TRAINING_FORMATS[expected]:
        if not isinstance(record[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}", TRAINING_HINT)
    if not "".join(record[key] for key in TRAINING_FORMATS[expected]).strip():
        raise DataError(f"{where}: empty {expected} record", "Remove the line or fill it in.")
    return {key: record[key] for key in TRAINING_FORMATS[expected]}


def check_preference_record(record: dict[str, Any], expected: str, where: str) -> dict[str, Any]:
    """prompt/chosen/rejected (or prompt/completion/label): all strings, or all chat messages (TRL's
    conversational form: the prompt a list of messages, the answers lists of assistant messages)."""
    hint = PREFERENCE_HINT if expected == "preference" else UNPAIRED_HINT
    texts = ("prompt", "chosen", "rejected") if expected == "preference" else ("prompt", "completion")
    for key in TRAINING_FORMATS[expected]:
        if key not in record:
            raise DataError(f"{where}: no '{key}' field (keys: {', '.join(sorted(record))})", hint)
    conversational = isinstance(record["prompt"], list)
    checked: dict[str, Any] = {}
    for key in texts:
        value = record[key]
        if conversational:
            if not isinstance(value, list):
                raise DataError(f"{where}: 'prompt' is a list of messages but '{key}' is a "
                                f"{type(value).__name__}", hint)
            checked[key] = parse_messages(value, f"{where} '{key}'")
        elif not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}",
                            hint)
        elif not value.strip() and key != "prompt":
            raise DataError(f"{where}: empty '{key}'", "Remove the line or fill it in.")
        else:
            checked[key] = value
    if expected == "preference" and checked["chosen"] == checked["rejected"]:
        raise DataError(f"{where}: 'chosen' equals 'rejected', so the record prefers nothing",
                        "Remove the line or give it two different answers.")
    if expected == "unpaired-preference":
        if not isinstance(record["label"], bool):
            raise DataError(f"{where}: 'label' must be true or false, got {json.dumps(record['label'])[:40]}", hint)
        checked["label"] = record["label"]
    return checked


def check_prompt_record(record: dict[str, Any], where: str) -> dict[str, Any]:
    """A GRPO record: a `prompt` (a non-empty string, or chat messages); its other fields, whatever they hold,
    are kept for the reward functions (TRL's prompt-only format)."""
    if "prompt" not in record:
        raise DataError(f"{where}: no 'prompt' field (keys: {', '.join(sorted(record)) or 'none'})", PROMPT_HINT)
    prompt = record["prompt"]
    if isinstance(prompt, list):
        return {**record, "prompt": parse_messages(prompt, f"{where} 'prompt'")}
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: 'prompt' must be a non-empty string or a list of messages, got "
                        f"{json.dumps(prompt)[:40]}", PROMPT_HINT)
    return record


def jsonl_records(path: str, prompts_only: bool = False) -> tuple[str, list[dict[str, Any]]]:
    name, lines, _ = numbered_lines(path, "records")
    records, expected = [], "prompt-only" if prompts_only else None
    for n, line in lines:
        where = f"{name} line {n}"
        record = parse_json_object(line, where, '{"text": "..."}')
        expected = expected or record_format(record) or "text"
        records.append(check_prompt_record(record, where) if expected == "prompt-only"
                       else check_training_record(record, expected, where))
        # one column type per field (a datasets.Dataset needs it): chat or strings, like the first record
        if "prompt" in records[-1] and isinstance(records[-1]["prompt"], list) != isinstance(records[0]["prompt"], list):
            raise DataError(f"{where}: a {'chat' if isinstance(records[-1]['prompt'], list) else 'string'} record "
                            "among records of the other kind", "Use chat messages on every line, or strings on every line.")
    return expected, records


def prompt_dataset(records: list[dict[str, Any]], path: str) -> Any:
    import datasets
    import pyarrow

    try:
        return datasets.Dataset.from_list(records)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as exc:
        raise DataError(f"{path}: a field holds values of different types on different lines ({exc})",
                        "Give each field one type on every line (e.g. all numbers or all strings).") from exc


def text_records(path: str, line_by_line: bool) -> list[dict[str, Any]]:
    text = read_text(path)
    blocks = text.splitlines() if line_by_line else re.split(r"\n\s*\n", text)
    records = [{"text": block.strip("\n")} for block in blocks if block.strip()]
    if not records:
        raise DataError(f"{path} contains no text", "Pass a file with some text.")
    return records


def csv_records(path: str, text_column: str) -> list[dict[str, Any]]:
    import csv
    import io

    reader = csv.DictReader(io.StringIO(read_text(path)))
    if text_column not in (reader.fieldnames or []):
        raise DataError(f"{path} has no column {text_column!r} (columns: {', '.join(reader.fieldnames or [])})",
                        "Name the column with --text-column.")
    records = []
    for row in reader:
        value = row[text_column]
        if value is None:
            raise DataError(f"{path} line {reader.line_num}: missing {text_column!r} value", "Fix the row.")
        if value.strip():
            records.append({"text": value})
    if not records:
        raise DataError(f"{path} has no non-empty {text_column!r} values", "Pass a file with some text.")
    return records


def saved_dataset_records(path: str) -> tuple[str, Any]:
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path} is a directory but not a dataset saved with save_to_disk ({exc})",
                        "Pass a JSONL, .txt or .csv file, or a save_to_disk directory.") from exc
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{path} holds splits {list(dataset)} but no 'train'", "Save the train split.")
        dataset = dataset["train"]
    for format_name, columns in TRAINING_FORMATS.items():  # preference formats are tried first
        if all(c in dataset.column_names for c in columns) and format_name not in ("text", "prompt-only"):
            return format_name, dataset.select_columns(list(columns))
    if "text" in dataset.column_names:
        return "text", dataset.select_columns(["text"])
    raise DataError(f"{path} has columns {dataset.column_names}, none of text/prompt+completion/messages",
                    TRAINING_HINT)


def load_training_data(path: str, text_column: str = "text", line_by_line: bool = False,
                       prompts_only: bool = False) -> tuple[str, Any]:
    """A training file as (format, datasets.Dataset). Format: text, prompt-completion, chat, the preference
    formats, or prompt-only (GRPO's; `prompts_only` reads every record so, whatever other fields it has)."""
    import datasets

    file = Path(path)
    if path != STDIN and file.is_dir():
        return saved_dataset_records(path)
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        data_format, records = jsonl_records(path, prompts_only)
        if data_format == "prompt-only":
            return data_format, prompt_dataset(records, path)
    elif suffix == ".csv":
        data_format, records = "text", csv_records(path, text_column)
    else:
        data_format, records = "text", text_records(path, line_by_line)
    return data_format, datasets.Dataset.from_list(records)
