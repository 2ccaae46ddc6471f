"""Structured output on the llama.cpp engine: every output of seeded samples validates against its
JSON schema (checked by `jsonschema`, independently of the library that constrains), regexes and
choices hold, a constraint that allows everything changes nothing, and bad constraints are one-line
errors."""

from __future__ import annotations

import json
import re

import pytest

from conftest import run_cli

pytest.importorskip("llama_cpp")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[a-z]{2,6}$"},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                               "minItems": 2, "maxItems": 4}},
     "required": ["colour", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -5, "maximum": 5}, "y": {"type": "boolean"}},
        "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
]


def generate(*args) -> list[dict]:
    result = run_cli("generate", *args, "--engine", "llama.cpp", "--json")
    assert result.exit_code == 0, result.stderr
    return result.json_lines()


@pytest.mark.parametrize("number", range(len(SCHEMAS)))
def test_seeded_samples_validate_against_the_schema(tiny_gguf, number):
    """Three seeded samples of each of two prompts, decoded together: each is complete, valid JSON for
    the schema (nested objects, arrays with minItems, enums, bounded integers, patterns, required,
    additionalProperties: false)."""
    schema = SCHEMAS[number]
    records = generate("This License", "the work", "-m", tiny_gguf, "--schema", json.dumps(schema), "-n", "120",
                       "-t", "3.0", "--seed", "4", "--num-return-sequences", "3")
    assert len(records) == 6
    for record in records:
        assert record["finish_reason"] == "eos", record
        jsonschema.validate(json.loads(record["text"]), schema)
    assert len({r["text"] for r in records}) > 1  # samples, not one forced string


def test_a_regex_and_a_choice_hold(tiny_gguf):
    dates = generate("This License", "-m", tiny_gguf, "--regex", "[0-9]{4}-[0-9]{2}-[0-9]{2}", "-n", "30",
                     "-t", "1.0", "--seed", "1", "--num-return-sequences", "4")
    assert all(re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r["text"]) for r in dates), dates
    picked = generate("This License", "the work", "-m", tiny_gguf, "--choice", "yes", "--choice", "no",
                      "--choice", "maybe so", "-n", "10")
    assert all(r["text"] in ("yes", "no", "maybe so") for r in picked), picked
    [alone] = generate("This License", "-m", tiny_gguf, "--regex", "[0-9]{3}[a-z]", "-n", "10")  # one sequence
    assert re.fullmatch("[0-9]{3}[a-z]", alone["text"]), alone


def test_a_constraint_that_allows_everything_changes_nothing(tiny_gguf):
    """The mask only removes tokens: with a regex any text matches, greedy output is the unconstrained one."""
    base = ("This License", "-m", tiny_gguf, "--no-chat", "-n", "16")
    free = generate(*base)
    constrained = generate(*base, "--regex", "(?s:.*)")
    assert [r["token_ids"] for r in constrained] == [r["token_ids"] for r in free]


@pytest.mark.parametrize("args, fragment", [
    (["--schema", "{not json"], "--schema is not valid JSON"),
    (["--schema", "[1, 2]"], "--schema must be a JSON object"),
    (["--regex", "(["], "the regex cannot be compiled"),
    (["--regex", "a", "--choice", "b"], "--regex and --choice are two constraints"),
    (["--schema", "missing-schema.json"], "--schema missing-schema.json: no such file"),
])
def test_bad_constraints_are_one_line_errors(tiny_gguf, args, fragment):
    result = run_cli("generate", "hi", "-m", tiny_gguf, *args)
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_hf_engine_refuses_a_constraint_in_one_line(tiny_gpt2):
    result = run_cli("generate", "hi", "-m", tiny_gpt2, "--schema", "json")
    assert result.exit_code == 2 and "run on the llama.cpp engine so far" in result.stderr
