"""TensorRT path: TensorRT-ready ONNX (FP16 / INT8 Q/DQ / INT4 weight-only Q/DQ), engine build, sidecar, runner.

Why the graph carries the precision. TensorRT 11 removed the precision builder flags (``BuilderFlag.FP16/BF16/INT8/
FP8/INT4``), the INT8 calibrators and trtexec's ``--fp16/--int8/--best/--calib``: every network is strongly typed, so
FP16 must be in the ONNX graph and INT8/INT4 must arrive as explicit Q/DQ (NVIDIA, "Migrating from TensorRT 10.x to
11.x", Python/C++/trtexec pages). TensorRT 10 still has the flags, but NVIDIA's explicit-quantization guide says
"Use explicit quantization with Strong Typing. Precision-control build flags are not required and should not be
specified", and weak typing is deprecated. So one graph per precision serves both versions; only the
network-creation flag differs (10.x: opt-in ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; 11.x: always strongly
typed, the flag is deprecated and ignored).

TensorRT itself cannot be installed on slice2deploy's machines (PyPI's ``tensorrt`` only downloads the libraries from
NVIDIA's index, which is unreachable there). Everything up to the builder call is plain Python and tested on CPU; the
builder and runner are written against the documented TensorRT 10/11 Python API and tested wherever ``import
tensorrt`` works (``pytest -m tensorrt``). Nothing here claims an engine exists unless TensorRT built one.

Modules, in the order a graph goes through them:

- ``config``   constants, typed errors, profile presets, :class:`TrtBuildConfig`, graph-input shapes
- ``fp16``     the float16 graph with float32 islands
- ``qdq``      INT8 / INT4 Q/DQ and TensorRT's Q/DQ rules
- ``ready``    :func:`make_trt_ready`: graph + validation against the float32 source + manifest
- ``sidecar``  TensorRT import, versions, the engine sidecar and the load-time compatibility check
- ``engine``   :func:`build_engine` (TensorRT 10.x / 11.x Python API)
- ``weight_only`` INT4 / INT8 weight-only Q/DQ with GPTQ, 8-bit outlier MatMuls and an untied, quantized head
- ``runner``   :class:`TrtCausalLM`
- ``rtx``      TensorRT-RTX: refusals before the build, ahead-of-time build for compute-capability targets
- ``report``   the network report (what the parser built: layers, Q/DQ, weight precisions)
- ``rtx_runner`` :class:`RtxCausalLM` (runtime cache, refit of weight-stripped engines; needs an RTX GPU)
- ``bundle``   the deploy bundle (``build.sh`` for trtexec, README); ``rtx_bundle`` adds the built RTX engine
- ``cli``      ``slice2deploy build-engine`` (imports nothing heavy until it runs)

Public names are re-exported here lazily, so ``import exporters.tensorrt.cli`` stays cheap.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "config": ["ENGINE_FILE", "INSTALL_HINT", "TIMING_CACHE_FILE", "TRT_ONNX_MANIFEST", "SIDECAR_SUFFIX",
               "EngineBuildError", "EngineMismatchError", "Precision", "ProfilePreset", "ShapeRange",
               "TensorRTUnavailable", "TrtBuildConfig", "Runtime", "TrtProfile", "TrtReadyQualityError",
               "context_length_of",
               "datacenter_profile", "graph_inputs", "input_shapes", "jetson_profile", "profile_preset",
               "rtx_profile"],
    "fp16": ["convert_fp16", "float32_nodes"],
    "bf16": ["convert_bf16", "float32_twin", "write_float32_twin"],
    "qdq": ["qdq_report", "quantize_int4_qdq", "quantize_int8_qdq"],
    "ready": ["make_trt_ready", "validate_against_source"],
    "sidecar": ["check_engine_compatibility", "check_trt_major", "current_device", "make_sidecar", "onnx_digest",
                "read_sidecar", "require_tensorrt", "sidecar_path", "sidecar_static", "tensorrt_available",
                "version_tuple"],
    "engine": ["build_engine", "network_flags", "resolve_runtime"],
    "runner": ["TrtCausalLM"],
    "rtx": ["GraphRefused", "build_rtx_engine", "check_buildable", "refusal", "require_tensorrt_rtx",
            "tensorrt_rtx_available"],
    "rtx_runner": ["RtxCausalLM", "check_rtx_compatibility"],
    "report": ["network_report"],
    "weight_only": ["quantize_weight_only", "untie_head"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])


__all__ = sorted(_WHERE)
