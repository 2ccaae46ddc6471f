"""Bad input: exit 2, one `Error:` line naming the problem (plus an optional hint), no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_cli


def assert_clean_error(result, *fragments: str, code: int = 2) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("Error: "), result.stderr
    assert len(lines) <= 2, result.stderr  # the error, and at most one hint line
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_missing_model_path(tmp_path):
    assert_clean_error(run_cli("generate", "hi", "-m", tmp_path / "nope"), "does not exist")


def test_directory_that_is_not_a_model(tmp_path):
    assert_clean_error(run_cli("generate", "hi", "-m", tmp_path), "without config.json")


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert_clean_error(run_cli("generate", "hi", "-m", path), "not a .gguf model")


def test_gguf_that_is_not_a_model(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"this is not gguf at all" * 10)
    assert_clean_error(run_cli("generate", "hi", "-m", path), "not a GGUF model")


def test_uncached_hub_id_offline():
    assert_clean_error(run_cli("generate", "hi", "-m", "nobody/no-such-model-xyz"),
                       "nobody/no-such-model-xyz", "hub is unreachable")


@pytest.mark.parametrize(
    "options, fragment",
    [
        (["-n", "0"], "--max-new-tokens must be at least 1, got 0"),
        (["-n", "-5"], "--max-new-tokens must be at least 1, got -5"),
        (["-t", "-0.5"], "--temperature must be 0 (greedy) or positive, got -0.5"),
        (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--num-return-sequences", "2"], "needs sampling"),
        (["-n", "abc"], "Input should be a valid integer"),
        (["--no-such-option"], "No such option"),
    ],
)
def test_bad_option_values(tiny_gpt2, options, fragment):
    assert_clean_error(run_cli("generate", "hi", "-m", tiny_gpt2, *options), fragment)


def test_missing_prompt_file(tmp_path):
    assert_clean_error(run_cli("generate", "-f", tmp_path / "missing.txt"), "missing.txt does not exist")


def test_empty_prompt():
    assert_clean_error(run_cli("generate", "  "), "empty prompt")


def test_no_prompt():
    assert_clean_error(run_cli("generate"), "no prompt given")


def test_empty_prompt_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    assert_clean_error(run_cli("generate", "-f", path), "contains no prompts")


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"prompt": "ok"}', '{"prompt": "broken'], "line 2: invalid JSON"),
        (['{"prompt": "ok"}', '["a list"]'], "line 2: expected a JSON object"),
        (['{"prompt": "ok"}', '', '{"text": "wrong field"}'], "line 3: expected a non-empty string 'prompt'"),
        (['{"messages": [{"role": "user"}]}'], "line 1: each message needs string 'role' and 'content'"),
    ],
)
def test_malformed_jsonl_names_the_line(tmp_path, lines, fragment):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert_clean_error(run_cli("generate", "-f", path), f"{path} {fragment}")


def test_binary_and_non_utf8_files(tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"abc\x00def")
    assert_clean_error(run_cli("generate", "-f", binary), "binary file")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    assert_clean_error(run_cli("generate", "-f", latin1), "not valid UTF-8")


def test_prompt_longer_than_context(tiny_gpt2):
    assert_clean_error(run_cli("generate", "word " * 300, "-m", tiny_gpt2, "--no-chat"), "exceeds the model's context")


def test_chat_messages_need_a_template(tiny_gpt2, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert_clean_error(run_cli("generate", "-f", path, "-m", tiny_gpt2), "no chat template")


def test_debug_shows_traceback(tmp_path):
    result = run_cli("--debug", "generate", "hi", "-m", tmp_path / "nope")
    assert result.exit_code == 2 and "Traceback" in result.stderr


def test_version_and_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "llmcli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("llmcli ")


def test_help_imports_neither_torch_nor_transformers():
    for args in (["--help"], ["generate", "--help"], ["chat", "--help"]):
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmcli", *args],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
        assert "typer" in imported  # the import log was really captured
        assert not imported & {"torch", "transformers", "accelerate", "datasets"}, args
