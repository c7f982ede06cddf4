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
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import numpy as np

from slice2deploy.utils import (
    Slice2DeployError,
    UserInputError,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_text,
    sha256_file,
)

from .ort import MODEL_FILE, OrtCausalLM, check_onnx_dir, graph_summary, require_onnx, runtime_versions
from .quantize import SNR_FLOOR_DB, QuantConfig, QuantMode, WeightMatMul, logits_snr_db, plan, weight_matmuls

TRT_ONNX_MANIFEST = "slice2deploy_trt_onnx_manifest.json"
ENGINE_FILE = "model.engine"
SIDECAR_SUFFIX = ".json"  # model.engine -> model.engine.json
TIMING_CACHE_FILE = "timing.cache"
SIDECAR_FORMAT = "slice2deploy-trt-engine"
INSTALL_HINT = ("pip install tensorrt on a machine that can reach NVIDIA's package index (the PyPI package only "
                "downloads the libraries from pypi.nvidia.com, so it cannot be installed where that index is "
                "unreachable, as on slice2deploy's own build machines)")
SUPPORTED_TRT_MAJORS = (10, 11)
# FP16 quality gate: the logits' SNR against the float32 source, and max |Δ| relative to the logits' scale. 2% of the
# scale is the ONNX export's own float16 parity rtol (exporters.onnx.DEFAULT_TOLERANCE); a correct FP16 graph reaches
# 60+ dB (tiny models; 63.6 dB on SmolLM2-135M). The check runs on ONNX Runtime's CPU provider, which computes ops
# lacking float16 kernels (Pow, ReduceMean, Cos...) in float32, so it cannot see every float16 hazard TensorRT would
# hit: the float32 regions below are placed structurally, not tuned on this number.
FP16_SNR_FLOOR_DB = 30.0
FP16_MAX_REL_DIFF = 2e-2
# Values are clamped to ±1e4 when cast to float16 (onnxconverter-common's default; onnxruntime's is 65504): the
# attention mask's additive float32-min becomes -1e4, so mask + mask or mask + score stays finite in float16 (at
# -65504 two masks sum to -inf, and a fully masked, left-padded row turns into NaN that spreads through the KV cache).
FP16_CLAMP = 1e4
# Ops that must see float32: normalization statistics and the attention probabilities. The RMSNorm and RoPE regions
# are found structurally (float32_nodes), the final logits through keep_io_types and head_in_float32.
FLOAT32_OP_TYPES = ("Softmax", "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "com.microsoft:MatMulNBits", "com.microsoft:QOrderedMatMul"}
QDQ_OPSET = 21  # float16 Q/DQ scales need opset >= 19; blocked DequantizeLinear (block_size) needs 21
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types


class TensorRTUnavailable(Slice2DeployError):
    """TensorRT's Python package cannot be imported here."""


class EngineMismatchError(Slice2DeployError):
    """An engine was built for another GPU or TensorRT version than the current one."""


class EngineBuildError(Slice2DeployError):
    """TensorRT rejected the ONNX graph or failed to build the engine."""


class TrtReadyQualityError(Slice2DeployError):
    """A TensorRT-ready graph fell below its quality floor against the float32 source."""


# -- TensorRT import and versions ------------------------------------------------------------------------------------
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


# -- options, profiles and the build config --------------------------------------------------------------------------
class Precision(str, Enum):
    FP16 = "fp16"  # float16 graph, norms/softmax/RoPE/logits in float32
    INT8 = "int8"  # W8A8: Q/DQ on weight MatMuls (weights per channel, activations per tensor), float16 elsewhere
    INT4 = "int4"  # W4A16: blocked INT4 weight DequantizeLinear, float16 elsewhere


class ProfilePreset(str, Enum):
    RTX = "rtx"
    DATACENTER = "datacenter"
    JETSON = "jetson"


@dataclass(frozen=True)
class ShapeRange:
    """One dynamic axis of an optimization profile: TensorRT tunes kernels for ``opt`` and accepts [min, max]."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        values = (self.min, self.opt, self.max)
        integers = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        if not integers or not 0 <= self.min <= self.opt <= self.max:
            raise UserInputError(f"a shape range needs integers 0 <= min <= opt <= max, got {values}")

    def clipped(self, upper: int) -> ShapeRange:
        high = min(self.max, upper)
        low = min(self.min, high)
        return ShapeRange(low, min(max(self.opt, low), high), high)

    def __add__(self, other: ShapeRange) -> ShapeRange:
        return ShapeRange(self.min + other.min, self.opt + other.opt, self.max + other.max)


@dataclass(frozen=True)
class TrtProfile:
    """Ranges for the three dynamic axes of the graph contract, plus the builder's workspace limit.

    ``sequence`` is the number of new tokens per call (a prompt chunk at prefill, 1 at decode), ``past`` the cached
    length; the attention mask spans ``total_sequence = past + sequence``. One profile covers prefill (past 0) and
    decode (sequence 1). The largest logits buffer is batch.max x sequence.max x vocab.
    """

    name: str
    batch: ShapeRange
    sequence: ShapeRange
    past: ShapeRange
    workspace_mib: int
    notes: str = ""

    def __post_init__(self) -> None:
        if self.batch.min < 1 or self.sequence.min < 1:
            raise UserInputError(f"profile {self.name}: batch and sequence need min >= 1")
        if self.workspace_mib < 64:
            raise UserInputError(f"profile {self.name}: workspace must be at least 64 MiB, got {self.workspace_mib}")

    def axes(self) -> dict[str, ShapeRange]:
        """Ranges by the graph's dim_param names (exporters.onnx.dynamic_axes)."""
        return {"batch": self.batch, "sequence": self.sequence, "past_sequence": self.past,
                "total_sequence": self.sequence + self.past}

    def for_context(self, context_length: int | None) -> TrtProfile:
        """Clipped to a model's context: prompts of at most ``context`` tokens, a past of at most ``context - 1``."""
        if not context_length:
            return self
        return replace(self, sequence=self.sequence.clipped(context_length),
                       past=self.past.clipped(max(context_length - 1, 0)))

    def to_dict(self) -> dict:
        return {"name": self.name, "workspace_mib": self.workspace_mib, "notes": self.notes,
                **{axis: asdict(r) for axis, r in self.axes().items()}}


def rtx_profile() -> TrtProfile:
    # GeForce RTX 30/40/50 (compute capability 8.6 / 8.9 / 12.0), 8-32 GB shared with the desktop: one user, short
    # batches. FP16 and INT8 tensor cores on all three; a 4 GiB workspace leaves room for the KV cache on an 8 GB card.
    return TrtProfile("rtx", batch=ShapeRange(1, 1, 4), sequence=ShapeRange(1, 128, 1024),
                      past=ShapeRange(0, 1024, 4096), workspace_mib=4096,
                      notes="consumer RTX (sm_86/89/120), 8-32 GB, interactive chat")


def datacenter_profile() -> TrtProfile:
    # A100 (8.0) / L40S (8.9) / H100-H200 (9.0), 40-141 GB: batched serving. The corner batch x sequence = 16k tokens
    # sizes the float32 logits (16k x vocab x 4 B: 3.2 GB at a 49k vocabulary), so batch and chunk stay moderate.
    return TrtProfile("datacenter", batch=ShapeRange(1, 8, 16), sequence=ShapeRange(1, 256, 1024),
                      past=ShapeRange(0, 2048, 8192), workspace_mib=16384,
                      notes="A100/L40S/H100 (sm_80/89/90), 40-141 GB, batched serving")


def jetson_profile() -> TrtProfile:
    # Jetson Orin (compute capability 8.7): 8-64 GB of *unified* memory shared with the CPU, so the workspace is
    # small and the shapes are single-stream. JetPack 6 ships TensorRT 10.x; NVIDIA's TensorRT 11.3/11.4 migration
    # notes state JetPack is not supported by those 11.x releases. Engines must be built on the device itself.
    return TrtProfile("jetson", batch=ShapeRange(1, 1, 1), sequence=ShapeRange(1, 64, 256),
                      past=ShapeRange(0, 256, 1024), workspace_mib=1024,
                      notes="Jetson Orin (sm_87), unified memory, TensorRT 10.x from JetPack 6")


PROFILE_PRESETS = {ProfilePreset.RTX: rtx_profile, ProfilePreset.DATACENTER: datacenter_profile,
                   ProfilePreset.JETSON: jetson_profile}


def profile_preset(name: ProfilePreset | str, context_length: int | None = None) -> TrtProfile:
    return PROFILE_PRESETS[_enum(ProfilePreset, name, "profile")]().for_context(context_length)


def _enum(kind: type[Enum], value, name: str):
    try:
        return kind(value)
    except ValueError:
        raise UserInputError(f"unknown {name} {value!r}; choose one of {', '.join(m.value for m in kind)}") from None


@dataclass
class TrtBuildConfig:
    """How to make the TensorRT-ready graph and the engine; recorded in every manifest and sidecar."""

    precision: Precision = Precision.FP16
    profile: ProfilePreset = ProfilePreset.RTX
    workspace_mib: int | None = None  # None: the profile's
    int4_block_size: int = 32  # INT4 blocks along K; 32 divides SmolLM2's 576 (ModelOpt's TensorRT default is 128)
    head_in_float32: bool = True  # logits GEMM in float32 (costs the head's weight bandwidth twice over float16)
    quantize_head: bool = False  # INT8/INT4: the head is the most sensitive layer, and shared if tied
    # INT8/INT4: weight MatMuls whose node name contains one of these stay in float. Per-tensor INT8 activations
    # cannot represent LLM activation outliers; the MLP output projection (down_proj/fc2) sees the largest ones
    # (SmolLM2-135M, 4 x 64 tokens: 6.1 dB logits SNR with every linear in INT8, 13.4 dB with down_proj left in float).
    keep_float: list[str] = field(default_factory=list)
    calib: str = "builtin"  # text for INT8 activation ranges and for the quality gate of every precision
    calib_samples: int = 8
    calib_seqlen: int = 128
    seed: int = 0
    snr_floor_db: float | None = None  # None: FP16_SNR_FLOOR_DB or exporters.quantize's floor for the mode
    fp16_max_rel_diff: float = FP16_MAX_REL_DIFF
    timing_cache: str | None = None  # None: timing.cache next to the engine
    device_index: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        self.precision = _enum(Precision, self.precision, "precision")
        self.keep_float = [str(p) for p in self.keep_float if str(p)]
        self.profile = _enum(ProfilePreset, self.profile, "profile")
        if self.workspace_mib is not None and (isinstance(self.workspace_mib, bool) or self.workspace_mib < 64):
            raise UserInputError(f"workspace_mib must be at least 64, got {self.workspace_mib}")
        self.quant_config()  # validates block size and calibration sizes with exporters.quantize's rules
        if not 0 < self.fp16_max_rel_diff < 1:
            raise UserInputError(f"fp16_max_rel_diff must be in (0, 1), got {self.fp16_max_rel_diff}")
        if self.device_index < 0:
            raise UserInputError(f"device_index must be >= 0, got {self.device_index}")

    @property
    def quant_mode(self) -> QuantMode | None:
        return {Precision.INT8: QuantMode.INT8_STATIC, Precision.INT4: QuantMode.INT4}.get(self.precision)

    @property
    def snr_floor(self) -> float:
        if self.snr_floor_db is not None:
            return self.snr_floor_db
        return FP16_SNR_FLOOR_DB if self.quant_mode is None else SNR_FLOOR_DB[self.quant_mode]

    def quant_config(self) -> QuantConfig:
        return QuantConfig(mode=self.quant_mode or QuantMode.INT8_STATIC, block_size=self.int4_block_size,
                           quantize_head=self.quantize_head, calib=self.calib, calib_samples=self.calib_samples,
                           calib_seqlen=self.calib_seqlen, seed=self.seed,
                           shortcuts="float")  # TensorRT Q/DQ graphs have no 8-bit weight-only MatMulNBits

    def resolved_profile(self, context_length: int | None = None) -> TrtProfile:
        profile = profile_preset(self.profile, context_length)
        return profile if self.workspace_mib is None else replace(profile, workspace_mib=self.workspace_mib)

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision.value, "profile": self.profile.value}

    @classmethod
    def from_dict(cls, data: dict) -> TrtBuildConfig:
        return cls(**data)


# -- graph inputs and profile shapes ---------------------------------------------------------------------------------
Dims = tuple  # of int (static) or str (dim_param)


def graph_inputs(model_path: str | Path) -> list[tuple[str, Dims]]:
    """(name, dims) of every graph input, dims as ints or dim_param names, without loading the weights."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return [(i.name, tuple(d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim))
            for i in model.graph.input]


def input_shapes(inputs: Iterable[tuple[str, Dims]], profile: TrtProfile) -> dict[str, tuple[tuple, tuple, tuple]]:
    """(min, opt, max) dims of every input with a dynamic axis; static inputs need no profile entry."""
    axes = profile.axes()
    shapes = {}
    for name, dims in inputs:
        if all(isinstance(d, int) and d > 0 for d in dims):
            continue
        unknown = [d for d in dims if not (isinstance(d, int) and d > 0) and d not in axes]
        if unknown:
            raise UserInputError(f"input {name} has dynamic dimension(s) {unknown} that no TensorRT profile axis "
                                 f"covers (known: {', '.join(axes)}); export with slice2deploy's ONNX exporter")
        shapes[name] = tuple(tuple(d if isinstance(d, int) else getattr(axes[d], which) for d in dims)
                             for which in ("min", "opt", "max"))
    if not shapes:
        raise UserInputError("the graph has no dynamic input; nothing for an optimization profile to cover")
    return shapes


def context_length_of(onnx_dir: str | Path) -> int | None:
    path = Path(onnx_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = config.get(key, (config.get("base_config") or {}).get(key))
        if isinstance(value, int) and value > 0:
            return value
    return None


# -- FP16 conversion -------------------------------------------------------------------------------------------------
def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph) -> dict[str, list]:
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _elem_types(model) -> dict[str, int]:
    """Element type of every named tensor (inputs, initializers, inferred values, Cast outputs)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for node in model.graph.node:
        if node.op_type == "Cast":
            types[node.output[0]] = _cast_to(node)
    return types


def _cast_to(node) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _norm_region(node, producers: dict, consumers: dict) -> set[str]:
    """RMSNorm statistics around one ReduceMean(Pow(x, 2)): the input Cast, Pow, ReduceMean, eps Add, Sqrt,
    Div/Reciprocal and the Mul that applies them. x² overflows float16 past |x| = 256, which LLM residual streams
    with massive activations reach (TensorRT would compute these in float16 as written; ONNX Runtime's CPU provider
    silently uses float32, so only this placement protects the engine)."""
    power = producers.get(node.input[0])
    if power is None or power.op_type != "Pow":
        return set()
    region = {power.name, node.name}
    source = producers.get(power.input[0])
    if source is not None and source.op_type == "Cast":
        region.add(source.name)  # keeps its to=float, so the statistics start from float32
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for consumer in consumers.get(current.output[0], []):
            if consumer.name in region:
                continue
            if consumer.op_type in ("Add", "Sqrt", "Div", "Reciprocal"):
                region.add(consumer.name)
                frontier.append(consumer)
            elif consumer.op_type == "Mul":
                region.add(consumer.name)
    return region


def _rope_region(seeds: list, producers: dict, types: dict[str, int]) -> set[str]:
    """Cos/Sin and every float ancestor back to the integer positions. float16 holds integers exactly only up to
    2048: converted naively, positions 6001 and 6002 both become 6000 (checked in ONNX Runtime). SmolLM2's logits
    moved little from it (60.7 vs 61.2 dB SNR at positions 6000+), so this guards long contexts rather than being a
    measured gain on short ones."""
    region, frontier = set(), list(seeds)
    while frontier:
        node = frontier.pop()
        if node.name in region:
            continue
        region.add(node.name)
        for name in node.input:
            producer = producers.get(name)
            if producer is not None and any(types.get(out) == FLOAT for out in producer.output):
                frontier.append(producer)
    return region


def _head_nodes(graph, producers: dict) -> set[str]:
    """The MatMul/Gemm computing the logits, found by walking back from the output through shape-only ops."""
    node = producers.get("logits")
    while node is not None and node.op_type in ("Cast", "Identity", "Reshape"):
        node = producers.get(node.input[0])
    return {node.name} if node is not None and node.op_type in ("MatMul", "Gemm") else set()


def _infer_types(model) -> None:
    """Fill ``model.graph.value_info`` with inferred types, inferring on a weight-free skeleton (initializers become
    typed graph inputs), so this works for models above protobuf's 2 GiB limit too."""
    import onnx
    from onnx import helper

    graph = model.graph
    typed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    skeleton = helper.make_model(helper.make_graph(graph.node, "skeleton", [*graph.input, *typed], graph.output),
                                 opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)


def float32_nodes(model, head_in_float32: bool = True) -> set[str]:
    """Names of the nodes the FP16 graph keeps in float32 (besides FLOAT32_OP_TYPES); needs inferred types."""
    graph = model.graph
    producers, consumers, types = _producers(graph), _consumers(graph), _elem_types(model)
    keep: set[str] = set()
    for node in graph.node:
        if node.op_type == "ReduceMean":
            keep |= _norm_region(node, producers, consumers)
    keep |= _rope_region([n for n in graph.node if n.op_type in ("Cos", "Sin")], producers, types)
    if head_in_float32:
        keep |= _head_nodes(graph, producers)
    return keep


def _drop_cast_round_trips(model) -> int:
    """Remove Cast pairs the converter leaves between neighbouring float32 nodes; return how many Casts went.

    onnxruntime's converter casts every kept-float32 node's output to float16 and the next kept node's input back
    to float32: float32 -> float16 -> float32 would round the RMSNorm's x² through float16 (and overflow it). Such a
    pair, float16 -> float32 -> float16 (exact) and same-type chains read the pair's input instead. Repeated until
    stable, since removing one pair can expose the next.
    """
    removed = 0
    while rename := _round_trip_renames(model):
        _apply_renames(model.graph, rename)
        removed += _remove_dead_casts(model.graph, {o.name for o in model.graph.output})
    return removed


def _round_trip_renames(model) -> dict[str, str]:
    producers, types = _producers(model.graph), _elem_types(model)
    rename = {}
    for node in model.graph.node:
        first = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if first is None or first.op_type != "Cast":
            continue
        source, middle, target = first.input[0], _cast_to(first), _cast_to(node)
        if types.get(source) == target and {target, middle} == {FLOAT, FLOAT16}:
            rename[node.output[0]] = source
        elif middle == target:
            rename[node.output[0]] = first.output[0]
    return rename


def _apply_renames(graph, rename: dict[str, str]) -> None:
    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = resolve(name)
        if node.op_type == "Cast" and node.output[0] in outputs and node.output[0] in rename:
            # a graph output keeps its name: its Cast becomes an Identity of the pair's input
            node.op_type, node.input[0] = "Identity", resolve(node.output[0])
            del node.attribute[:]


def _remove_dead_casts(graph, outputs: set[str]) -> int:
    removed = 0
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)


def convert_fp16(model, head_in_float32: bool = True):
    """The float16 graph of a float32 (or Q/DQ) model, with float32 kept where TensorRT needs it; returns a model.

    KV-cache inputs/outputs become float16 (half the cache memory); logits stay float32. Uses onnxruntime's
    maintained converter (onnxruntime.transformers.float16): onnxconverter-common 1.16's converter keeps
    ``keep_io_types`` all-or-nothing and leaves ``Cast(to=float)`` nodes untouched, which gives this graph a
    float32 input on a float16 Mul that the checker rejects.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    _infer_types(model)
    keep = float32_nodes(model, head_in_float32)
    converted = convert_float_to_float16(model, keep_io_types=["logits"], op_block_list=list(FLOAT32_OP_TYPES),
                                         node_block_list=sorted(keep), max_finite_val=FP16_CLAMP,
                                         disable_shape_infer=True)
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends its Casts at the end of the node list
    _drop_cast_round_trips(wrapped.model)
    return wrapped.model


def _require_opset(model, opset: int) -> None:
    """Raise the default-domain opset import. Between 18 and 21 the ops these graphs use only gained types
    (int4/float8, bfloat16), block_size and Pad's wrap mode; no existing behaviour changed."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < opset:
            entry.version = opset


# -- INT8 / INT4 Q/DQ ------------------------------------------------------------------------------------------------
def _plan_nodes(model_path: Path, config: TrtBuildConfig) -> tuple[list[WeightMatMul], list[dict]]:
    """exporters.quantize's plan (weight MatMuls only, never attention scores or mask arithmetic; head optional),
    minus the nodes ``keep_float`` names, which are reported with that reason."""
    import onnx

    chosen, skipped = plan(weight_matmuls(onnx.load(str(model_path), load_external_data=False)),
                           config.quant_config())
    kept = [mm for mm in chosen if any(pattern in mm.node for pattern in config.keep_float)]
    if len(kept) == len(chosen):
        raise UserInputError(f"keep_float {config.keep_float} leaves no weight MatMul to quantize")
    skipped += [{"node": mm.node, "role": mm.role, "reason": "kept in float (keep_float)"} for mm in kept]
    return [mm for mm in chosen if mm not in kept], skipped


class _PrefillReader:
    """onnxruntime's CalibrationDataReader protocol: one prefill (empty cache) per calibration sequence."""

    def __init__(self, runner: OrtCausalLM, samples: list[np.ndarray]):
        self._feeds = iter([_prefill_feeds(runner, ids) for ids in samples])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def _prefill_feeds(runner: OrtCausalLM, ids: np.ndarray) -> dict[str, np.ndarray]:
    batch, length = ids.shape
    feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((batch, length), np.int64),
             "position_ids": np.tile(np.arange(length, dtype=np.int64), (batch, 1))}
    for index, (key, value) in enumerate(runner.empty_past(batch)):
        feeds[f"past_key_values.{index}.key"], feeds[f"past_key_values.{index}.value"] = key, value
    return feeds


def quantize_int8_qdq(source: Path, target: Path, nodes: list[str], runner: OrtCausalLM,
                      samples: list[np.ndarray]) -> None:
    """INT8 Q/DQ as TensorRT's explicit quantization expects: symmetric (zero points 0), int8 weights per output
    channel (axis 1 of a (K, N) MatMul weight, a 1-D scale), activations per tensor (scalar scale, MinMax ranges)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(source), str(target), _PrefillReader(runner, samples), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_quantize=nodes, op_types_to_quantize=["MatMul", "Gemm"],
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=_is_large(source),
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                                   "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                                   # onnxruntime's qdq_quantizer.py notes both for TensorRT: GEMM outputs are not
                                   # quantized (the next op needs resolution) and Q/DQ pairs are not shared.
                                   "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
                                   "DedicatedQDQPair": True})


def quantize_int4_qdq(model, nodes: list[str], block_size: int):
    """INT4 weight-only as blocked ``DequantizeLinear`` (opset 21, int4 weights, blocks of ``block_size`` along K,
    symmetric so no zero point): onnxruntime's MatMulNBitsQuantizer with quant_format=QDQ."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, quant_format=QuantFormat.QDQ,
                                        op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=True, nodes_to_include=nodes,
                                     quant_format=QuantFormat.QDQ, op_types_to_quantize=("MatMul",), algo_config=algo)
    quantizer.process()
    return quantizer.model.model


def qdq_report(model) -> dict:
    """Check every Q/DQ against TensorRT's rules and count them; raise TrtReadyQualityError on a violation.

    TensorRT's IQuantize/IDequantizeLayer: zero points absent or all zero (symmetric only); the scale a scalar
    (per tensor), 1-D (per channel) or of the input's rank (blocked); blocked quantization only on the last or
    second-to-last axis. Here activations (QuantizeLinear) must be per tensor.
    """
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    counts = {"QuantizeLinear": 0, "DequantizeLinear": 0, "blocked": 0, "per_channel": 0, "per_tensor": 0}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        counts[node.op_type] += 1
        scale = inits.get(node.input[1])
        block = next((a.i for a in node.attribute if a.name == "block_size"), 0)
        rank = len(scale.dims) if scale is not None else None
        kind = "blocked" if block else "per_channel" if rank == 1 and scale.dims[0] > 1 else "per_tensor"
        counts[kind] += 1
        if scale is None:
            problems.append(f"{node.name}: scale is not a constant")
        elif node.op_type == "QuantizeLinear" and kind != "per_tensor":
            problems.append(f"{node.name}: activation scale must be per tensor, got shape {list(scale.dims)}")
        elif kind == "blocked":
            data = inits.get(node.input[0])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if data is None or len(scale.dims) != len(data.dims) or axis % len(data.dims) < len(data.dims) - 2:
                problems.append(f"{node.name}: blocked scale must have the weight's rank and block one of its "
                                "last two axes")
        if len(node.input) > 2 and node.input[2]:
            zero = inits.get(node.input[2])
            if zero is None or np.any(numpy_helper.to_array(zero)):
                problems.append(f"{node.name}: non-zero zero point (TensorRT quantization is symmetric)")
    if problems:
        raise TrtReadyQualityError(f"{len(problems)} Q/DQ node(s) TensorRT cannot build: " + "; ".join(problems[:5]))
    return counts


def _is_large(model_path: Path) -> bool:
    data = [p for p in model_path.parent.iterdir() if p.name.startswith(model_path.name) and p != model_path]
    return sum(p.stat().st_size for p in [model_path, *data]) > (1536 << 20)


def _save(model, path: Path, large: bool) -> None:
    import onnx

    if large:  # protobuf refuses files over 2 GiB
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


# -- the TensorRT-ready graph ----------------------------------------------------------------------------------------
def _text_samples(runner: OrtCausalLM, config: TrtBuildConfig) -> list[np.ndarray]:
    from slice2deploy.data import calibration_batch, load_text

    ids, _ = calibration_batch(runner.tokenizer(), load_text(config.calib, "calibration"), config.calib_samples,
                               config.calib_seqlen, config.seed)
    return [row[None].numpy().astype(np.int64) for row in ids]


def _copy_side_files(source: Path, target: Path) -> None:
    """config.json, generation_config.json and the tokenizer files; not the graph or the source's manifests."""
    for path in source.iterdir():
        if path.is_file() and not path.name.startswith(MODEL_FILE) and "manifest" not in path.name:
            shutil.copy2(path, target / path.name)


def _write_graph(model_path: Path, target: Path, config: TrtBuildConfig, reference: OrtCausalLM,
                 samples: list[np.ndarray]) -> dict:
    """Write the precision's graph at ``target``; return what was quantized and what was left in float."""
    import onnx

    large = _is_large(model_path)
    chosen, skipped = _plan_nodes(model_path, config) if config.quant_mode else ([], [])
    nodes = [mm.node for mm in chosen]
    if config.precision is Precision.INT8:
        scratch = target.with_name(".int8-qdq.onnx")
        quantize_int8_qdq(model_path, scratch, nodes, reference, samples)
        model = onnx.load(str(scratch))
        for path in scratch.parent.glob(scratch.name + "*"):
            path.unlink()
    else:
        model = onnx.load(str(model_path))
        if config.precision is Precision.INT4:
            model = quantize_int4_qdq(model, nodes, config.int4_block_size)
    if config.quant_mode:
        _require_opset(model, QDQ_OPSET)
        chosen, missed = _check_quantized(model, chosen, _node_outputs(model_path), config.precision)
        skipped += missed
    model = convert_fp16(model, config.head_in_float32)
    _save(model, target, large)
    roles: dict[str, int] = {}
    for mm in chosen:
        roles[mm.role] = roles.get(mm.role, 0) + 1
    return {"quantized_matmuls": len(chosen), "quantized_by_role": roles, "unquantized": skipped,
            "unquantized_count": len(skipped)}


def _node_outputs(model_path: Path) -> dict[str, str]:
    import onnx

    return {n.name: n.output[0] for n in onnx.load(str(model_path), load_external_data=False).graph.node}


def _check_quantized(model, chosen: list[WeightMatMul], outputs: dict[str, str],
                     precision: Precision) -> tuple[list[WeightMatMul], list[dict]]:
    """Post-condition: every planned MatMul/Gemm reads its weight through a DequantizeLinear. Nodes are found by
    their output tensor (the quantizers rename nodes, never tensors). onnxruntime's INT4 quantizer skips Gemm (a
    Linear with bias) with only a log line; such nodes are reported as unquantized, never counted."""
    producers = _producers(model.graph)
    done, missed = [], []
    for mm in chosen:
        node = producers.get(outputs.get(mm.node, ""))
        weight = producers.get(node.input[1]) if node is not None and len(node.input) > 1 else None
        if weight is not None and weight.op_type == "DequantizeLinear":
            done.append(mm)
        else:
            op = node.op_type if node is not None else "node"
            missed.append({"node": mm.node, "role": mm.role,
                           "reason": f"the {precision.value} quantizer left this {op} in float"})
    if not done:
        raise UserInputError(f"no weight MatMul could be quantized to {precision.value} "
                             f"({len(missed)} left in float, e.g. {missed[0]['node'] if missed else '-'})")
    return done, missed


def _logits(runner: OrtCausalLM, ids: np.ndarray, mask: np.ndarray | None = None, past=None) -> tuple:
    logits, presents = runner.forward(ids, attention_mask=mask, past=past)
    return logits.astype(np.float64), presents


def _max_diffs(reference: OrtCausalLM, candidate: OrtCausalLM, samples: list[np.ndarray]) -> dict:
    """max |Δ| of the logits on three paths: prefill, a decode step through the cache, a left-padded batch
    (real positions only: padded rows differ by design, float32-min vs the clamped float16 mask)."""
    ids = samples[0]
    prefill = max(float(np.abs(_logits(reference, s)[0] - _logits(candidate, s)[0]).max()) for s in samples)
    _, ref_past = _logits(reference, ids[:, :-1])
    _, cand_past = _logits(candidate, ids[:, :-1])
    decode = float(np.abs(_logits(reference, ids[:, -1:], past=ref_past)[0]
                          - _logits(candidate, ids[:, -1:], past=cand_past)[0]).max())
    batch = np.concatenate([ids, samples[-1]], axis=0)
    mask = np.ones_like(batch)
    pad = ids.shape[1] // 2
    mask[0, :pad] = 0
    ref_pad, cand_pad = _logits(reference, batch, mask)[0], _logits(candidate, batch, mask)[0]
    if not np.isfinite(cand_pad).all():
        raise TrtReadyQualityError("the TensorRT-ready graph produces non-finite logits on a left-padded batch")
    padded = max(float(np.abs(ref_pad[0, pad:] - cand_pad[0, pad:]).max()),
                 float(np.abs(ref_pad[1] - cand_pad[1]).max()))
    scale = max(float(np.abs(_logits(reference, s)[0]).max()) for s in samples)
    return {"prefill": prefill, "decode": decode, "left_padding": padded, "logits_scale": scale}


def validate_against_source(reference: OrtCausalLM, candidate: OrtCausalLM, samples: list[np.ndarray],
                            config: TrtBuildConfig) -> dict:
    """Quality of the TensorRT-ready graph in ONNX Runtime against the float32 source; raises below the floors."""
    snr = logits_snr_db(reference, candidate, samples)
    diffs = _max_diffs(reference, candidate, samples)
    worst = max(diffs["prefill"], diffs["decode"], diffs["left_padding"])
    relative = worst / diffs["logits_scale"] if diffs["logits_scale"] else 0.0
    report = {"logits_snr_db": round(snr, 3), "snr_floor_db": config.snr_floor,
              "max_abs_diff": {k: float(f"{v:.6g}") for k, v in diffs.items()},
              "max_rel_diff": float(f"{relative:.6g}"),
              "samples": len(samples), "sample_tokens": int(samples[0].shape[1])}
    failures = []
    if not snr >= config.snr_floor:  # `not >=` also catches NaN
        failures.append(f"logits SNR {snr:.1f} dB is below the floor of {config.snr_floor:.1f} dB")
    if config.precision is Precision.FP16:
        report["max_rel_diff_limit"] = config.fp16_max_rel_diff
        if not relative <= config.fp16_max_rel_diff:
            failures.append(f"max |Δ| is {relative:.2%} of the logits' scale (limit {config.fp16_max_rel_diff:.0%})")
    if failures:
        hint = (". Per-tensor INT8 activations lose LLM activation outliers: keep the most sensitive MatMuls in "
                "float (keep_float / --keep-float down_proj) or use int4 (weight-only)"
                if config.precision is Precision.INT8 else "")
        raise TrtReadyQualityError(f"{config.precision.value} TensorRT-ready graph: {'; '.join(failures)} "
                                   f"(measured in ONNX Runtime against the float32 source); nothing was written{hint}")
    return report


def make_trt_ready(source_dir: str | Path, out_dir: str | Path, config: TrtBuildConfig | None = None,
                   overwrite: bool = False) -> dict:
    """Write the TensorRT-ready graph of a float32 ONNX export (graph, config, tokenizer, manifest) to ``out_dir``.

    The graph is checked with ``onnx.checker`` and TensorRT's Q/DQ rules, and compared with the source in ONNX
    Runtime (logits SNR, and for FP16 max |Δ| relative to the logits' scale); below a floor nothing is written.
    """
    import onnx

    require_onnx()
    config = config or TrtBuildConfig()
    source = Path(source_dir).expanduser()
    model_path = check_onnx_dir(source)
    if Path(out_dir).expanduser().resolve() == source.resolve():
        raise UserInputError("the output directory must differ from the input (inputs are never modified)")
    ops = set(graph_summary(model_path)["ops"])
    if "Attention" in ops:
        raise UserInputError(f"{source} writes attention as fused ONNX Attention nodes (export --attention fused), "
                             "which this TensorRT path does not take; export with --attention eager for TensorRT")
    quantized_ops = QUANTIZED_OPS & ops
    if quantized_ops:
        raise UserInputError(f"{source} is already quantized ({', '.join(sorted(quantized_ops))}); TensorRT-ready "
                             "graphs are made from the float32 export, which this step quantizes itself")
    reference = OrtCausalLM(source)
    if reference.dtype != "float32":
        raise UserInputError(f"{source} is a {reference.dtype} export; TensorRT-ready graphs are made from a float32 "
                             "export (slice2deploy export onnx MODEL --dtype float32)")
    samples = _text_samples(reference, config)
    started = time.perf_counter()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        _copy_side_files(source, tmp)
        quantized = _write_graph(model_path, tmp / MODEL_FILE, config, reference, samples)
        onnx.checker.check_model(str(tmp / MODEL_FILE))  # by path: works with external data
        transformed = time.perf_counter()
        qdq = qdq_report(onnx.load(str(tmp / MODEL_FILE), load_external_data=config.quant_mode is not None))
        quality = validate_against_source(reference, OrtCausalLM(tmp), samples, config)
        manifest = _trt_onnx_manifest(source, model_path, tmp, config, quantized, qdq, quality,
                                      {"transform": round(transformed - started, 2),
                                       "validation": round(time.perf_counter() - transformed, 2)})
        atomic_write_text(tmp / TRT_ONNX_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {**manifest, "output": str(Path(out_dir).expanduser().resolve())}


def _trt_onnx_manifest(source: Path, model_path: Path, out: Path, config: TrtBuildConfig, quantized: dict,
                       qdq: dict, quality: dict, seconds: dict) -> dict:
    inputs = graph_inputs(out / MODEL_FILE)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "config": config.to_dict(),
        "precision": config.precision.value,
        "source": {"directory": str(source.resolve()), "model_sha256": sha256_file(model_path)},
        "model_sha256": sha256_file(out / MODEL_FILE),
        "inputs": {name: list(dims) for name, dims in inputs},
        "float32_ops": list(FLOAT32_OP_TYPES),
        "qdq": qdq,
        **quantized,
        "validation": quality,
        "calibration": {"source": config.calib, "samples": config.calib_samples, "seqlen": config.calib_seqlen,
                        "seed": config.seed},
        "seconds": seconds,
        "versions": runtime_versions(),
    }


# -- sidecar and the engine/GPU check --------------------------------------------------------------------------------
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


# -- engine build ----------------------------------------------------------------------------------------------------
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


def build_engine(onnx_dir: str | Path, engine_path: str | Path, config: TrtBuildConfig | None = None) -> dict:
    """Build a TensorRT engine from a TensorRT-ready ONNX directory; write the engine, its sidecar and the timing
    cache; return the sidecar. Needs TensorRT 10.x/11.x and a GPU (raises TensorRTUnavailable without TensorRT)."""
    config = config or TrtBuildConfig()
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


# -- runner ----------------------------------------------------------------------------------------------------------
class TrtCausalLM:
    """A TensorRT engine of the causal-LM graph contract: ``forward`` with the KV cache on the GPU, greedy ``generate``.

    Loading checks the sidecar against this machine first (:func:`check_engine_compatibility`). Buffers are torch
    CUDA tensors; TensorRT reads and writes them through ``set_tensor_address`` and runs on a torch stream with
    ``execute_async_v3`` (the name-based API of TensorRT 10 and 11).
    """

    def __init__(self, engine_path: str | Path, device_index: int = 0, allow_other_gpu_model: bool = False):
        import torch

        trt = require_tensorrt()
        self.engine_path = Path(engine_path).expanduser()
        self.sidecar = read_sidecar(self.engine_path)
        check_engine_compatibility(self.sidecar, current_device(device_index), allow_other_gpu_model)
        self.device = torch.device("cuda", device_index)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with _cuda_device(device_index):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise EngineMismatchError(f"TensorRT could not deserialize {self.engine_path} (see its log above)")
            self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        past = [n for n in self.input_names if n.startswith("past_key_values.")]
        self.num_layers = len(past) // 2
        shape = self.sidecar["shapes"][past[0]]["min"]
        self.kv_heads, self.head_dim = shape[1], shape[3]
        self.stream = torch.cuda.Stream(self.device)
        self._scratch = torch.empty(1, dtype=torch.float32, device=self.device)  # address for zero-size tensors

    def empty_past(self, batch: int) -> list[tuple]:
        import torch

        dtype = self.dtypes["past_key_values.0.key"]
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [(torch.empty(shape, dtype=dtype, device=self.device),) * 2 for _ in range(self.num_layers)]

    def _check_shapes(self, feeds: dict) -> None:
        for name, tensor in feeds.items():
            limits = self.sidecar["shapes"].get(name)
            if limits and not all(lo <= d <= hi for d, lo, hi in zip(tensor.shape, limits["min"], limits["max"],
                                                                      strict=True)):
                raise UserInputError(f"{name} has shape {tuple(tensor.shape)}, outside the engine's profile "
                                     f"{limits['min']}..{limits['max']} ({self.sidecar['profile']['name']}); "
                                     "rebuild with a larger profile")

    def _feeds(self, input_ids, attention_mask, position_ids, past) -> dict:
        import torch

        ids = torch.as_tensor(input_ids, device=self.device).long()
        ids = ids[None] if ids.dim() == 1 else ids
        past = self.empty_past(ids.shape[0]) if past is None else past
        past_length = past[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones((ids.shape[0], past_length + ids.shape[1]), dtype=torch.long,
                                        device=self.device)
        mask = torch.as_tensor(attention_mask, device=self.device).long()
        if position_ids is None:
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)[:, past_length:]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": torch.as_tensor(position_ids).to(ids)}
        for index, (key, value) in enumerate(past):
            feeds[f"past_key_values.{index}.key"], feeds[f"past_key_values.{index}.value"] = key, value
        return {name: value.to(self.dtypes[name]).contiguous() for name, value in feeds.items()}

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._scratch.data_ptr()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past=None) -> tuple:
        """Logits (batch, sequence, vocab) and the updated cache [(key, value) per layer], torch tensors on the GPU."""
        import torch

        feeds = self._feeds(input_ids, attention_mask, position_ids, past)
        self._check_shapes(feeds)
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name in self.output_names:  # shapes follow from the input shapes once all are set
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                        device=self.device)
            self.context.set_tensor_address(name, self._address(outputs[name]))
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs were written on the current stream
        with _cuda_device(self.device.index):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise Slice2DeployError("TensorRT failed to enqueue the engine (see its log above)")
        self.stream.synchronize()
        presents = [(outputs[f"present.{i}.key"], outputs[f"present.{i}.value"]) for i in range(self.num_layers)]
        return outputs["logits"], presents

    __call__ = forward

    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None) -> np.ndarray:
        """Greedy continuation: one prefill, then one decode step per token with the cache; returns prompt + new."""
        import torch

        if max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = torch.as_tensor(np.atleast_2d(np.asarray(input_ids, dtype=np.int64)), device=self.device)
        eos = torch.as_tensor(np.atleast_1d(np.asarray([] if eos_token_id is None else eos_token_id, dtype=np.int64)),
                              device=self.device)
        mask = torch.ones_like(ids)
        logits, past = self.forward(ids, mask)
        tokens, done = [ids], torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            next_token = logits[:, -1].float().argmax(-1, keepdim=True)  # (B, 1)
            if eos.numel():
                next_token = torch.where(done[:, None], eos[0], next_token)  # finished rows repeat the first EOS
                done |= torch.isin(next_token[:, 0], eos)
            tokens.append(next_token)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            logits, past = self.forward(next_token, mask, past=past)
        return torch.cat(tokens, dim=1).cpu().numpy()


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    if hasattr(trt, "int64"):  # INT64 I/O exists from TensorRT 10.0
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise EngineBuildError(f"engine tensor type {dtype} has no torch equivalent here")
    return table[dtype]


__all__ = [
    "ENGINE_FILE", "INSTALL_HINT", "TIMING_CACHE_FILE", "TRT_ONNX_MANIFEST", "EngineBuildError",
    "EngineMismatchError", "Precision", "ProfilePreset", "ShapeRange", "TensorRTUnavailable", "TrtBuildConfig",
    "TrtCausalLM", "TrtProfile", "TrtReadyQualityError", "build_engine", "check_engine_compatibility",
    "convert_fp16", "current_device", "datacenter_profile", "graph_inputs", "input_shapes", "jetson_profile",
    "make_sidecar", "make_trt_ready", "network_flags", "onnx_digest", "profile_preset", "qdq_report",
    "read_sidecar", "sidecar_static",
    "require_tensorrt", "rtx_profile", "sidecar_path", "validate_against_source", "version_tuple",
]
