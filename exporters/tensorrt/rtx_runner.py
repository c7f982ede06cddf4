"""``RtxCausalLM``: a TensorRT-RTX engine on an RTX GPU, with the runtime cache and (optionally) refit at load.

Written against TensorRT-RTX 1.7's documented Python API: ``IRuntime.get_engine_validity`` (is this engine for this
GPU and version?), ``ICudaEngine.create_runtime_config`` + ``IRuntimeConfig.create_runtime_cache`` (the JIT's
compiled kernels, kept in ``runtime.cache`` next to the engine so the second load skips compilation),
``Refitter`` + ``OnnxParserRefitter.refit_from_file`` for a weight-stripped engine. Loading needs an RTX-class GPU
and the NVIDIA driver: nothing here runs on a machine without one (the tests for it carry the ``gpu`` and
``tensorrt`` markers).
"""

from __future__ import annotations

from pathlib import Path

from slice2deploy.utils import UserInputError, atomic_write_bytes

from .config import EngineMismatchError
from .rtx import RTX_SIDECAR_RUNTIME, logger, require_tensorrt_rtx
from .runner import TrtCausalLM

RUNTIME_CACHE_FILE = "runtime.cache"


def current_compute_capability(device_index: int = 0) -> str:
    """``"8.9"`` for the CUDA device, via torch; UserInputError when no GPU is visible."""
    import torch

    if not torch.cuda.is_available() or device_index >= torch.cuda.device_count():
        raise UserInputError(f"no CUDA GPU {device_index} is visible; TensorRT-RTX engines are built anywhere but "
                             "run only on an RTX-class NVIDIA GPU with its driver")
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"{major}.{minor}"


def check_rtx_compatibility(sidecar: dict, version: str, compute_capability: str) -> None:
    """Refuse an engine that is not a TensorRT-RTX engine, was built by another TensorRT-RTX version, or was built
    for compute capabilities that do not include this GPU's (one line, with what to do)."""
    from .sidecar import version_tuple

    if sidecar.get("runtime") != RTX_SIDECAR_RUNTIME:
        raise EngineMismatchError(f"{sidecar.get('engine_file', '?')} was built by TensorRT "
                                  f"{(sidecar.get('tensorrt') or {}).get('version')}, not TensorRT-RTX: load it "
                                  "with exporters.tensorrt.TrtCausalLM")
    built = (sidecar.get("tensorrt") or {}).get("version") or "0"
    if version_tuple(built)[:2] != version_tuple(version)[:2]:
        raise EngineMismatchError(f"refusing {sidecar.get('engine_file', '?')}: built with TensorRT-RTX {built}, "
                                  f"this machine has {version}; rebuild it with `slice2deploy build-engine "
                                  "--runtime tensorrt-rtx`")
    targets = (sidecar.get("targets") or {}).get("compute_capabilities") or []
    if compute_capability not in targets:
        raise EngineMismatchError(f"refusing {sidecar.get('engine_file', '?')}: built for compute capabilities "
                                  f"{', '.join(targets) or 'unknown'}, this GPU is {compute_capability}; rebuild "
                                  f"with --target-cc {compute_capability}")


class RtxCausalLM(TrtCausalLM):
    """A TensorRT-RTX engine of the causal-LM graph contract (prefill + decode with the KV cache on the GPU)."""

    def __init__(self, engine_path: str | Path, device_index: int = 0, onnx_path: str | Path | None = None):
        self._onnx_path = onnx_path
        super().__init__(engine_path, device_index)
        if self.sidecar.get("weight_stripped"):
            self._refit(onnx_path)

    def _module(self):
        return require_tensorrt_rtx()

    def _check(self, device_index: int, allow_other_gpu_model: bool) -> None:
        trt = self._module()
        check_rtx_compatibility(self.sidecar, trt.__version__, current_compute_capability(device_index))

    def _context(self, trt):
        """An execution context whose runtime config carries the runtime cache (read from runtime.cache)."""
        config = self.engine.create_runtime_config()
        self._cache = config.create_runtime_cache()
        cache_file = self.engine_path.with_name(RUNTIME_CACHE_FILE)
        if cache_file.is_file():
            self._cache.deserialize(cache_file.read_bytes())
        config.set_runtime_cache(self._cache)
        return self.engine.create_execution_context(config)

    def _refit(self, onnx_path: str | Path | None) -> None:
        """Put the weights back into a weight-stripped engine from the ONNX file it was built from."""
        trt = self._module()
        source = Path(onnx_path) if onnx_path else Path(self.sidecar["source_onnx"]["path"])
        if not source.is_absolute():
            source = self.engine_path.parent / source
        if not source.is_file():  # a bundle copied to the target: its own onnx/model.onnx
            source = self.engine_path.parent / "onnx" / "model.onnx"
        if not source.is_file():
            raise EngineMismatchError(f"{self.engine_path.name} is weight-stripped and its ONNX file {source} is "
                                      "missing; pass onnx_path= the TensorRT-ready model.onnx it was built from")
        refitter = trt.Refitter(self.engine, logger(trt))
        if not trt.OnnxParserRefitter(refitter, logger(trt)).refit_from_file(str(source)):
            raise EngineMismatchError(f"refitting {self.engine_path.name} from {source} failed (see the log above)")
        if not refitter.refit_cuda_engine():
            raise EngineMismatchError(f"TensorRT-RTX could not refit {self.engine_path.name} (see the log above)")

    def save_runtime_cache(self) -> Path:
        """Write the runtime cache (kernels compiled for this GPU) next to the engine, atomically."""
        path = self.engine_path.with_name(RUNTIME_CACHE_FILE)
        atomic_write_bytes(path, bytes(memoryview(self._cache.serialize())))
        return path


__all__ = ["RUNTIME_CACHE_FILE", "RtxCausalLM", "check_rtx_compatibility", "current_compute_capability"]
