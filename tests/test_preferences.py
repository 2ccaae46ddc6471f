"""`llmcli finetune --objective dpo | kto | orpo | simpo`: equal to TRL's trainers, bad input, resume, the
reference precomputed or copied, 2 processes.

The equality tests train the tiny Llama with llmcli and with TRL 1.16 in the same test, on the same
records in the same order (TRL reads them sequentially in llmcli's shuffled order), with the same
hyperparameters on the CPU in float32, and compare every step's loss and metrics and the final weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from test_errors import assert_clean_error

STEPS, BATCH, LR, SEED = 3, 2, 1e-3, 42
RTOL = 1e-5

PAIRS = [
    ("The license is", " free software for all", " a secret contract"),
    ("You may copy", " and share the program", " nothing at all"),
    ("Source code is", " the preferred form for making changes", " hidden"),
    ("Warranty:", " there is no warranty", " full warranty forever"),
    ("Patents may", " not restrict your freedom", " be used against users"),
    ("Distribute copies", " with the license text", " without notice"),
]


def string_pairs() -> list[dict]:
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]


def chat_pairs() -> list[dict]:
    return [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c.strip()}],
             "rejected": [{"role": "assistant", "content": r.strip()}]} for p, c, r in PAIRS]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def llmcli_order(size: int) -> list[int]:
    """The record order of llmcli's first epoch (one process)."""
    from llmcli.tasks.finetune_loop import epoch_batches

    return [i for batch in epoch_batches(size, 0, SEED, BATCH, 1, 0) for i in batch]


def run_llmcli(model_dir: Path, data: Path, output: Path, *options: str) -> tuple[list[dict], dict]:
    result = run_cli("finetune", "-d", str(data), "-m", str(model_dir), "-o", str(output), "--max-steps", str(STEPS),
                     "--batch-size", str(BATCH), "--lr", str(LR), "--seed", str(SEED), "--log-every", "1", *options)
    assert result.exit_code == 0, result.stderr
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    if (output / "adapter_model.safetensors").is_file():  # LoRA: named as in the PeftModel's state dict
        adapter = load_file(str(output / "adapter_model.safetensors"))
        return records, {name.replace(".weight", ".default.weight"): t for name, t in adapter.items()}
    trained, start = load_file(str(output / "model.safetensors")), load_file(str(model_dir / "model.safetensors"))
    assert any((trained[name] != start[name]).any() for name in start)  # training moved the weights
    return records, trained


def run_trl(trainer_name: str, model_dir: Path, records: list[dict], output: Path, lora: bool = False,
            **config) -> tuple[list[dict], dict]:
    """TRL's trainer on the records in llmcli's order, read sequentially, with llmcli's hyperparameters."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import trl
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    trainer_class, config_class = {"dpo": (trl.DPOTrainer, trl.DPOConfig), "kto": (trl.KTOTrainer, trl.KTOConfig),
                                   "orpo": (ORPOTrainer, ORPOConfig), "cpo": (CPOTrainer, CPOConfig)}[trainer_name]
    ordered = [records[i] for i in llmcli_order(len(records))]
    args = config_class(
        output_dir=str(output), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=LR, seed=SEED,
        lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, train_sampling_strategy="sequential",
        max_length=256, disable_tqdm=True, bf16=False, **config)  # TRL defaults to bf16; the comparison is float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    extra: dict = {}
    if lora:  # llmcli's defaults for --lora
        from peft import LoraConfig

        extra["peft_config"] = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                          task_type="CAUSAL_LM")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token  # ORPO's collator wants one; padding is masked out either way
    trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(ordered),
                            processing_class=tokenizer, **extra)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def relative_error(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / max(abs(theirs), 1e-12)


def compare(ours: list[dict], theirs: list[dict], keys: tuple[str, ...], our_weights: dict, their_weights: dict,
            beta: float) -> None:
    """Every step's `keys` within RTOL relative, and the final weights within RTOL (atol 1e-7).

    A reward is beta * (log p - log p_ref) of sequences whose log-probabilities are around -50 to -100:
    the difference of two nearly equal float32 sums. After the first update the two trainers' weights
    differ in the last bits (TRL's chunked log-softmax has its own backward), so a reward can differ by
    an ulp of those sums. Rewards and margins are therefore held to RTOL relative to the sums they are
    made of (beta * |logps|; KTO's kl to |logps|), the loss and the log-probabilities to RTOL relative
    to themselves."""
    import torch

    assert [r["step"] for r in ours] == list(range(1, STEPS + 1)) and len(theirs) == STEPS
    worst: dict[str, float] = {}
    for step, (mine, reference) in enumerate(zip(ours, theirs), start=1):
        scale = beta * max(abs(reference.get(k, 0.0)) for k in ("logps/chosen", "logps/rejected"))
        for key in keys:
            if key not in reference:  # KTO: a batch without a desirable (or undesirable) completion
                assert key not in mine, (step, key)
                continue
            if key.startswith("rewards/") and key != "rewards/accuracies":
                error = abs(mine[key] - reference[key]) / scale
            elif key == "kl":  # KTO's KL estimate: also a difference of sums of log-probabilities
                error = abs(mine[key] - reference[key]) / (scale / beta)
            else:
                error = relative_error(mine[key], reference[key]) if reference[key] else abs(mine[key])
            assert error <= RTOL, (step, key, mine[key], reference[key], error)
            worst[key] = max(worst.get(key, 0.0), error)
    assert our_weights.keys() <= their_weights.keys()
    # Adam turns a gradient at rounding level into a step of about lr for that weight, so weights are held
    # to 1e-5 absolute (they are about 0.02 in size, the steps about 1e-3), not relative per element
    weight_error = 0.0
    for name, tensor in our_weights.items():
        torch.testing.assert_close(tensor, their_weights[name], rtol=RTOL, atol=RTOL, msg=name)
        weight_error = max(weight_error, (tensor - their_weights[name]).abs().max().item())
    print("\nlargest differences from TRL:", {k: f"{v:.1e}" for k, v in worst.items()},
          f"weights (absolute) {weight_error:.1e}")


DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected")


@pytest.mark.parametrize("loss_type, beta, label_smoothing", [("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0),
                                                               ("hinge", 0.2, 0.0), ("robust", 0.1, 0.1)])
def test_dpo_equals_trl(loss_type, beta, label_smoothing, tiny_llama, tmp_path):
    records = string_pairs()
    ours, our_weights = run_llmcli(tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", records), tmp_path / "ours",
                                   "--objective", "dpo", "--beta", str(beta), "--loss-type", loss_type,
                                   "--label-smoothing", str(label_smoothing))
    theirs, their_weights = run_trl("dpo", tiny_llama, records, tmp_path / "trl", beta=beta, loss_type=[loss_type],
                                    label_smoothing=label_smoothing)
    compare(ours, theirs, DPO_KEYS, our_weights, their_weights, beta)
    assert ours[-1]["rewards/margins"] != 0.0  # it learned something, so the comparison means something


def test_dpo_with_lora_equals_trl_with_peft(tiny_llama, tmp_path):
    """--lora: the reference is the same model with its adapter disabled, as TRL does with a PeftModel."""
    records = string_pairs()
    ours, our_weights = run_llmcli(tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", records), tmp_path / "ours",
                                   "--lora", "--beta", "0.3")
    theirs, their_weights = run_trl("dpo", tiny_llama, records, tmp_path / "trl", lora=True, beta=0.3)
    compare(ours, theirs, DPO_KEYS, our_weights, their_weights, 0.3)
    assert any(r["rewards/margins"] != 0 for r in ours)
    run = json.loads((tmp_path / "ours" / "run.json").read_text())
    assert run["resolved"]["reference"] == "the base model with the LoRA adapter disabled"


def test_dpo_on_chat_messages_equals_trl(tiny_llama, tmp_path):
    records = chat_pairs()
    ours, our_weights = run_llmcli(tiny_llama, write_jsonl(tmp_path / "chat.jsonl", records), tmp_path / "ours")
    theirs, their_weights = run_trl("dpo", tiny_llama, records, tmp_path / "trl", beta=0.1)
    compare(ours, theirs, DPO_KEYS, our_weights, their_weights, 0.1)
    run = json.loads((tmp_path / "ours" / "run.json").read_text())
    assert run["resolved"]["objective"] == "dpo" and run["resolved"]["data_format"] == "preference"
    assert run["resolved"]["reference"] == PRECOMPUTED
    png = (tmp_path / "ours" / "loss.png").read_bytes()
    assert int.from_bytes(png[16:20], "big") == 1200  # two panels: the loss, and the rewards beside it


PRECOMPUTED = "log-probabilities of the starting model, computed once before training"


def test_dpo_reference_precomputed_equals_copy_and_trl(tiny_llama, tmp_path):
    """--reference precomputed (the default without LoRA) against a frozen copy: the first epoch scores
    the reference in the same batches either way, so losses, metrics, evaluation and final weights are
    bit-identical; and both equal TRL's precompute_ref_log_probs=True within RTOL."""
    records = string_pairs()
    data = write_jsonl(tmp_path / "pairs.jsonl", records)
    evaluation = ["--data-eval", str(data), "--eval-every", "3"]
    copied, copy_weights = run_llmcli(tiny_llama, data, tmp_path / "copy", "--reference", "copy", *evaluation)
    precomputed, weights = run_llmcli(tiny_llama, data, tmp_path / "pre", "--reference", "precomputed", *evaluation)
    without_speed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]
    assert without_speed(precomputed) == without_speed(copied) and "eval_loss" in precomputed[-1]
    assert all((weights[name] == copy_weights[name]).all() for name in copy_weights)
    runs = {name: json.loads((tmp_path / name / "run.json").read_text())["resolved"] for name in ("copy", "pre")}
    assert runs["copy"]["reference"] == "a frozen copy of the starting model"
    assert runs["pre"]["reference"] == PRECOMPUTED
    assert (tmp_path / "pre" / "reference_logps.safetensors").is_file()
    assert not (tmp_path / "copy" / "reference_logps.safetensors").exists()
    theirs, their_weights = run_trl("dpo", tiny_llama, records, tmp_path / "trl", beta=0.1,
                                    precompute_ref_log_probs=True)
    compare([r for r in precomputed if "loss" in r], theirs, DPO_KEYS, weights, their_weights, 0.1)


def count_models_during_training(monkeypatch, *args: str) -> tuple[int, int]:
    """(models, parameters) alive while the first training step runs `llmcli finetune ARGS`: the
    PreTrainedModel instances in this process that the run made, and the elements of all their distinct
    parameter storages."""
    import gc

    from transformers import PreTrainedModel

    from llmcli.tasks import finetune_loop

    def alive() -> list:
        gc.collect()
        return [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]

    before = {id(model) for model in alive()}  # earlier tests' models, not this run's
    seen: list[tuple[int, int]] = []
    train = finetune_loop.train

    def probe(*train_args):
        objective = train_args[-1]
        loss = objective.loss

        def counted(model, batch):
            if not seen:
                models = [o for o in alive() if id(o) not in before]
                inner = {id(sub) for m in models for sub in list(m.modules())[1:]}  # LlamaModel inside its LM
                models = [m for m in models if id(m) not in inner]
                storages = {p.untyped_storage().data_ptr(): p.numel() for m in models for p in m.parameters()}
                seen.append((len(models), sum(storages.values())))
            return loss(model, batch)

        objective.loss = counted
        return train(*train_args)

    monkeypatch.setattr(finetune_loop, "train", probe)
    result = run_cli("finetune", *args)
    assert result.exit_code == 0, result.stderr
    return seen[0]


def test_lora_and_precomputed_references_hold_no_second_copy(tiny_llama, tmp_path, monkeypatch):
    """Under --lora (the base with the adapter disabled) and with a precomputed reference, one model is
    alive while training, with one set of weights; a frozen copy shows as a second model with as many
    weights again, so the probe would see a copy if one were made."""
    from safetensors.torch import load_file

    size = sum(t.numel() for t in load_file(str(tiny_llama / "model.safetensors")).values())
    common = ["-d", str(write_jsonl(tmp_path / "pairs.jsonl", string_pairs())), "-m", str(tiny_llama), "--max-steps",
              "1", "--batch-size", "2"]
    lora_models, lora_weights = count_models_during_training(monkeypatch, *common, "-o", str(tmp_path / "lora"),
                                                             "--lora")
    assert lora_models == 1 and size < lora_weights < 1.5 * size  # the base and its adapters (a copy: 2x)
    assert count_models_during_training(monkeypatch, *common, "-o", str(tmp_path / "pre")) == (1, size)
    assert count_models_during_training(monkeypatch, *common, "-o", str(tmp_path / "copy"), "--reference",
                                        "copy") == (2, 2 * size)


KTO_KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def labelled_completions() -> list[dict]:
    return [{"prompt": p, "completion": answer, "label": good}
            for p, c, r in PAIRS for answer, good in ((c, True), (r, False))][:8]


@pytest.mark.parametrize("reference", ["copy", "precomputed"])
def test_kto_equals_trl(reference, tiny_llama, tmp_path):
    """Precomputed, the KL pairs are fixed before training as TRL fixes them (each row with the previous
    completion of its first-epoch batch), and their reference log-probabilities are precomputed too."""
    records = labelled_completions()
    records[0]["label"] = records[1]["label"] = False  # unbalanced, so a batch may lack desirable answers
    ours, our_weights = run_llmcli(tiny_llama, write_jsonl(tmp_path / "kto.jsonl", records), tmp_path / "ours",
                                   "--objective", "kto", "--desirable-weight", "1.3", "--undesirable-weight", "0.8",
                                   "--reference", reference)
    theirs, their_weights = run_trl("kto", tiny_llama, records, tmp_path / "trl", beta=0.1, desirable_weight=1.3,
                                    undesirable_weight=0.8, precompute_ref_log_probs=reference == "precomputed")
    compare(ours, theirs, KTO_KEYS, our_weights, their_weights, 0.1)
    assert any(r["kl"] > 0 for r in ours[1:])  # the KL estimate is in play after the first step


ORPO_KEYS = DPO_KEYS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@pytest.mark.parametrize("chat", [False, True])
def test_orpo_equals_trl(chat, tiny_llama, tmp_path):
    records = chat_pairs() if chat else string_pairs()
    ours, our_weights = run_llmcli(tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", records), tmp_path / "ours",
                                   "--objective", "orpo", "--beta", "0.2")
    theirs, their_weights = run_trl("orpo", tiny_llama, records, tmp_path / "trl", beta=0.2)
    compare(ours, theirs, ORPO_KEYS, our_weights, their_weights, 0.2)
    run = json.loads((tmp_path / "ours" / "run.json").read_text())
    assert run["resolved"]["reference"] == "none"


SIMPO_KEYS = DPO_KEYS + ("logits/chosen", "logits/rejected")


@pytest.mark.parametrize("chat, gamma, label_smoothing", [(False, 0.5, 0.0), (True, 1.2, 0.1)])
def test_simpo_equals_trl(chat, gamma, label_smoothing, tiny_llama, tmp_path):
    """TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0 (pure SimPO, no NLL term)."""
    records = chat_pairs() if chat else string_pairs()
    ours, our_weights = run_llmcli(tiny_llama, write_jsonl(tmp_path / "pairs.jsonl", records), tmp_path / "ours",
                                   "--objective", "simpo", "--beta", "2.0", "--simpo-gamma", str(gamma),
                                   "--label-smoothing", str(label_smoothing))
    theirs, their_weights = run_trl("cpo", tiny_llama, records, tmp_path / "trl", beta=2.0, loss_type="simpo",
                                    simpo_gamma=gamma, cpo_alpha=0.0, label_smoothing=label_smoothing)
    compare(ours, theirs, SIMPO_KEYS, our_weights, their_weights, 2.0)
    assert json.loads((tmp_path / "ours" / "run.json").read_text())["resolved"]["reference"] == "none"


@pytest.mark.parametrize("records, objective, fragments", [
    ([{"prompt": "a", "rejected": "b"}], "dpo", ["line 1: no 'chosen' field"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": " same", "rejected": " same"}], "dpo",
     ["line 2: 'chosen' equals 'rejected'"]),
    ([{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}], "dpo",
     ["'prompt' is a list of messages but 'chosen' is a str"]),
    ([{"prompt": "a", "completion": "b", "label": "yes"}], "kto", ["'label' must be true or false"]),
    ([{"text": "plain text"}], "dpo", ["--objective dpo needs records with prompt, chosen and rejected", "text records"]),
    ([{"prompt": "a", "completion": "b"}], "kto", ["--objective kto needs records with prompt, completion and label"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], "kto", ["--objective kto does not fit", "preference records"]),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], "clm", ["--objective clm does not fit", "dpo or orpo"]),
])
def test_bad_preference_input_is_one_error_line(records, objective, fragments, tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", records)
    output = tmp_path / "out"
    result = run_cli("finetune", "-d", str(data), "-m", str(tiny_llama), "-o", str(output), "--objective", objective,
                     "--max-steps", "1")
    assert_clean_error(result, *fragments)
    assert not output.exists()  # nothing written


def test_bad_preference_options(tiny_llama, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", string_pairs())
    for options, fragment in ((["--loss-type", "nope"], "unknown --loss-type 'nope'"),
                              (["--beta", "0"], "--beta must be positive"),
                              (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5)"),
                              (["--packing"], "--packing does not apply to --objective dpo"),
                              (["--reference", "nope"], "unknown --reference 'nope'"),
                              (["--reference", "copy", "--lora"], "--reference copy with --lora"),
                              (["--reference", "copy", "--objective", "orpo"], "--objective orpo has no reference"),
                              (["--from-scratch", "--arch", "llama"], "not random weights")):
        result = run_cli("finetune", "-d", str(data), "-m", str(tiny_llama), "-o", str(tmp_path / "out"), *options)
        assert_clean_error(result, fragment)
        assert not (tmp_path / "out").exists()


def test_dpo_kill_and_resume_equals_uninterrupted(tiny_llama, tmp_path):
    """SIGKILL after checkpoint 2 of 5, then --resume: bit-identical weights and the same metrics, the
    reference staying the starting model (not the checkpoint's weights)."""
    from test_finetune import kill_after_checkpoint, same_weights, weights

    args = ["-d", write_jsonl(tmp_path / "pairs.jsonl", string_pairs()), "-m", tiny_llama, "--max-steps", "5",
            "--batch-size", "2", "--lr", "1e-3", "--log-every", "1", "--save-every", "1"]
    straight = tmp_path / "straight"
    assert run_cli("finetune", *map(str, args), "-o", str(straight)).exit_code == 0
    killed = tmp_path / "killed"
    kill_after_checkpoint(args, killed, 2)
    resumed = run_cli("finetune", *map(str, args), "-o", str(killed), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert same_weights(weights(killed), weights(straight))
    assert (killed / "metrics.jsonl").read_text().count("rewards/margins") == 5
    lines = lambda path: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_second"}
                          for line in (path / "metrics.jsonl").read_text().splitlines()]
    assert lines(killed) == lines(straight)


def test_resume_refuses_a_precomputed_reference_of_other_data(tiny_llama, tmp_path):
    """The saved reference log-probabilities belong to the data they were computed on: resuming on
    changed records is refused, not trained against numbers of other text."""
    data = write_jsonl(tmp_path / "pairs.jsonl", string_pairs())
    args = ["finetune", "-d", data, "-m", tiny_llama, "-o", tmp_path / "run", "--batch-size", "2", "--save-every", "1"]
    assert run_cli(*args, "--max-steps", "1").exit_code == 0
    write_jsonl(data, [{**r, "chosen": r["chosen"] + " indeed"} for r in string_pairs()])
    resumed = run_cli(*args, "--max-steps", "2", "--resume")
    assert resumed.exit_code == 2 and "Traceback" not in resumed.stderr, resumed.stderr
    assert "Error: cannot resume: the data differs from the data" in resumed.stderr  # after the "Resuming" note
    assert not (tmp_path / "run" / "checkpoints" / "step-2").exists()


def test_chat_and_string_records_are_not_mixed(tmp_path):
    from llmcli.data import load_training_data
    from llmcli.errors import DataError

    data = write_jsonl(tmp_path / "mixed.jsonl", string_pairs()[:1] + chat_pairs()[1:2])
    with pytest.raises(DataError, match="line 2: a chat record among records of the other kind"):
        load_training_data(str(data))
    assert load_training_data(str(write_jsonl(tmp_path / "kto.jsonl", labelled_completions())))[0] == \
        "unpaired-preference"


def test_dpo_on_two_processes_equals_one(tiny_llama, tmp_path):
    """Two processes of 2 pairs against one process of 2 pairs accumulated twice: the same pairs in each
    step, and DDP's mean of the two gradients, (a + b) / 2 (a sum of two values over gloo has one
    order), is bit for bit the accumulated a / 2 + b / 2; the precomputed reference is gathered from
    both processes, each having scored its own first-epoch batches, which are the one process's batches.
    So every training record and the weights are identical. Evaluation sums its batches in another
    order on two processes (rel 1e-6, as tests/test_finetune.py's). Against one process with batches of
    4 the arithmetic itself differs (other padding widths and sums): measured, the metrics agree to
    about 1e-6 relative and the weights to about 1e-7, held to 1e-5."""
    import os
    import subprocess
    import sys

    from test_finetune import weights

    data = write_jsonl(tmp_path / "pairs.jsonl", string_pairs()[:4])  # one step an epoch, either way
    common = ["finetune", "-d", data, "-m", tiny_llama, "--max-steps", "3", "--lr", "1e-3", "--log-every", "1",
              "--data-eval", data, "--eval-every", "3"]
    two = subprocess.run([sys.executable, "-m", "llmcli", *map(str, common), "-o", str(tmp_path / "two"),
                          "--batch-size", "2", "--num-processes", "2"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "run.json").read_text())["resolved"]["world_size"] == 2
    for name, options in (("accumulated", ["--batch-size", "2", "--grad-accum", "2"]), ("single", ["--batch-size", "4"])):
        assert run_cli(*common, "-o", tmp_path / name, *options).exit_code == 0
    lines = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("two", "accumulated", "single")}
    training = lambda name: [{k: v for k, v in r.items() if k not in ("tokens_per_second", "eval_loss")}
                             for r in lines[name]]
    assert training("two") == training("accumulated") and len(training("two")) == 3
    evaluated = [(a["eval_loss"], b["eval_loss"]) for a, b in zip(lines["two"], lines["accumulated"]) if "eval_loss" in b]
    assert len(evaluated) == 1 and all(a == pytest.approx(b, rel=1e-6) for a, b in evaluated)
    assert all((weights(tmp_path / "two")[k] == w).all() for k, w in weights(tmp_path / "accumulated").items())
    worst = 0.0
    for mine, single in zip(training("two"), training("single")):
        for key in DPO_KEYS:
            scale = 0.1 * abs(single["logps/chosen"]) if key.startswith("rewards/") else abs(single[key]) or 1.0
            worst = max(worst, abs(mine[key] - single[key]) / scale)
    weight_error = max((weights(tmp_path / "two")[k] - w).abs().max().item()
                       for k, w in weights(tmp_path / "single").items())
    print(f"\n2 processes against one of batch 4: metrics {worst:.1e} relative, weights {weight_error:.1e}")
    assert worst <= RTOL and weight_error <= RTOL
