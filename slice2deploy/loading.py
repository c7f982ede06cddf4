"""Loading any model slice2deploy accepts into PyTorch, with the dtype and device checked first."""

from __future__ import annotations

import torch

from .utils import Slice2DeployError, UserInputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserInputError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"--device {device} was asked for but no CUDA GPU is visible to PyTorch")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserInputError(f"unknown device {device!r}; use cpu or cuda[:N]")
    return device


def parameter_dtype(model: torch.nn.Module) -> str:
    """The one floating-point dtype of ``model``'s parameters (``"float16"``, ...): what a forward runs in.

    Raises:
        Slice2DeployError: the parameters are in more than one dtype (a model that would not run as reported).
    """
    found = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    if len(found) != 1:
        raise Slice2DeployError(f"the model's parameters are in several dtypes ({', '.join(found)}); "
                                "this is a slice2deploy bug, please report it")
    return found[0]


def load(spec: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """Load any model slice2deploy accepts (built-in alias, hub id, local or sliced directory, GGUF file)."""
    from .sources import load_model

    model, tokenizer, resolved = load_model(spec, dtype=torch_dtype(dtype), device=check_device(device),
                                            trust_remote_code=trust_remote_code)
    return model, tokenizer, resolved
