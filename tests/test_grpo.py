"""`llmcli finetune --objective grpo`: equal to TRL's GRPOTrainer on fixed completions, learning from a
reward, exact resume (sampling included), bad input.

The equality test fixes the completions (both trainers' sampling is replaced by the same lookup) so that
only the loss, its advantages, KL and normalisation, and the update are compared: the tiny Llama, the same
prompts in the same order, the same rewards, CPU float32, every step's loss and metrics and the final
weights.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from conftest import run_cli
from test_errors import assert_clean_error

STEPS, PROMPTS_PER_STEP, G, LR, SEED = 3, 2, 3, 2e-4, 42
RTOL = 1e-5

PROMPTS = ["The license is", "You may copy", "Source code is", "Warranty:", "Patents may", "Distribute copies"]
ANSWERS = [" free", " and share it", " the preferred form", " none at all", " not restrict you", " with the text",
           " for all", " hidden away", " yes"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def fixed_completions(tokenizer) -> dict[tuple, list[list[int]]]:
    """G completions per prompt (token ids ending in EOS, of different lengths), keyed by the prompt's ids."""
    eos = tokenizer.eos_token_id
    table = {}
    for p, prompt in enumerate(PROMPTS):
        answers = [ANSWERS[(p + k * 2) % len(ANSWERS)] for k in range(G)]
        table[tuple(tokenizer(prompt)["input_ids"])] = [tokenizer(a)["input_ids"] + [eos] for a in answers]
    return table


def replay(table: dict[tuple, list[list[int]]], prompt_ids: list) -> list[list[int]]:
    """Each occurrence of a prompt gets its next fixed completion, in order."""
    seen: dict[tuple, int] = {}
    out = []
    for ids in prompt_ids:
        key = tuple(int(t) for t in ids)
        out.append(table[key][seen.get(key, 0) % G])
        seen[key] = seen.get(key, 0) + 1
    return out


REWARD_FILE = '''
REWARDS = {ANSWERS}

def fixed(prompts, completions, **kwargs):
    """A reward per answer text, different within each group."""
    return [REWARDS[c.strip()] for c in completions]

def short(completions, completion_ids, **kwargs):
    return [1.0 if len(ids) <= 4 else None for ids in completion_ids]
'''


def reward_file(path: Path) -> Path:
    rewards = {a.strip(): round(0.37 * i - 1.1, 2) for i, a in enumerate(ANSWERS)}
    path.write_text(REWARD_FILE.replace("{ANSWERS}", repr(rewards)))
    return path


def load_module(path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("rewards_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def llmcli_order(size: int) -> list[int]:
    from llmcli.tasks.finetune_loop import epoch_batches

    return [i for batch in epoch_batches(size, 0, SEED, PROMPTS_PER_STEP, 1, 0) for i in batch]


def run_trl(model_dir: Path, output: Path, functions: list, beta: float, temperature: float, weights: list[float],
            grad_accum: int):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    table = fixed_completions(tokenizer)

    def generate(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        return replay(table, prompt_ids), None

    ordered = [{"prompt": PROMPTS[i]} for i in llmcli_order(len(PROMPTS))]
    args = trl.GRPOConfig(
        output_dir=str(output), max_steps=STEPS, per_device_train_batch_size=PROMPTS_PER_STEP // grad_accum * G,
        gradient_accumulation_steps=grad_accum, num_generations=G,
        learning_rate=LR, seed=SEED, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, shuffle_dataset=False, bf16=False,
        disable_tqdm=True, beta=beta, temperature=temperature, max_completion_length=16, reward_weights=weights)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    trainer = trl.GRPOTrainer(model=model, reward_funcs=functions, args=args,
                              train_dataset=datasets.Dataset.from_list(ordered), processing_class=tokenizer)
    trainer._generate_single_turn = types.MethodType(generate, trainer)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("beta, temperature, grad_accum", [(0.0, 1.0, 1), (0.04, 0.7, 1), (0.04, 1.0, 2)])
def test_grpo_equals_trl_on_fixed_completions(beta, temperature, grad_accum, tiny_llama, tmp_path, monkeypatch):
    """With --grad-accum 2 each step's two micro-batches hold one prompt's group each (TRL shuffles the step's
    completions before splitting them): the step's loss, normalised by all of its completion tokens, and the
    update are the same however they are split."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    import llmcli.tasks.rollouts as rollouts

    table = fixed_completions(AutoTokenizer.from_pretrained(tiny_llama))
    monkeypatch.setattr(rollouts, "sample_completions",
                        lambda model, tokenizer, prompt_ids, settings, seed: replay(table, prompt_ids))
    rewards = reward_file(tmp_path / "rewards.py")
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    output = tmp_path / "ours"
    result = run_cli("finetune", "-d", data, "-m", tiny_llama, "-o", output, "--objective", "grpo",
                     "--reward", f"{rewards}:fixed", "--reward", f"{rewards}:short", "--reward-weights", 1,
                     "--reward-weights", 0.5,
                     "--num-generations", G, "--batch-size", PROMPTS_PER_STEP // grad_accum, "--grad-accum", grad_accum,
                     "--max-steps", STEPS, "--lr", LR,
                     "--seed", SEED, "--log-every", 1, "--beta", beta, "--temperature", temperature,
                     "--rollout-engine", "hf")  # the fixed completions replace the hf engine's sampling
    assert result.exit_code == 0, result.stderr
    ours = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    module = load_module(rewards)
    theirs, their_weights = run_trl(tiny_llama, tmp_path / "trl", [module.fixed, module.short], beta, temperature,
                                    [1.0, 0.5], grad_accum)

    assert [r["step"] for r in ours] == list(range(1, STEPS + 1)) and len(theirs) == STEPS
    # kl is a mean per micro-batch: TRL's micro-batches hold other completions than ours under grad_accum
    keys = ["loss", "reward", "reward_std", "rewards/fixed/mean", "rewards/short/mean"] + \
        (["kl"] if beta and grad_accum == 1 else [])
    for mine, reference in zip(ours, theirs):
        for key in keys:
            # kl is about d**2 / 2 for differences d of token log-probabilities near -6 taken on weights that
            # already differ in the last bits: held to 1e-6 absolute (it is about 4e-3 at step 3), not relative
            tolerance = {"rel": RTOL, "abs": 1e-7} if key != "kl" else {"rel": 0, "abs": 1e-6}
            assert mine[key] == pytest.approx(reference[key], **tolerance), (mine["step"], key, mine[key], reference[key])
        assert mine["completion_length"] == pytest.approx(reference["completions/mean_length"])
        assert mine["clip_ratio"] == reference["clip_ratio/region_mean"] == 0.0  # one update per generation
    assert any(abs(r["loss"]) > 1e-3 for r in ours)  # the advantages moved the model
    if beta:
        assert ours[-1]["kl"] > 0
    trained = load_file(str(output / "model.safetensors"))
    # A weight's gradient is a sum of advantage-weighted terms that nearly cancel (advantages are centred per
    # group), so the two trainers' last-bit differences (their log-softmax backward passes differ) become a few
    # percent of some Adam steps: at lr 2e-4 the worst weight is 4e-6 from TRL's after moving 6e-4
    # (lr 1e-3 gives 2e-5); held to 1e-5 absolute, as the DPO comparison
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, their_weights[name], rtol=RTOL, atol=RTOL, msg=name)
    run = json.loads((output / "run.json").read_text())
    assert run["resolved"]["beta"] == beta
    assert run["resolved"]["reference"] == ("a frozen copy of the starting model" if beta else "none")


EVEN_REWARD = '''
def even(completion_ids, **kwargs):
    """The share of a completion's tokens with an even id: about 0.5 for an untrained model."""
    return [sum(1 for t in ids if t % 2 == 0) / len(ids) for ids in completion_ids]
'''


def grpo_args(tiny_llama: Path, tmp_path: Path, *extra) -> list[str]:
    (tmp_path / "even.py").write_text(EVEN_REWARD)
    data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "n": i} for i, p in enumerate(PROMPTS)])
    return ["-d", data, "-m", tiny_llama, "--objective", "grpo", "--reward", f"{tmp_path / 'even.py'}:even",
            "--num-generations", 4, "--batch-size", 3, "--max-completion-length", 4, "--log-every", 1, *extra]


@pytest.mark.parametrize("engine", ["hf", "llama"])
def test_grpo_raises_the_reward(engine, tiny_llama, tmp_path):
    """Sampled rollouts on the tiny model and a reward it meets half the time: 20 steps raise the mean, with
    either rollout engine (llama.cpp's only learns if its weights follow the trained ones)."""
    output = tmp_path / "run"
    result = run_cli("finetune", *grpo_args(tiny_llama, tmp_path, "--max-steps", 20, "--lr", 3e-2, "--scheduler",
                                            "constant", "--rollout-engine", engine), "-o", output)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records]
    assert sum(rewards[:3]) / 3 < 0.65 and sum(rewards[-5:]) / 5 > 0.75, rewards
    for record in records:
        assert {"reward", "reward_std", "rewards/even/mean", "completion_length", "clip_ratio", "time/generate",
                "time/score", "time/update"} <= record.keys()
        assert record["completion_length"] <= 4
        assert "kl" not in record  # beta is 0 by default, as TRL's
        assert ("time/sync" in record) == (engine == "llama")
    run = json.loads((output / "run.json").read_text())
    assert run["resolved"]["objective"] == "grpo" and run["resolved"]["reference"] == "none"
    assert run["resolved"]["rollout_engine"] == engine
    png = (output / "loss.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 1200  # two panels: the loss, and the reward beside it


@pytest.mark.parametrize("engine", ["hf", "llama"])
def test_grpo_kill_and_resume_equals_uninterrupted(engine, tiny_llama, tmp_path):
    """SIGKILL after checkpoint 2 of 5, then --resume: bit-identical weights and metrics, so the resumed run
    sampled the same completions (the sampling seed comes from seed, step, micro-batch and rank; llama.cpp's
    weights are written again from the resumed ones, and its batches decode on a fresh context each step)."""
    from test_finetune import kill_after_checkpoint, same_weights, weights

    args = grpo_args(tiny_llama, tmp_path, "--max-steps", 5, "--lr", 1e-2, "--save-every", 1, "--beta", 0.04,
                     "--grad-accum", 2, "--batch-size", 1, "--rollout-engine", engine)
    straight = tmp_path / "straight"
    assert run_cli("finetune", *args, "-o", straight).exit_code == 0
    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 2)
    resumed = run_cli("finetune", *args, "-o", killed, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert same_weights(weights(killed), weights(straight))
    lines = lambda path: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second" and
                           not k.startswith("time/")} for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert lines(killed) == lines(straight)
    assert len({r["reward"] for r in lines(straight)}) > 1 and lines(straight)[-1]["kl"] > 0


@pytest.mark.parametrize("records, options, fragments", [
    ([{"prompt": "a", "n": 1}], ["--num-generations", "1"], ["--num-generations must be at least 2, got 1"]),
    ([{"prompt": "a", "n": 1}], ["--no-reward"], ["--objective grpo needs at least one --reward"]),
    ([{"text": "a"}], [], ["line 1: no 'prompt' field"]),
    ([{"prompt": "a"}, {"prompt": ""}], [], ["line 2: 'prompt' must be a non-empty string or a list of messages"]),
    ([{"prompt": "a", "n": 1}, {"prompt": "b", "n": "x"}], [], ["a field holds values of different types"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], ["--objective", "kto", "--reward", "x.py:f"],
     ["--reward applies to --objective grpo, not kto"]),
    ([{"prompt": "a", "n": 1}], ["--objective", "dpo"], ["--objective dpo does not fit", "prompt-only records",
                                                         "--objective grpo"]),
    ([{"prompt": "a", "n": 1}], ["--val-split", "0.5"], ["not supported with --objective grpo"]),
    ([{"prompt": "a", "n": 1}], ["--temperature", "0"], ["--temperature must be positive"]),
    ([{"prompt": "a", "n": 1}], ["--reward-weights", "1", "--reward-weights", "2"], ["--reward-weights has 2 weights for 1 --reward"]),
    ([{"prompt": "a", "n": 1}], ["--beta", "-1"], ["--beta must not be negative"]),
])
def test_bad_grpo_input_is_one_error_line(records, options, fragments, tiny_llama, tmp_path):
    (tmp_path / "even.py").write_text(EVEN_REWARD)
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    reward = [] if "--no-reward" in options or "dpo" in options else ["--reward", f"{tmp_path / 'even.py'}:even"]
    objective = [] if "--objective" in options else ["--objective", "grpo"]
    output = tmp_path / "out"
    result = run_cli("finetune", "-d", data, "-m", tiny_llama, "-o", output, *objective, *reward,
                     *[o for o in options if o != "--no-reward"], "--max-steps", "1")
    assert_clean_error(result, *fragments)
    assert not output.exists()  # nothing written


def test_grpo_with_lora_takes_the_base_as_reference(tiny_llama, tmp_path):
    """--lora: rollouts from the model with its adapter on, the KL to the same model with it off."""
    output = tmp_path / "lora"
    result = run_cli("finetune", *grpo_args(tiny_llama, tmp_path, "--max-steps", 3, "--lr", 1e-2, "--lora", "--beta",
                                            0.04), "-o", output)
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kl"] == 0.0 and records[-1]["kl"] > 0  # the adapter starts as a no-op, then moves
    run = json.loads((output / "run.json").read_text())
    assert run["resolved"]["reference"] == "the base model with the LoRA adapter disabled"
    assert (output / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------- llama.cpp rollouts

def hf_logprobs(model, ids: list[int]):
    """log p(ids[i] | ids[:i]) for i >= 1 under the hf model, in float64."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


def llama_logprobs(rollouts, ids: list[int]):
    import torch

    from llmcli.engines import Window

    values, _ = rollouts.engine.token_logprobs(Window(ids, len(ids) - 1), 0)
    return torch.tensor(values, dtype=torch.float64)


F16_LOGPROB_TOLERANCE = 2e-3  # the tiny model's log-probabilities on F16 weights vs float32: 3e-4 at most measured


@pytest.mark.parametrize("lora", [False, True])
def test_llama_rollouts_follow_the_trained_weights(lora, tiny_llama):
    """llama.cpp's log-probabilities equal hf's within F16 rounding; after the weights move (all of them, or
    a LoRA adapter's), they stay the old ones until `sync`, then equal the new ones."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcli.tasks.llama_rollouts import LlamaRollouts

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="float32")
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    ids = tokenizer("The license is free and you may copy it")["input_ids"]
    rollouts = LlamaRollouts(model, tokenizer, [tokenizer.eos_token_id])
    torch.testing.assert_close(llama_logprobs(rollouts, ids), hf_logprobs(model, ids), rtol=0,
                               atol=F16_LOGPROB_TOLERANCE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a training step's worth of change, and more
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * (0.3 if lora else 0.05))
    moved = hf_logprobs(model, ids)
    assert (llama_logprobs(rollouts, ids) - moved).abs().max() > 20 * F16_LOGPROB_TOLERANCE  # not yet synced
    rollouts.sync(model)
    torch.testing.assert_close(llama_logprobs(rollouts, ids), moved, rtol=0, atol=F16_LOGPROB_TOLERANCE)


def test_llama_rollouts_sample_what_hf_scores(tiny_llama):
    """The completions' ids are the hf model's own (no text round trip): with top-k 1 each token is hf's
    likeliest (within F16 rounding of a near tie), a completion ends at its first stop or at the length limit,
    a prompt's G rows differ, and the same seed samples the same rows again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcli.tasks.llama_rollouts import LlamaRollouts
    from llmcli.tasks.rollouts import SamplingSettings

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype="float32")
    stop = tokenizer.eos_token_id
    rollouts = LlamaRollouts(model, tokenizer, [stop])
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    greedy = rollouts.sample(prompts, 2, SamplingSettings(2, 8, 1.0, 1.0, 1), seed=7)
    assert len(greedy) == 4
    for row, prompt in zip(greedy, [p for p in prompts for _ in range(2)]):
        assert 1 <= len(row) <= 8 and all(t != stop for t in row[:-1]) and (len(row) == 8 or row[-1] == stop)
        import torch

        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + row])).logits[0, len(prompt) - 1:-1]
        chosen = logits.gather(-1, torch.tensor(row).unsqueeze(-1)).squeeze(-1)
        assert (logits.max(-1).values - chosen).max() < 1e-2, row
    settings = SamplingSettings(4, 8, 1.0, 1.0, 0)
    first = rollouts.sample(prompts, 4, settings, seed=11)
    assert first == rollouts.sample(prompts, 4, settings, seed=11)
    assert first != rollouts.sample(prompts, 4, settings, seed=12)
    assert len({tuple(row) for row in first[:4]}) > 1  # each row its own seed


def test_rollout_engine_llama_without_llama_cpp_is_one_error_line(tiny_llama, tmp_path, monkeypatch):
    import llmcli.engines

    monkeypatch.setattr(llmcli.engines, "llama_cpp_installed", lambda: False)
    output = tmp_path / "out"
    result = run_cli("finetune", *grpo_args(tiny_llama, tmp_path, "--max-steps", 1, "--rollout-engine", "llama",
                                            "--max-length", 256), "-o", output)  # (no note on the length first)
    assert_clean_error(result, "--rollout-engine llama needs the llama.cpp engine", "pip install")
    assert not output.exists()
    auto = run_cli("finetune", *grpo_args(tiny_llama, tmp_path, "--max-steps", 1, "--rollout-engine", "auto"),
                   "-o", output)
    assert auto.exit_code == 0, auto.stderr
    assert json.loads((output / "run.json").read_text())["resolved"]["rollout_engine"] == "hf"
