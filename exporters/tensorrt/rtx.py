"""TensorRT for RTX: ahead-of-time engine build on any machine (no GPU, no driver), for RTX compute capabilities.

``tensorrt_rtx`` (PyPI ``tensorrt-rtx-cu12``) has TensorRT 10's API family, with three differences that matter here
(NVIDIA, "CPU-Only AOT and TensorRT-RTX Engines"): the build needs no GPU and targets a list of compute
capabilities (``IBuilderConfig.num_compute_capabilities`` + ``set_compute_capability``; by default 8.0, 8.6, 8.9 and
12.0, 7.5 only on request); networks are strongly typed only (no precision flags, no calibrators: precision comes
from the graph, INT8/INT4 weight-only GEMMs from Q/DQ); a weight-stripped ("weightless") engine is refitted from the
ONNX file at load. Loading and running need an RTX-class GPU and driver (:class:`exporters.tensorrt.rtx_runner`).

Every graph is checked before the build and refused with a one-line reason when TensorRT-RTX cannot take it
(:func:`refusal`), rather than failing deep inside the builder.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from slice2deploy.utils import UserInputError, atomic_write_bytes, atomic_write_text

from ..ort import all_nodes, check_onnx_dir
from .config import (
    RTX_DEFAULT_TARGETS,
    EngineBuildError,
    TensorRTUnavailable,
    TrtBuildConfig,
    context_length_of,
    graph_inputs,
    input_shapes,
)
from .sidecar import onnx_digest, sidecar_path, sidecar_static

RTX_INSTALL_HINT = "pip install 'slice2deploy[tensorrt-rtx]' (NVIDIA's tensorrt-rtx-cu12 wheels from PyPI)"
NETWORK_REPORT_FILE = "network_report.json"
RTX_SIDECAR_RUNTIME = "tensorrt-rtx"
# Ops of our exports that TensorRT-RTX 1.7 cannot build, with the reason and what to do instead. The fused-attention
# export (opset-23 Attention, causal query blocks in If branches) parses but fails in the builder with "Error Code 1:
# Myelin ... unknown input tensor" (checked with 1.7.1.116 on the SmolLM2 graph).
REFUSED_OPS = {
    "Attention": "fused ONNX Attention nodes (export --attention fused) fail in TensorRT-RTX's builder; export with "
                 "--attention eager",
    "If": "If subgraphs (the fused-attention export's causal blocks) fail in TensorRT-RTX's builder; export with "
          "--attention eager",
    "Loop": "Loop subgraphs are not part of slice2deploy's graph contract for TensorRT",
    "Scan": "Scan subgraphs are not part of slice2deploy's graph contract for TensorRT",
}
FOREIGN_DOMAINS_HINT = "onnxruntime contrib ops (MatMulNBits, QOrderedMatMul...) exist only in ONNX Runtime"
_LOGGERS: dict = {}


class GraphRefused(UserInputError):
    """TensorRT-RTX cannot build this graph; the message says why in one line, before any build starts."""


def require_tensorrt_rtx():
    """The ``tensorrt_rtx`` module, or :class:`TensorRTUnavailable` with the install hint."""
    try:
        import tensorrt_rtx
    except ImportError as error:
        raise TensorRTUnavailable(f"TensorRT-RTX is not installed: {RTX_INSTALL_HINT}") from error
    except OSError as error:
        raise TensorRTUnavailable(f"TensorRT-RTX's libraries could not be loaded ({error}): {RTX_INSTALL_HINT}") \
            from error
    return tensorrt_rtx


def tensorrt_rtx_available() -> bool:
    try:
        require_tensorrt_rtx()
    except TensorRTUnavailable:
        return False
    return True


def logger(trt):
    """One logger per module: TensorRT keeps the first one it sees and warns about every other."""
    if trt.__name__ not in _LOGGERS:
        _LOGGERS[trt.__name__] = trt.Logger(trt.Logger.WARNING)
    return _LOGGERS[trt.__name__]


def refusal(model_path: str | Path) -> str | None:
    """Why TensorRT-RTX cannot build this graph (one line), or None. Reads the graph without its weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                  for n in all_nodes(model.graph))
    for op, reason in REFUSED_OPS.items():
        if op in ops:
            return f"{ops[op]} {op} node(s): {reason}"
    foreign = sorted(op for op in ops if ":" in op)
    if foreign:
        return f"{', '.join(foreign)}: {FOREIGN_DOMAINS_HINT}; make the TensorRT-ready graph from the float32 export"
    return _qdq_refusal(model)


def _qdq_refusal(model) -> str | None:
    """Q/DQ TensorRT cannot take (non-zero zero points, activation scales not per tensor), via qdq_report."""
    from .config import TrtReadyQualityError
    from .qdq import qdq_report

    try:
        qdq_report(model)
    except TrtReadyQualityError as error:
        return str(error)
    return None


def check_buildable(model_path: str | Path) -> None:
    """Raise :class:`GraphRefused` (one line) when TensorRT-RTX cannot build the graph at ``model_path``."""
    reason = refusal(model_path)
    if reason:
        raise GraphRefused(f"TensorRT-RTX cannot build {Path(model_path).parent.name}/{Path(model_path).name}: "
                           f"{reason}")


def check_strip(targets: list[str]) -> None:
    """Weight-stripped engines, as TensorRT-RTX 1.7.1 builds them: refittable (STRIP_PLAN / REFIT flags) engines
    compile on a GPU for exactly one target. Measured here: with several targets the builder fails its check
    ``sm_vers_.size() == 1``; with one target and no GPU its JIT step fails with a CUDA error. Refused up front."""
    import torch

    if len(targets) != 1:
        raise GraphRefused(f"a weight-stripped engine is built for one compute capability (TensorRT-RTX 1.7), got "
                           f"{len(targets)} targets: pass one --target-cc, or build a full engine")
    if not torch.cuda.is_available():
        raise GraphRefused("a weight-stripped (refittable) engine needs a GPU at build time in TensorRT-RTX 1.7 (its "
                           "builder compiles refittable kernels with CUDA); build a full engine here, or strip on "
                           "the target")


def target_enums(trt, targets: list[str] | tuple[str, ...]) -> list:
    """``["8.6", "12.0"]`` -> ``[ComputeCapability.SM86, ComputeCapability.SM120]`` (UserInputError if unknown)."""
    found = []
    for target in targets:
        member = getattr(trt.ComputeCapability, "SM" + str(target).replace(".", ""), None)
        if member is None:
            raise UserInputError(f"TensorRT-RTX {trt.__version__} has no compute capability target {target}")
        found.append(member)
    return found


def _parse(trt, network, model_path: Path):
    parser = trt.OnnxParser(network, logger(trt))
    if not parser.parse_from_file(str(model_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT-RTX's ONNX parser rejected {model_path}: "
                               f"{'; '.join(errors[:3]) or 'no detail'}")
    return parser


def _builder_config(trt, builder, shapes: dict, targets: list[str], strip: bool):
    config = builder.create_builder_config()
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    enums = target_enums(trt, targets)
    config.num_compute_capabilities = len(enums)
    for index, target in enumerate(enums):
        if not config.set_compute_capability(target, index):
            raise EngineBuildError(f"TensorRT-RTX refused compute capability target {targets[index]}")
    if strip:  # kernels only; the weights are refitted from the same ONNX file at load (OnnxParserRefitter)
        config.set_flag(trt.BuilderFlag.STRIP_PLAN)
        config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    return config


def build_rtx_engine(onnx_dir: str | Path, engine_path: str | Path, config: TrtBuildConfig | None = None) -> dict:
    """Build a TensorRT-RTX engine ahead of time (no GPU needed) from a TensorRT-ready ONNX directory.

    Writes the engine, its sidecar (``<engine>.json``) and the network report (``network_report.json`` beside it),
    each atomically (temp file + rename; the sidecar last, so a sidecar always describes a complete engine).
    Returns the sidecar. Raises GraphRefused before the build for a graph TensorRT-RTX cannot take,
    TensorRTUnavailable without ``tensorrt_rtx``, EngineBuildError when the parser or builder fails.
    """
    from .report import network_report

    config = config or TrtBuildConfig()
    trt = require_tensorrt_rtx()
    onnx_dir = Path(onnx_dir).expanduser()
    model_path = check_onnx_dir(onnx_dir)
    check_buildable(model_path)
    targets = list(config.target_cc or RTX_DEFAULT_TARGETS)
    if config.strip_weights:
        check_strip(targets)
    profile = config.resolved_profile(context_length_of(onnx_dir))
    shapes = input_shapes(graph_inputs(model_path), profile)
    engine_path = Path(engine_path).expanduser()
    started = time.perf_counter()
    builder = trt.Builder(logger(trt))
    network = builder.create_network(0)  # TensorRT-RTX networks are always strongly typed
    _parse(trt, network, model_path)
    report = network_report(trt, network)
    parsed = time.perf_counter()
    serialized = builder.build_serialized_network(network, _builder_config(trt, builder, shapes, targets,
                                                                           config.strip_weights))
    if serialized is None:
        raise EngineBuildError("TensorRT-RTX failed to build the engine (see its log above); nothing was written")
    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
    built = time.perf_counter()
    report_path = engine_path.with_name(NETWORK_REPORT_FILE)
    atomic_write_text(report_path, json.dumps(report, indent=2, sort_keys=True) + "\n")
    sidecar = rtx_sidecar(engine_path, trt.__version__, config, profile, shapes, onnx_digest(onnx_dir), targets,
                          {"parse": round(parsed - started, 2), "build": round(built - parsed, 2)}, report)
    atomic_write_text(sidecar_path(engine_path), json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return sidecar


def rtx_sidecar(engine_path: Path, version: str, config: TrtBuildConfig, profile, shapes: dict, source: dict,
                targets: list[str], seconds: dict, report: dict) -> dict:
    """The sidecar of a TensorRT-RTX engine: what it was built from, with which version, for which targets."""
    from datetime import datetime, timezone

    from slice2deploy.utils import sha256_file

    return {
        **sidecar_static(config.precision, profile, shapes, source),
        "runtime": RTX_SIDECAR_RUNTIME,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "builder": "python",
        "engine_file": engine_path.name,
        "engine_bytes": engine_path.stat().st_size,
        "engine_sha256": sha256_file(engine_path),
        "tensorrt": {"version": version, "flavour": RTX_SIDECAR_RUNTIME},
        "targets": {"compute_capabilities": targets, "ahead_of_time": True},
        "gpu": None,  # built without a GPU: the targets say where it runs
        "weight_stripped": config.strip_weights,
        "build_config": config.to_dict(),
        "build_seconds": round(sum(seconds.values()), 2),
        "seconds": seconds,
        "network_report": {"file": NETWORK_REPORT_FILE, "summary": report["summary"]},
    }


__all__ = ["NETWORK_REPORT_FILE", "REFUSED_OPS", "RTX_INSTALL_HINT", "GraphRefused", "build_rtx_engine",
           "check_buildable", "refusal", "require_tensorrt_rtx", "rtx_sidecar", "target_enums",
           "tensorrt_rtx_available"]
