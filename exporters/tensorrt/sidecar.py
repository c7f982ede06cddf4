"""Engine sidecars (what an engine was built from, with which TensorRT, for which GPU) and the load-time check."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from slice2deploy.utils import UserInputError, sha256_file

from ..ort import MODEL_FILE
from .config import (
    INSTALL_HINT,
    SIDECAR_FORMAT,
    SIDECAR_SUFFIX,
    SUPPORTED_TRT_MAJORS,
    EngineMismatchError,
    Precision,
    TensorRTUnavailable,
    TrtProfile,
    _enum,
)


def require_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` with the install hint."""
    try:
        import tensorrt
    except ImportError as error:  # also raised when sys.modules["tensorrt"] is None
        raise TensorRTUnavailable(f"TensorRT is not installed: {INSTALL_HINT}") from error
    except OSError as error:  # the bindings are there but libnvinfer could not be loaded
        raise TensorRTUnavailable(f"TensorRT's libraries could not be loaded ({error}): {INSTALL_HINT}") from error
    return tensorrt


def tensorrt_available() -> bool:
    try:
        require_tensorrt()
    except TensorRTUnavailable:
        return False
    return True


def version_tuple(version: str) -> tuple[int, int, int]:
    """``"10.3.0.26"`` -> ``(10, 3, 0)``: engines are tied to major.minor.patch, not the build number."""
    parts = [int(p) for p in str(version).split(".")[:3] if p.isdigit()]
    if not parts:
        raise UserInputError(f"not a TensorRT version: {version!r}")
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def check_trt_major(version: str) -> int:
    major = version_tuple(version)[0]
    if major not in SUPPORTED_TRT_MAJORS:
        raise UserInputError(f"TensorRT {version} is not supported; slice2deploy builds with TensorRT "
                             f"{' or '.join(f'{m}.x' for m in SUPPORTED_TRT_MAJORS)}")
    return major


def sidecar_path(engine_path: str | Path) -> Path:
    engine = Path(engine_path)
    return engine.with_name(engine.name + SIDECAR_SUFFIX)


def onnx_digest(onnx_dir: str | Path, path: str | None = None) -> dict:
    """sha256 of the graph file and of its external data, if any: what an engine was built from."""
    model = Path(onnx_dir) / MODEL_FILE
    data = model.with_name(model.name + ".data")
    return {"path": path or str(model.resolve()), "sha256": sha256_file(model),
            "data_sha256": sha256_file(data) if data.is_file() else None}


def sidecar_static(precision: Precision | str, profile: TrtProfile, shapes: dict, source: dict) -> dict:
    """The sidecar fields known before the build (build.sh embeds them; the builder adds the rest)."""
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "precision": _enum(Precision, precision, "precision").value,
        "profile": profile.to_dict(),
        "shapes": {name: dict(zip(("min", "opt", "max"), map(list, dims), strict=True))
                   for name, dims in shapes.items()},
        "source_onnx": source,
    }


def make_sidecar(engine_path: Path, device: dict, static: dict, builder: str) -> dict:
    """The JSON written next to an engine: what it was built from, with which TensorRT, for which GPU."""
    gpu = device.get("gpu") or {}
    return {
        **static,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "builder": builder,
        "engine_file": engine_path.name,
        "engine_sha256": sha256_file(engine_path),
        "tensorrt": {"version": device.get("tensorrt")},
        "gpu": {"name": gpu.get("name"), "compute_capability": gpu.get("compute_capability")},
    }


def read_sidecar(engine_path: str | Path) -> dict:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise EngineMismatchError(f"{engine_path} has no sidecar {path.name}, so its TensorRT version and GPU are "
                                  "unknown; rebuild it with `slice2deploy build-engine` or the bundle's build.sh")
    sidecar = json.loads(path.read_text())
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise EngineMismatchError(f"{path} is not a slice2deploy engine sidecar")
    return sidecar


def check_engine_compatibility(sidecar: dict, current: dict, allow_other_gpu_model: bool = False) -> None:
    """Refuse an engine built for another TensorRT version or GPU; ``current`` looks like ``current_device()``.

    A plan is specific to the TensorRT version and the GPU's compute capability it was built with (NVIDIA,
    "End-to-End AI for NVIDIA-Based PCs: TensorRT Deployment"; version-compatible and hardware-compatible engines
    are opt-in build modes slice2deploy does not use). Another GPU model of the same compute capability loads but
    runs tactics timed on different hardware, so that is refused too unless ``allow_other_gpu_model``.
    """
    built_trt = (sidecar.get("tensorrt") or {}).get("version")
    built_gpu = sidecar.get("gpu") or {}
    here_gpu = current.get("gpu") or {}
    problems = []
    if not built_trt or not built_gpu.get("name") or not built_gpu.get("compute_capability"):
        problems.append("the sidecar does not record the TensorRT version and GPU it was built with")
    else:
        if version_tuple(built_trt) != version_tuple(current.get("tensorrt") or "0"):
            problems.append(f"it was built with TensorRT {built_trt}, this machine has TensorRT "
                            f"{current.get('tensorrt')}")
        if str(built_gpu["compute_capability"]) != str(here_gpu.get("compute_capability")):
            problems.append(f"it was built for compute capability {built_gpu['compute_capability']} "
                            f"({built_gpu['name']}), this GPU is {here_gpu.get('compute_capability')} "
                            f"({here_gpu.get('name')})")
        elif built_gpu["name"] != here_gpu.get("name") and not allow_other_gpu_model:
            problems.append(f"it was built on a {built_gpu['name']}, this GPU is a {here_gpu.get('name')} (same "
                            "compute capability; pass allow_other_gpu_model=True to run it anyway)")
    if problems:
        raise EngineMismatchError(f"refusing to load engine {sidecar.get('engine_file', '?')}: {'; '.join(problems)}. "
                                  "TensorRT engines are not portable; rebuild it on this machine (build.sh in the "
                                  "deploy bundle, or `slice2deploy build-engine`)")


def current_device(device_index: int = 0) -> dict:
    """TensorRT version and the GPU's name and compute capability, in the sidecar's layout."""
    import torch

    trt = require_tensorrt()
    if not torch.cuda.is_available() or device_index >= torch.cuda.device_count():
        raise UserInputError(f"no CUDA GPU {device_index} is visible; TensorRT engines build and run only on an "
                             "NVIDIA GPU (build the bundle here with --bundle-only and run build.sh on the target)")
    major, minor = torch.cuda.get_device_capability(device_index)
    return {"tensorrt": trt.__version__,
            "gpu": {"name": torch.cuda.get_device_name(device_index), "compute_capability": f"{major}.{minor}"}}

