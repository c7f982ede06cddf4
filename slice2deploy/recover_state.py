"""Resumable recovery runs: checkpoints of the trainable tensors (safetensors) and the optimizer state
(``torch.save``, read back with ``weights_only=True``), keyed by a fingerprint of the run's settings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from .utils import UserInputError, atomic_directory

STATE_WEIGHTS = "trainable.safetensors"
STATE_OPTIMIZER = "optimizer.pt"
STATE_FILE = "state.json"


def state_dir_for(output: Path) -> Path:
    """Where resumable checkpoints of a run writing ``output`` live: a hidden sibling, removed on success."""
    return output.parent / f".{output.name}.recover-state"


def trainable_state(named: Iterator[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    return {name: p.detach().to("cpu").contiguous().clone() for name, p in named if p.requires_grad}


def save_state(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
               record: dict) -> None:
    """Atomically write the trainable tensors (safetensors), the optimizer state (torch.save) and ``record``."""
    from safetensors.torch import save_file

    with atomic_directory(directory, overwrite=True) as tmp:
        save_file(trainable_state(iter(params.items())), str(tmp / STATE_WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / STATE_OPTIMIZER)
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def load_state(directory: Path, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer,
               fingerprint: str) -> dict | None:
    """Restore a checkpoint written by :func:`save_state` for the same run (``fingerprint``); None if there is none.

    A checkpoint of a different run is refused: delete it, or rerun with the settings it was written with.
    """
    from safetensors.torch import load_file

    if not (directory / STATE_FILE).is_file():
        return None
    record = json.loads((directory / STATE_FILE).read_text())
    if record.get("fingerprint") != fingerprint:
        raise UserInputError(f"{directory} holds a checkpoint of a different recovery run (other settings, model or "
                             "data); delete it to start over")
    tensors = load_file(str(directory / STATE_WEIGHTS))
    if set(tensors) != set(params):
        raise UserInputError(f"{directory}: the checkpoint's tensors do not match this run's trainable parameters")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    device = next(iter(params.values())).device
    optimizer.load_state_dict(torch.load(directory / STATE_OPTIMIZER, map_location=device, weights_only=True))
    return record
