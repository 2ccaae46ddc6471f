"""`llmcli finetune`: learning, outputs, masking, exact resume, interrupts, DDP, LoRA, from scratch, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import gpl_text, run_cli
from test_errors import assert_clean_error

TRAIN = ["--max-length", "64", "--batch-size", "8", "--lr", "3e-3", "--log-every", "5"]


@pytest.fixture(scope="module")
def gpl_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "gpl.txt"
    path.write_text(gpl_text()[:24000])
    return path


def finetune(*args):
    result = run_cli("finetune", *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def metrics(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("model, command", [("tiny_gpt2", "generate"), ("tiny_llama", "generate"),
                                            ("tiny_bert", "fill-mask")])
def test_loss_goes_down_and_output_loads(model, command, request, gpl_file, tmp_path):
    model_dir = request.getfixturevalue(model)
    output = tmp_path / "out"
    result = finetune("--data", gpl_file, "-m", model_dir, "-o", output, "--max-steps", "30", "--val-split", "0.1",
                      "--eval-every", "15", *TRAIN)
    history = metrics(output)
    losses = [r["loss"] for r in history if "loss" in r]
    assert sum(losses[-2:]) < 0.95 * sum(losses[:2]), losses
    assert result["objective"] == ("mlm" if model == "tiny_bert" else "clm")
    evals = [r for r in history if "eval_loss" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert {"step", "epoch", "loss", "lr", "tokens", "tokens_per_second"} <= set(history[0])
    assert (output / "loss.png").stat().st_size > 1000
    run = json.loads((output / "run.json").read_text())
    assert run["training"]["max_length"] == 64 and "torch" in run["versions"]

    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    (AutoModelForMaskedLM if model == "tiny_bert" else AutoModelForCausalLM).from_pretrained(output)
    text = "the [MASK] program" if command == "fill-mask" else "This License"
    assert run_cli(command, text, "-m", output, "-n" if command == "generate" else "--top-k", "3").exit_code == 0


def test_prompt_completion_masking(tiny_llama, tmp_path):
    """Loss only on completions: the labels of the prompt tokens are -100, the rest are the ids."""
    from transformers import AutoTokenizer

    from llmcli.data import load_training_data
    from llmcli.training_data import prepare

    data = tmp_path / "pc.jsonl"
    pairs = [("Question: what is free software?\nAnswer:", " software you may share"),
             ("Say hi:", " hi there")]
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in pairs))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data_format, dataset = load_training_data(str(data))
    blocks = prepare(dataset, tokenizer, data_format, objective="clm", max_length=64, packing=False,
                     mask_prompt=True, name=str(data))
    for (prompt, completion), block in zip(pairs, blocks):
        n_prompt = len(tokenizer(prompt)["input_ids"])
        assert block["input_ids"] == tokenizer(prompt + completion)["input_ids"] + [tokenizer.eos_token_id]
        assert block["labels"][:n_prompt] == [-100] * n_prompt
        assert block["labels"][n_prompt:] == block["input_ids"][n_prompt:]
    unmasked = prepare(dataset, tokenizer, data_format, objective="clm", max_length=64, packing=False,
                       mask_prompt=False, name=str(data))
    assert all(b["labels"] == b["input_ids"] for b in unmasked)


def test_chat_masking_scores_only_assistant_turns(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    from llmcli.data import load_training_data
    from llmcli.training_data import prepare

    data = tmp_path / "chat.jsonl"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi friend"},
                {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    data.write_text(json.dumps({"messages": messages}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data_format, dataset = load_training_data(str(data))
    [block] = prepare(dataset, tokenizer, data_format, objective="clm", max_length=128, packing=False,
                      mask_prompt=True, name=str(data))
    scored = tokenizer.decode([t for t, label in zip(block["input_ids"], block["labels"]) if label != -100])
    assert scored == "hi friend\nsee you\n"  # the template ends each turn with a newline


def test_kill_and_resume_equals_uninterrupted(tiny_gpt2, gpl_file, tmp_path):
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "40", "--save-every", "5", *TRAIN]
    straight = tmp_path / "straight"
    finetune(*args, "-o", straight)

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "llmcli", "finetune", *map(str, args), "-o", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-10" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists()  # it really died before the end
    resumed = run_cli("finetune", *args, "-o", killed, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr
    ours, reference = weights(killed), weights(straight)
    assert ours.keys() == reference.keys()
    assert all((ours[k] == reference[k]).all() for k in ours)  # bit-identical
    assert [r["step"] for r in metrics(killed)] == [r["step"] for r in metrics(straight)]


def test_resume_another_runs_checkpoint_into_a_new_directory(tiny_gpt2, gpl_file, tmp_path):
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "10", *TRAIN]
    finetune(*args, "-o", tmp_path / "straight")
    finetune(*args, "--save-every", "5", "-o", tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoints" / "step-5"
    finetune(*args, "-o", tmp_path / "branch", "--resume", checkpoint)
    ours, reference = weights(tmp_path / "branch"), weights(tmp_path / "straight")
    assert all((ours[k] == reference[k]).all() for k in reference)
    assert [r["step"] for r in metrics(tmp_path / "branch")] == [5, 10]  # the first run's history, then ours
    # an unrelated non-empty directory is never written into
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    result = run_cli("finetune", *args, "-o", tmp_path / "other", "--resume", checkpoint)
    assert result.exit_code == 2 and "belongs to another run" in result.stderr
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny_gpt2, gpl_file, tmp_path):
    output = tmp_path / "out"
    command = [sys.executable, "-m", "llmcli", "finetune", "--data", str(gpl_file), "-m", str(tiny_gpt2), "-o",
               str(output), "--max-steps", "100000", *TRAIN]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (output / "metrics.jsonl").exists() or not (output / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "continue with --resume" in stderr
    [checkpoint] = (output / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert checkpoint.name == f"step-{state['step']}" and state["step"] >= 5


def test_two_process_cpu_ddp(tiny_gpt2, gpl_file, tmp_path):
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "llmcli", "finetune", "--data", str(gpl_file), "-m", str(tiny_gpt2),
               "-o", str(output), "--max-steps", "10", "--num-processes", "2", *TRAIN, "--val-split", "0.1",
               "--eval-every", "5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run = json.loads((output / "run.json").read_text())
    assert run["resolved"]["world_size"] == 2
    assert run["resolved"]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert [r["step"] for r in metrics(output)] == [5, 10]  # written once, by rank 0
    assert result.stdout.count("output") == 1  # one summary, from rank 0
    single = tmp_path / "single"
    finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", single, "--max-steps", "10", *TRAIN)
    # two processes see twice the examples per step
    assert metrics(output)[-1]["tokens"] == pytest.approx(2 * metrics(single)[-1]["tokens"], rel=0.02)


def test_from_scratch_with_trained_tokenizer(gpl_file, tmp_path):
    output = tmp_path / "scratch"
    result = finetune("--data", gpl_file, "--from-scratch", "--arch", "llama", "--tokenizer-vocab-size", "400",
                      "--config-overrides", "hidden_size=64,intermediate_size=128,num_hidden_layers=2,"
                      "num_attention_heads=4,num_key_value_heads=2,max_position_embeddings=128",
                      "-o", output, "--max-steps", "30", *TRAIN)
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(output)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 2, 64)
    assert len(AutoTokenizer.from_pretrained(output)) == config.vocab_size == 400
    losses = [r["loss"] for r in metrics(output)]
    assert losses[-1] < losses[0] and result["steps"] == 30


def test_lora_adapter_and_merge(tiny_llama, gpl_file, tmp_path):
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    args = ["--data", gpl_file, "-m", tiny_llama, "--lora", "--lora-r", "4", "--max-steps", "10", *TRAIN]
    finetune(*args, "-o", adapter)
    finetune(*args, "-o", merged, "--merge-lora")
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    outputs = []
    for path in (adapter, merged):
        result = run_cli("generate", "This License", "-m", path, "-n", "8", "--no-chat", "--json")
        assert result.exit_code == 0, result.stderr
        outputs.append(result.json_lines()[0]["token_ids"])
    assert outputs[0] == outputs[1]  # the merged model computes what base + adapter computes


@pytest.mark.slow
def test_lora_on_the_embedded_model(gpl_file, tmp_path):
    output = tmp_path / "smol-lora"
    result = finetune("--data", gpl_file, "--lora", "--max-steps", "4", "--max-length", "128", "--batch-size", "2",
                      "--lr", "1e-3", "-o", output)
    assert result["steps"] == 4
    generated = run_cli("generate", "What is free software?", "-m", output, "-n", "8", "--json")
    assert generated.exit_code == 0, generated.stderr


def test_non_empty_output_dir_is_kept(tiny_gpt2, gpl_file, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "precious.txt").write_text("keep me")
    assert_clean_error(run_cli("finetune", "--data", gpl_file, "-m", tiny_gpt2, "-o", output), "is not empty",
                       "--overwrite")
    assert [p.name for p in output.iterdir()] == ["precious.txt"]
    finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "2", "--overwrite", *TRAIN)
    assert not (output / "precious.txt").exists() and (output / "model.safetensors").is_file()




def test_grad_accumulation_consumes_that_many_batches_per_step(tiny_gpt2, gpl_file, tmp_path):
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "5", *TRAIN]
    finetune(*args, "-o", tmp_path / "one")
    finetune(*args, "-o", tmp_path / "two", "--grad-accum", "2")
    one, two = metrics(tmp_path / "one")[-1], metrics(tmp_path / "two")[-1]
    assert one["step"] == two["step"] == 5
    assert two["tokens"] == pytest.approx(2 * one["tokens"], rel=0.02)


def test_gradient_checkpointing_gives_the_same_weights(tiny_llama, gpl_file, tmp_path):
    import torch

    args = ["--data", gpl_file, "-m", tiny_llama, "--max-steps", "4", *TRAIN]
    finetune(*args, "-o", tmp_path / "plain")
    finetune(*args, "-o", tmp_path / "checkpointed", "--grad-checkpointing")
    plain, checkpointed = weights(tmp_path / "plain"), weights(tmp_path / "checkpointed")
    assert plain.keys() == checkpointed.keys()
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)


def test_bf16_mixed_precision_on_cpu(tiny_gpt2, gpl_file, tmp_path):
    result = finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", tmp_path / "bf16", "--max-steps", "20", "--bf16",
                      *TRAIN)
    losses = [r["loss"] for r in metrics(tmp_path / "bf16")]
    assert result["steps"] == 20 and losses[-1] < losses[0]
    run = json.loads((tmp_path / "bf16" / "run.json").read_text())
    assert run["training"]["mixed_precision"] == "bf16"


def test_fused_gelu_matches_gpt2s_gelu_and_keeps_the_saved_config(tiny_gpt2, gpl_file, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    from llmcli.tasks.finetune_loop import use_fused_gelu

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    ids = torch.arange(40)[None] % model.config.vocab_size
    with torch.no_grad():
        before = model(ids).logits
        use_fused_gelu(model)
        after = model(ids).logits
    kinds = {type(m) for m in model.modules()}
    assert GELUTanh in kinds and NewGELUActivation not in kinds
    assert torch.allclose(before, after, atol=1e-5) and before.argmax(-1).equal(after.argmax(-1))
    finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", tmp_path / "out", "--max-steps", "2", *TRAIN)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["activation_function"] == "gelu_new"
