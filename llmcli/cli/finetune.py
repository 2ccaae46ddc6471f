"""`llmcli finetune`."""


from typing import Annotated, Optional

import typer

from llmcli import render
from llmcli.cli.app import app
from llmcli.cli.common import check_fsdp, launch_if_asked
from llmcli.cli.options import (completes, ModelOption, DeviceOption, TrustOption, PickleOption, NumProcessesOption,
                                 NnodesOption, NodeRankOption, MasterAddrOption, MasterPortOption)
from llmcli.errors import UsageError


@app.command()
def finetune(
    data: Annotated[str, typer.Option("--data", "-d", help="Training data: JSONL (text, prompt+completion, "
                                      "messages, prompt+chosen+rejected, or prompt+completion+label), .txt, .csv, "
                                      "or a save_to_disk directory.", show_default=False)],
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory for the model, metrics and "
                                        "checkpoints.")] = "llmcli-finetuned",
    data_eval: Annotated[Optional[str], typer.Option(help="Evaluation data, same format.")] = None,
    model: ModelOption = None,
    objective: Annotated[str, typer.Option(autocompletion=completes("auto", "clm", "mlm", "dpo", "kto", "orpo",
                                                                    "simpo", "grpo"),
                                           help="auto (from the model and data), clm, mlm, a preference "
                                           "objective: dpo, kto, orpo, simpo, or grpo (rewards on sampled "
                                           "completions).")] = "auto",
    beta: Annotated[Optional[float], typer.Option(help="dpo/kto/orpo/simpo: strength of the preference (DPO's "
                                                  "beta; ORPO's lambda), default 0.1. grpo: weight of the KL to "
                                                  "the starting model, default 0.0 as TRL's GRPOConfig (no "
                                                  "reference model kept); e.g. 0.04.", show_default=False)] = None,
    loss_type: Annotated[str, typer.Option(autocompletion=completes("sigmoid", "ipo", "hinge", "robust"),
                                           help="dpo: sigmoid, ipo, hinge or robust (TRL's formulas).")] = "sigmoid",
    label_smoothing: Annotated[float, typer.Option(help="dpo --loss-type robust and simpo: the assumed rate "
                                                   "of flipped preferences, in [0, 0.5).")] = 0.0,
    desirable_weight: Annotated[float, typer.Option(help="kto: weight of the loss on label=true "
                                                    "completions.")] = 1.0,
    undesirable_weight: Annotated[float, typer.Option(help="kto: weight of the loss on label=false "
                                                      "completions.")] = 1.0,
    simpo_gamma: Annotated[float, typer.Option(help="simpo: the margin the chosen answer's mean token "
                                               "log-probability should win by, times --beta (TRL's "
                                               "simpo_gamma).")] = 0.5,
    reference: Annotated[str, typer.Option(autocompletion=completes("auto", "copy", "precomputed"),
                                           help="dpo/kto: the reference model. precomputed: one no-grad pass "
                                           "over the data before training, no second model in memory; copy: "
                                           "a frozen copy beside the policy (the model's weights twice in "
                                           "memory), scored every step; auto: the base with the adapter "
                                           "disabled under --lora, else precomputed (grpo with --beta: a "
                                           "frozen copy, as its completions are new every step).")] = "auto",
    reward: Annotated[Optional[list[str]], typer.Option(help="grpo: a reward function (repeatable): "
                                                        "regex:PATTERN, json-schema:FILE, exact-match[:FIELD], "
                                                        "number-match[:FIELD[:TOL]], length:MIN-MAX, or "
                                                        "FILE.py:NAME (TRL's reward-function signature).",
                                                        show_default=False)] = None,
    reward_weights: Annotated[Optional[list[float]], typer.Option(help="grpo: the weight of each --reward, in "
                                                                  "order (repeatable; default 1 each).",
                                                                  show_default=False)] = None,
    num_generations: Annotated[int, typer.Option(help="grpo: completions sampled per prompt (G, at least 2). "
                                                 "--batch-size counts prompts, so a micro-batch holds "
                                                 "batch-size x G completions: TRL's per_device_train_batch_size "
                                                 "counts completions (it is batch-size x G).")] = 8,
    max_completion_length: Annotated[int, typer.Option(help="grpo: tokens per sampled completion at most.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="grpo: sampling temperature (above "
                                               "0); log-probabilities are scored at it, as TRL.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="grpo: nucleus sampling threshold in (0, 1].")] = 1.0,
    top_k: Annotated[int, typer.Option(help="grpo: sample among the k most likely tokens (0 = off).")] = 0,
    epsilon: Annotated[float, typer.Option(help="grpo: clip range of the probability ratio (TRL's "
                                           "epsilon).")] = 0.2,
    rollout_engine: Annotated[str, typer.Option(autocompletion=completes("auto", "hf", "llama"),
                                                help="grpo: what samples the completions: hf (model.generate "
                                                "on the weights being trained), llama (llama.cpp on those "
                                                "weights, synced every step; about 3x faster sampling, same "
                                                "training not yet shown on a real model), or auto: llama on the "
                                                "CPU where it can run the model, else hf.")] = "hf",
    from_scratch: Annotated[bool, typer.Option(help="Random weights instead of pretrained ones.")] = False,
    arch: Annotated[Optional[str], typer.Option(autocompletion=completes("gpt2", "llama", "bert"), help="Architecture for --from-scratch: gpt2, llama or bert.")] = None,
    config_overrides: Annotated[str, typer.Option(help="Config changes for --from-scratch, e.g. "
                                                  "n_layer=2,n_embd=128,n_head=4.")] = "",
    tokenizer_vocab_size: Annotated[Optional[int], typer.Option(help="Train a tokenizer of this size on the data "
                                                                "(--from-scratch).")] = None,
    text_column: Annotated[str, typer.Option(help="Column holding the text in a .csv file.")] = "text",
    line_by_line: Annotated[bool, typer.Option(help=".txt: one example per line instead of per paragraph.")] = False,
    epochs: Annotated[float, typer.Option(help="Passes over the data (fractions allowed).")] = 1.0,
    max_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps; overrides --epochs.")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 5e-5,
    batch_size: Annotated[int, typer.Option(help="Examples per batch per process (grpo: prompts, each with "
                                            "--num-generations completions).")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Batches per optimizer step.")] = 1,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example (block size when packing). Default: "
                                                      "512, or the model's context if smaller.",
                                                      show_default=False)] = None,
    packing: Annotated[Optional[bool], typer.Option("--packing/--no-packing", help="Concatenate and cut into "
                                                    "--max-length blocks. Default: on for plain text.",
                                                    show_default=False)] = None,
    mask_prompt: Annotated[Optional[bool], typer.Option("--mask-prompt/--no-mask-prompt", help="Loss only on "
                                                        "completions / assistant turns. Default: on for those "
                                                        "formats.", show_default=False)] = None,
    warmup: Annotated[float, typer.Option(help="Warmup steps, or a fraction of all steps when below 1.")] = 0.0,
    scheduler: Annotated[str, typer.Option(help="LR schedule: linear, cosine, constant, ...")] = "linear",
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (not on biases and norms).")] = 0.0,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0 = off).")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed for weights, data order, dropout and masking.")] = 42,
    val_split: Annotated[float, typer.Option(help="Fraction of the data held out for evaluation.")] = 0.0,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps (and at the end).")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option(help="Keep only the last N checkpoints.")] = None,
    log_every: Annotated[int, typer.Option(help="Write a metrics line every N steps.")] = 10,
    resume: Annotated[Optional[str], typer.Option(help="Continue from the latest checkpoint in --output, or "
                                                  "from the checkpoint directory given.", show_default=False)] = None,
    lora: Annotated[bool, typer.Option(help="Train LoRA adapters (peft) instead of all weights.")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 16,
    lora_dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.05,
    lora_targets: Annotated[str, typer.Option(help="Modules to adapt: all-linear or names like q_proj,v_proj.")]
    = "all-linear",
    merge_lora: Annotated[bool, typer.Option(help="Write the merged model instead of the adapter.")] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 mixed precision.")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="float16 mixed precision (GPU).")] = False,
    grad_checkpointing: Annotated[bool, typer.Option(help="Trade compute for memory.")] = False,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="Shard weights, gradients and optimizer state over the GPUs "
                                       "(FSDP2 through accelerate). GPUs only.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --output (and an existing --export-gguf "
                                            "file).")] = False,
    export_gguf: Annotated[Optional[str], typer.Option(help="Also write the result as an F16 GGUF file (a LoRA "
                                                       "adapter merged), for the llama.cpp engine; as llmcli "
                                                       "export.", show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    device: DeviceOption = None,
    trust_remote_code: TrustOption = False,
    allow_pickle: PickleOption = False,
    num_processes: NumProcessesOption = 1,
    nnodes: NnodesOption = 1,
    node_rank: NodeRankOption = 0,
    master_addr: MasterAddrOption = "127.0.0.1",
    master_port: MasterPortOption = None,
) -> None:
    """Finetune a model (or train one from scratch) on your data, with checkpoints that resume exactly."""
    if reward and rollout_engine != "hf":  # GRPO may decode on llama.cpp: set before torch loads libgomp
        from llmcli.engines.llama_import import gentle_openmp

        gentle_openmp()
    from llmcli.tasks.finetune import FinetuneOptions, validate
    from llmcli.tasks.finetune_loop import run

    if bf16 and fp16:
        raise UsageError("--bf16 and --fp16 both given", "Choose one.")
    if fsdp:
        check_fsdp(device)
    options = FinetuneOptions(
        data=data, output=output, data_eval=data_eval, model=model, objective=objective, from_scratch=from_scratch,
        arch=arch, config_overrides=config_overrides, tokenizer_vocab_size=tokenizer_vocab_size,
        text_column=text_column, line_by_line=line_by_line, epochs=epochs, max_steps=max_steps, lr=lr,
        batch_size=batch_size, grad_accum=grad_accum, max_length=max_length, packing=packing,
        mask_prompt=mask_prompt, warmup=warmup, scheduler=scheduler, weight_decay=weight_decay,
        max_grad_norm=max_grad_norm, seed=seed, val_split=val_split, eval_every=eval_every, save_every=save_every,
        keep_checkpoints=keep_checkpoints, log_every=log_every, resume=resume, lora=lora, lora_r=lora_r,
        lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_targets=lora_targets, merge_lora=merge_lora,
        mixed_precision="bf16" if bf16 else "fp16" if fp16 else "no", grad_checkpointing=grad_checkpointing,
        overwrite=overwrite, device=device, trust_remote_code=trust_remote_code, num_processes=num_processes,
        allow_pickle=allow_pickle, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
        desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, simpo_gamma=simpo_gamma,
        reference=reference, reward=reward or [], reward_weights=reward_weights, num_generations=num_generations,
        max_completion_length=max_completion_length, temperature=temperature, top_p=top_p, top_k=top_k,
        epsilon=epsilon, rollout_engine=rollout_engine,
    )
    validate(options)
    if export_gguf:
        from llmcli.tasks.export import check_request

        check_request(export_gguf, "f16", overwrite, option="--export-gguf")  # before hours of training, not after
    launch_if_asked(num_processes, nnodes, node_rank, master_addr, master_port, device)
    if model is None and not from_scratch:
        render.notice("Using the embedded model SmolLM2-135M-Instruct (pass --model, or set LLMCLI_MODEL, to choose another).")
    from llmcli.distributed import rank

    main_process = rank() == 0
    with render.training_progress(enabled=main_process) as reporter:
        result = run(options, reporter)
    if main_process:
        if json_output:
            render.json_line(render.finetune_record(result))
        else:
            render.finetune_summary(result)
        if export_gguf:
            from llmcli.tasks.export import export

            exported = export(result.output, export_gguf, "f16", overwrite)
            size = render.human_size(exported.size_mb * 2**20)
            render.notice(f"Wrote {exported.path} ({size}): llmcli generate -m {exported.path}")

