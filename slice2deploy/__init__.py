"""slice2deploy: SliceGPT slicing of causal LMs and their deployment to inference runtimes."""

from .modeling import SlicedConfig, SlicedForCausalLM, register_auto_classes

register_auto_classes()

__version__ = "0.1.0"

__all__ = ["SlicedConfig", "SlicedForCausalLM", "__version__"]
