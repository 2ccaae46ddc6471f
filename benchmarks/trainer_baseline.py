"""The plain Hugging Face way to finetune a causal LM: run_clm's tokenize + group_texts, then Trainer.

Prints one JSON line: tokens_per_second (tokens the model trained on over Trainer's own train_runtime),
peak_rss_mb and, on a GPU, peak_gpu_mb (torch's peak allocation)."""

import argparse
import json

import torch

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, default_data_collator

parser = argparse.ArgumentParser()
for name, kind in [("--model", str), ("--data", str), ("--output", str), ("--max-length", int), ("--batch-size", int),
                   ("--max-steps", int), ("--lr", float), ("--seed", int)]:
    parser.add_argument(name, type=kind, required=True)
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
blocks = [b.strip("\n") for b in open(args.data).read().split("\n\n") if b.strip()]
dataset = Dataset.from_dict({"text": blocks})
tokenized = dataset.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])


def group_texts(examples):  # run_clm.py
    concatenated = {k: sum(examples[k], []) for k in examples}
    total = (len(concatenated["input_ids"]) // args.max_length) * args.max_length
    result = {k: [t[i:i + args.max_length] for i in range(0, total, args.max_length)] for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result


train = tokenized.map(group_texts, batched=True, batch_size=len(tokenized))
training_args = TrainingArguments(
    output_dir=args.output, per_device_train_batch_size=args.batch_size, max_steps=args.max_steps,
    learning_rate=args.lr, seed=args.seed, logging_steps=10**6, save_strategy="no", report_to=[],
    use_cpu=args.device == "cpu", dataloader_num_workers=0, disable_tqdm=True,
)
# Counted as the model sees them: an epoch's last batch can be short, so steps x batch x length overcounts
trained = {"tokens": 0}
model.register_forward_pre_hook(
    lambda module, positional, named: trained.update(tokens=trained["tokens"] + int(named["attention_mask"].sum())),
    with_kwargs=True)
result = Trainer(model=model, args=training_args, train_dataset=train, data_collator=default_data_collator).train()
tokens = trained["tokens"]
peak = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print(json.dumps({"tokens": tokens, "tokens_per_second": tokens / result.metrics["train_runtime"], "peak_rss_mb": peak,
                  "peak_gpu_mb": gpu}))
