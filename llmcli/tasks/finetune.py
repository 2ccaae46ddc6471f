"""Finetuning (or training from scratch): options, their checks, and loading the data and model.
The accelerate loop that trains (CPU, one GPU or many processes) is `finetune_loop.run`.

Our own loop rather than `Trainer`, for exact resume: the data order is a seeded permutation per
epoch, a checkpoint records how many batches were consumed, and every RNG state is saved, so a run
killed after step k and resumed ends with bit-identical weights on CPU.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmcli.errors import DataError, UsageError

# Options that may differ between a run and its resumption; all others must match.
RESUMABLE_CHANGES = {"resume", "overwrite", "save_every", "keep_checkpoints", "eval_every", "log_every",
                     "num_processes", "max_steps", "epochs", "output"}


DEFAULT_MAX_LENGTH = 512  # tokens per example, when the model's context allows


@dataclass
class FinetuneOptions:
    data: str
    output: str
    data_eval: str | None = None
    model: str | None = None
    objective: str = "auto"  # auto | clm | mlm | dpo | kto | orpo | simpo
    from_scratch: bool = False
    arch: str | None = None
    config_overrides: str = ""
    tokenizer_vocab_size: int | None = None
    text_column: str = "text"
    line_by_line: bool = False
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 5e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int | None = None  # None: DEFAULT_MAX_LENGTH, capped to the model's context
    packing: bool | None = None  # default: on for plain text, off for prompt/completion and chat
    mask_prompt: bool | None = None  # default: on for prompt/completion and chat
    warmup: float = 0.0  # steps, or a fraction of all steps when below 1
    scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    val_split: float = 0.0
    eval_every: int | None = None
    save_every: int | None = None
    keep_checkpoints: int | None = None
    log_every: int = 10
    resume: str | None = None  # "latest" or a checkpoint directory
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    merge_lora: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16
    grad_checkpointing: bool = False
    overwrite: bool = False
    device: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False
    num_processes: int = 1
    # preference objectives (TRL's names and defaults)
    beta: float | None = None  # None: the objective's own (TRL's): 0.1 for dpo, kto and orpo, 0.0 for grpo
    loss_type: str = "sigmoid"  # dpo: sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # dpo --loss-type robust, simpo
    desirable_weight: float = 1.0  # kto
    undesirable_weight: float = 1.0  # kto
    simpo_gamma: float = 0.5  # simpo: the target margin (TRL's simpo_gamma)
    reference: str = "auto"  # dpo/kto: auto | copy | precomputed
    # grpo (TRL GRPOConfig's names and defaults)
    reward: list[str] = field(default_factory=list)  # reward specs, see llmcli.tasks.rewards
    reward_weights: list[float] | None = None  # one per --reward; None: 1.0 each
    num_generations: int = 8
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    epsilon: float = 0.2
    # auto | hf | llama (llmcli.tasks.llama_rollouts). hf by default: llama.cpp samples ~3x faster on the CPU, but
    # that it trains the embedded model as hf does was not shown (docs/finetune.md, "Rollout engines")
    rollout_engine: str = "hf"


OBJECTIVES = ("auto", "clm", "mlm", "dpo", "kto", "orpo", "simpo", "grpo")


@dataclass
class FinetuneResult:
    output: str
    objective: str
    data_format: str
    steps: int
    train_examples: int
    final_loss: float | None
    eval_loss: float | None
    seconds: float  # the whole run, saving included
    tokens: int
    tokens_per_second: float  # over the training loop
    world_size: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Reporter:
    """How the task tells the CLI what is happening; the CLI draws it."""

    start: Callable[[int, int], None] = lambda total, done: None
    step: Callable[[int], None] = lambda done: None  # every optimizer step: the progress bar and its ETA move
    log: Callable[[dict[str, Any]], None] = lambda record: None  # every --log-every steps
    note: Callable[[str], None] = lambda message: None


def validate(options: FinetuneOptions) -> None:
    checks = [
        (options.objective in OBJECTIVES, f"unknown --objective {options.objective!r}",
         "Use auto, clm, mlm, dpo, kto, orpo, simpo or grpo."),
        (options.beta is None or options.beta >= 0, f"--beta must not be negative, got {options.beta}", None),
        (options.num_generations >= 2, f"--num-generations must be at least 2, got {options.num_generations}",
         "GRPO scores each completion against the others sampled for its prompt: use 2 or more (TRL's default is 8)."),
        (options.max_completion_length >= 1,
         f"--max-completion-length must be at least 1, got {options.max_completion_length}", None),
        (options.temperature > 0, f"--temperature must be positive, got {options.temperature}",
         "GRPO samples its completions: greedy ones would all be alike."),
        (0 < options.top_p <= 1, f"--top-p must be in (0, 1], got {options.top_p}", None),
        (options.top_k >= 0, f"--top-k must not be negative, got {options.top_k}", None),
        (options.epsilon > 0, f"--epsilon must be positive, got {options.epsilon}", None),
        (options.rollout_engine in ("auto", "hf", "llama"), f"unknown --rollout-engine {options.rollout_engine!r}",
         "Use auto, hf or llama."),
        (options.objective != "grpo" or options.reward, "--objective grpo needs at least one --reward to score the "
         "completions", "Add e.g. --reward 'regex:^\\d+$' or --reward my_rewards.py:score (repeatable)."),
        (not options.reward or options.objective in ("auto", "grpo"),
         f"--reward applies to --objective grpo, not {options.objective}",
         "Drop --reward, or train on prompts with --objective grpo."),
        (options.reward_weights is None or len(options.reward_weights) == len(options.reward),
         f"--reward-weights has {len(options.reward_weights or [])} weights for {len(options.reward)} --reward",
         "Give one weight per --reward, in the same order."),
        (options.loss_type in ("sigmoid", "ipo", "hinge", "robust"), f"unknown --loss-type {options.loss_type!r}",
         "Use sigmoid, ipo, hinge or robust."),
        (0 <= options.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {options.label_smoothing}",
         None),
        (options.desirable_weight > 0 and options.undesirable_weight > 0,
         "--desirable-weight and --undesirable-weight must be positive", None),
        (options.reference in ("auto", "copy", "precomputed"), f"unknown --reference {options.reference!r}",
         "Use auto, copy or precomputed."),
        (not (options.lora and options.reference == "copy"),
         "--reference copy with --lora: the reference is the base model with the adapter disabled, no copy needed",
         "Drop --reference copy (or use --reference precomputed)."),
        (options.epochs > 0, f"--epochs must be positive, got {options.epochs}", None),
        (options.max_steps is None or options.max_steps > 0, f"--max-steps must be at least 1, got {options.max_steps}", None),
        (options.lr > 0, f"--lr must be positive, got {options.lr}", None),
        (options.batch_size > 0, f"--batch-size must be at least 1, got {options.batch_size}", None),
        (options.grad_accum > 0, f"--grad-accum must be at least 1, got {options.grad_accum}", None),
        (options.max_length is None or options.max_length >= 2,
         f"--max-length must be at least 2, got {options.max_length}", None),
        (options.warmup >= 0, f"--warmup must not be negative, got {options.warmup}", None),
        (options.weight_decay >= 0, f"--weight-decay must not be negative, got {options.weight_decay}", None),
        (options.max_grad_norm >= 0, f"--max-grad-norm must not be negative, got {options.max_grad_norm}", None),
        (0 <= options.val_split < 1, f"--val-split must be in [0, 1), got {options.val_split}", None),
        (not (options.val_split and options.data_eval), "--val-split and --data-eval both given", "Choose one."),
        (options.eval_every is None or options.eval_every > 0, "--eval-every must be at least 1", None),
        (options.save_every is None or options.save_every > 0, "--save-every must be at least 1", None),
        (options.keep_checkpoints is None or options.keep_checkpoints > 0, "--keep-checkpoints must be at least 1", None),
        (options.log_every > 0, "--log-every must be at least 1", None),
        (options.lora_r > 0, f"--lora-r must be at least 1, got {options.lora_r}", None),
        (0 <= options.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {options.lora_dropout}", None),
        (not options.merge_lora or options.lora, "--merge-lora needs --lora", "Add --lora."),
        (not (options.lora and options.from_scratch), "--lora trains adapters on a pretrained model, not from scratch",
         "Drop --lora or --from-scratch."),
        (options.mixed_precision in ("no", "bf16", "fp16"), f"unknown precision {options.mixed_precision!r}", None),
        (not (options.resume and options.overwrite), "--resume and --overwrite contradict each other", "Choose one."),
        (options.from_scratch or not (options.arch or options.config_overrides or options.tokenizer_vocab_size),
         "--arch, --config-overrides and --tokenizer-vocab-size need --from-scratch", "Add --from-scratch."),
        (options.arch is None or options.arch in ("gpt2", "llama", "bert"), f"unknown --arch {options.arch!r}",
         "Use gpt2, llama or bert, or --model to take its config."),
        (not (options.from_scratch and options.arch is None and options.model is None),
         "--from-scratch needs an architecture", "Add --arch gpt2|llama|bert, or --model to take its config."),
    ]
    for ok, message, hint in checks:
        if not ok:
            raise UsageError(message, hint)
    from transformers import SchedulerType

    if options.scheduler not in [s.value for s in SchedulerType]:
        raise UsageError(f"unknown --scheduler {options.scheduler!r}",
                         "Use linear, cosine, constant, constant_with_warmup, polynomial or inverse_sqrt.")


def check_output_dir(options: FinetuneOptions) -> Path:
    output = Path(options.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"output {output} is a file, not a directory", "Pass a directory path with --output.")
    if options.resume is None and output.is_dir() and any(output.iterdir()) and not options.overwrite:
        raise UsageError(f"output directory {output} is not empty",
                         "Pass --overwrite to replace it, --resume to continue its run, or another --output.")
    probe = output if output.exists() else next((p for p in output.parents if p.exists()), Path("."))
    if not probe.is_dir() or not _writable(probe):
        raise UsageError(f"cannot write to {probe}", "Choose an --output where you have write permission.")
    return output


def _writable(path: Path) -> bool:
    import os

    return os.access(path, os.W_OK | os.X_OK)


def load_datasets(options: FinetuneOptions) -> tuple[str, Any, Any]:
    from llmcli.data import load_training_data

    prompts_only = options.objective == "grpo"  # every field but the prompt goes to the rewards, even 'label'
    data_format, train = load_training_data(options.data, options.text_column, options.line_by_line, prompts_only)
    evaluation = None
    if data_format == "prompt-only" and (options.data_eval or options.val_split):
        raise UsageError("--data-eval and --val-split are not supported with --objective grpo yet",
                         "Drop them; the reward and its per-function means in metrics.jsonl show the progress.")
    if options.data_eval:
        eval_format, evaluation = load_training_data(options.data_eval, options.text_column, options.line_by_line)
        if eval_format != data_format:
            raise DataError(f"{options.data_eval} holds {eval_format} records but {options.data} holds {data_format}",
                            "Use the same format for training and evaluation data.")
    elif options.val_split:
        if len(train) < 2:
            raise DataError(f"{options.data} has {len(train)} record, too few to split off validation data",
                            "Drop --val-split or add data.")
        split = train.train_test_split(test_size=options.val_split, seed=options.seed)
        train, evaluation = split["train"], split["test"]
    return data_format, train, evaluation


def preference_objective(options: FinetuneOptions, data_format: str, data: str) -> str | None:
    """The preference objective the options and data ask for (None: language modeling), or a UsageError
    when they do not fit each other. `auto` picks DPO for pairs and KTO for labelled completions."""
    from llmcli.tasks.objectives import PREFERENCE_OBJECTIVES

    wanted = options.objective
    if data_format in ("preference", "unpaired-preference", "prompt-only"):
        fitting = [name for name, form in PREFERENCE_OBJECTIVES.items() if form == data_format]
        chosen = fitting[0] if wanted == "auto" else wanted
        if chosen not in fitting:
            raise UsageError(f"--objective {wanted} does not fit {data}, which holds {data_format} records",
                             f"Use --objective {' or '.join(fitting)}, or data made for {wanted}.")
        if options.packing:
            raise UsageError(f"--packing does not apply to --objective {chosen}: each record is one example",
                             "Drop --packing.")
        if options.from_scratch:
            raise UsageError(f"--objective {chosen} tunes a pretrained model's preferences, not random weights",
                             "Drop --from-scratch, or train on text first and pass that model with --model.")
        return chosen
    if wanted in PREFERENCE_OBJECTIVES:
        needed = {"preference": "prompt, chosen and rejected", "unpaired-preference": "prompt, completion and label",
                  "prompt-only": "a prompt (and the fields the rewards read)"}[PREFERENCE_OBJECTIVES[wanted]]
        raise UsageError(f"--objective {wanted} needs records with {needed}, but {data} holds {data_format} records",
                         "Pass preference data, or --objective auto to train on this data as it is.")
    return None


def load_model(options: FinetuneOptions, train: Any, data_format: str) -> tuple[Any, Any, str, str]:
    """(model, tokenizer, kind, base location): pretrained, or a fresh model from scratch."""
    from llmcli import models
    from llmcli.scratch import build_from_scratch

    if options.from_scratch:
        base_config = base_tokenizer = None
        if options.model is not None:
            from transformers import AutoConfig, AutoTokenizer

            location = models.local_model_dir(models.resolve_model(options.model))
            base_config = AutoConfig.from_pretrained(location, trust_remote_code=options.trust_remote_code)
            if options.tokenizer_vocab_size is None:
                base_tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=options.trust_remote_code)
        model, tokenizer, kind = build_from_scratch(options.arch, base_config, base_tokenizer, options.config_overrides,
                                                    options.tokenizer_vocab_size, train, data_format)
        return model, tokenizer, kind, ""
    kind = {"auto": "auto", "mlm": "masked"}.get(options.objective, "causal")
    loaded = models.load_model(options.model, kind=kind, device="cpu", dtype="float32",
                               trust_remote_code=options.trust_remote_code, allow_pickle=options.allow_pickle)
    return loaded.model, loaded.tokenizer, loaded.kind, models.portable_reference(loaded.source)


def add_lora(model: Any, options: FinetuneOptions, kind: str) -> Any:
    from peft import LoraConfig, get_peft_model

    targets: Any = options.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM" if kind == "causal" else None,
                        # GPT-2's Conv1D layers store weights transposed: said up front, peft does not warn
                        fan_in_fan_out=model.config.model_type == "gpt2")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise UsageError(f"--lora-targets {options.lora_targets!r}: {exc}",
                         "Name linear layers of this model, e.g. q_proj,v_proj, or use all-linear.") from exc


def training_config(options: FinetuneOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if k not in RESUMABLE_CHANGES}


def refuse_finished_run(output: Path, options: FinetuneOptions) -> None:
    """A bare --resume on a run that wrote its final model and asks for no more steps: say so, instead
    of "no checkpoint" or a run of zero steps."""
    run_file = output / "run.json"
    finished = (output / "config.json").is_file() or (output / "adapter_config.json").is_file()
    if options.resume != "latest" or not finished or not run_file.is_file():
        return
    run = json.loads(run_file.read_text())
    total = run.get("resolved", {}).get("total_steps")
    # max_steps and epochs may change on resume (to train on), so they are kept apart from "training"
    same_length = all(run.get("resolved", {}).get(key) == getattr(options, key) for key in ("max_steps", "epochs"))
    if total is not None and same_length:
        raise UsageError(f"the run in {output} is finished ({total} steps), so there is nothing to resume",
                         "Pass a larger --max-steps or --epochs with --resume to train on, or use a new --output.")


def check_resume_config(output: Path, options: FinetuneOptions) -> None:
    run_file = output / "run.json"
    if not run_file.is_file():
        return
    saved = json.loads(run_file.read_text()).get("training", {})
    current = training_config(options)
    if current.get("max_length") is None:  # not given: the run's own (resolved) value is used again
        current.pop("max_length", None)
    changed = sorted(k for k in current if k in saved and saved[k] != current[k])
    if changed:
        raise UsageError(f"--resume with different settings than the run in {output}: {', '.join(changed)}",
                         "Resume with the original options (see run.json).")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("llmcli", "torch", "transformers", "accelerate", "datasets", "peft", "tokenizers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
