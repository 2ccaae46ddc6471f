"""Training checkpoints written atomically (temporary directory + rename) and read back exactly.

A checkpoint holds the trainable weights (safetensors), optimizer and scheduler state, every RNG
state, and the data position, so a resumed run continues bit for bit on CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

from llmcli.errors import UsageError

STATE_FILE = "trainer_state.json"


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A directory without its state file was never finished."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step-*") if d.name[5:].isdigit() and (d / STATE_FILE).is_file()]
    return sorted(found, key=lambda d: int(d.name[5:]))


def rng_states() -> dict[str, Any]:
    """Every RNG state as tensors and plain values, so it loads with torch.load(weights_only=True)."""
    import numpy
    import torch

    name, keys, position, has_gauss, cached = numpy.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [name, torch.from_numpy(keys.astype("int64")), position, has_gauss, cached]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    import numpy
    import torch

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    numpy.random.set_state((name, keys.numpy().astype("uint32"), position, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def trainable_state(model: Any) -> dict[str, Any]:
    """Only what training changes: all weights in a full finetune, the adapters with LoRA."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().contiguous().clone() for name, t in model.state_dict().items() if name in names}


def save_checkpoint(output: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], rank_rngs: list[dict[str, Any]] | None = None,
                    keep: int | None = None) -> Path:
    """Write checkpoints/step-N atomically, with every rank's RNG states (`rank_rngs`, gathered by
    the caller; default: this one process's) as rng-RANK.pt."""
    import torch
    from safetensors.torch import save_file

    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(trainable_state(model), str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        for rank, rngs in enumerate(rank_rngs or [rng_states()]):
            torch.save(rngs, tmp / f"rng-{rank}.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        for file in tmp.iterdir():  # make the data durable before the rename makes it visible
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        if target.exists():  # a checkpoint of this step from an interrupted earlier run
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep:
        for old in checkpoint_dirs(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def find_checkpoint(output: Path, resume: str) -> Path:
    """`latest` (the newest complete checkpoint in the output dir) or a given checkpoint directory."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise UsageError(f"{resume} is not a complete checkpoint (no {STATE_FILE})",
                             f"Pass a checkpoints/step-N directory, or --resume alone for the latest in {output}.")
        return path
    found = checkpoint_dirs(output)
    if not found:
        raise UsageError(f"no complete checkpoint under {output / 'checkpoints'} to resume from",
                         "Drop --resume to start a new run (with --overwrite to replace the directory).")
    return found[-1]


def run_dir(checkpoint: Path) -> Path:
    """The run directory a checkpoint was saved in: RUN/checkpoints/step-N."""
    return checkpoint.parent.parent


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, rank: int = 0) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise UsageError(f"checkpoint {path} does not match this model ({len(missing)} weights missing)",
                         "Resume with the same --model, --lora and --from-scratch settings.")
    model.load_state_dict(weights, strict=False)
    # weights_only: tensors and plain values only, so a tampered checkpoint cannot run code
    states = torch.load(path / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        restore_rng_states(torch.load(rng_file, weights_only=True))
    return json.loads((path / STATE_FILE).read_text())
