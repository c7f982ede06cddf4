"""What a quantization will do, decided before any calibration: the config, the weight MatMuls of a graph, which
of them the mode quantizes (with the reason for each one left in float), and the block size and GPTQ window chosen
from the model when unset. :mod:`exporters.quantize` runs the plan.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import Enum

from slice2deploy.utils import Slice2DeployError, UserInputError

QUANT_MANIFEST = "slice2deploy_quant_manifest.json"
MODEL_FILE = "model.onnx"


class QuantMode(str, Enum):
    INT8_DYNAMIC = "int8-dynamic"  # int8 weights (per channel), activations quantized at run time
    INT8_STATIC = "int8-static"  # QDQ: int8 weights per channel, activations per tensor from calibration
    INT4 = "int4"  # weight-only MatMulNBits, blocks of block_size along K


class ShortcutPolicy(str, Enum):
    """How the residual shortcut matrices of a sliced model are stored."""

    FLOAT = "float"  # left as float MatMuls
    WEIGHT_INT8 = "weight-int8"  # weight-only 8-bit blocks (MatMulNBits bits=8): activations stay float
    SAME = "same"  # quantized like every other MatMul of the mode


class Int4Method(str, Enum):
    RTN = "rtn"  # symmetric round-to-nearest per block (ORT's built-in blockwise quantizer)
    HQQ = "hqq"  # half-quadratic quantization: optimises scale/zero per block, no calibration data
    GPTQ = "gptq"  # error feedback through the inverse input Gram matrix measured on calibration text (gptq.py)


# A floor on the signal-to-noise ratio of the logits (10 log10 |ref|² / |ref - q|²) measured on calibration
# text: below it the quantized model is rejected. Set from measurements on SmolLM2 and tiny random models,
# with margin; a broken graph (e.g. quantized mask arithmetic) lands far below.
# SmolLM2 (8 x 128 calibration tokens) measured: INT8 dynamic 17.2 dB, INT8 static 12.1 dB (both with down_proj in
# float), INT4 RTN/32 8.8 dB dense (perplexity +20%) and 6.6 dB sliced 25% (perplexity 39x: broken, so the
# INT4 floor stays at 8 dB); tiny random models ~30 dB (INT8).
SNR_FLOOR_DB = {QuantMode.INT8_DYNAMIC: 15.0, QuantMode.INT8_STATIC: 10.0, QuantMode.INT4: 8.0}


# Block sizes tried, largest first, when none is given: 32 (the common INT4 default) or 16, whichever divides every
# quantized input width (a default 25 % slice of d = 576 has k = 432 = 27 x 16).
AUTO_BLOCK_SIZES = (32, 16)
# Block sizes ONNX Runtime's blockwise quantizer (MLAS; behind RTN, HQQ and the 8-bit blocks) accepts, 4-bit and
# 8-bit alike: any other size dies there ("Only block sizes 16, 32, 64, 128, 256 are supported"). Our GPTQ packer
# could write others, but one set for every method keeps a block size portable between them.
MATMUL_NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)


class QuantQualityError(Slice2DeployError):
    """The quantized model's logits fell below the signal-to-noise floor."""


@dataclass
class QuantConfig:
    """How to quantize an exported model; recorded in the output's manifest."""

    mode: QuantMode = QuantMode.INT8_DYNAMIC
    # along K, for INT4 and the 8-bit blocks; None: the largest of AUTO_BLOCK_SIZES dividing every quantized width
    block_size: int | None = None
    method: Int4Method = Int4Method.RTN  # INT4 only
    quantize_head: bool = False  # the head is the most sensitive layer (and shared with the embedding if tied)
    # The residual shortcut matrices of sliced models sit on the residual path itself, so their errors compound
    # over every layer, and they read the raw stream with its massive activations. Measured on sliced SmolLM2:
    # INT8 dynamic (per-tensor activations) 3.0 dB and INT4 6.6 dB logits SNR with them quantized like the rest.
    # Weight-only 8-bit blocks keep the activations in float and cost a quarter of the float bytes.
    shortcuts: ShortcutPolicy = ShortcutPolicy.WEIGHT_INT8
    keep_float: tuple[str, ...] = ()  # node-name substrings left in float (e.g. "down_proj": outlier inputs)
    # node-name substrings stored as weight-only 8-bit blocks instead of the mode (mixed precision, like
    # llama.cpp's Q4_K_M keeping down projections at higher precision); activations stay float
    weight_int8: tuple[str, ...] = ()
    # the token-embedding table (Gather; shared with a tied head) stored as float16 and cast to float32 when the
    # session loads: half the bytes on disk, the same float32 arithmetic at run time. None keeps it float32.
    embedding_dtype: str | None = None
    # MatMulNBits compute: None = onnxruntime's default (float32 dequantize + GEMM); 4 = int8 compute (activations
    # quantized per block at run time: the CPU kernels' fast int8 dot-product path)
    accuracy_level: int | None = None
    # int8-static graph format: "qdq" (QuantizeLinear/DequantizeLinear pairs, fused by the runtime) or "qoperator"
    # (QLinearMatMul nodes with uint8 activations). Measured on SmolLM2 CPU: onnxruntime fuses only the o_proj QDQ
    # MatMuls, so QDQ decodes at 3-4 tok/s; QOperator is benchmarks/results/onnx_runtime_cpu_smollm2.md's note.
    static_format: str = "qdq"
    # INT8 modes: SmoothQuant strength (smooth.py), moving outlier channels of norm outputs (and of the MLP product
    # read by down_proj, when that is quantized) into the weights that read them, with channel maxima measured on
    # the calibration text. None: off. A slice's norms are weight-free: only its MLP products qualify.
    smooth_alpha: float | None = None
    calib: str = "builtin"  # text for int8-static ranges, GPTQ's Gram matrices and the quality gate
    calib_samples: int = 8
    calib_seqlen: int = 128
    seed: int = 0
    # GPTQ's own calibration (the Gram matrices need many more tokens than the quality gate: K up to 1536) and
    # its damping, a fraction of the mean diagonal of X^T X added before inversion
    gptq_samples: int = 32
    gptq_seqlen: int | None = None  # None: 512, or the model's context if shorter (recorded in the manifest)
    gptq_damp: float = 0.01
    gptq_first_token_weight: float | None = None  # weight of each sequence's first token in X^T X; None: the seqlen
    snr_floor_db: float | None = None  # None: the mode's default floor
    # below the floor, with no keep_float/weight_int8 given: measure which MatMul kind reads the most outlier-heavy
    # inputs (outliers.py), keep it float (INT8) or 8-bit (INT4), and try once more; recorded in the manifest
    auto_mixed_precision: bool = True
    # decode.onnx next to model.onnx: one-token steps through GroupQueryAttention over a shared KV cache
    # (exporters/decode_graph.py), gated against model.onnx; written only when every layer has the pattern
    decode_graph: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        self.keep_float, self.weight_int8 = tuple(self.keep_float), tuple(self.weight_int8)
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise UserInputError(f"accuracy_level must be 0-4 (or unset), got {self.accuracy_level!r}")
        if self.static_format not in ("qdq", "qoperator"):
            raise UserInputError(f"static_format must be 'qdq' or 'qoperator', got {self.static_format!r}")
        if self.embedding_dtype not in (None, "float16"):
            raise UserInputError(f"embedding_dtype must be None or 'float16', got {self.embedding_dtype!r}")
        try:
            self.mode, self.method = QuantMode(self.mode), Int4Method(self.method)
            self.shortcuts = ShortcutPolicy(self.shortcuts)
        except ValueError as error:
            raise UserInputError(f"{error}; modes: {', '.join(m.value for m in QuantMode)}; int4 methods: "
                                 f"{', '.join(m.value for m in Int4Method)}; shortcut policies: "
                                 f"{', '.join(m.value for m in ShortcutPolicy)}") from error
        if self.block_size is not None and self.block_size not in MATMUL_NBITS_BLOCK_SIZES:
            raise UserInputError(f"block size {self.block_size} is not one ONNX Runtime's block quantizer takes; "
                                 f"choose one of {', '.join(map(str, MATMUL_NBITS_BLOCK_SIZES))}")
        if min(self.calib_samples, self.gptq_samples) < 1 or min(self.calib_seqlen, self.gptq_seqlen or 2) < 2:
            raise UserInputError("calibration needs at least 1 sample of at least 2 tokens")
        if self.gptq_first_token_weight is not None and self.gptq_first_token_weight <= 0:
            raise UserInputError(f"gptq_first_token_weight must be > 0, got {self.gptq_first_token_weight}")
        if not 0.0 < self.gptq_damp < 1.0:
            raise UserInputError(f"gptq_damp must be in (0, 1), got {self.gptq_damp}")
        if self.smooth_alpha is not None and (self.mode == QuantMode.INT4 or not 0.0 < self.smooth_alpha < 1.0):
            raise UserInputError(f"smooth_alpha is an INT8 option in (0, 1), got {self.smooth_alpha} with mode "
                                 f"{self.mode.value}")
        if self.method == Int4Method.GPTQ and self.mode != QuantMode.INT4:
            raise UserInputError("method gptq is an INT4 weight quantizer; use it with mode int4")

    @property
    def floor(self) -> float:
        return SNR_FLOOR_DB[self.mode] if self.snr_floor_db is None else self.snr_floor_db

    def to_dict(self) -> dict:
        data = asdict(self)
        data["mode"], data["method"], data["keep_float"] = self.mode.value, self.method.value, list(self.keep_float)
        data["shortcuts"], data["weight_int8"] = self.shortcuts.value, list(self.weight_int8)
        return data


@dataclass(frozen=True)
class WeightMatMul:
    node: str
    op_type: str
    weight: str | None  # initializer name; None when the weight is computed (e.g. a tied head's transpose)
    k: int | None
    n: int | None
    role: str  # linear | shortcut | mix | head


def _role(node_name: str) -> str:
    if "lm_head" in node_name:
        return "head"
    if "_shortcut/" in node_name:
        return "shortcut"
    if "/mix/" in node_name:
        return "mix"
    return "linear"


def weight_matmuls(model) -> list[WeightMatMul]:
    """MatMul/Gemm nodes whose second input is a weight (an initializer, or the head's product of one)."""
    initializers = {init.name: list(init.dims) for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        role = _role(node.name)
        if weight in initializers and len(initializers[weight]) == 2:
            k, n = initializers[weight]
            found.append(WeightMatMul(node.name, node.op_type, weight, k, n, role))
        elif role == "head":
            found.append(WeightMatMul(node.name, node.op_type, None, None, None, role))
    return found


@dataclass
class QuantPlan:
    chosen: list[WeightMatMul]  # quantized by the mode's quantizer
    weight_int8: list[WeightMatMul]  # weight-only 8-bit blocks (residual shortcuts under ShortcutPolicy.WEIGHT_INT8)
    skipped: list[dict]  # left in float, each with its reason


def plan(matmuls: list[WeightMatMul], config: QuantConfig) -> tuple[list[WeightMatMul], list[dict]]:
    """Which weight MatMuls the mode quantizes, and every one left in float with its reason."""
    full = quant_plan(matmuls, config)
    return full.chosen, full.skipped


def _shortcut_choice(mm: WeightMatMul, config: QuantConfig) -> str | None:
    """'mode', 'weight-int8', or None (float) for a shortcut MatMul, with the block-size rule of MatMulNBits."""
    if config.shortcuts == ShortcutPolicy.SAME:
        return "mode"
    if config.shortcuts == ShortcutPolicy.WEIGHT_INT8 and mm.k % config.block_size == 0:
        return "weight-int8"
    return None


def quant_plan(matmuls: list[WeightMatMul], config: QuantConfig) -> QuantPlan:
    """Split the weight MatMuls into the mode's, the 8-bit weight-only ones and the float ones (with reasons)."""
    chosen, weight_int8, skipped = [], [], []
    for mm in matmuls:
        reason = None
        shortcut = _shortcut_choice(mm, config) if mm.role == "shortcut" and mm.weight is not None else "mode"
        if mm.weight is None:
            reason = "weight is computed in the graph (tied head shares the embedding table)"
        elif mm.role == "head" and not config.quantize_head:
            reason = "head kept in float (quantize_head=False)"
        elif shortcut is None:
            reason = (f"residual shortcut kept in float (shortcuts={config.shortcuts.value}"
                      + (f"; K={mm.k} is not a multiple of the block size {config.block_size})"
                         if config.shortcuts == ShortcutPolicy.WEIGHT_INT8 else ")"))
        elif shortcut == "weight-int8":
            weight_int8.append(mm)
            continue
        elif any(part in mm.node for part in config.keep_float):
            reason = "kept in float (keep_float)"
        elif any(part in mm.node for part in config.weight_int8) and mm.op_type == "MatMul":
            if mm.k % config.block_size:
                raise UserInputError(f"weight_int8: K={mm.k} of {mm.node} is not a multiple of the block size "
                                     f"{config.block_size}")
            weight_int8.append(mm)
            continue
        elif config.mode == QuantMode.INT4 and mm.op_type != "MatMul":
            reason = f"{mm.op_type}: ONNX Runtime's MatMulNBits quantizer takes MatMul nodes only"
        if reason:
            skipped.append({"node": mm.node, "role": mm.role, "reason": reason})
        else:
            chosen.append(mm)
    if config.mode == QuantMode.INT4:
        bad = [mm for mm in chosen if mm.k % config.block_size]
        if bad:
            widths = sorted({mm.k for mm in bad})
            raise UserInputError(
                f"INT4 block size {config.block_size} does not divide the input width of {len(bad)} MatMul(s) "
                f"(K = {', '.join(map(str, widths))}, e.g. {bad[0].node}); slice with --round-to "
                f"{config.block_size} (or a multiple) or choose a block size that divides every width")
    if not chosen and not weight_int8:
        raise UserInputError("no weight MatMul left to quantize under this configuration")
    return QuantPlan(chosen, weight_int8, skipped)


def _blocked_widths(matmuls: list[WeightMatMul], config: QuantConfig) -> set[int]:
    """Input widths K of the MatMuls that would be stored in blocks (INT4, 8-bit weight-only, 8-bit shortcuts)."""
    int4 = config.mode == QuantMode.INT4
    widths = set()
    for mm in matmuls:
        if mm.weight is None or mm.k is None:
            continue
        if mm.role == "shortcut":
            if config.shortcuts == ShortcutPolicy.WEIGHT_INT8 or (config.shortcuts == ShortcutPolicy.SAME and int4):
                widths.add(mm.k)
        elif mm.role == "head" and not config.quantize_head or any(p in mm.node for p in config.keep_float):
            continue
        elif int4 or any(part in mm.node for part in config.weight_int8):
            widths.add(mm.k)
    return widths


GPTQ_SEQLEN = 512  # tokens per GPTQ calibration sequence when unset (or the model's context, if shorter)


def with_gptq_seqlen(config: QuantConfig, context: int | None) -> QuantConfig:
    """``config`` with GPTQ's sequence length resolved: 512 tokens, or the model's context if shorter."""
    if config.gptq_seqlen is not None:
        return config
    return replace(config, gptq_seqlen=min(GPTQ_SEQLEN, context or GPTQ_SEQLEN))


def with_block_size(config: QuantConfig, matmuls: list[WeightMatMul]) -> QuantConfig:
    """``config`` with its block size chosen from the widths when unset: the largest of AUTO_BLOCK_SIZES dividing
    every blocked input width K, else the first (INT4 then refuses, naming K; INT8 leaves such shortcuts float)."""
    if config.block_size is not None:
        return config
    widths = _blocked_widths(matmuls, config)
    block = next((b for b in AUTO_BLOCK_SIZES if all(k % b == 0 for k in widths)), AUTO_BLOCK_SIZES[0])
    return replace(config, block_size=block)
