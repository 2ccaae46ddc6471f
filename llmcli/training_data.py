"""Turn a training `datasets.Dataset` into token blocks with labels, and batch them.

Labels use -100 for tokens that carry no loss (prompts when --mask-prompt, padding), the
convention of transformers' loss functions.
"""

from __future__ import annotations

from typing import Any

from llmcli.errors import DataError, UsageError

IGNORE = -100


def with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    """End each document with EOS so a packed block shows where one text stops and the next begins."""
    eos = tokenizer.eos_token_id
    return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
    """(start, end) token spans of each assistant message in the rendered chat.

    Rendered incrementally (the conversation up to a turn with a generation prompt, then through the
    turn), which works with any template whose renderings extend each other."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        spans.append((len(tokenizer(before, add_special_tokens=False)["input_ids"]),
                      len(tokenizer(through, add_special_tokens=False)["input_ids"])))
    return spans


def tokenize_example(tokenizer: Any, data_format: str, example: dict[str, Any], mask_prompt: bool) -> dict[str, list]:
    if data_format == "text":
        ids = with_eos(tokenizer, tokenizer(example["text"])["input_ids"])
        return {"input_ids": ids, "labels": list(ids)}
    if data_format == "prompt-completion":
        # the boundary comes from tokenizing the prompt alone, the sequence from the joined text,
        # so the completion's first token is what the model really sees after this prompt
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        ids = with_eos(tokenizer, tokenizer(example["prompt"] + example["completion"])["input_ids"])
        labels = [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):] if mask_prompt else list(ids)
        return {"input_ids": ids, "labels": labels}
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("chat 'messages' data needs a tokenizer with a chat template",
                         "Use a chat model or convert the data to prompt/completion records.")
    text = tokenizer.apply_chat_template(example["messages"], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not mask_prompt:
        return {"input_ids": ids, "labels": list(ids)}
    labels = [IGNORE] * len(ids)
    for start, end in assistant_spans(tokenizer, example["messages"]):
        labels[start:end] = ids[start:end]
    return {"input_ids": ids, "labels": labels}


def tokenize_dataset(dataset: Any, tokenizer: Any, data_format: str, mask_prompt: bool, objective: str) -> Any:
    """Batched `datasets.map` from records to input_ids/labels (MLM labels are made by the collator)."""
    def tokenize_batch(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        out = [tokenize_example(tokenizer, data_format, row, mask_prompt and objective == "clm") for row in rows]
        return {"input_ids": [o["input_ids"] for o in out], "labels": [o["labels"] for o in out]}

    return dataset.map(tokenize_batch, batched=True, remove_columns=dataset.column_names,
                       desc="Tokenizing", load_from_cache_file=False)


def pack_blocks(dataset: Any, max_length: int) -> Any:
    """Concatenate all examples and cut them into blocks of max_length (run_clm's group_texts);
    the remainder shorter than a block is kept as a last, shorter block rather than dropped."""
    def group(batch: dict[str, list]) -> dict[str, list]:
        ids = [t for row in batch["input_ids"] for t in row]
        labels = [t for row in batch["labels"] for t in row]
        return {"input_ids": [ids[i:i + max_length] for i in range(0, len(ids), max_length)],
                "labels": [labels[i:i + max_length] for i in range(0, len(labels), max_length)]}

    # one map batch over everything, so block boundaries do not depend on map's batch size
    return dataset.map(group, batched=True, batch_size=len(dataset), desc="Packing", load_from_cache_file=False)


def truncate(dataset: Any, max_length: int) -> Any:
    return dataset.map(lambda row: {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]},
                       desc="Truncating", load_from_cache_file=False)


def prepare(dataset: Any, tokenizer: Any, data_format: str, *, objective: str, max_length: int,
            packing: bool, mask_prompt: bool, name: str) -> Any:
    tokenized = tokenize_dataset(dataset, tokenizer, data_format, mask_prompt, objective)
    blocks = pack_blocks(tokenized, max_length) if packing else truncate(tokenized, max_length)
    blocks = blocks.filter(lambda row: len(row["input_ids"]) >= 2 and any(t != IGNORE for t in row["labels"][1:]),
                           load_from_cache_file=False)
    if len(blocks) == 0:
        raise DataError(f"{name} gives no training example of at least 2 tokens with a label",
                        "Pass more text, or check --mask-prompt.")
    return blocks


def make_collator(tokenizer: Any, objective: str) -> Any:
    """Pads a list of rows into a batch. MLM: transformers' 15% masking with the 80/10/10 rule."""
    import torch

    if objective == "mlm":
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token is None:
            raise UsageError("masked-LM training needs a tokenizer with a mask token", "Use --objective clm.")
        mlm = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=0.15)
        return lambda rows: mlm([{"input_ids": row["input_ids"]} for row in rows])

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def collate(rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        width = max(len(row["input_ids"]) for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            labels[i, :n] = torch.tensor(row["labels"])
            attention[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}

    return collate
