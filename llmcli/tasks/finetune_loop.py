"""The training loop of `llmcli finetune`: steps, evaluation, logging, checkpoints and the final save."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmcli import checkpoints, strict_json
from llmcli.errors import UsageError
from llmcli.tasks.finetune import (
    DEFAULT_MAX_LENGTH,
    FinetuneOptions,
    FinetuneResult,
    Reporter,
    add_lora,
    check_output_dir,
    check_resume_config,
    load_datasets,
    load_model,
    preference_objective,
    refuse_finished_run,
    training_config,
    validate,
    versions,
)
from llmcli.tasks import objectives, reference
from llmcli.tasks.objectives import Objective


def make_accelerator(options: FinetuneOptions) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton that refuses a new mixed precision: reset it (not
    # the distributed PartialState) so a second run in one process (library use, tests) may change it
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True is what turns a torchrun launch on CPU into gloo DDP (MULTI_CPU)
    use_cpu = options.device == "cpu" or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return Accelerator(cpu=use_cpu, mixed_precision=options.mixed_precision)


def use_fused_gelu(model: Any) -> None:
    """Swap GPT-2's tanh-approximated GELU, written as eight tensor ops that each keep their output for
    the backward pass, for torch's single-kernel equal (within rounding; transformers' own
    "gelu_pytorch_tanh"). Measured on a small GPT-2: peak RSS 0.91x, steps 2% faster. Only training
    gets it: generate and eval keep the model's exact arithmetic, and the saved weights are unchanged."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, (NewGELUActivation, FastGELUActivation)):
                setattr(module, name, GELUTanh())


class StepBoundaryInterrupts:
    """Ctrl-C or SIGTERM during a step is acted on when the step ends, so the checkpoint then written
    holds one consistent state. Raised mid-step, the interrupt would save RNG states already advanced
    by the unfinished step's dropout, and the resumed run would drift from an uninterrupted one.

    With several processes every rank must stop at the same step (a checkpoint is a collective
    save), so at each step's end the ranks agree whether any of them was asked to stop (one tiny
    all-reduce). A worker usually gets two signals for one Ctrl-C (its own SIGINT, then the
    launcher's SIGTERM), so only a further one stops it at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator
        self.signals = 0
        self.patience = 1 if accelerator.num_processes == 1 else 2  # signals acted on at the step's end
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.request) for s in self.SIGNALS}

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def request(self, signum: int, frame: Any) -> None:
        self.signals += 1
        if self.signals > self.patience:
            raise KeyboardInterrupt

    def stop_here(self) -> None:
        requested = self.signals > 0
        if self.accelerator.num_processes > 1:
            import torch

            flag = torch.tensor(float(requested), device=self.accelerator.device)
            requested = self.accelerator.reduce(flag, "sum").item() > 0
        if requested:
            raise KeyboardInterrupt


def total_steps(options: FinetuneOptions, batches_per_epoch: int) -> int:
    steps_per_epoch = max(1, batches_per_epoch // options.grad_accum)
    return options.max_steps or max(1, math.ceil(options.epochs * steps_per_epoch))


def batch_tokens(batch: dict[str, Any]) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "prompt_mask" in batch:  # GRPO: prompts and their sampled completions
        return int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())
    return batch["input_ids"].numel()


def evaluate_loss(model: Any, blocks: Any, objective: Objective, options: FinetuneOptions, accelerator: Any) -> float:
    """Mean loss over the evaluation blocks (weighted by scored tokens, or by pairs for preferences),
    summed across processes. The RNG is forked and seeded, so MLM's eval masking is the same every time
    and training randomness is untouched."""
    import torch

    model.eval()
    total = torch.zeros(2, device=accelerator.device)  # summed loss, weight
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        for indices in eval_batches(len(blocks), options.batch_size, accelerator.num_processes,
                                    accelerator.process_index):
            batch = objective.collate([blocks[i] for i in indices])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                loss, _ = objective.loss(model, batch)
            weight = objective.batch_weight(batch)
            total += torch.stack([loss.float() * weight, weight.float()])
    model.train()
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()


def eval_batches(size: int, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's evaluation batches: every world-th example from its rank on, in order."""
    indices = list(range(rank, size, world))
    return [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]


def precomputed_reference(objective: Objective, model: Any, train_blocks: Any, eval_blocks: Any,
                          options: FinetuneOptions, accelerator: Any, output: Path, resume_from: Path | None,
                          reporter: Reporter) -> tuple[Any, Any]:
    """The rows with the reference's log-probabilities (reference.py), scored in the batches the first
    epoch and every evaluation use."""
    world = accelerator.num_processes
    splits = {"train": (train_blocks, [epoch_batches(len(train_blocks), 0, options.seed, options.batch_size, world, r)
                                       for r in range(world)])}
    if eval_blocks is not None:
        splits["eval"] = (eval_blocks, [eval_batches(len(eval_blocks), options.batch_size, world, r)
                                        for r in range(world)])
    rows = reference.attach(objective, model, splits, accelerator, output,
                            checkpoints.run_dir(resume_from) if resume_from is not None else None, reporter.note)
    return rows["train"], rows.get("eval")


def read_metrics(output: Path, up_to_step: int) -> list[dict[str, Any]]:
    """The logged records of the run being resumed, up to its checkpoint (later ones are redone)."""
    path = output / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]


def write_metrics(output: Path, records: list[dict[str, Any]]) -> None:
    with open(output / "metrics.jsonl", "w") as file:
        file.writelines(strict_json.dumps(r) + "\n" for r in records)


def plot_losses(output: Path, records: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    reward_names = [n for n in ("rewards/chosen", "rewards/rejected", "rewards/margins", "reward")
                    if any(n in r for r in records)]
    figure, panels = plt.subplots(1, 2 if reward_names else 1, figsize=(12 if reward_names else 7, 4), squeeze=False)
    axes = panels[0][0]
    for name in reward_names:  # preference objectives: the rewards beside the loss
        panels[0][1].plot(*zip(*[(r["step"], r[name]) for r in records if name in r]), label=name)
    if reward_names:
        panels[0][1].set_xlabel("step")
        panels[0][1].set_title("rewards")
        panels[0][1].legend()
        panels[0][1].grid(alpha=0.3)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        axes.plot(*zip(*train), label="train loss")
    if evals:
        axes.plot(*zip(*evals), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no 2.5 ticks
    axes.set_title(f"{output.name}: loss per step")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output / "loss.png", dpi=100)
    plt.close(figure)
    return True


def save_final(output: Path, model: Any, tokenizer: Any, options: FinetuneOptions, base: str) -> None:
    """The model (or LoRA adapter, or merged model) and tokenizer, written to a temporary directory
    and moved into place file by file, so a crash never leaves a half-written model."""
    tmp = output / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if options.lora and options.merge_lora:
        model = model.merge_and_unload()
    elif options.lora:
        model.peft_config["default"].base_model_name_or_path = base
    if options.lora and not options.merge_lora:
        # peft's "auto" looks for the base's config.json, on the hub when the base is not a directory (an
        # alias, a .gguf file: a network attempt and a warning on every run), to see whether the vocabulary
        # grew; it never does here, so the embedding layers are saved exactly when LoRA targets them
        from peft.utils.other import EMBEDDING_LAYER_NAMES

        targets = model.peft_config["default"].target_modules
        embeddings = not isinstance(targets, str) and any(name in targets for name in EMBEDDING_LAYER_NAMES)
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=embeddings)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    umask = os.umask(0)
    os.umask(umask)
    for file in tmp.iterdir():
        # safetensors writes through a private temporary file (mode 0600): give every file the usual mode
        file.chmod(0o666 & ~umask)
        file.replace(output / file.name)
    tmp.rmdir()


def train(options: FinetuneOptions, output: Path, model: Any, tokenizer: Any, train_blocks: Any, eval_blocks: Any,
          resolved: dict[str, Any], reporter: Reporter, resume_from: Path | None, objective: Objective) -> FinetuneResult:
    import torch
    from transformers import get_scheduler, set_seed

    accelerator = make_accelerator(options)
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    set_seed(options.seed)
    collate = objective.collate
    batches_per_epoch = len(epoch_batches(len(train_blocks), 0, options.seed, options.batch_size, world, rank))
    steps = total_steps(options, batches_per_epoch)
    warmup = int(options.warmup * steps) if options.warmup < 1 else int(options.warmup)
    model.train()
    use_fused_gelu(model)
    optimizer = optimizer_for(model, options)
    scheduler = get_scheduler(options.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    objective.place(accelerator)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "tokens": 0}
    history: list[dict[str, Any]] = []
    if resume_from is not None:
        state = checkpoints.load_checkpoint(resume_from, accelerator.unwrap_model(model), optimizer, scheduler, rank)
        history = read_metrics(checkpoints.run_dir(resume_from), up_to_step=state["step"])
        # a larger --max-steps recomputes the schedule for the new total: the rate goes on from this step of it
        rate = scheduler.lr_lambdas[0](state["step"]) * scheduler.base_lrs[0]
        reporter.note(f"Resuming from {resume_from} (step {state['step']} of {steps}; the learning-rate schedule "
                      f"runs over {steps} steps, at {rate:.3g} now).")
    elif main and options.overwrite and output.is_dir():
        replace_dir_contents(output)
    if main:
        output.mkdir(parents=True, exist_ok=True)  # resuming another run's checkpoint starts a new directory
    accelerator.wait_for_everyone()
    if objective.precompute:
        train_blocks, eval_blocks = precomputed_reference(objective, model, train_blocks, eval_blocks, options,
                                                          accelerator, output, resume_from, reporter)
    if main:
        run = {"training": training_config(options), "resolved": {**resolved, "total_steps": steps,
               "max_steps": options.max_steps, "epochs": options.epochs,
               "warmup_steps": warmup, "world_size": world, "device": str(accelerator.device),
               "distributed_type": str(accelerator.distributed_type)}, "versions": versions()}
        (output / "run.json").write_text(strict_json.dumps(run, indent=2, default=str))
        write_metrics(output, history)
    writer = tensorboard_writer(output) if main else None

    def checkpoint() -> None:
        # every rank's RNG states (its dropout masks), so that N processes resume exactly
        rank_rngs = [checkpoints.rng_states()]
        if world > 1:
            from accelerate.utils import gather_object

            rank_rngs = gather_object(rank_rngs)
        # the loss summed since the last record, so a resumed run logs the same mean
        state["interval_loss"] = (accelerator.reduce(interval[0], "mean") if world > 1 else interval[0]).item()
        state["interval_steps"] = interval[1]
        state["interval_metrics"] = (accelerator.reduce(metric_sums, "mean") if world > 1 else metric_sums).tolist()
        if main:
            checkpoints.save_checkpoint(output, state["step"], accelerator.unwrap_model(model), optimizer, scheduler,
                                        dict(state), rank_rngs, options.keep_checkpoints)
        accelerator.wait_for_everyone()

    reporter.start(steps, state["step"])
    began, tokens_at_start = time.perf_counter(), state["tokens"]
    order = epoch_batches(len(train_blocks), state["epoch"], options.seed, options.batch_size, world, rank)
    last_loss = last_eval = None
    # the logged loss is the mean over the steps since the previous record, as Trainer logs it
    interval = [torch.tensor(float(state.get("interval_loss", 0.0)), device=accelerator.device),
                int(state.get("interval_steps", 0))]
    # the objective's metrics: per name a sum over the micro-batches that gave it and their count
    names = objective.metric_names
    metric_sums = torch.tensor(state.get("interval_metrics", [[0.0, 0.0]] * len(names)), device=accelerator.device,
                               dtype=torch.float32).reshape(len(names), 2)  # float32: MPS has no float64
    interrupts = StepBoundaryInterrupts(accelerator)
    step_start: dict[str, Any] | None = None
    try:
        while state["step"] < steps:
            step_loss = torch.zeros((), device=accelerator.device)
            step_tokens = 0
            step_began = time.perf_counter()
            # a further Ctrl-C stops mid-step: the checkpoint then saved must be this step's start (its rows
            # not yet taken, its RNG not yet used), or the resumed run would skip rows and drift
            step_start = {"epoch": state["epoch"], "batch_in_epoch": state["batch_in_epoch"],
                          "rngs": checkpoints.rng_states(), "metric_sums": metric_sums.clone()}
            step_rows = []
            for micro in range(options.grad_accum):
                if state["batch_in_epoch"] >= len(order):
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
                    order = epoch_batches(len(train_blocks), state["epoch"], options.seed, options.batch_size, world, rank)
                step_rows.append([train_blocks[i] for i in order[state["batch_in_epoch"]]])
                state["batch_in_epoch"] += 1
            # GRPO makes the step's batches up front (rollouts, rewards, the step's token count); the others
            # collate each micro-batch just before its forward, so the RNG (MLM masks, dropout) is used in order
            made = objective.begin_step(model, step_rows, state["step"]) if objective.begin_step else None
            for micro in range(options.grad_accum):
                batch = made[micro] if made is not None else collate(step_rows[micro])
                # counted on the CPU: reading a GPU tensor would wait for the GPU every micro-batch
                step_tokens += batch_tokens(batch)
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                with no_sync_unless(micro == options.grad_accum - 1, accelerator, model):
                    with accelerator.autocast():
                        loss, batch_metrics = objective.loss(model, batch)
                        loss = loss / options.grad_accum
                    accelerator.backward(loss)
                for i, name in enumerate(names):
                    if batch_metrics.get(name) is not None:  # KTO has no chosen-side metrics in a batch without one
                        metric_sums[i] += torch.stack([batch_metrics[name].detach().float(), metric_sums.new_ones(())])
                step_loss += loss.detach()
                # `loss` holds this step's autograd graph: kept alive into the next forward, its nodes sit
                # among the freed activations and fragment the heap (+50 MB peak RSS measured on CPU)
                del loss
            if options.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm)
            step_start["updating"] = True  # from here to the step's count, the weights are neither before nor after
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if objective.end_step:  # metrics of the whole step (GRPO: rewards, and where the time went)
                for name, value in objective.end_step(time.perf_counter() - step_began).items():
                    metric_sums[names.index(name)] += torch.tensor([value, 1.0], device=accelerator.device)
            state["step"] += 1
            if world > 1:
                step_tokens = int(accelerator.reduce(torch.tensor(step_tokens, device=accelerator.device), "sum"))
            state["tokens"] += step_tokens
            interval[0], interval[1] = interval[0] + step_loss, interval[1] + 1
            step_start = None
            reporter.step(state["step"])
            record: dict[str, Any] = {}
            if state["step"] % options.log_every == 0 or state["step"] == steps:
                # the loss is read only when logged: .item() makes the CPU wait for the GPU's queue
                last_loss = accelerator.reduce(interval[0], "mean").item() / interval[1]
                interval[0], interval[1] = torch.zeros((), device=accelerator.device), 0
                seconds = time.perf_counter() - began
                record = {"step": state["step"], "epoch": round(state["epoch"] + state["batch_in_epoch"] / len(order), 4),
                          "loss": last_loss, "lr": scheduler.get_last_lr()[0], "tokens": state["tokens"],
                          "tokens_per_second": (state["tokens"] - tokens_at_start) / seconds if seconds else 0.0}
                if names:
                    sums = (accelerator.reduce(metric_sums, "sum") if world > 1 else metric_sums).tolist()
                    record.update({name: total / count for name, (total, count) in zip(names, sums) if count})
                    metric_sums.zero_()
            if eval_blocks is not None and options.eval_every and (state["step"] % options.eval_every == 0
                                                                    or state["step"] == steps):
                last_eval = evaluate_loss(model, eval_blocks, objective, options, accelerator)
                record = record or {"step": state["step"]}
                record.update(eval_record(last_eval, objective))
            if record:
                history.append(record)
                if main:
                    with open(output / "metrics.jsonl", "a") as file:
                        file.write(strict_json.dumps(record) + "\n")
                    log_tensorboard(writer, record)
                reporter.log(record)
            # the last step too, so a finished run can be extended with a larger --max-steps
            if options.save_every and state["step"] % options.save_every == 0 or state["step"] == steps:
                checkpoint()
            interrupts.stop_here()
    except KeyboardInterrupt:
        if step_start is not None and step_start.get("updating"):
            reporter.note("Interrupted while the weights were being updated: nothing saved; the last checkpoint "
                          "stands.")
        elif state["step"] > 0:
            if step_start is not None:  # stopped mid-step: save the state before it
                state["epoch"], state["batch_in_epoch"] = step_start["epoch"], step_start["batch_in_epoch"]
                checkpoints.restore_rng_states(step_start["rngs"])
                metric_sums.copy_(step_start["metric_sums"])
            checkpoint()
            reporter.note(f"Interrupted: saved checkpoints/step-{state['step']}; continue with --resume.")
        raise
    finally:
        interrupts.restore()
    loop_seconds = time.perf_counter() - began  # training throughput, like Trainer's: saving is not training
    if eval_blocks is not None and last_eval is None:
        last_eval = evaluate_loss(model, eval_blocks, objective, options, accelerator)
        history.append({"step": state["step"], **eval_record(last_eval, objective)})
        if main:
            write_metrics(output, history)
    accelerator.wait_for_everyone()
    if main:
        save_final(output, accelerator.unwrap_model(model), tokenizer, options, resolved["base_model"])
        plot_losses(output, history)
        if writer:
            writer.close()
    seconds = time.perf_counter() - began
    trained = state["tokens"] - tokens_at_start
    return FinetuneResult(str(output), resolved["objective"], resolved["data_format"], state["step"],
                          len(train_blocks), last_loss, last_eval, seconds, state["tokens"],
                          trained / loop_seconds if loop_seconds else 0.0, world, history)


def eval_record(loss: float, objective: Objective) -> dict[str, float]:
    """A perplexity only where the loss is a language model's mean token loss."""
    if objective.name in ("clm", "mlm"):
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700))}
    return {"eval_loss": loss}


def tensorboard_writer(output: Path) -> Any:
    """TensorBoard event files when tensorboard is installed; nothing otherwise."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(output / "tensorboard"))


def log_tensorboard(writer: Any, record: dict[str, Any]) -> None:
    if writer is None:
        return
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            writer.add_scalar(key, value, record["step"])


def run(options: FinetuneOptions, reporter: Reporter | None = None) -> FinetuneResult:
    from transformers import set_seed

    from llmcli.models import quiet_libraries

    reporter = reporter or Reporter()
    quiet_libraries()
    validate(options)
    output = check_output_dir(options)
    resume_from = None
    if options.resume is not None:
        refuse_finished_run(output, options)
        resume_from = checkpoints.find_checkpoint(output, options.resume)
        source_run = checkpoints.run_dir(resume_from)
        if source_run.resolve() != output.resolve() and output.is_dir() and any(output.iterdir()):
            raise UsageError(f"{output} is not empty, and {resume_from} belongs to another run ({source_run})",
                             "Pass a new or empty --output, or the checkpoint's own run directory.")
        check_resume_config(source_run, options)
    data_format, train_data, eval_data = load_datasets(options)
    preference = preference_objective(options, data_format, options.data)
    beta = objectives.DEFAULT_BETA.get(preference, 0.1) if options.beta is None else options.beta
    if beta == 0 and preference and preference != "grpo":
        raise UsageError(f"--beta must be positive for --objective {preference}, got 0",
                         "Use e.g. --beta 0.1 (the default).")
    if options.reference != "auto" and not objectives.needs_reference(preference or "", beta):
        raise UsageError(f"--reference {options.reference}: --objective {preference or options.objective} has no "
                         f"reference model", "Drop --reference; it applies to dpo, kto and grpo with --beta above 0.")
    set_seed(options.seed)  # before any weights are made: from-scratch and LoRA initialisation
    model, tokenizer, kind, base = load_model(options, train_data, data_format)
    objective = preference or {"causal": "clm", "masked": "mlm"}[kind]
    if preference and kind != "causal":
        raise UsageError(f"--objective {preference} trains a causal language model, not this {kind} model",
                         "Use a causal LM (a --model for generate).")
    if not preference and options.objective != "auto" and options.objective != objective:
        raise UsageError(f"--objective {options.objective} does not fit this {kind} model",
                         f"Use --objective {objective} or auto.")
    packing = False if preference else options.packing if options.packing is not None else \
        data_format == "text" or objective == "mlm"
    mask_prompt = options.mask_prompt if options.mask_prompt is not None else data_format != "text"
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if options.max_length is None:  # the default fits the model: a small model's context caps it
        options = replace(options, max_length=min(DEFAULT_MAX_LENGTH, context or DEFAULT_MAX_LENGTH))
        if options.max_length < DEFAULT_MAX_LENGTH:
            reporter.note(f"--max-length defaults to {DEFAULT_MAX_LENGTH}; using {options.max_length}, the model's "
                          f"context.")
    elif context and options.max_length > context:
        raise UsageError(f"--max-length {options.max_length} is above the model's context of {context} tokens",
                         f"Use --max-length {context} or less.")
    settings = dict(objective=objective, max_length=options.max_length, packing=packing, mask_prompt=mask_prompt)
    preferences = objectives.PreferenceSettings(beta, options.loss_type, options.label_smoothing,
                                                options.desirable_weight, options.undesirable_weight,
                                                options.simpo_gamma)
    grpo = grpo_settings(options, objective, beta, train_data, model, tokenizer)
    built = objectives.build(objective, tokenizer, data_format, options.max_length, preferences, settings, grpo)
    train_blocks = built.prepare(train_data, options.data)
    eval_blocks = built.prepare(eval_data, options.data_eval or "validation split") if eval_data is not None else None
    # TRL turns dropout off for DPO, KTO and ORPO (their disable_dropout defaults to True), not for GRPO
    dropout_off = preference in ("dpo", "kto", "orpo", "simpo")
    if dropout_off:
        objectives.disable_dropout(model)
    if preference:
        objectives.attach_reference(built, model, options.lora, options.reference, beta)
    if options.lora:
        model = add_lora(model, options, kind)
        if dropout_off:
            objectives.disable_dropout(model)  # LoRA's own dropout too, as TRL's disable_dropout does
    if options.grad_checkpointing:
        model.gradient_checkpointing_enable()
    resolved = {"objective": objective, "data_format": data_format, "packing": packing, "mask_prompt": mask_prompt,
                "train_blocks": len(train_blocks), "eval_blocks": len(eval_blocks) if eval_blocks else 0,
                "base_model": base}
    if preference:
        resolved.update(packing=None, mask_prompt=None, reference=built.reference, beta=beta)
    if grpo is not None:
        resolved.update(rewards=dict(zip(grpo.rewards.names, grpo.rewards.weights)), loss_type="dapo",
                        scale_rewards="group", rollout_engine=grpo.rollout_engine)
    fresh = resume_from is None and (options.overwrite or not output.is_dir() or not any(output.iterdir()))
    try:
        return train(options, output, model, tokenizer, train_blocks, eval_blocks, resolved, reporter, resume_from,
                     built)
    except BaseException:
        if fresh and not checkpoints.checkpoint_dirs(output):
            # nothing to resume from: what the run wrote (run.json, metrics) would only make the
            # corrected command fail with "not empty"
            replace_dir_contents(output) if output.is_dir() else None
        raise


def grpo_settings(options: FinetuneOptions, objective: str, beta: float, train_data: Any, model: Any = None,
                  tokenizer: Any = None) -> Any:
    """GRPO's settings with its reward functions loaded (a missing file or function is an error now, before
    any training); None for the other objectives, which must not be given --reward."""
    if objective != "grpo":
        if options.reward:
            raise UsageError(f"--reward applies to --objective grpo, not {objective}",
                             "Drop --reward, or train on prompts with --objective grpo.")
        return None
    if not options.reward:  # --objective auto on prompts (an explicit grpo is checked with the other options)
        raise UsageError("--objective grpo needs at least one --reward to score the completions",
                         "Add e.g. --reward 'regex:^\\d+$' or --reward my_rewards.py:score (repeatable).")
    import torch

    from llmcli.tasks.llama_rollouts import resolve_rollout_engine
    from llmcli.tasks.objectives import GRPOSettings
    from llmcli.tasks.rewards import load_rewards
    from llmcli.tasks.rollouts import SamplingSettings

    rewards = load_rewards(options.reward, options.reward_weights,
                           [c for c in train_data.column_names if c != "prompt"])
    sampling = SamplingSettings(options.num_generations, options.max_completion_length, options.temperature,
                                options.top_p, options.top_k)
    on_cpu = options.device == "cpu" or not (torch.cuda.is_available() or torch.backends.mps.is_available())
    engine = resolve_rollout_engine(options.rollout_engine, model, tokenizer, on_cpu)
    return GRPOSettings(sampling, rewards, options.epsilon, beta, options.seed, engine)


def epoch_batches(size: int, epoch: int, seed: int, batch_size: int, world: int, rank: int) -> list[list[int]]:
    """This rank's batches of example indices for an epoch: a seeded permutation, wrapped around so
    that every rank gets the same number of full batches (as DistributedSampler pads)."""
    import torch

    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_step = batch_size * world
    steps = math.ceil(size / per_step)
    order = (order * math.ceil(steps * per_step / size))[: steps * per_step]
    return [order[s * per_step + rank * batch_size: s * per_step + (rank + 1) * batch_size] for s in range(steps)]


def optimizer_for(model: Any, options: FinetuneOptions) -> Any:
    """AdamW without weight decay on biases and norm weights (the usual split)."""
    import torch

    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # fused AdamW: one kernel for all parameters, 3x faster steps on CPU (as Trainer's default)
        return torch.optim.AdamW(groups, lr=options.lr, fused=True)
    except RuntimeError:  # devices or dtypes without a fused kernel
        return torch.optim.AdamW(groups, lr=options.lr)


def replace_dir_contents(output: Path) -> None:
    """--overwrite: empty the output directory (only after every input has been validated)."""
    for child in output.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def no_sync_unless(last: bool, accelerator: Any, model: Any) -> Any:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    return nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(model)
