"""GRPO's rewards (llmcli/tasks/rewards.py): each built-in on hand-made completions, a user's function
called exactly as TRL 1.16's GRPOTrainer calls it, None as NaN, the weighted total, and every bad spec
or bad function as one error line before (or instead of) training."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmcli.errors import DataError, LlmcliError, UsageError
from llmcli.tasks.rewards import load_rewards

ROOT = Path(__file__).resolve().parent.parent


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def scores(spec: str, completions: list, records: list[dict] | None = None,
           completion_ids: list[list[int]] | None = None) -> list[float]:
    """One reward's column over the completions (one record each, `answer` 0 unless given)."""
    records = records or [{"prompt": "p", "answer": 0} for _ in completions]
    rewards = load_rewards([spec], None, list(records[0]))
    ids = completion_ids or [[1] for _ in completions]
    table = rewards.score([r["prompt"] for r in records], completions, ids, records)
    assert table.dtype == torch.float32 and table.shape == (len(completions), 1)
    return table[:, 0].tolist()


def one_line_error(kind: type[LlmcliError], specs: list[str], fragments: tuple[str, ...],
                   weights: list[float] | None = None, columns: tuple[str, ...] = ("prompt", "answer")) -> None:
    with pytest.raises(kind) as caught:
        load_rewards(specs, weights, list(columns))
    assert_one_line(caught.value, fragments)


def assert_one_line(error: LlmcliError, fragments: tuple[str, ...]) -> None:
    assert "\n" not in error.message and "\n" not in (error.hint or ""), error.message
    for fragment in fragments:
        assert fragment in error.message, (fragment, error.message)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- built-ins ---------------------------------------------------------------------------------

def test_regex_searches_the_completion_text_in_either_form():
    completions = ["The answer is 42", "no digits", "42 first", "line one\nAnswer: 7"]
    assert scores(r"regex:\d+$", completions) == [1.0, 0.0, 0.0, 1.0]
    assert scores(r"regex:\d+$", [chat(c) for c in completions]) == [1.0, 0.0, 0.0, 1.0]
    assert scores(r"regex:(?s)^The.*42$", completions) == [1.0, 0.0, 0.0, 0.0]


def test_json_schema_accepts_valid_json_and_a_fenced_block(tmp_path):
    schema = write(tmp_path / "schema.json", json.dumps({
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"]}))
    completions = [' {"name": "Ada", "age": 36}\n', '```json\n{"name": "Ada", "age": 36}\n```',
                   '{"name": "Ada", "age": "36"}', '{"name": "Ada"}', 'Sure! {"name": "Ada", "age": 36}',
                   '{"name": "Ada", "age": NaN}', "not json"]
    assert scores(f"json-schema:{schema}", completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert scores(f"json-schema:{schema}", [chat(c) for c in completions[:3]]) == [1.0, 1.0, 0.0]


def test_exact_match_compares_with_a_record_field_stripped():
    records = [{"prompt": "p", "answer": "Paris", "city": 42}, {"prompt": "p", "answer": "Paris", "city": 42},
               {"prompt": "p", "answer": None, "city": 42}]
    completions = ["  Paris\n", "paris", "Paris"]
    assert scores("exact-match", completions, records)[:2] == [1.0, 0.0]
    assert math.isnan(scores("exact-match", completions, records)[2])  # no answer to check: None
    assert scores("exact-match:city", ["42", chat(" 42 "), "4"], records) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("text, reward", [
    ("5 + 3 = 8", 1.0), ("8 at first, then 9", 0.0), ("it is -8", 0.0), ("1,234 apples, no: 8.0000001", 1.0),
    ("no number", 0.0), ("Between 2024-05 and 8", 1.0), ("8", 1.0),
])
def test_number_match_reads_the_last_number(text, reward):
    assert scores("number-match", [text, chat(text)], [{"prompt": "p", "answer": 8}] * 2) == [reward, reward]


def test_number_match_parses_negatives_decimals_thousands_and_a_tolerance():
    records = [{"prompt": "p", "answer": "-1,234.5", "gold": 3.14}] * 4
    assert scores("number-match", ["so: -1,234.5", "-1234.5", "1,234.5", "-1234.4"], records) == [1.0, 1.0, 0.0, 0.0]
    assert scores("number-match:gold:0.01", ["3.14159", "3.15", "pi is 3.1", "3.1415 and 3"], records) == \
        [1.0, 1.0, 0.0, 0.0]


def test_number_match_names_the_record_whose_answer_is_not_a_number():
    records = [{"prompt": "p", "answer": 1, "_index": 10}, {"prompt": "p", "answer": "one", "_index": 11}]
    rewards = load_rewards(["number-match"], None, ["prompt", "answer", "_index"])
    with pytest.raises(DataError) as caught:
        rewards.score(["p", "p"], ["1", "1"], [[1], [1]], records)
    assert_one_line(caught.value, ("reward number-match on record 11", "'answer'", "'one'", "not a number"))


def test_length_counts_completion_tokens():
    ids = [[1] * 2, [1] * 3, [1] * 5, [1] * 6, []]
    assert scores("length:3-5", ["x"] * 5, completion_ids=ids) == [0.0, 1.0, 1.0, 0.0, 0.0]


# --- user functions --------------------------------------------------------------------------

USER_FILE = '''
calls = []

def my_reward(prompts, completions, completion_ids, **kwargs):
    calls.append(dict(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
    return [float(len(ids)) if "skip" not in kwargs["answer"][i] else None for i, ids in enumerate(completion_ids)]
'''


def test_a_user_function_gets_what_trl_passes(tmp_path):
    """The same function, called by TRL's own `GRPOTrainer._calculate_rewards` on a stand-in trainer and by
    llmcli, receives the same arguments and gives the same table (NaN for None)."""
    from types import SimpleNamespace

    from accelerate import PartialState
    from trl.trainer.grpo_trainer import GRPOTrainer

    file = write(tmp_path / "user_rewards.py", USER_FILE)
    records = [{"prompt": [{"role": "user", "content": "hi"}], "answer": "a", "level": 3},
               {"prompt": [{"role": "user", "content": "ho"}], "answer": "skip", "level": 1}]
    prompts = [r["prompt"] for r in records]
    completions, ids = [chat("one"), chat("two three")], [[5], [6, 7]]

    rewards = load_rewards([f"{file}:my_reward"], None, ["prompt", "answer", "level", "_index"])
    ours = rewards.score(prompts, completions, ids, [{**r, "_index": i} for i, r in enumerate(records)])
    calls = rewards.rewards[0].function.__globals__["calls"]
    received = calls.pop()

    PartialState()  # TRL logs through accelerate, which needs its state
    theirs_function = rewards.rewards[0].function  # the same function object, now called by TRL
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", is_main_process=True), args=SimpleNamespace(report_to=[]),
        state=SimpleNamespace(global_step=0), reward_funcs=[theirs_function], reward_processing_classes=[None],
        reward_func_names=["my_reward"], environments=None, _log_completion_extra=lambda column, values: None,
        _log_metric=lambda name, value: None)
    theirs = GRPOTrainer._calculate_rewards(trainer, records, prompts, completions, ids)
    expected = calls.pop()

    assert sorted(received) == sorted(expected)  # the same names: TRL's callbacks and state included
    for key in ("prompts", "completions", "completion_ids", "answer", "level"):
        assert received[key] == expected[key], key
    assert received["trainer_state"] is None
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours[0, 0] == theirs[0, 0] == 1.0
    assert rewards.names == ("my_reward",)


def test_none_is_nan_and_the_total_is_a_weighted_nansum(tmp_path):
    file = write(tmp_path / "r.py", "def maybe(completions, **kw):\n"
                                    "    return [None if c == 'x' else 2.0 for c in completions]\n")
    rewards = load_rewards([f"{file}:maybe", "regex:x", "regex:y"], [0.5, 3.0, -1.0], ["prompt"])
    table = rewards.score(["p"] * 3, ["x", "y", "xy"], [[1]] * 3, [{"prompt": "p"}] * 3)
    assert math.isnan(table[0, 0]) and table[1:, 0].tolist() == [2.0, 2.0]
    assert rewards.total(table).tolist() == [3.0, 1.0 - 1.0, 1.0 + 3.0 - 1.0]
    assert rewards.weights == [0.5, 3.0, -1.0]
    assert load_rewards(["regex:x", "regex:y"], None, ["prompt"]).weights == [1.0, 1.0]


def test_names_are_metric_safe_and_unique(tmp_path):
    file = write(tmp_path / "r.py", "import functools\n"
                                    "def judge(completions, **kw):\n    return [0.0] * len(completions)\n"
                                    "strict = functools.partial(judge)\n")
    rewards = load_rewards(["json-schema:" + str(write(tmp_path / "s.json", "{}")), "regex:a", "regex:b",
                            f"{file}:judge", f"{file}:strict", "number-match", "length:1-2", "exact-match"],
                           None, ["prompt", "answer"])
    assert rewards.names == ("json_schema", "regex", "regex_2", "judge", "judge_2", "number_match", "length",
                             "exact_match")


def test_private_keys_never_reach_a_user_function(tmp_path):
    file = write(tmp_path / "r.py", "def keys(completions, **kw):\n"
                                    "    assert not any(k.startswith('_') for k in kw), sorted(kw)\n"
                                    "    assert 'prompt' not in kw and 'answer' in kw\n"
                                    "    return [1.0] * len(completions)\n")
    rewards = load_rewards([f"{file}:keys"], None, ["prompt", "answer", "_index", "_source"])
    record = {"prompt": "p", "answer": 1, "_index": 4, "_source": "x"}
    assert rewards.score(["p"], ["c"], [[1]], [record]).tolist() == [[1.0]]


def test_example_rewards_file_scores_string_and_chat_completions():
    example = ROOT / "examples" / "rewards.py"
    rewards = load_rewards([f"{example}:answer_format", f"{example}:correct_answer"], [0.2, 1.0],
                           ["prompt", "answer"])
    records = [{"prompt": "What is 17 + 25?", "answer": 42}] * 4 + [{"prompt": "?", "answer": None}]
    completions = ["17 + 25 = 42.\nAnswer: 42.", "Answer: 41", "It is 42", chat("So,\nanswer: 42 "), "Answer: 1"]
    table = rewards.score([r["prompt"] for r in records], completions, [[1]] * 5, records)
    assert table[:4].tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    assert table[4, 0] == 1.0 and math.isnan(table[4, 1])
    assert torch.allclose(rewards.total(table), torch.tensor([1.2, 0.2, 0.0, 1.2, 0.2]))


def test_example_sums_carry_their_right_answers():
    records = [json.loads(line) for line in (ROOT / "examples" / "sums.jsonl").read_text().splitlines()]
    for record in records:
        question = record["prompt"][0]["content"]
        a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", question).groups())
        assert record["answer"] == a + b, question
    rewards = load_rewards(["number-match", f"{ROOT / 'examples' / 'rewards.py'}:correct_answer"], None,
                           list(records[0]))
    right = [chat(f"{r['answer']}\nAnswer: {r['answer']}") for r in records]
    table = rewards.score([r["prompt"] for r in records], right, [[1]] * len(records), records)
    assert table.eq(1.0).all()


# --- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("specs, weights, kind, fragments", [
    ([], None, UsageError, ("at least one --reward",)),
    (["regex:a", "regex:b"], [1.0], UsageError, ("1 --reward-weights for 2 --reward",)),
    (["regex:a"], [math.nan], UsageError, ("finite",)),
    (["regex:(unclosed"], None, UsageError, ("regex:(unclosed", "bad regular expression")),
    (["regex:"], None, UsageError, ("no pattern",)),
    (["bleu"], None, UsageError, ("--reward bleu: unknown reward",)),
    (["exact-match:gold"], None, UsageError, ("no field 'gold'", "they have: answer")),
    (["exact-match:_index"], None, UsageError, ("no field '_index'",)),
    (["number-match:answer:abc"], None, UsageError, ("tolerance 'abc'",)),
    (["number-match:answer:-1"], None, UsageError, ("tolerance '-1'",)),
    (["number-match:gold:0.1"], None, UsageError, ("no field 'gold'",)),
    (["length:5"], None, UsageError, ("length:5", "MIN-MAX")),
    (["length:9-3"], None, UsageError, ("MIN <= MAX",)),
    (["json-schema:nowhere.json"], None, UsageError, ("no such file nowhere.json",)),
    (["nowhere.py:fn"], None, UsageError, ("nowhere.py:fn", "no such file")),
    (["examples/rewards.py"], None, UsageError, ("which function",)),
])
def test_bad_specs_are_one_line_errors(specs, weights, kind, fragments):
    one_line_error(kind, specs, fragments, weights)


def test_bad_schema_and_bad_reward_files(tmp_path):
    not_json = write(tmp_path / "broken.json", "{")
    one_line_error(DataError, [f"json-schema:{not_json}"], ("broken.json is not a valid JSON schema",))
    bad_schema = write(tmp_path / "bad.json", '{"type": "no-such-type"}')
    one_line_error(DataError, [f"json-schema:{bad_schema}"], ("bad.json is not a valid JSON schema",))
    number = write(tmp_path / "number.json", "5")
    one_line_error(DataError, [f"json-schema:{number}"], ("number.json is not a valid JSON schema", "not int"))
    syntax = write(tmp_path / "syntax.py", "def f(:\n    pass\n")
    one_line_error(DataError, [f"{syntax}:f"], ("syntax.py line 1",))
    imports = write(tmp_path / "imports.py", "import no_such_module_here\n")
    one_line_error(DataError, [f"{imports}:f"], ("ModuleNotFoundError", "no_such_module_here"))
    good = write(tmp_path / "good.py", "LIMIT = 3\ndef fine(completions, **kw):\n    return [0.0]\n")
    one_line_error(UsageError, [f"{good}:missing"], ("has no 'missing'",))
    with pytest.raises(UsageError) as caught:
        load_rewards([f"{good}:missing"], None, ["prompt"])
    assert "fine" in caught.value.hint
    one_line_error(UsageError, [f"{good}:LIMIT"], ("'LIMIT'", "int, not a function"))


def test_json_schema_without_jsonschema_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # as if not installed
    schema = write(tmp_path / "s.json", "{}")
    with pytest.raises(UsageError) as caught:
        load_rewards([f"json-schema:{schema}"], None, ["prompt"])
    assert_one_line(caught.value, ("needs the jsonschema package",))
    assert "llmcli[rewards]" in caught.value.hint


RAISES = '''
def picky(completions, **kwargs):
    for c in completions:
        if "bad" in c:
            raise ValueError("cannot score\\n" + c)
    return [1.0] * len(completions)

def batch_only(completions, **kwargs):
    if len(completions) > 1:
        raise RuntimeError("too many")
    return [1.0]
'''


def test_a_raising_function_is_reported_with_the_first_record_it_fails_on(tmp_path):
    file = write(tmp_path / "raises.py", RAISES)
    records = [{"prompt": "p", "_index": n} for n in (20, 21, 22, 23)]
    rewards = load_rewards([f"{file}:picky"], None, ["prompt", "_index"])
    with pytest.raises(DataError) as caught:
        rewards.score(["p"] * 4, ["ok", "ok", "bad one", "bad two"], [[1]] * 4, records)
    assert_one_line(caught.value, (f"reward {file}:picky raised ValueError: cannot score bad one on record 22",))
    assert isinstance(caught.value.__cause__, ValueError)  # --debug's traceback shows the function's own
    without_index = [{"prompt": "p"}] * 4
    with pytest.raises(DataError) as caught:
        rewards.score(["p"] * 4, ["ok", "bad", "ok", "ok"], [[1]] * 4, without_index)
    assert_one_line(caught.value, ("on record 1",))
    batch = load_rewards([f"{file}:batch_only"], None, ["prompt"])
    with pytest.raises(DataError) as caught:
        batch.score(["p"] * 2, ["a", "b"], [[1]] * 2, without_index[:2])
    assert_one_line(caught.value, ("raised RuntimeError: too many", "no single record"))


@pytest.mark.parametrize("body, fragments", [
    ("return 1.0", ("returned float 1.0", "not a list")),
    ("return {'a': 1.0}", ("returned dict",)),
    ("return [1.0]", ("returned 1 values for 2 completions",)),
    ("return [1.0, 'high']", ("returned str 'high' for record 1",)),
    ("return [1.0, float('inf')]", ("returned float inf for record 1",)),
])
def test_a_function_returning_other_than_numbers_is_named(body, fragments, tmp_path):
    file = write(tmp_path / "returns.py", f"def odd(completions, **kwargs):\n    {body}\n")
    rewards = load_rewards([f"{file}:odd"], None, ["prompt"])
    with pytest.raises(DataError) as caught:
        rewards.score(["p"] * 2, ["a", "b"], [[1]] * 2, [{"prompt": "p"}] * 2)
    assert_one_line(caught.value, (f"reward {file}:odd", *fragments))


def test_arrays_tuples_and_async_functions_are_accepted(tmp_path):
    file = write(tmp_path / "forms.py", "import numpy, torch\n"
                                       "def array(completions, **kw):\n    return numpy.array([1, 0.5])\n"
                                       "def pair(completions, **kw):\n    return (True, None)\n"
                                       "async def later(completions, **kw):\n    return [0.25, 0.75]\n"
                                       "def scalars(completions, **kw):\n"
                                       "    return [torch.tensor(2.0), numpy.float32(3.0)]\n")
    specs = [f"{file}:{name}" for name in ("array", "pair", "later", "scalars")]
    table = load_rewards(specs, None, ["prompt"]).score(["p"] * 2, ["a", "b"], [[1]] * 2, [{"prompt": "p"}] * 2)
    assert table[:, 0].tolist() == [1.0, 0.5] and table[0, 1] == 1.0 and math.isnan(table[1, 1])
    assert table[:, 2].tolist() == [0.25, 0.75] and table[:, 3].tolist() == [2.0, 3.0]


def test_metrics_a_function_logs_are_kept_for_the_caller(tmp_path):
    file = write(tmp_path / "logs.py", "def logs(completions, log_metric, log_extra, **kw):\n"
                                       "    log_metric('share_long', 0.5)\n"
                                       "    log_extra('note', ['x'] * len(completions))\n"
                                       "    return [1.0] * len(completions)\n")
    rewards = load_rewards([f"{file}:logs"], None, ["prompt"])
    for _ in range(2):
        rewards.score(["p"], ["a"], [[1]], [{"prompt": "p"}])
    assert rewards.logged_metrics == {"share_long": [0.5, 0.5]}


def test_checking_specs_imports_no_torch():
    """`finetune` can check every --reward before it loads torch and the model (a typo costs no wait)."""
    code = ("import sys; from llmcli.tasks.rewards import load_rewards; "
            "load_rewards(['regex:a', 'number-match', 'length:1-3', 'examples/rewards.py:answer_format'], None, "
            "['prompt', 'answer']); print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
