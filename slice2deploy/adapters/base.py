"""The adapter contract: a declaration of where the residual stream is read and written.

An adapter never re-implements a forward pass. It names, for one architecture family, the embedding modules
that write the residual stream, the decoder layers, and per layer the *stages* (attention, MLP): the norm in
front of each stage, the linears that read from the stream, the linears that write back to it, and how the
stage's sub-modules are called. Everything else (folding, rotation, slicing, the sliced model's forward)
is generic and driven by these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..utils import UserInputError


class StageKind:
    """How a stage's sub-modules are called: attention gets the layer's keyword arguments, an MLP does not."""

    ATTENTION = "attention"
    MLP = "mlp"


@dataclass(frozen=True)
class Stage:
    """One residual branch of a decoder layer: ``x ← x + branch(norm(x))``."""

    name: str  # "attn" / "mlp": used for parameter names of the residual shortcut
    kind: str  # StageKind
    norm: str  # attribute of the layer holding the norm in front of the branch
    readers: tuple[str, ...]  # dotted paths (inside the layer) of linears reading the normed stream
    writers: tuple[str, ...]  # dotted paths of linears writing the branch output into the stream
    call: tuple[str, ...]  # sub-modules applied in order (attention: exactly one)

    def __post_init__(self) -> None:
        if self.kind not in (StageKind.ATTENTION, StageKind.MLP):
            raise TypeError(f"stage {self.name}: unknown kind {self.kind!r}")
        if not self.readers or not self.writers or not self.call:
            raise TypeError(f"stage {self.name}: readers, writers and call must be non-empty")
        if self.kind == StageKind.ATTENTION and len(self.call) != 1:
            raise TypeError(f"stage {self.name}: an attention stage calls exactly one module")

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "norm": self.norm, "call": list(self.call)}


class Adapter:
    """Declarative description of one architecture family. Subclass and register with ``@register_adapter``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    embeddings: ClassVar[tuple[str, ...]] = ()  # modules (from the CausalLM root) writing the first position
    layers: ClassVar[str] = ""  # dotted path of the ModuleList of decoder layers
    final_norm: ClassVar[str] = ""
    head: ClassVar[str] = "lm_head"
    stages: ClassVar[tuple[Stage, ...]] = ()
    norm_kind: ClassVar[str] = "rms"  # "rms" or "layer" (LayerNorm: bias and mean-subtraction folded as well)
    min_transformers: ClassVar[str] = "5.0"
    tiny_config: ClassVar[dict] = {}  # a small config used by the test-suite fixture of this adapter

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.model_types:  # an intermediate base class
            return
        missing = [name for name in ("embeddings", "layers", "final_norm", "stages") if not getattr(cls, name)]
        if missing:
            raise TypeError(f"adapter {cls.__name__} does not declare {', '.join(missing)}")
        if cls.norm_kind not in ("rms", "layer"):
            raise TypeError(f"adapter {cls.__name__}: norm_kind must be 'rms' or 'layer'")
        names = [stage.name for stage in cls.stages]
        if len(set(names)) != len(names):
            raise TypeError(f"adapter {cls.__name__}: stage names must be unique")
        if not cls.tiny_config:
            raise TypeError(f"adapter {cls.__name__} has no tiny_config test fixture")

    # --- hooks an adapter may override -------------------------------------------------------------------
    def check_supported(self, config) -> None:
        """Raise ``UserInputError`` for variants of the family that the declarations do not describe."""

    def norm_eps(self, config) -> float:
        return float(getattr(config, "rms_norm_eps", getattr(config, "layer_norm_eps", 1e-5)))

    def norm_scale_and_bias(self, norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The affine part of a norm as (scale, bias); None where absent."""
        return getattr(norm, "weight", None), getattr(norm, "bias", None)

    def hidden_size(self, config) -> int:
        return int(config.hidden_size)

    # --- helpers -------------------------------------------------------------------------------------------
    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def num_positions(self, num_layers: int) -> int:
        """Residual positions: the embedding output, the input of every stage, the final norm's input."""
        return num_layers * len(self.stages) + 1

    def runtime_layout(self) -> dict:
        """What the sliced model's forward needs to know, stored in its config (JSON)."""
        return {
            "embeddings": list(self.embeddings),
            "layers": self.layers,
            "final_norm": self.final_norm,
            "head": self.head,
            "stages": [stage.as_dict() for stage in self.stages],
            "readers": {stage.name: list(stage.readers) for stage in self.stages},
            "writers": {stage.name: list(stage.writers) for stage in self.stages},
        }


_REGISTRY: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``cls`` the adapter of every ``model_type`` it declares."""
    for model_type in cls.model_types:
        if model_type in _REGISTRY:
            raise TypeError(f"model_type {model_type!r} already has adapter {_REGISTRY[model_type].__name__}")
        _REGISTRY[model_type] = cls
    return cls


def registered_adapters() -> dict[str, type[Adapter]]:
    return dict(_REGISTRY)


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(config) -> Adapter:
    """The adapter for a model config (by ``config.model_type``); a clear error when there is none."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UserInputError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
        )
    adapter = _REGISTRY[model_type]()
    adapter.check_supported(config)
    return adapter

