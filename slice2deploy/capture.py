"""Capturing what the decoder layers receive (hidden states, masks, rotary embeddings) for calibration."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter


@dataclass
class LayerInputs:
    """One calibration batch as the decoder layers see it."""

    hidden: torch.Tensor  # (B, T, width of the current position), on the storage device
    mask: torch.Tensor  # (B, T) 1 = real token
    kwargs: dict  # what the model passes to the decoder layer being processed (masks, rotary embeddings, ...)
    layer_kwargs: list[dict] = field(default_factory=list)  # per layer: sliding/full layers get different ones

    def use_layer(self, index: int) -> None:
        """Make ``kwargs`` those the model passes to decoder layer ``index``."""
        if self.layer_kwargs:
            self.kwargs = self.layer_kwargs[index]


class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


class _KwargsRecorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records what the model loop passes it, returns its input.

    Models with per-layer attention types (Gemma-3's sliding/full layers, Qwen2/3 max_window_layers) give each
    layer its own mask and rotary embedding; this records them all at the cost of the embedding and the masks.
    """

    def __init__(self, layer: nn.Module, index: int, sink: dict, last: bool):
        super().__init__()
        for key, value in vars(layer).items():  # plain attributes the model loop may read (attention_type, ...)
            if not key.startswith("_") and key != "training" and not isinstance(value, nn.Module):
                setattr(self, key, value)
        self.index, self.last, self._sink = index, last, sink

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("decoder layers are expected to get keyword arguments besides the hidden states")
        if self.index == 0:
            self._sink["hidden"] = hidden_states
        self._sink.setdefault("kwargs", []).append(dict(kwargs))
        if self.last:
            raise StopForward
        return hidden_states


def capture_layer_inputs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         batch_size: int, device: torch.device) -> list[LayerInputs]:
    """Run the model's embedding and layer loop with recorders in place of the decoder layers: keep the first
    layer's inputs and every layer's keyword arguments (the layers are restored afterwards). ``kwargs`` starts as
    the first layer's; :meth:`LayerInputs.use_layer` switches to another layer's."""
    layers = adapter.get_layers(model)
    originals = list(layers)
    batches = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            sink: dict = {}
            for index, layer in enumerate(originals):
                layers[index] = _KwargsRecorder(layer, index, sink, index == len(originals) - 1)
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            batches.append(LayerInputs(sink["hidden"].detach(), mask, sink["kwargs"][0], sink["kwargs"]))
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return batches
