"""`llmcli finetune`: learning, outputs, masking, exact resume, interrupts, DDP, LoRA, from scratch, errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import default_sigint, gpl_text, run_cli
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


def same_weights(ours: dict, reference: dict, names=None) -> bool:
    """Bit-identical tensors for every name of `reference` (or the names given)."""
    return all((ours[k] == reference[k]).all() for k in (reference if names is None else names))


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


def kill_after_checkpoint(args: list, output: Path, step: int) -> None:
    """`llmcli finetune ARGS -o OUTPUT` in a process killed with SIGKILL once checkpoint `step` is complete."""
    command = [sys.executable, "-m", "llmcli", "finetune", *map(str, args), "-o", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (output / "checkpoints" / f"step-{step}" / "trainer_state.json").exists():
        assert process.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output / "model.safetensors").exists()  # it really died before the end


def test_kill_and_resume_equals_uninterrupted(tiny_gpt2, gpl_file, tmp_path):
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "40", "--save-every", "5", *TRAIN]
    straight = tmp_path / "straight"
    finetune(*args, "-o", straight)

    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 10)
    resumed = run_cli("finetune", *args, "-o", killed, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert "Resuming from" in resumed.stderr
    ours, reference = weights(killed), weights(straight)
    assert ours.keys() == reference.keys()
    assert same_weights(ours, reference)  # bit-identical
    assert [r["step"] for r in metrics(killed)] == [r["step"] for r in metrics(straight)]


def test_resume_another_runs_checkpoint_into_a_new_directory(tiny_gpt2, gpl_file, tmp_path):
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "10", *TRAIN]
    finetune(*args, "-o", tmp_path / "straight")
    finetune(*args, "--save-every", "5", "-o", tmp_path / "first")
    checkpoint = tmp_path / "first" / "checkpoints" / "step-5"
    finetune(*args, "-o", tmp_path / "branch", "--resume", checkpoint)
    ours, reference = weights(tmp_path / "branch"), weights(tmp_path / "straight")
    assert same_weights(ours, reference)
    assert [r["step"] for r in metrics(tmp_path / "branch")] == [5, 10]  # the first run's history, then ours
    # A fresh run gives the same weights as a faithful resume: only a changed checkpoint shows that the
    # checkpoint was read at all. Its weights nudged, the branch must end elsewhere.
    from safetensors.torch import load_file, save_file

    shutil.copytree(tmp_path / "first", tmp_path / "nudged")
    nudged = tmp_path / "nudged" / "checkpoints" / "step-5" / "model.safetensors"
    save_file({k: v + 0.05 for k, v in load_file(str(nudged)).items()}, str(nudged))
    finetune(*args, "-o", tmp_path / "nudged-branch", "--resume", nudged.parent)
    moved = weights(tmp_path / "nudged-branch")
    assert not same_weights(moved, reference)
    # an unrelated non-empty directory is never written into
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    result = run_cli("finetune", *args, "-o", tmp_path / "other", "--resume", checkpoint)
    assert result.exit_code == 2 and "belongs to another run" in result.stderr
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_resume_equals_uninterrupted(tiny_gpt2, gpl_file, tmp_path, signum):
    """Ctrl-C or SIGTERM mid-run: exit 130 with a checkpoint of the last finished step; --resume then ends
    with the weights of a run never interrupted (the tiny GPT-2 has dropout, so its RNG must be exact too)."""
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "30", *TRAIN]
    output = tmp_path / "out"
    command = [sys.executable, "-m", "llmcli", "finetune", *map(str, args), "-o", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    deadline = time.time() + 120
    while not (output / "metrics.jsonl").exists() or not (output / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "continue with --resume" in stderr
    [checkpoint] = (output / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert checkpoint.name == f"step-{state['step']}" and 5 <= state["step"] < 30
    assert not (output / "model.safetensors").exists()
    finetune(*args, "-o", output, "--resume")
    finetune(*args, "-o", tmp_path / "straight")
    ours, reference = weights(output), weights(tmp_path / "straight")
    assert same_weights(ours, reference)


def test_an_interrupt_mid_step_saves_the_step_before_it(tiny_gpt2, gpl_file, tmp_path, monkeypatch):
    """A further Ctrl-C stops at once, mid-step: the checkpoint is the last finished step, with the data
    position and RNG it had, so --resume still ends with an uninterrupted run's weights (the half step's
    rows taken or its dropout drawn would make it skip rows or drift)."""
    from llmcli.tasks import finetune_loop

    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "8", *TRAIN, "--batch-size", "4", "--grad-accum", "2"]
    count_tokens, calls = finetune_loop.batch_tokens, []

    def interrupted(batch):
        calls.append(batch)
        if len(calls) == 12:  # step 6's second micro-batch: both its rows taken, the first one's dropout drawn
            raise KeyboardInterrupt
        return count_tokens(batch)

    monkeypatch.setattr(finetune_loop, "batch_tokens", interrupted)
    output = tmp_path / "out"
    result = run_cli("finetune", *args, "-o", output)
    monkeypatch.undo()
    assert result.exit_code == 130 and "saved checkpoints/step-5" in result.stderr, result.stderr
    [checkpoint] = (output / "checkpoints").iterdir()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 5
    finetune(*args, "-o", output, "--resume")
    finetune(*args, "-o", tmp_path / "straight")
    assert same_weights(weights(output), weights(tmp_path / "straight"))


def test_two_process_cpu_ddp_splits_the_global_batch(tiny_llama, gpl_file, tmp_path):
    """Two ranks of 4 examples must see disjoint halves of the batch that one process of 8 sees.
    DDP averages the two halves' gradients, (a + b) / 2, which is bit for bit what accumulating two
    batches of 4 in one process computes (a / 2 + b / 2): the same weights exactly. A batch of 8 in one
    pass differs only by rounding (gradients agree to 4e-7 relative, measured), which Adam's
    normalisation grows over the steps, so against it the first step's loss is compared tightly."""
    common = ["--data", gpl_file, "-m", tiny_llama, "--max-steps", "6", "--max-length", "64", "--lr", "3e-3",
              "--log-every", "1", "--val-split", "0.1", "--eval-every", "3"]
    output = tmp_path / "ddp"
    command = [sys.executable, "-m", "llmcli", "finetune", *map(str, common), "-o", str(output),
               "--batch-size", "4", "--num-processes", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    run = json.loads((output / "run.json").read_text())
    assert run["resolved"]["world_size"] == 2
    assert run["resolved"]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert [r["step"] for r in metrics(output)] == [1, 2, 3, 4, 5, 6]  # written once, by rank 0
    assert result.stdout.count("output") == 1  # one summary, from rank 0
    finetune(*common, "-o", tmp_path / "accumulated", "--batch-size", "4", "--grad-accum", "2")
    finetune(*common, "-o", tmp_path / "single", "--batch-size", "8")
    ddp, accumulated, single = (metrics(tmp_path / name) for name in ("ddp", "accumulated", "single"))
    # training records equal exactly; evaluation sums its batches in another order on two ranks
    exact = ("step", "epoch", "loss", "lr", "tokens")
    assert [[r[k] for k in exact] for r in ddp] == [[r[k] for k in exact] for r in accumulated]
    evaluated = [(a["eval_loss"], b["eval_loss"]) for a, b in zip(ddp, accumulated) if "eval_loss" in b]
    assert len(evaluated) == 2 and all(a == pytest.approx(b, rel=1e-6) for a, b in evaluated)
    ours, reference = weights(output), weights(tmp_path / "accumulated")
    assert same_weights(ours, reference)
    assert [r["tokens"] for r in ddp] == [r["tokens"] for r in single]
    assert ddp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-6)
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], rel=1e-3)


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
    # and the adapter learned: the start of the training text scores better than with the base model
    start = tmp_path / "start.txt"
    start.write_text(gpl_file.read_text()[:3000])
    scores = [run_cli("eval", "--data", start, "-m", path, "--max-length", "64", "--stride", "64",
                      "--json").json_lines()[0]["value"] for path in (tiny_llama, adapter, merged)]
    assert scores[1] < 0.95 * scores[0]
    assert scores[2] == pytest.approx(scores[1], rel=1e-4)


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




def test_grad_accumulation_equals_one_bigger_batch(tiny_llama, gpl_file, tmp_path):
    """Two accumulated batches of 4 are one batch of 8: the same tokens and the same mean loss (the
    first step exactly; later ones up to rounding grown by Adam, see the DDP test)."""
    args = ["--data", gpl_file, "-m", tiny_llama, "--max-steps", "4", "--max-length", "64", "--lr", "3e-3",
            "--log-every", "1"]
    finetune(*args, "-o", tmp_path / "one", "--batch-size", "8")
    finetune(*args, "-o", tmp_path / "two", "--batch-size", "4", "--grad-accum", "2")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6)
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-3)


def count_mlp_calls(monkeypatch) -> list[int]:
    """Spy on the model the training loop gets: count calls of its first layer's MLP `forward` (module
    hooks would not do: torch runs none during a checkpoint's recomputation)."""
    from llmcli.tasks import finetune_loop

    calls = [0]
    original = finetune_loop.use_fused_gelu

    def spy(model):
        original(model)
        mlp = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp"))
        forward = mlp.forward

        def counted(*args, **kwargs):
            calls[0] += 1
            return forward(*args, **kwargs)

        mlp.forward = counted

    monkeypatch.setattr(finetune_loop, "use_fused_gelu", spy)
    return calls


def test_gradient_checkpointing_gives_the_same_weights(tiny_llama, gpl_file, tmp_path, monkeypatch):
    import torch

    args = ["--data", gpl_file, "-m", tiny_llama, "--max-steps", "4", *TRAIN]
    calls = count_mlp_calls(monkeypatch)
    finetune(*args, "-o", tmp_path / "plain")
    assert calls[0] == 4  # one forward per step
    finetune(*args, "-o", tmp_path / "checkpointed", "--grad-checkpointing")
    assert calls[0] == 4 + 8  # checkpointed: each layer runs again in the backward pass
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
    # bf16 autocast really ran: the same run in float32 ends with other (but nearby) weights
    import torch

    finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", tmp_path / "fp32", "--max-steps", "20", *TRAIN)
    mixed, full = weights(tmp_path / "bf16"), weights(tmp_path / "fp32")
    assert not same_weights(mixed, full)
    assert all(torch.allclose(mixed[k], full[k], atol=0.05) for k in full)


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


def test_resume_refuses_changed_training_options(tiny_gpt2, gpl_file, tmp_path):
    output = tmp_path / "out"
    finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "4", "--save-every", "2", *TRAIN)
    before = {p: p.stat().st_mtime_ns for p in output.rglob("*")}
    changed = [a if a != "3e-3" else "1e-3" for a in TRAIN]
    result = run_cli("finetune", "--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "6",
                     "--resume", *changed, "--weight-decay", "0.1")
    assert_clean_error(result, "different settings", "lr, weight_decay")
    assert {p: p.stat().st_mtime_ns for p in output.rglob("*")} == before
    # the options a resume may change (here --max-steps) are accepted
    assert run_cli("finetune", "--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "6",
                   "--resume", *TRAIN).exit_code == 0


def test_keep_checkpoints_prunes_the_oldest(tiny_gpt2, gpl_file, tmp_path):
    output = tmp_path / "out"
    finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "10", "--save-every", "2",
             "--keep-checkpoints", "2", *TRAIN)
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-10", "step-8"]  # the last step too


def test_every_text_format_gives_the_same_training(tiny_gpt2, tmp_path):
    """.txt --line-by-line, .csv --text-column and a save_to_disk directory read the same records as
    JSONL with 'text': the same blocks, so bit-identical weights."""
    import csv

    from datasets import Dataset

    lines = [line.strip() for line in gpl_text()[:6000].splitlines() if line.strip()]
    sources = {"jsonl": tmp_path / "data.jsonl", "txt": tmp_path / "data.txt", "csv": tmp_path / "data.csv",
               "saved": tmp_path / "saved"}
    sources["jsonl"].write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    sources["txt"].write_text("\n".join(lines) + "\n")  # no blank lines: one paragraph without --line-by-line
    with open(sources["csv"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "body"])
        writer.writerows([i, line] for i, line in enumerate(lines))
    Dataset.from_dict({"text": lines}).save_to_disk(str(sources["saved"]))
    extra = {"txt": ["--line-by-line"], "csv": ["--text-column", "body"]}
    results = {}
    for name, path in sources.items():
        finetune("--data", path, "-m", tiny_gpt2, "-o", tmp_path / f"out-{name}", "--max-steps", "2", *TRAIN,
                 *extra.get(name, []))
        results[name] = weights(tmp_path / f"out-{name}")
    reference = results.pop("jsonl")
    for name, ours in results.items():
        assert same_weights(ours, reference), name
    finetune("--data", sources["txt"], "-m", tiny_gpt2, "-o", tmp_path / "paragraph", "--max-steps", "2", *TRAIN)
    paragraph = weights(tmp_path / "paragraph")
    assert not same_weights(paragraph, reference)  # lines are not paragraphs


def test_data_eval_is_evaluated(tiny_gpt2, gpl_file, tmp_path):
    held_out = tmp_path / "held-out.txt"
    held_out.write_text(gpl_text()[30000:34000])
    output = tmp_path / "out"
    finetune("--data", gpl_file, "--data-eval", held_out, "-m", tiny_gpt2, "-o", output, "--max-steps", "4",
             "--eval-every", "2", *TRAIN)
    run = json.loads((output / "run.json").read_text())
    assert run["resolved"]["eval_blocks"] > 0
    evals = [r for r in metrics(output) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert evals[-1]["eval_perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))


@pytest.mark.parametrize("scheduler, warmup", [("linear", "2"), ("cosine", "0.5"), ("constant", "0")])
def test_learning_rate_follows_scheduler_and_warmup(tiny_gpt2, gpl_file, tmp_path, scheduler, warmup):
    import torch
    from transformers import get_scheduler

    output = tmp_path / "out"
    finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "6", "--scheduler", scheduler,
             "--warmup", warmup, "--max-length", "64", "--batch-size", "2", "--lr", "1e-3", "--log-every", "1")
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    warmup_steps = int(float(warmup) * 6) if float(warmup) < 1 else int(warmup)
    reference = get_scheduler(scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=6)
    expected = []
    for _ in range(6):
        optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert [r["lr"] for r in metrics(output)] == pytest.approx(expected, rel=1e-9)


def test_weight_decay_spares_biases_and_norms(tiny_gpt2, gpl_file, tmp_path):
    """One step: decoupled decay shrinks the matrices, while vectors (biases, norm weights) get the
    same update with or without it."""
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "1", *TRAIN]
    finetune(*args, "-o", tmp_path / "plain")
    finetune(*args, "-o", tmp_path / "decayed", "--weight-decay", "0.5")
    plain, decayed = weights(tmp_path / "plain"), weights(tmp_path / "decayed")
    matrices = [k for k in plain if plain[k].ndim >= 2]
    vectors = [k for k in plain if plain[k].ndim < 2]
    assert matrices and vectors
    assert same_weights(decayed, plain, vectors)
    assert all(decayed[k].norm() < plain[k].norm() for k in matrices)


def test_lora_targets_choose_the_adapted_modules(tiny_llama, gpl_file, tmp_path):
    from safetensors.torch import load_file

    output = tmp_path / "adapter"
    finetune("--data", gpl_file, "-m", tiny_llama, "--lora", "--lora-targets", "q_proj,v_proj", "-o", output,
             "--max-steps", "2", *TRAIN)
    config = json.loads((output / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    keys = load_file(str(output / "adapter_model.safetensors")).keys()
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "v_proj"}


def test_prompt_completion_masks_the_prompt_by_default(tiny_llama, tmp_path):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}:", "completion": f" {w} {w}"}) + "\n"
                            for w in ("hi", "bye", "yes", "no")))
    runs = {}
    for name, flag in (("default", ()), ("masked", ("--mask-prompt",)), ("unmasked", ("--no-mask-prompt",))):
        output = tmp_path / name
        finetune("--data", data, "-m", tiny_llama, "-o", output, "--max-steps", "1", *TRAIN, *flag)
        runs[name] = weights(output)
        assert json.loads((output / "run.json").read_text())["resolved"]["mask_prompt"] is (name != "unmasked")
    assert same_weights(runs["default"], runs["masked"])
    assert not same_weights(runs["default"], runs["unmasked"])


def test_max_grad_norm_clips(tiny_gpt2, gpl_file, tmp_path):
    """Clipping to a tiny norm changes the run (Adam is nearly scale-free, so the change is small, but
    a CPU run is deterministic); --max-grad-norm 0 turns clipping off."""
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "2", *TRAIN]
    finetune(*args, "-o", tmp_path / "off", "--max-grad-norm", "0")
    finetune(*args, "-o", tmp_path / "clipped", "--max-grad-norm", "1e-6")
    off, clipped = weights(tmp_path / "off"), weights(tmp_path / "clipped")
    assert not same_weights(clipped, off)


def test_epochs_set_the_number_of_steps(tiny_gpt2, gpl_file, tmp_path):
    output = tmp_path / "out"
    result = finetune("--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--epochs", "2", *TRAIN)
    blocks = json.loads((output / "run.json").read_text())["resolved"]["train_blocks"]
    assert result["steps"] == 2 * math.ceil(blocks / 8)
    assert metrics(output)[-1]["epoch"] == pytest.approx(2.0)


def test_default_max_length_is_capped_to_a_small_models_context(tiny_gpt2, gpl_file, tmp_path):
    """The default --max-length (512) does not fit the tiny GPT-2's 256 positions: it is lowered, with a
    notice, and a resume without the option uses the run's value; an explicit 512 stays an error.
    A bare --resume of the finished run says it is finished; a larger --max-steps trains on."""
    output = tmp_path / "run"
    result = run_cli("finetune", "--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "2",
                     "--batch-size", "2", "--save-every", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert "--max-length defaults to 512; using 256" in result.stderr
    assert json.loads((output / "run.json").read_text())["training"]["max_length"] == 256
    finished = run_cli("finetune", "--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "2",
                       "--batch-size", "2", "--save-every", "1", "--resume")
    assert finished.exit_code == 2 and "is finished (2 steps), so there is nothing to resume" in finished.stderr
    resumed = run_cli("finetune", "--data", gpl_file, "-m", tiny_gpt2, "-o", output, "--max-steps", "3",
                      "--batch-size", "2", "--save-every", "1", "--resume", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == 3
    explicit = run_cli("finetune", "--data", gpl_file, "-m", tiny_gpt2, "-o", tmp_path / "other", "--max-length",
                       "512", "--max-steps", "1")
    assert explicit.exit_code == 2 and "--max-length 512 is above the model's context of 256" in explicit.stderr


def test_from_scratch_llama_heads_follow_and_a_failed_run_leaves_nothing(gpl_file, tmp_path, monkeypatch):
    """num_attention_heads=4 alone: Llama's key/value heads follow it (not LlamaConfig's default 32).
    A run that fails in training before any checkpoint (here a fault put in on purpose, after run.json
    is written) leaves its output empty, so the corrected command is not refused as "not empty"."""
    from llmcli.tasks import finetune_loop

    output = tmp_path / "scratch"
    common = ["--data", gpl_file, "--from-scratch", "--arch", "llama", "--tokenizer-vocab-size", "400",
              "-o", output, "--max-steps", "3", *TRAIN]
    with monkeypatch.context() as patched:
        patched.setattr(finetune_loop, "StepBoundaryInterrupts", lambda accelerator: 1 / 0)
        failed = run_cli("finetune", *common, "--config-overrides", "hidden_size=64,num_attention_heads=4")
    assert failed.exit_code != 0 and "ZeroDivisionError" in failed.stderr
    assert output.is_dir() and not any(output.iterdir())
    result = finetune(*common, "--config-overrides", "hidden_size=64,intermediate_size=128,num_hidden_layers=2,"
                      "num_attention_heads=4,max_position_embeddings=128")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(output)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 4, 16)
    assert result["steps"] == 3
    umask = os.umask(0)
    os.umask(umask)
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in output.iterdir() if path.is_file()} == \
        {path.name: oct(0o666 & ~umask) for path in output.iterdir() if path.is_file()}  # model.safetensors too


def test_a_finished_run_extends_from_its_last_step(tiny_gpt2, gpl_file, tmp_path):
    """A 6-step run with --save-every 4, extended to 10 with --resume: it goes on from step 6 (not 4),
    keeps steps 1-6 as they were, and says how the schedule continues."""
    args = ["--data", gpl_file, "-m", tiny_gpt2, "--save-every", "4", *TRAIN, "--log-every", "1"]
    output = tmp_path / "run"
    finetune(*args, "--max-steps", "6", "-o", output)
    first = metrics(output)
    extended = run_cli("finetune", *args, "--max-steps", "10", "-o", output, "--resume")
    assert extended.exit_code == 0, extended.stderr
    assert "step 6 of 10" in extended.stderr and "schedule runs over 10 steps" in extended.stderr
    records = metrics(output)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert records[:6] == first


def test_a_lora_adapter_names_its_base_so_that_it_survives_the_cache(tiny_gguf, gpl_file, tmp_path, monkeypatch):
    """An adapter trained on a GGUF model records the .gguf file (not the cache's conversion of it):
    after `cache rm --all` the adapter still loads (the base is converted again) and generates the same.
    Saving it never asks the hub: peft's default looks there for the config.json of a base that is not a
    directory (a .gguf file, the smollm2 alias), a network attempt and a UserWarning on every run."""
    import json
    import warnings

    import peft.utils.save_and_load

    monkeypatch.setenv("LLMCLI_CACHE", str(tmp_path / "cache"))  # this test's own cache, emptied below
    asked = []
    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub",
                        lambda *args, **kwargs: asked.append(args))
    adapter = tmp_path / "adapter"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune("--data", gpl_file, "-m", tiny_gguf, "--lora", "--lora-r", "2", "--max-steps", "2", *TRAIN, "-o",
                 adapter)
    assert asked == []
    assert not [w for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_gguf.resolve())

    def generated() -> list[int]:
        result = run_cli("generate", "This License", "-m", adapter, "-n", "6", "--no-chat", "--json")
        assert result.exit_code == 0, result.stderr
        return result.json_lines()[0]["token_ids"]

    before = generated()
    assert run_cli("cache", "rm", "--all").exit_code == 0
    assert not any((tmp_path / "cache").rglob("*.safetensors"))
    assert generated() == before


def test_the_logged_loss_is_the_mean_since_the_last_record_and_survives_a_resume(tiny_gpt2, gpl_file, tmp_path):
    """--log-every 4: each record's loss is the mean of its 4 steps' losses (as Trainer logs), and a
    run killed between two records and resumed logs exactly what the uninterrupted run logs."""
    base = ["--data", gpl_file, "-m", tiny_gpt2, "--max-steps", "12", *TRAIN]
    finetune(*base, "--log-every", "1", "-o", tmp_path / "every")
    args = [*base, "--log-every", "4", "--save-every", "3"]
    finetune(*args, "-o", tmp_path / "straight")
    every, straight = metrics(tmp_path / "every"), metrics(tmp_path / "straight")
    assert [r["step"] for r in straight] == [4, 8, 12]
    for record in straight:
        steps = every[record["step"] - 4:record["step"]]
        assert record["loss"] == pytest.approx(sum(r["loss"] for r in steps) / 4, rel=1e-6)

    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 3)
    assert run_cli("finetune", *args, "-o", killed, "--resume").exit_code == 0
    assert [(r["step"], r["loss"]) for r in metrics(killed)] == [(r["step"], r["loss"]) for r in straight]


def test_the_progress_bar_moves_every_optimizer_step(tiny_gpt2, gpl_file, tmp_path):
    """The reporter hears of every optimizer step (the bar and its ETA move), not only of the
    --log-every records: 5 steps logged every 4 report steps 1..5 and log steps 4 and 5."""
    from llmcli.tasks.finetune import FinetuneOptions, Reporter
    from llmcli.tasks.finetune_loop import run

    steps, logged = [], []
    options = FinetuneOptions(data=str(gpl_file), output=str(tmp_path / "out"), model=str(tiny_gpt2), max_steps=5,
                              max_length=64, batch_size=2, log_every=4)
    run(options, Reporter(step=steps.append, log=lambda record: logged.append(record["step"])))
    assert steps == [1, 2, 3, 4, 5] and logged == [4, 5]

