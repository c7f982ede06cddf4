"""Capturing what the first decoder layer receives (hidden states, masks, rotary embeddings) for calibration."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter


@dataclass
class LayerInputs:
    """One calibration batch as the first decoder layer sees it."""

    hidden: torch.Tensor  # (B, T, width of the current position), on the storage device
    mask: torch.Tensor  # (B, T) 1 = real token
    kwargs: dict  # what the model passes to every decoder layer (masks, rotary embeddings, ...)


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def capture_layer_inputs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         batch_size: int, device: torch.device) -> list[LayerInputs]:
    """Run the model up to its first decoder layer and keep that layer's inputs and keyword arguments."""
    first_layer = adapter.get_layers(model)[0]
    captured: dict = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = dict(kwargs)
        raise StopForward

    batches = []
    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            batches.append(LayerInputs(captured["hidden"].detach(), mask, captured["kwargs"]))
    finally:
        handle.remove()
    return batches
