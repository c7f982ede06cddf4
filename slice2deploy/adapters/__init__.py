"""Architecture adapters, registered by ``config.model_type``."""

from . import llama, opt  # noqa: F401  (registration side effects)
from .base import Adapter, Stage, StageKind, get_adapter, register_adapter, registered_adapters, supported_model_types

__all__ = [
    "Adapter",
    "Stage",
    "StageKind",
    "get_adapter",
    "register_adapter",
    "registered_adapters",
    "supported_model_types",
]
