"""The adapter contract: a declaration of where the residual stream is read and written.

An adapter never re-implements a forward pass. It names, for one architecture family, the embedding modules
that write the residual stream, the decoder layers, and per layer the *stages* (attention, MLP): the norm in
front of each stage, the linears that read from the stream, the linears that write back to it, and how the
stage's sub-modules are called. Everything else (folding, rotation, slicing, the sliced model's forward)
is generic and driven by these declarations.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import nn

from ..modeling import stage_groups
from ..utils import UserInputError


class StageKind:
    """How a stage's sub-modules are called: attention gets the layer's keyword arguments, an MLP does not."""

    ATTENTION = "attention"
    MLP = "mlp"


class Topology(str, Enum):
    """How a layer's stages meet the residual stream.

    ``sequential`` (Llama, OPT): ``x ← x + attn(norm₁(x)); x ← x + mlp(norm₂(x))`` — one residual position per stage.
    ``parallel`` (Phi-2, GPT-J, GPT-NeoX): ``x ← x + attn(norm(x)) + mlp(norm(x))`` — all stages read the layer's
    input position and write its output position, so a layer has one position and one shortcut.
    """

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


@dataclass(frozen=True)
class Stage:
    """One residual branch of a decoder layer: ``x ← x + post_norm(branch(norm(x)))`` (post_norm optional)."""

    name: str  # "attn" / "mlp": used for parameter names of the residual shortcut
    kind: str  # StageKind
    norm: str  # attribute of the layer holding the norm in front of the branch
    readers: tuple[str, ...]  # dotted paths (inside the layer) of linears reading the normed stream
    writers: tuple[str, ...]  # dotted paths of linears producing the branch output
    call: tuple[str, ...]  # sub-modules applied in order (attention: exactly one)
    # attribute of the layer holding a norm applied to the branch output before the residual add (Gemma-2/3's
    # post_attention_layernorm / post_feedforward_layernorm). The writers then write into the branch's own space and
    # the norm's mix matrix (see fold.py) is what writes into the residual stream.
    post_norm: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in (StageKind.ATTENTION, StageKind.MLP):
            raise TypeError(f"stage {self.name}: unknown kind {self.kind!r}")
        if not self.readers or not self.writers or not self.call:
            raise TypeError(f"stage {self.name}: readers, writers and call must be non-empty")
        if self.kind == StageKind.ATTENTION and len(self.call) != 1:
            raise TypeError(f"stage {self.name}: an attention stage calls exactly one module")

    @property
    def residual_writers(self) -> tuple[str, ...]:
        """The linears whose output rows live in the residual stream (rotated by the output basis)."""
        return (f"{self.post_norm}.mix",) if self.post_norm else self.writers

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "norm": self.norm, "call": list(self.call),
                "post_norm": self.post_norm}


class Adapter:
    """Declarative description of one architecture family. Subclass and register with ``@register_adapter``."""

    model_types: ClassVar[tuple[str, ...]] = ()
    embeddings: ClassVar[tuple[str, ...]] = ()  # modules (from the CausalLM root) writing the first position
    layers: ClassVar[str] = ""  # dotted path of the ModuleList of decoder layers
    final_norm: ClassVar[str] = ""
    head: ClassVar[str] = "lm_head"
    stages: ClassVar[tuple[Stage, ...]] = ()
    topology: ClassVar[Topology] = Topology.SEQUENTIAL
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
        if not isinstance(cls.topology, Topology):
            raise TypeError(f"adapter {cls.__name__}: topology must be a Topology, got {cls.topology!r}")
        if cls.norm_kind == "layer" and any(stage.post_norm for stage in cls.stages):
            raise TypeError(f"adapter {cls.__name__}: post-norms are supported for RMSNorm families only")

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
        """Residual positions: the embedding output, the input of every stage group, the final norm's input."""
        return num_layers * len(self.groups()) + 1

    def groups(self) -> tuple[tuple[Stage, ...], ...]:
        """Stages grouped by the residual position they read: one group per position of a layer."""
        return tuple(tuple(group) for group in stage_groups(list(self.stages), self.topology.value))

    def residual_norm_paths(self) -> tuple[str, ...]:
        """Every norm of a layer that acts on the residual stream or a branch output (folded), each once."""
        paths = [stage.norm for stage in self.stages] + [stage.post_norm for stage in self.stages if stage.post_norm]
        return tuple(dict.fromkeys(paths))

    def check_textbook(self, feature: str) -> None:
        """Refuse ``feature`` for families beyond sequential blocks without post-norms (what it was written for)."""
        if self.topology is not Topology.SEQUENTIAL or any(stage.post_norm for stage in self.stages):
            raise UserInputError(f"{feature} supports sequential pre-norm blocks (Llama, Mistral, Qwen, Phi-3, OPT); "
                                 f"{type(self).__name__} has {self.topology.value} blocks"
                                 f"{' with post-norms' if any(s.post_norm for s in self.stages) else ''}")

    def runtime_layout(self) -> dict:
        """What the sliced model's forward needs to know, stored in its config (JSON)."""
        return {
            "embeddings": list(self.embeddings),
            "layers": self.layers,
            "final_norm": self.final_norm,
            "head": self.head,
            "stages": [stage.as_dict() for stage in self.stages],
            "topology": self.topology.value,
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

