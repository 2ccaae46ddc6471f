"""Structured output: a JSON schema, a regex, a Lark grammar or a choice of strings, compiled by
llguidance into one matcher per sequence. Before each sampling step the matcher's token mask sets the
disallowed tokens' logits to -inf, so among the allowed tokens the model's distribution (and the
sampler chain after it) is unchanged; the sampled token then advances the matcher.

llguidance was chosen over xgrammar (which pulls torch, transformers and triton: the llama.cpp path
must import neither) and outlines-core (regex and FSMs only, no Lark grammars): it has no
dependencies, builds its tokenizer from a llama.cpp vocab or a Hugging Face fast tokenizer, and fills
a NumPy bitmask. The llama.cpp engine masks the row llama.cpp samples from; the hf engine masks in a
logits processor that transformers runs before its sampling warpers (temperature, top-k, top-p).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmcli.errors import UsageError

ANY_JSON_OBJECT = '{"type": "object"}'
# JSON output is bounded by default where a sampler could otherwise loop up to max_tokens: a string
# without maxLength (or enum, const, format, pattern) gets this maxLength, which a schema lifts by
# giving its own; a number never gets more digits than a double needs (17 significant, 3 of exponent)
DEFAULT_STRING_LENGTH = 1000
NUMBER_DIGITS, EXPONENT_DIGITS = 17, 3


@dataclass(frozen=True)
class Constraint:
    kind: str  # "schema" | "regex" | "grammar" | "choice"
    text: str  # the schema's JSON, the regex, the Lark grammar, or the choices one per line
    # true of the text so far when it should end now (EOS next), though the grammar would go on: the
    # tool layer's repeated call. A hashable callable (a frozen dataclass), as constraints are dict keys.
    ends: Callable[[str], bool] | None = None

    def grammar(self) -> str:
        """llguidance's grammar for it (not yet checked: `compile_grammar` does that)."""
        from llguidance import LLMatcher

        if self.kind == "schema":
            # compact JSON: no run of whitespace a sampler could loop in up to max_tokens
            schema = json.dumps(bounded_strings(json.loads(self.text)))
            return LLMatcher.grammar_from_json_schema(ascii_patterns(schema), defaults={"whitespace_flexible": False})
        if self.kind == "grammar":
            return LLMatcher.grammar_from_lark(self.text)
        if self.kind == "choice":
            return LLMatcher.grammar_from_regex("|".join(f"({re.escape(c)})" for c in self.text.split("\n")))
        return LLMatcher.grammar_from_regex(ascii_classes(self.text))


def bounded_strings(schema: Any) -> Any:
    """The schema with DEFAULT_STRING_LENGTH as the maxLength of every free string in it."""
    if isinstance(schema, list):
        return [bounded_strings(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    bounded = {key: bounded_strings(value) for key, value in schema.items()
               if key not in ("enum", "const", "default", "examples")}
    bounded.update({key: schema[key] for key in ("enum", "const", "default", "examples") if key in schema})
    kind = schema.get("type")
    is_string = kind == "string" or (isinstance(kind, list) and "string" in kind)
    if is_string and not any(key in schema for key in ("maxLength", "enum", "const", "format", "pattern")):
        bounded["maxLength"] = DEFAULT_STRING_LENGTH
    return bounded


def closed_objects(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties and
    says nothing of others, as OpenAI's strict mode has it: a small model otherwise fills an object with
    keys copied from the schema itself (seen on the embedded model). Everything it allows is valid for
    the schema as given."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: value if key in ("enum", "const", "default", "examples") else closed_objects(value)
              for key, value in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        closed["additionalProperties"] = False
    return closed


# Python's `re.ASCII` classes: the regex library under llguidance (Rust's) reads \d, \w and \s as Unicode
# classes, so `\d{4}` let the embedded model write four U+1FBF8 (a segmented digit 8). Inside a class
# the negated ones nest as classes, which Rust's syntax allows.
ASCII_CLASSES = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\x0B\\f\\r "}


def ascii_classes(regex: str) -> str:
    """The regex with \\d, \\w, \\s (and \\D, \\W, \\S) meaning ASCII digits, word characters and
    whitespace, in and out of [classes]; \\p{Nd} and the like still name Unicode classes."""
    out, depth, at = [], 0, 0
    while at < len(regex):
        char = regex[at]
        if char == "\\" and at + 1 < len(regex):
            escaped = regex[at + 1]
            members = ASCII_CLASSES.get(escaped.lower())
            if members is None:
                out.append(regex[at:at + 2])
            elif escaped.islower():
                out.append(members if depth else f"[{members}]")
            else:
                out.append(f"[^{members}]")
            at += 2
            continue
        if char == "[":
            depth += 1
            out.append(char)
            at += 1
            if regex.startswith("^", at):
                out.append("^")
                at += 1
            if regex.startswith("]", at):  # a `]` first in a class is one of its members
                out.append("]")
                at += 1
            continue
        if char == "]" and depth:
            depth -= 1
        out.append(char)
        at += 1
    return "".join(out)


def ascii_patterns(schema: str) -> str:
    """A JSON schema's text with `ascii_classes` applied to its patterns (`pattern`, and the keys of
    `patternProperties`)."""
    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key in ("enum", "const", "default", "examples"):
                out[key] = value
            elif key == "pattern" and isinstance(value, str):
                out[key] = ascii_classes(value)
            elif key == "patternProperties" and isinstance(value, dict):
                out[key] = {ascii_classes(pattern): walk(item) for pattern, item in value.items()}
            else:
                out[key] = walk(value)
        return out

    return json.dumps(walk(json.loads(schema)))


def constraint_from_options(schema: str | None, regex: str | None, grammar: str | None,
                            choices: list[str] | None) -> Constraint | None:
    """The command line's constraint: `--schema FILE|JSON|json`, `--regex`, `--grammar FILE`,
    `--choice` (repeatable); at most one kind."""
    given = [name for name, value in (("--schema", schema), ("--regex", regex), ("--grammar", grammar),
                                      ("--choice", choices)) if value]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} are two constraints", "Pass one of them.")
    if schema:
        return Constraint("schema", read_schema(schema))
    if regex:
        return Constraint("regex", regex)
    if grammar:
        return Constraint("grammar", read_file(grammar, "--grammar"))
    if choices:
        if any(not c or "\n" in c for c in choices):
            raise UsageError("--choice takes non-empty strings of one line")
        return Constraint("choice", "\n".join(choices))
    return None


CHECK_HINTS = {  # what to look at after a constraint fails to compile, by its kind
    "schema": "Check it; an unsupported JSON-schema keyword is named in the message.",
    "regex": "Check the regular expression (Rust regex syntax: no look-around or backreferences).",
    "grammar": "Check the Lark grammar at the place the message names.",
}


def read_schema(value: str) -> str:
    """`json` (any JSON object), inline JSON, or a file of it; checked to be a JSON object."""
    if value == "json":
        return ANY_JSON_OBJECT
    text = value if value.lstrip()[:1] in ("{", "[") else read_file(value, "--schema")  # inline JSON, or a file
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--schema is not valid JSON: {exc}", "Pass a JSON schema (a file or inline), or json.") from exc
    if not isinstance(schema, dict):
        raise UsageError("--schema must be a JSON object (a JSON schema)", 'For any JSON object pass: --schema json')
    return json.dumps(schema)


def read_file(path: str, option: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{option} {path}: no such file", "Check the path.")
    return file.read_text(encoding="utf-8")


def compile_grammar(constraint: Constraint, tokenizer: Any) -> str:
    """The checked grammar; an error (a keyword the library does not support, a regex that does not
    compile, a grammar with a syntax error) is one UsageError naming it."""
    from llguidance import LLMatcher

    try:
        grammar = constraint.grammar()
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"the {constraint.kind} cannot be compiled: {exc}") from exc
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        # llguidance's message draws the place over several lines: one line here, as every error is
        raise UsageError(f"the {constraint.kind} cannot be compiled: {' '.join(messages[0].split())}",
                         CHECK_HINTS.get(constraint.kind, "Check it."))
    return grammar


class Constraints:
    """One engine's constraint machinery: llguidance's tokenizer of its vocabulary, built on first use
    (0.5-1 s), and each constraint's grammar compiled once; `seconds` is the time both took."""

    def __init__(self, make_tokenizer: Callable[[], Any], n_vocab: int) -> None:
        self.make_tokenizer, self.n_vocab = make_tokenizer, n_vocab
        self.tokenizer: Any = None
        self.digits: NumberDigits | None = None  # for JSON's digit bound, built with the first schema
        self.grammars: dict[Constraint, str] = {}
        self.seconds = 0.0

    def compile(self, constraint: Constraint | None) -> str | None:
        """The constraint's checked grammar, compiled on first use (an error is a UsageError)."""
        if constraint is None:
            return None
        if constraint not in self.grammars:
            began = time.perf_counter()
            if self.tokenizer is None:
                self.tokenizer = self.make_tokenizer()
            self.grammars[constraint] = compile_grammar(constraint, self.tokenizer)
            if constraint.kind == "schema":
                self.number_digits()  # built once per engine (0.1 s for 49152 tokens), before decoding starts
            self.seconds += time.perf_counter() - began
        return self.grammars[constraint]

    def matcher(self, constraint: Constraint | None) -> Matcher | None:
        """A fresh matcher for one sequence, or None without a constraint."""
        grammar = self.compile(constraint)
        if grammar is None:
            return None
        numbers = self.number_digits() if constraint.kind == "schema" else None
        return Matcher(self.tokenizer, grammar, self.n_vocab, numbers, constraint.ends)

    def number_digits(self) -> NumberDigits:
        if self.digits is None:
            self.digits = NumberDigits(self.tokenizer, self.n_vocab)
        return self.digits


class NumberDigits:
    """What each token would add to a JSON number, for the digit bound: the digits at its start (after
    a leading '.'), and whether it starts with '.' (a fraction, which needs at least one digit more)."""

    def __init__(self, tokenizer: Any, n_vocab: int) -> None:
        import numpy

        self.tokenizer = tokenizer
        self.leading = numpy.zeros(n_vocab, dtype=numpy.int32)
        self.dot = numpy.zeros(n_vocab, dtype=bool)
        for token in range(min(n_vocab, tokenizer.vocab_size)):
            text = tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")
            self.dot[token] = text.startswith(".")
            digits = re.match(r"\.?([0-9]*)", text).group(1)
            self.leading[token] = len(digits)

    def text(self, token: int) -> str:
        return self.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")


class NumberState:
    """Where the JSON text so far stands: inside a string, or inside a number with how many digits of
    mantissa and exponent it has."""

    def __init__(self) -> None:
        self.in_string = self.escaped = self.in_number = self.in_exponent = False
        self.mantissa = self.exponent = 0

    def follow(self, text: str) -> None:
        for ch in text:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch.isdigit():
                self.in_number = True
                if self.in_exponent:
                    self.exponent += 1
                else:
                    self.mantissa += 1
            elif ch in "eE" and self.in_number:
                self.in_exponent = True
            elif ch == "." and self.in_number or ch in "+-" and self.in_exponent:
                pass
            else:
                self.in_exponent, self.mantissa, self.exponent = False, 0, 0
                self.in_number = ch == "-"  # a number's sign
                self.in_string = ch == '"'

    def room(self) -> int | None:
        """How many more digits the number may take: None inside a string, NUMBER_DIGITS before a number."""
        if self.in_string:
            return None
        if self.in_exponent:
            return EXPONENT_DIGITS - self.exponent
        return NUMBER_DIGITS - self.mantissa if self.in_number else NUMBER_DIGITS


class Matcher:
    """One sequence's constraint state: masks its logits, then follows the token sampled."""

    def __init__(self, tokenizer: Any, grammar: str, n_vocab: int, numbers: NumberDigits | None = None,
                 ends: Callable[[str], bool] | None = None) -> None:
        import llguidance.numpy as masks
        from llguidance import LLMatcher

        self.masks, self.matcher, self.n_vocab = masks, LLMatcher(tokenizer, grammar, log_level=0), n_vocab
        self.bitmask = masks.allocate_token_bitmask(1, n_vocab)
        self.numbers, self.state = numbers, NumberState()  # JSON: the digit bound
        self.tokenizer, self.ends = tokenizer, ends
        self.text = b""  # what the sequence wrote so far, for `ends`
        self.ending = False  # `ends` said yes: EOS is the one token allowed

    def mask(self, logits: Any) -> None:
        """Disallowed tokens' logits (a writable float32 array of the vocabulary) become -inf."""
        import numpy

        # one unpack and a masked copy: a tenth of the time of llguidance.numpy's shift-and-compare kernel
        numpy.copyto(logits, -numpy.inf, where=~self.allowed())

    def allowed(self) -> Any:
        """The tokens allowed next, as a NumPy bool array over the vocabulary."""
        import numpy

        if self.ending:
            allowed = numpy.zeros(self.n_vocab, dtype=bool)
            allowed[self.tokenizer.eos_token] = True
            return allowed
        self.masks.fill_next_token_bitmask(self.matcher, self.bitmask)
        # bit i of the little-endian 32-bit words is token i
        allowed = numpy.unpackbits(self.bitmask[0].view(numpy.uint8), bitorder="little")[:self.n_vocab].view(bool)
        if self.matcher.is_error() or not allowed.any():  # sampling from nothing would be NaN or token 0
            raise UsageError("the constraint cannot go on in this model's vocabulary: no token spells what it needs "
                             f"next ({self.matcher.get_error() or 'no token allowed'})",
                             "Use characters the model's tokenizer can write, or a byte-level model.")
        room = self.state.room() if self.numbers is not None else None
        if room is not None and room < NUMBER_DIGITS:
            # no digit past the bound, and no '.' once the mantissa is full (a fraction needs a digit)
            bounded = allowed & (self.numbers.leading <= room)
            if not self.state.in_exponent and room == 0:
                bounded &= ~self.numbers.dot
            if bounded.any():  # the grammar always lets a number end; kept as it is if it does not
                allowed = bounded
        return allowed

    def accept(self, token: int, eos: Any, eos_id: int | None, room: int) -> int | None:
        """Follows the sampled token; returns the EOS id to end the sequence with when the constrained
        text is now complete (EOS is the one token its mask allows next: taken without a step), if the
        sequence has `room` for another token and did not just end at EOS."""
        if self.ending:
            return None  # the EOS it was told to take, which the grammar would refuse
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the constraint rejected token {token}: {self.matcher.get_error()}")
        if self.numbers is not None:
            self.state.follow(self.numbers.text(token))
        if self.ends is not None:
            piece = self.tokenizer.decode_bytes([token])
            self.text += piece
            # asked only when a token closes an object: where a tool call can end
            self.ending = b"}" in piece and self.ends(self.text.decode("utf-8", errors="replace"))
            if self.ending and token not in eos and eos_id is not None and room > 0:
                return eos_id
        if self.matcher.is_stopped() and token not in eos and eos_id is not None and room > 0:
            return eos_id
        return None
