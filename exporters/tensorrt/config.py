"""Constants, typed errors, optimization-profile presets, the build config and the graph-input shapes.

Imports no TensorRT and no onnxruntime: the CLI reads its defaults from :class:`TrtBuildConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path

from slice2deploy.utils import Slice2DeployError, UserInputError

from ..quantize import SNR_FLOOR_DB, QuantConfig, QuantMode

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
# BF16: bfloat16 keeps 8 significant bits to float16's 11, ~18 dB less SNR for each rounding, and more where the
# residual stream is rounded layer after layer. Measured on the float32 twin (exporters.tensorrt.bf16): 46.3 dB on the
# tiny Llama (its fp16 graph: 68.8), 35.2 dB on SmolLM2-135M (fp16: 62.0) with perplexity +0.05 % against float32.
# The floor sits 10 dB under the model measured, so deeper models are not refused for bfloat16 itself.
BF16_SNR_FLOOR_DB = 25.0
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


class Precision(str, Enum):
    FP16 = "fp16"  # float16 graph, norms/softmax/RoPE/logits in float32
    BF16 = "bf16"  # the same in bfloat16 (checked on CPU through a float32 twin: exporters.tensorrt.bf16)
    INT8 = "int8"  # W8A8: Q/DQ on weight MatMuls (weights per channel, activations per tensor), float16 elsewhere
    INT4 = "int4"  # W4A16: blocked INT4 weight DequantizeLinear, float16 elsewhere
    INT8_WO = "int8-wo"  # W8A16: per-channel INT8 weight DequantizeLinear (weight-only), float16 elsewhere


class Runtime(str, Enum):
    """Which TensorRT builds the engine: TensorRT 10.x/11.x (on the target GPU) or TensorRT for RTX (ahead of
    time, on any machine, for RTX-class compute capabilities)."""

    TENSORRT = "tensorrt"
    TENSORRT_RTX = "tensorrt-rtx"


WEIGHT_ONLY = (Precision.INT8_WO, Precision.INT4)
INT4_METHODS = ("rtn", "gptq")
# TensorRT-RTX 1.7's ComputeCapability targets, and the documented default set an engine is built for when none
# is named (NVIDIA, "CPU-Only AOT and TensorRT-RTX Engines": 8.0, 8.6, 8.9 and 12.0; 7.5 only on request)
RTX_TARGETS = ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1")
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")


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
    # Weight-only graphs (int4, int8-wo) take exporters.quantize's quality tools: GPTQ for the 4-bit weights,
    # 8-bit storage for outlier-heavy MatMuls (weight_int8 patterns, e.g. down_proj) and residual shortcuts, and
    # an untied head at head_bits (None: float) so the embedding table is stored on its own (embedding_bits).
    int4_method: str = "rtn"  # rtn | gptq
    weight_int8: list[str] = field(default_factory=list)
    shortcuts: str = "float"  # float | weight-int8 (weight-only graphs) | same
    head_bits: int | None = None  # weight-only graphs: 8 or 4 (the head untied from a tied embedding)
    # The token-embedding table the Gather reads: 8 = INT8, one symmetric scale per vocabulary row (the weight-only
    # default: TensorRT-RTX keeps it INT8, e.g. 28 MB instead of 57 MB for SmolLM2's 49152 x 576), 16 = the graph's
    # 16-bit float (the only choice for fp16/bf16/int8). None: 8 for weight-only precisions, else 16. A table tied to
    # a head kept in float stays 16-bit (an INT8 copy would add bytes); the manifest's "embedding" says so. Checked with
    # TensorRT-RTX 1.7.1's builder (exporters.tensorrt.weight_only); TensorRT 10/11 cannot be installed here, so for
    # them it is unverified.
    embedding_bits: int | None = None
    gptq_samples: int = 32
    gptq_seqlen: int = 512
    gptq_damp: float = 0.01
    runtime: Runtime | None = None  # None: TensorRT if it imports, else TensorRT-RTX if it imports
    target_cc: list[str] = field(default_factory=list)  # TensorRT-RTX targets; empty: RTX_DEFAULT_TARGETS
    strip_weights: bool = False  # TensorRT-RTX: weight-stripped engine, refitted from the ONNX file at load
    version: int = 1

    def __post_init__(self) -> None:
        self.precision = _enum(Precision, self.precision, "precision")
        self.keep_float = [str(p) for p in self.keep_float if str(p)]
        self.weight_int8 = [str(p) for p in self.weight_int8 if str(p)]
        self.profile = _enum(ProfilePreset, self.profile, "profile")
        self.runtime = None if self.runtime is None else _enum(Runtime, self.runtime, "runtime")
        self.target_cc = [str(t) for t in self.target_cc]
        unknown = [t for t in self.target_cc if t not in RTX_TARGETS]
        if unknown:
            raise UserInputError(f"unknown compute capability target(s) {unknown}; TensorRT-RTX builds for "
                                 f"{', '.join(RTX_TARGETS)}")
        if self.int4_method not in INT4_METHODS:
            raise UserInputError(f"int4_method must be one of {', '.join(INT4_METHODS)}, got {self.int4_method!r}")
        if self.head_bits not in (None, 4, 8):
            raise UserInputError(f"head_bits must be 4, 8 or unset, got {self.head_bits!r}")
        weight_only_options = self.int4_method != "rtn" or self.weight_int8 or self.head_bits is not None
        if weight_only_options and self.precision not in WEIGHT_ONLY:
            raise UserInputError("int4_method, weight_int8 and head_bits apply to the weight-only precisions "
                                 f"(int4, int8-wo), not {self.precision.value}")
        if self.embedding_bits is None:
            self.embedding_bits = 8 if self.precision in WEIGHT_ONLY else 16
        if self.embedding_bits not in (8, 16):
            raise UserInputError(f"embedding_bits must be 8 or 16, got {self.embedding_bits!r}")
        if self.embedding_bits == 8 and self.precision not in WEIGHT_ONLY:
            raise UserInputError(f"embedding_bits=8 (an INT8 embedding table) applies to the weight-only precisions "
                                 f"(int4, int8-wo), not {self.precision.value}; use 16")
        if self.workspace_mib is not None and (isinstance(self.workspace_mib, bool) or self.workspace_mib < 64):
            raise UserInputError(f"workspace_mib must be at least 64, got {self.workspace_mib}")
        self.quant_config()  # validates block size and calibration sizes with exporters.quantize's rules
        if self.shortcuts == "weight-int8" and self.precision not in WEIGHT_ONLY:
            raise UserInputError("shortcuts=weight-int8 needs a weight-only precision (int4, int8-wo)")
        if not 0 < self.fp16_max_rel_diff < 1:
            raise UserInputError(f"fp16_max_rel_diff must be in (0, 1), got {self.fp16_max_rel_diff}")
        if self.device_index < 0:
            raise UserInputError(f"device_index must be >= 0, got {self.device_index}")

    @property
    def quant_mode(self) -> QuantMode | None:
        # int8-wo is gated like ONNX Runtime's int8-dynamic (int8 weights per channel, float activations in the GEMM)
        return {Precision.INT8: QuantMode.INT8_STATIC, Precision.INT4: QuantMode.INT4,
                Precision.INT8_WO: QuantMode.INT8_DYNAMIC}.get(self.precision)

    @property
    def weight_only_path(self) -> bool:
        """True when the graph is written by exporters.tensorrt.weight_only (int8-wo always; int4 with any of its
        quality options); plain round-to-nearest int4 keeps onnxruntime's blocked quantizer."""
        return self.precision is Precision.INT8_WO or (self.precision is Precision.INT4 and bool(
            self.int4_method != "rtn" or self.weight_int8 or self.head_bits is not None or self.shortcuts != "float"))

    @property
    def snr_floor(self) -> float:
        if self.snr_floor_db is not None:
            return self.snr_floor_db
        if self.precision is Precision.BF16:
            return BF16_SNR_FLOOR_DB
        return FP16_SNR_FLOOR_DB if self.quant_mode is None else SNR_FLOOR_DB[self.quant_mode]

    def quant_config(self) -> QuantConfig:
        return QuantConfig(mode=self.quant_mode or QuantMode.INT8_STATIC, block_size=self.int4_block_size,
                           quantize_head=self.quantize_head, calib=self.calib, calib_samples=self.calib_samples,
                           calib_seqlen=self.calib_seqlen, seed=self.seed, gptq_samples=self.gptq_samples,
                           gptq_seqlen=self.gptq_seqlen, gptq_damp=self.gptq_damp,
                           shortcuts=self.shortcuts)  # W8A8 (int8) takes float or same only: see __post_init__

    def resolved_profile(self, context_length: int | None = None) -> TrtProfile:
        profile = profile_preset(self.profile, context_length)
        return profile if self.workspace_mib is None else replace(profile, workspace_mib=self.workspace_mib)

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision.value, "profile": self.profile.value,
                "runtime": None if self.runtime is None else self.runtime.value}

    @classmethod
    def from_dict(cls, data: dict) -> TrtBuildConfig:
        return cls(**data)


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

