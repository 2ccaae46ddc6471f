"""A preference objective's reference, precomputed: the starting model's log-probabilities of every
record, from one no-grad pass before training (TRL's `precompute_ref_log_probs`), stored with the rows
so that no second model stays in memory.

The pass runs over the first epoch's batches, so that epoch sees exactly the numbers a frozen copy
would give. The values are saved in the run directory and reloaded on `--resume`: by then the model
holds the checkpoint's weights, which are not the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmcli.errors import UsageError
from llmcli.tasks.objectives import Objective

REFERENCE_FILE = "reference_logps.safetensors"
PARTNER = "KL_partner"  # KTO: the row whose completion each row's KL term pairs with its prompt


def kl_partners(size: int, batches: list[list[int]]) -> list[int]:
    """KTO's mismatched pairs fixed once, as TRL fixes them when it prepares the data: each row with the
    previous row's completion in its first-epoch batch (what the in-batch rotation gives in that epoch).
    A row that a wrapped-around batch repeats keeps its first partner."""
    partner = [-1] * size
    for batch in batches:
        for position, index in enumerate(batch):
            if partner[index] < 0:
                partner[index] = batch[position - 1]
    return partner


def fingerprint(rows: Any) -> str:
    """A digest of the tokenized rows, so that reloaded values are refused if the data has changed."""
    columns = sorted(c for c in rows.column_names if c.endswith("_ids"))
    return hashlib.sha256(json.dumps({c: list(rows[c]) for c in columns}).encode()).hexdigest()


def reference_pass(objective: Objective, model: Any, rows: Any, batches: list[list[int]], accelerator: Any) -> dict:
    """{column: float32 tensor by row} of the reference's log-probabilities: this process scores its
    `batches` (lists of row indices), and the processes' results are gathered."""
    import torch

    scored: list[tuple[list[int], dict[str, list[float]]]] = []
    model.eval()
    with torch.no_grad():
        for indices in batches:
            batch = {k: v.to(accelerator.device) for k, v in objective.collate([rows[i] for i in indices]).items()}
            with accelerator.autocast():
                values = objective.score_reference(model, batch)
            scored.append((indices, {name: v.float().cpu().tolist() for name, v in values.items()}))
    model.train()
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        scored = gather_object(scored)
    columns: dict[str, list[float | None]] = {}
    for indices, values in scored:
        for name, numbers in values.items():
            column = columns.setdefault(name, [None] * len(rows))
            for index, number in zip(indices, numbers):
                if column[index] is None:  # a row repeated by a wrapped-around batch keeps its first value
                    column[index] = number
    assert all(None not in column for column in columns.values()), "a row was left out of the reference pass"
    return {name: torch.tensor(column, dtype=torch.float32) for name, column in columns.items()}


def with_columns(rows: Any, columns: dict[str, Any]) -> Any:
    """The rows with the reference's values (and KTO's fixed partners' completions) added."""
    if PARTNER in columns:
        completions = list(rows["completion_ids"])
        rows = rows.add_column("KL_completion_ids", [completions[p] for p in columns[PARTNER].tolist()])
    for name, values in columns.items():
        if name != PARTNER:
            rows = rows.add_column(name, values.tolist())
    return rows


def compute(objective: Objective, model: Any, rows: Any, batches_by_rank: list[list[list[int]]],
            accelerator: Any) -> dict[str, Any]:
    import torch

    columns: dict[str, Any] = {}
    if "completion_ids" in rows.column_names:  # KTO: the pairs are part of what is precomputed
        partners = kl_partners(len(rows), [b for batches in batches_by_rank for b in batches])
        columns[PARTNER] = torch.tensor(partners, dtype=torch.int64)
        rows = with_columns(rows, columns)
    columns.update(reference_pass(objective, model, rows, batches_by_rank[accelerator.process_index], accelerator))
    return columns


def save(path: Path, splits: dict[str, dict[str, Any]], digests: dict[str, str]) -> None:
    from safetensors.torch import save_file

    tensors = {f"{split}.{name}": values for split, columns in splits.items() for name, values in columns.items()}
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(tensors, str(tmp), metadata={"fingerprints": json.dumps(digests)})
    os.replace(tmp, path)


def load(path: Path, digests: dict[str, str]) -> dict[str, dict[str, Any]]:
    from safetensors import safe_open

    if not path.is_file():
        raise UsageError(f"cannot resume: {path} is missing (the starting model's log-probabilities, which the "
                         f"checkpoint's weights cannot give again)",
                         "A run from before --reference kept a frozen copy: resume it with --reference copy.")
    with safe_open(str(path), "pt") as file:
        saved = json.loads(file.metadata().get("fingerprints", "{}"))
        if saved != digests:
            raise UsageError(f"cannot resume: the data differs from the data {path} was computed on",
                             "Resume with the run's own data, or start a new run.")
        splits: dict[str, dict[str, Any]] = {}
        for key in file.keys():
            split, name = key.split(".", 1)
            splits.setdefault(split, {})[name] = file.get_tensor(key)
    return splits


def attach(objective: Objective, model: Any, splits: dict[str, tuple[Any, list[list[list[int]]]]], accelerator: Any,
           output: Path, resume_run: Path | None, note: Any) -> dict[str, Any]:
    """{split: rows with the reference's values}: computed now and saved in `output`, or, resuming, read
    from the resumed run's file (copied into `output` when that is a new directory)."""
    digests = {split: fingerprint(rows) for split, (rows, _) in splits.items()}
    target = output / REFERENCE_FILE
    if resume_run is not None:
        columns = load(resume_run / REFERENCE_FILE, digests)
        if accelerator.is_main_process and resume_run.resolve() != output.resolve():
            shutil.copyfile(resume_run / REFERENCE_FILE, target)
    else:
        note(f"Computing the reference log-probabilities of {sum(len(rows) for rows, _ in splits.values())} "
             f"records, once, before training.")
        columns = {split: compute(objective, model, rows, batches, accelerator)
                   for split, (rows, batches) in splits.items()}
        if accelerator.is_main_process:
            save(target, columns, digests)
    accelerator.wait_for_everyone()
    return {split: with_columns(rows, columns[split]) for split, (rows, _) in splits.items()}
