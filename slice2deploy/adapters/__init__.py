"""Architecture adapters, registered by ``config.model_type``."""

from . import gemma3, llama, opt, phi, phi3, qwen3  # noqa: F401  (registration side effects)
from .base import (
    Adapter,
    Stage,
    StageKind,
    Topology,
    get_adapter,
    register_adapter,
    registered_adapters,
    supported_model_types,
)

__all__ = [
    "Adapter",
    "Stage",
    "StageKind",
    "Topology",
    "get_adapter",
    "register_adapter",
    "registered_adapters",
    "supported_model_types",
]
