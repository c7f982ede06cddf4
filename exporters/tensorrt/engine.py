"""Engine build with TensorRT 10.x / 11.x's Python API: parse, one optimization profile, timing cache, sidecar."""

from __future__ import annotations

import json
import time
from pathlib import Path

from slice2deploy.utils import atomic_write_bytes, atomic_write_text

from ..ort import check_onnx_dir
from .config import (
    TIMING_CACHE_FILE,
    EngineBuildError,
    Runtime,
    TensorRTUnavailable,
    TrtBuildConfig,
    TrtProfile,
    context_length_of,
    graph_inputs,
    input_shapes,
)
from .sidecar import (
    check_trt_major,
    current_device,
    make_sidecar,
    onnx_digest,
    require_tensorrt,
    sidecar_path,
    sidecar_static,
)


def _cuda_device(index: int):
    import torch

    return torch.cuda.device(index)


def network_flags(trt, major: int) -> int:
    """Network creation flags: TensorRT 10.x needs STRONGLY_TYPED to honour the graph's types (EXPLICIT_BATCH is
    ignored since 10.0); in 11.x networks are always strongly typed and STRONGLY_TYPED is deprecated and ignored."""
    if major == 10:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


def _parse(trt, network, logger, model_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(model_path)):  # by path, so external weights next to the file are found
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {model_path}: {'; '.join(errors[:5]) or 'no detail'}")
    return parser


def _builder_config(trt, builder, profile: TrtProfile, shapes: dict, cache_bytes: bytes) -> tuple:
    """(builder config, whether the stored timing cache was used)."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    reused = bool(cache_bytes) and _set_timing_cache(config, cache_bytes)
    if not reused:
        _set_timing_cache(config, b"")  # b"" starts an empty cache
    # No precision flags, on purpose: BuilderFlag.FP16/INT8/INT4 are removed in 11.x, and in 10.x a strongly typed
    # network takes its precision from the graph, as NVIDIA's explicit-quantization guide asks.
    return config, reused


def _set_timing_cache(config, blob: bytes) -> bool:
    """Install a timing cache; False when TensorRT refuses it (another device or version, or a truncated file):
    ignore_mismatch=False keeps timings measured on other hardware out of this build."""
    try:
        cache = config.create_timing_cache(blob)
        return cache is not None and config.set_timing_cache(cache, ignore_mismatch=False) is not False
    except (RuntimeError, TypeError, ValueError):
        return False


def resolve_runtime(config: TrtBuildConfig) -> Runtime:
    """The runtime that builds: the config's, else TensorRT 10.x/11.x when it imports, else TensorRT-RTX when it
    imports; TensorRTUnavailable (one line, both install hints) when neither does."""
    from .rtx import RTX_INSTALL_HINT, tensorrt_rtx_available

    if config.runtime is not None:
        return config.runtime
    try:
        require_tensorrt()
        return Runtime.TENSORRT
    except TensorRTUnavailable as error:
        if tensorrt_rtx_available():
            return Runtime.TENSORRT_RTX
        raise TensorRTUnavailable(f"{error}; or, for RTX GPUs, TensorRT-RTX (builds without a GPU): "
                                  f"{RTX_INSTALL_HINT}") from error


def build_engine(onnx_dir: str | Path, engine_path: str | Path, config: TrtBuildConfig | None = None) -> dict:
    """Build an engine from a TensorRT-ready ONNX directory with the runtime :func:`resolve_runtime` picks; write
    the engine and its sidecar (TensorRT 10/11: also the timing cache); return the sidecar.

    TensorRT 10.x/11.x builds on a GPU for that GPU; TensorRT-RTX builds ahead of time without one
    (:func:`exporters.tensorrt.rtx.build_rtx_engine`). Raises TensorRTUnavailable when the runtime is missing."""
    config = config or TrtBuildConfig()
    if resolve_runtime(config) is Runtime.TENSORRT_RTX:
        from .rtx import build_rtx_engine

        return build_rtx_engine(onnx_dir, engine_path, config)
    trt = require_tensorrt()
    major = check_trt_major(trt.__version__)
    device = current_device(config.device_index)
    onnx_dir = Path(onnx_dir).expanduser()
    model_path = check_onnx_dir(onnx_dir)
    profile = config.resolved_profile(context_length_of(onnx_dir))
    shapes = input_shapes(graph_inputs(model_path), profile)
    engine_path = Path(engine_path).expanduser()
    cache_path = Path(config.timing_cache) if config.timing_cache else engine_path.with_name(TIMING_CACHE_FILE)
    started = time.perf_counter()
    with _cuda_device(config.device_index):  # TensorRT builds on the current CUDA device
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt, major))
        _parse(trt, network, logger, model_path)
        build_config, reused = _builder_config(trt, builder, profile, shapes,
                                               cache_path.read_bytes() if cache_path.is_file() else b"")
        serialized = builder.build_serialized_network(network, build_config)
    if serialized is None:
        raise EngineBuildError("TensorRT failed to build the engine (see its log above); nothing was written")
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    atomic_write_bytes(cache_path, bytes(memoryview(build_config.get_timing_cache().serialize())))
    static = sidecar_static(config.precision, profile, shapes, onnx_digest(onnx_dir))
    sidecar = make_sidecar(engine_path, device, static, "python")
    sidecar.update(build_config=config.to_dict(), build_seconds=round(time.perf_counter() - started, 2),
                   timing_cache={"path": str(cache_path), "reused": reused})
    atomic_write_text(sidecar_path(engine_path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return sidecar

