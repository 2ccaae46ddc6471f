"""GRPO's rewards: each `--reward` spec becomes a function that scores completions.

Every reward, built-in or the user's, has the signature TRL 1.16's `GRPOTrainer` calls reward functions
with (`trainer/grpo_trainer.py`, `_calculate_rewards`): `fn(prompts=, completions=, completion_ids=,
**fields, trainer_state=, log_extra=, log_metric=)`, where `fields` are the records' other columns, one
value per completion, and the result is one float (or None: "does not apply") per completion. So a
reward function written for TRL works here unchanged, and `RewardSet.score` is TRL's table of rewards
per function, NaN where a function returned None.

Built-ins: `regex:PATTERN`, `json-schema:FILE`, `exact-match[:FIELD]`, `number-match[:FIELD[:TOL]]`,
`length:MIN-MAX`; a user's: `FILE.py:NAME`. Every problem with a spec is found by `load_rewards`, before
training; a function that raises or returns something else than numbers is reported by `score` with
the record it failed on.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import itertools
import json
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from llmcli.errors import DataError, UsageError

DEFAULT_FIELD = "answer"
DEFAULT_TOLERANCE = 1e-6  # absolute: answers are usually integers, and 1e-6 forgives float printing
NOT_FIELDS = ("prompt", "completion", "completion_ids")  # TRL hands every other column to the functions
INDEX_KEY = "_index"  # the caller's record number, reported in errors; keys starting with _ stay private
SPEC_FORMS = ("regex:PATTERN, json-schema:FILE, exact-match[:FIELD], number-match[:FIELD[:TOL]], "
              "length:MIN-MAX or FILE.py:NAME")

# The last number in a text: an optional minus (not a hyphen between words or digits, as in 2024-05),
# digits with optional thousands separators (1,234,567), an optional decimal part.
NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
FENCED = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?```", re.DOTALL)

RewardFunction = Callable[..., Any]
FILE_NUMBERS = itertools.count()  # user files' module names: two files called rewards.py stay apart


@dataclass(frozen=True)
class Reward:
    spec: str  # as given on the command line, for messages
    name: str  # metric-safe
    function: RewardFunction  # TRL's signature
    trusted: bool  # a built-in: its output needs no checking


class RewardSet:
    """The rewards of one run, in `--reward` order, with their weights."""

    def __init__(self, rewards: list[Reward], weights: list[float]) -> None:
        self.rewards = rewards
        self.names = tuple(reward.name for reward in rewards)
        self.weights = weights
        self.logged_metrics: dict[str, list[float]] = {}  # what user functions gave `log_metric`, for the caller

    def score(self, prompts: list, completions: list, completion_ids: list[list[int]],
              records: list[dict]) -> Any:
        """float32 [N, F]: one row per completion, a column per reward, NaN where a function gave None."""
        import torch

        if not len(prompts) == len(completions) == len(completion_ids) == len(records):
            raise ValueError(f"{len(prompts)} prompts, {len(completions)} completions, {len(completion_ids)} "
                             f"completion_ids and {len(records)} records: give one of each per completion")
        fields = reward_fields(records)
        columns = [self.call(reward, prompts, completions, completion_ids, fields, records)
                   for reward in self.rewards]
        rows = [[math.nan if value is None else float(value) for value in row] for row in zip(*columns)]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(completions), len(self.rewards))

    def total(self, per_function: Any) -> Any:
        """The weighted sum over reward functions, None (NaN) counting as nothing: TRL's `nansum`."""
        import torch

        weights = torch.tensor(self.weights, dtype=per_function.dtype, device=per_function.device)
        return (per_function * weights.unsqueeze(0)).nansum(dim=1)

    def call(self, reward: Reward, prompts: list, completions: list, completion_ids: list[list[int]],
             fields: dict[str, list], records: list[dict]) -> list:
        try:
            values = self.run(reward, prompts, completions, completion_ids, fields)
        except Exception as exc:
            raise failure(reward, exc, self.first_failing(reward, prompts, completions, completion_ids, fields,
                                                          records)) from exc
        return list(values) if reward.trusted else checked_output(reward, values, records)

    def run(self, reward: Reward, prompts: list, completions: list, completion_ids: list[list[int]],
            fields: dict[str, list]) -> Any:
        values = reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids, **fields,
                                 trainer_state=None, log_extra=ignore_extra_columns, log_metric=self.log_metric)
        if inspect.isawaitable(values):  # TRL runs async reward functions too
            values = asyncio.run(resolve(values))
        return values

    def first_failing(self, reward: Reward, prompts: list, completions: list, completion_ids: list[list[int]],
                      fields: dict[str, list], records: list[dict]) -> int | None:
        """The record a failing function fails on alone (None if it fails only on the whole batch)."""
        for i in range(len(completions)):
            try:
                self.run(reward, prompts[i:i + 1], completions[i:i + 1], completion_ids[i:i + 1],
                         {key: values[i:i + 1] for key, values in fields.items()})
            except Exception:
                return record_number(records, i)
        return None

    def log_metric(self, name: str, value: float) -> None:
        self.logged_metrics.setdefault(name, []).append(value)


async def resolve(awaitable: Any) -> Any:
    return await awaitable


def ignore_extra_columns(column: str, values: list) -> None:
    """TRL's `log_extra` adds columns to its completions table; llmcli keeps no such table."""


def record_number(records: list[dict], position: int) -> int:
    return records[position].get(INDEX_KEY, position)


def reward_fields(records: list[dict]) -> dict[str, list]:
    """The columns TRL passes to reward functions, one value per completion (llmcli's private keys left out)."""
    if not records:
        return {}
    keys = [key for key in records[0] if key not in NOT_FIELDS and not key.startswith("_")]
    for position, record in enumerate(records):
        missing = [key for key in keys if key not in record]
        if missing:
            raise DataError(f"record {record_number(records, position)} has no field '{missing[0]}', which the "
                            "first record has", "Give every record the same fields.")
    return {key: [record[key] for record in records] for key in keys}


def failure(reward: Reward, exc: Exception, record: int | None) -> DataError:
    where = f"on record {record}" if record is not None else "on the batch (on no single record alone)"
    if isinstance(exc, DataError):  # a built-in's own message about the data
        return DataError(f"reward {reward.spec} {where}: {exc.message}", exc.hint)
    message = " ".join(str(exc).split())  # one line, however the function formatted it
    return DataError(f"reward {reward.spec} raised {type(exc).__name__}: {message} {where}",
                     "Fix the function or the record; --debug shows the traceback.")


def checked_output(reward: Reward, values: Any, records: list[dict]) -> list:
    """TRL's contract: a list (or tuple, or 1-D array) of one number or None per completion."""
    if hasattr(values, "tolist") and getattr(values, "ndim", None) == 1:  # numpy or torch
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise DataError(f"reward {reward.spec} returned {describe(values)}, not a list of one number per "
                        "completion", "Return a list of floats (or None), one per completion.")
    if len(values) != len(records):
        raise DataError(f"reward {reward.spec} returned {len(values)} values for {len(records)} completions",
                        "Return one float (or None) per completion.")
    values = [value.item() if getattr(value, "ndim", None) == 0 else value for value in values]  # 0-d arrays
    for position, value in enumerate(values):
        if value is not None and not (isinstance(value, numbers.Real) and not math.isinf(value)):
            raise DataError(f"reward {reward.spec} returned {describe(value)} for record "
                            f"{record_number(records, position)}", "Return a finite float, or None where the reward "
                            "does not apply.")
    return values


def describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def load_rewards(specs: list[str], weights: list[float] | None, columns: list[str]) -> RewardSet:
    """The rewards of `--reward` specs and `--reward-weights`, checked against the data's `columns`."""
    if not specs:
        raise UsageError("GRPO needs at least one --reward", f"Pass --reward {SPEC_FORMS}.")
    if weights is None:
        weights = [1.0] * len(specs)
    if len(weights) != len(specs):
        raise UsageError(f"{len(weights)} --reward-weights for {len(specs)} --reward",
                         "Give one weight per --reward, in the same order.")
    if any(not math.isfinite(weight) for weight in weights):
        raise UsageError(f"--reward-weights must be finite numbers, got {list(weights)}")
    fields = [column for column in columns if column not in NOT_FIELDS and not column.startswith("_")]
    rewards, names, modules = [], [], {}
    for spec in specs:
        function, name, trusted = parse_spec(spec, fields, modules)
        names.append(unique_name(metric_name(name), names))
        rewards.append(Reward(spec, names[-1], function, trusted))
    return RewardSet(rewards, list(weights))


def parse_spec(spec: str, fields: list[str], modules: dict[Path, ModuleType]) -> tuple[RewardFunction, str, bool]:
    kind, has_argument, argument = spec.partition(":")
    built_ins = {"regex": regex_reward, "json-schema": json_schema_reward, "exact-match": exact_match_reward,
                "number-match": number_match_reward, "length": length_reward}
    if kind in built_ins:
        return built_ins[kind](spec, argument if has_argument else None, fields), kind, True
    path, _, name = spec.rpartition(":")
    if spec.endswith(".py"):
        raise UsageError(f"--reward {spec}: which function in it?", f"Use --reward {spec}:FUNCTION.")
    if path.endswith(".py"):
        function = user_function(spec, Path(path), name, modules)
        return function, callable_name(function), False
    raise UsageError(f"--reward {spec}: unknown reward", f"Use {SPEC_FORMS}.")


def metric_name(name: str) -> str:
    return re.sub(r"\W", "_", name.replace("-", "_")) or "reward"


def unique_name(name: str, taken: list[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def callable_name(function: Any) -> str:
    """TRL's `get_callable_name`: a partial's function, a function's name, or a callable object's class."""
    while isinstance(function, functools.partial):
        function = function.func
    return getattr(function, "__name__", type(function).__name__)


def user_function(spec: str, path: Path, name: str, modules: dict[Path, ModuleType]) -> RewardFunction:
    if not path.is_file():
        raise UsageError(f"--reward {spec}: no such file {path}", "Check the path.")
    if not name:
        raise UsageError(f"--reward {spec}: no function named", f"Use --reward {path}:FUNCTION.")
    module = modules.get(path.resolve())
    if module is None:
        module = modules[path.resolve()] = import_file(spec, path)
    function = getattr(module, name, None)
    if function is None:
        found = [key for key, value in vars(module).items() if callable(value) and not key.startswith("_")
                 and getattr(value, "__module__", None) == module.__name__]
        raise UsageError(f"--reward {spec}: {path} has no '{name}'",
                         f"Functions there: {', '.join(found)}." if found else "Define it in that file.")
    if not callable(function):
        raise UsageError(f"--reward {spec}: '{name}' in {path} is {type(function).__name__}, not a function",
                         "Name a function.")
    return function


def import_file(spec: str, path: Path) -> ModuleType:
    """Run the user's file as a module of its own, under a name no other module has (the Python docs'
    recipe "importing a source file directly": in sys.modules, so that dataclasses and pickle work)."""
    module_name = f"llmcli_reward_{next(FILE_NUMBERS)}_{metric_name(path.stem)}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = sys.modules[module_name] = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise import_error(spec, path, exc) from exc
    return module


def import_error(spec: str, path: Path, exc: Exception) -> DataError:
    if isinstance(exc, SyntaxError):
        return DataError(f"--reward {spec}: {path} line {exc.lineno}: {exc.msg}", "Fix the file.")
    message = " ".join(str(exc).split())
    return DataError(f"--reward {spec}: importing {path} raised {type(exc).__name__}: {message}",
                     "Fix the file (or install what it imports).")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return completion[-1].get("content") or ""


def field_of(spec: str, field: str | None, fields: list[str]) -> str:
    field = field or DEFAULT_FIELD
    if field not in fields:
        raise UsageError(f"--reward {spec}: the records have no field '{field}'"
                         + (f" (they have: {', '.join(fields)})" if fields else ""),
                         f"Add '{field}' to every record, or name another field.")
    return field


def regex_reward(spec: str, pattern: str | None, fields: list[str]) -> RewardFunction:
    if not pattern:
        raise UsageError(f"--reward {spec}: no pattern", "Use --reward 'regex:PATTERN'.")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--reward {spec}: bad regular expression: {exc}", "Fix the pattern (Python re syntax).") \
            from exc

    def regex(completions: list, **_: Any) -> list[float]:
        return [1.0 if compiled.search(completion_text(c)) else 0.0 for c in completions]

    return regex


def json_schema_reward(spec: str, file: str | None, fields: list[str]) -> RewardFunction:
    try:
        import jsonschema
    except ImportError as exc:
        raise UsageError(f"--reward {spec} needs the jsonschema package",
                         "Install it: pip install 'llmcli[rewards]'.") from exc
    if not file:
        raise UsageError(f"--reward {spec}: no schema file", "Use --reward json-schema:FILE.")
    path = Path(file)
    if not path.is_file():
        raise UsageError(f"--reward {spec}: no such file {path}", "Check the path.")
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"a schema is a JSON object (or true/false), not {type(schema).__name__}")
        validator_class = jsonschema.validators.validator_for(schema)
        validator_class.check_schema(schema)
    except (ValueError, jsonschema.SchemaError) as exc:
        what = getattr(exc, "message", None) or str(exc)
        raise DataError(f"--reward {spec}: {path} is not a valid JSON schema: {' '.join(what.split())}",
                        "Fix the schema.") from exc
    validator = validator_class(schema)

    def json_schema(completions: list, **_: Any) -> list[float]:
        return [1.0 if valid_json(completion_text(c), validator) else 0.0 for c in completions]

    return json_schema


def valid_json(text: str, validator: Any) -> bool:
    """The text, or the one fenced ```json block it is, parses as strict JSON and the schema accepts it."""
    text = text.strip()
    fenced = FENCED.fullmatch(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text, parse_constant=reject_constant)
    except ValueError:
        return False
    return validator.is_valid(value)


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # RFC 8259 has no NaN or Infinity; Python's json would take them


def exact_match_reward(spec: str, field: str | None, fields: list[str]) -> RewardFunction:
    field = field_of(spec, field, fields)

    def exact_match(completions: list, **columns: Any) -> list[float | None]:
        return [None if expected is None else float(completion_text(c).strip() == str(expected).strip())
                for c, expected in zip(completions, columns[field])]

    return exact_match


def number_match_reward(spec: str, argument: str | None, fields: list[str]) -> RewardFunction:
    field, _, tolerance_text = (argument or "").partition(":")
    field = field_of(spec, field, fields)
    tolerance = DEFAULT_TOLERANCE
    if tolerance_text:
        try:
            tolerance = float(tolerance_text)
        except ValueError:
            tolerance = math.nan
        if not tolerance >= 0 or math.isinf(tolerance):
            raise UsageError(f"--reward {spec}: tolerance '{tolerance_text}' is not a number >= 0",
                             "Use --reward number-match:FIELD:TOL, e.g. number-match:answer:0.01.")

    def number_match(completions: list, **columns: Any) -> list[float | None]:
        rewards = []
        for completion, expected in zip(completions, columns[field]):
            target = None if expected is None else number_value(expected, field)
            found = last_number(completion_text(completion))
            rewards.append(None if target is None else float(found is not None and abs(found - target) <= tolerance))
        return rewards

    return number_match


def last_number(text: str) -> float | None:
    numbers_found = NUMBER.findall(text)
    return float(numbers_found[-1].replace(",", "")) if numbers_found else None


def number_value(value: Any, field: str) -> float:
    """A record's expected number: a JSON number, or a string that is one number (1,234 allowed)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
        return float(value.strip().replace(",", ""))
    raise DataError(f"field '{field}' is {describe(value)}, not a number", "Give a number (or null to skip).")


def length_reward(spec: str, bounds: str | None, fields: list[str]) -> RewardFunction:
    match = re.fullmatch(r"(\d+)-(\d+)", bounds or "")
    if not match or int(match[1]) > int(match[2]):
        raise UsageError(f"--reward {spec}: expected length:MIN-MAX with whole numbers MIN <= MAX",
                         "For example --reward length:20-200 (completion tokens).")
    low, high = int(match[1]), int(match[2])

    def length(completion_ids: list[list[int]], **_: Any) -> list[float]:
        return [1.0 if low <= len(ids) <= high else 0.0 for ids in completion_ids]

    return length
