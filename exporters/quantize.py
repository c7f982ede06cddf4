"""INT8 / INT4 quantization of exported ONNX models, stacked on slicing, with a measured quality gate.

Only MatMul/Gemm nodes whose weight is a stored initializer are quantized: the attention-score MatMuls (two
activations) and the mask arithmetic stay in float, because an unrestricted INT8 pass over a Llama graph
quantizes the attention-mask path and wrecks the output. Every weight MatMul left in float is listed with
the reason. The lm_head and the residual shortcut matrices are explicit choices (``quantize_head``,
``shortcuts``). INT4 is weight-only ``MatMulNBits`` with blocks along K, so every quantized K (for a
sliced model: the residual widths) must be a multiple of the block size — slice with ``--round-to`` equal to
the block size.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from slice2deploy.utils import Slice2DeployError, UserInputError, atomic_directory, sha256_file

from .graph_io import PrefillReader, calibration_samples, copy_side_files, count_roles, is_large, prefill_feeds
from .ort import OrtCausalLM, check_onnx_dir, runtime_versions
from .smooth import SmoothGroup, smoothable_groups

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


class QuantQualityError(Slice2DeployError):
    """The quantized model's logits fell below the signal-to-noise floor."""


@dataclass
class QuantConfig:
    """How to quantize an exported model; recorded in the output's manifest."""

    mode: QuantMode = QuantMode.INT8_DYNAMIC
    block_size: int = 32  # INT4 only
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
    gptq_seqlen: int = 512
    gptq_damp: float = 0.01
    gptq_first_token_weight: float | None = None  # weight of each sequence's first token in X^T X; None: the seqlen
    snr_floor_db: float | None = None  # None: the mode's default floor
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
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UserInputError(f"block size must be a power of two >= 16, got {self.block_size}")
        if min(self.calib_samples, self.gptq_samples) < 1 or min(self.calib_seqlen, self.gptq_seqlen) < 2:
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


def _calibration_inputs(runner: OrtCausalLM, config: QuantConfig, samples: int | None = None,
                        seqlen: int | None = None) -> list[np.ndarray]:
    return calibration_samples(runner, config.calib, samples or config.calib_samples, seqlen or config.calib_seqlen,
                               config.seed)


QDQ_OUTPUT_DTYPE_OPSET = 21  # QuantizeLinear gains its output_dtype attribute


def _default_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _quantize_int8(source: Path, target: Path, nodes: list[str], config: QuantConfig,
                   runner: OrtCausalLM, samples: list[np.ndarray], opset: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    common = {"per_channel": True, "weight_type": QuantType.QInt8, "nodes_to_quantize": nodes,
              "op_types_to_quantize": ["MatMul", "Gemm"], "use_external_data_format": is_large(source)}
    if config.mode == QuantMode.INT8_DYNAMIC:
        quantize_dynamic(source, target, **common)
        return
    qdq = config.static_format == "qdq"  # QLinearMatMul kernels take uint8 (asymmetric) activations
    static = {"quant_format": QuantFormat.QDQ if qdq else QuantFormat.QOperator,
              "activation_type": QuantType.QInt8 if qdq else QuantType.QUInt8,
              "calibrate_method": CalibrationMethod.MinMax,
              "extra_options": {"ActivationSymmetric": qdq, "WeightSymmetric": True,
                                # ORT's QDQ propagation stamps output_dtype=int8 on the Q nodes it moves, then its
                                # S8->U8 pass makes their zero points uint8: opset >= 21 graphs then fail to load
                                # (onnxruntime#25526). com.microsoft Q/DQ (same kernels) have no output_dtype.
                                "UseQDQContribOps": qdq and opset >= QDQ_OUTPUT_DTYPE_OPSET}}
    quantize_static(source, target, PrefillReader(runner, samples), **static, **common)


def _quantize_nbits(source: Path, target: Path, nodes: list[str], config: QuantConfig, bits: int) -> None:
    """Weight-only ``MatMulNBits`` (``bits`` = 4 or 8, blocks along K) on exactly ``nodes``; others untouched."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if config.method == Int4Method.HQQ and bits == 4:
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=bits)
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True, bits=bits,
                                            accuracy_level=config.accuracy_level)
    model = onnx.load(str(source))
    before = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    # onnxruntime treats nodes_to_include as a union with "every MatMul", not as a restriction: exclude the rest.
    chosen = set(nodes)
    exclude = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in chosen]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=config.block_size, is_symmetric=True,
                                     accuracy_level=config.accuracy_level,
                                     nodes_to_include=nodes, nodes_to_exclude=exclude, algo_config=algo)
    quantizer.process()
    if config.accuracy_level is not None:  # HQQ's config has no such field: stamp every MatMulNBits node
        from onnx import helper

        for node in quantizer.model.model.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*kept, helper.make_attribute("accuracy_level", config.accuracy_level)])
    done = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node) - before
    if done != len(chosen):
        raise Slice2DeployError(f"{bits}-bit: asked to quantize {len(chosen)} MatMuls, onnxruntime produced {done} "
                                "MatMulNBits nodes; refusing to report a plan that was not carried out")
    quantizer.model.save_model_to_file(str(target), use_external_data_format=is_large(source))


def _quantize_gptq(source: Path, target: Path, chosen: list[WeightMatMul], config: QuantConfig,
                   runner: OrtCausalLM) -> None:
    """INT4 ``MatMulNBits`` for ``chosen`` by GPTQ against Gram matrices of their float inputs (gptq.py)."""
    import onnx
    from onnx import numpy_helper
    from tqdm.auto import tqdm

    from .gptq import gptq_quantize, probe_grams, replace_with_nbits

    model = onnx.load(str(source))
    weights = {init.name: init for init in model.graph.initializer}
    not_float32 = sorted({mm.node for mm in chosen if weights[mm.weight].data_type != onnx.TensorProto.FLOAT})
    if not_float32:
        raise UserInputError(f"GPTQ writes float32 scales and needs a float32 export; {not_float32[0]} (and "
                             f"{len(not_float32) - 1} more) is not float32: export with --dtype float32")
    readers = {node.name: node.input[0] for node in model.graph.node if node.input}
    inputs = {mm.node: readers[mm.node] for mm in chosen}
    samples = _calibration_inputs(runner, config, config.gptq_samples, config.gptq_seqlen)
    feeds = (prefill_feeds(runner, ids) for ids in samples)
    sink = config.gptq_first_token_weight or float(config.gptq_seqlen)
    grams = probe_grams(source, sorted(set(inputs.values())), feeds, target.parent, large=is_large(source),
                        first_token_weight=sink,
                        progress=lambda items: tqdm(items, desc="GPTQ calibration"))
    for mm in tqdm(chosen, desc="GPTQ layers"):
        weight = numpy_helper.to_array(weights[mm.weight])
        codes, scales, zeros = gptq_quantize(weight, grams[inputs[mm.node]], config.block_size, damp=config.gptq_damp)
        replace_with_nbits(model, mm.node, codes, scales, zeros, config.block_size, config.accuracy_level)
    onnx.save_model(model, str(target), save_as_external_data=is_large(source), all_tensors_to_one_file=True,
                    location=f"{target.name}.data")


def _smooth(source: Path, target: Path, groups: list[SmoothGroup], config: QuantConfig, runner: OrtCausalLM,
            samples: list[np.ndarray], summary: dict) -> None:
    """SmoothQuant: fold per-channel scales measured on the calibration text into the groups' weights."""
    import onnx
    from tqdm.auto import tqdm

    from .smooth import channel_maxima, smooth_initializers

    feeds = (prefill_feeds(runner, ids) for ids in samples)
    maxima = channel_maxima(source, [g.activation for g in groups], feeds, target.parent, large=is_large(source),
                            progress=lambda items: tqdm(items, desc="SmoothQuant calibration"))
    model = onnx.load(str(source))
    summary.update(smooth_initializers(model, groups, maxima, config.smooth_alpha))
    onnx.save_model(model, str(target), save_as_external_data=is_large(source), all_tensors_to_one_file=True,
                    location=f"{target.name}.data")


def logits_snr_db(reference: OrtCausalLM, candidate: OrtCausalLM, samples: list[np.ndarray]) -> float:
    """Signal-to-noise ratio (dB) of the candidate's logits against the reference's over the samples."""
    signal = noise = 0.0
    for ids in samples:
        ref = reference.forward(ids)[0].astype(np.float64)
        out = candidate.forward(ids)[0].astype(np.float64)
        signal += float(np.square(ref).sum())
        noise += float(np.square(ref - out).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".onnx", ".data", ".onnx_data"))


def quantize_onnx(source_dir: str | Path, out_dir: str | Path, config: QuantConfig, overwrite: bool = False) -> dict:
    """Quantize an exported ONNX directory into ``out_dir`` (atomically) and return its manifest."""
    import onnx

    source = Path(source_dir).expanduser()
    model_path = check_onnx_dir(source)
    if Path(out_dir).expanduser().resolve() == source.resolve():
        raise UserInputError("the output directory must differ from the input (inputs are never modified)")
    reference = OrtCausalLM(source)
    graph = onnx.load(str(model_path), load_external_data=False)
    matmuls = weight_matmuls(graph)
    full = quant_plan(matmuls, config)
    samples = _calibration_inputs(reference, config)
    groups = [] if config.smooth_alpha is None else smoothable_groups(graph, {mm.node for mm in full.chosen})
    smoothing: dict = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        copy_side_files(source, tmp)
        _run_passes(model_path, tmp, full, config, reference, samples, _default_opset(graph), groups, smoothing)
        embedding = None if not config.embedding_dtype else _embedding_name(tmp / MODEL_FILE)
        snr = logits_snr_db(reference, OrtCausalLM(tmp), samples)
        if snr < config.floor:
            hint = "" if config.keep_float and config.smooth_alpha else (
                " Models with outlier activations (e.g. SmolLM2's MLP down projection inputs) quantize better with "
                "keep_float (--keep-float down_proj) and, for INT8, SmoothQuant (--smooth-alpha 0.8).")
            raise QuantQualityError(f"{config.mode.value}: logits SNR {snr:.1f} dB is below the floor of "
                                    f"{config.floor:.1f} dB; nothing was written.{hint}")
        manifest = _manifest(source, model_path, tmp, config, full, snr)
        manifest["embedding_float16"] = embedding
        manifest["smoothing"] = None if config.smooth_alpha is None else {
            "alpha": config.smooth_alpha, "groups": len(groups), "matmuls": sum(len(g.matmuls) for g in groups),
            "by_activation": smoothing}
        (tmp / QUANT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _run_passes(model_path: Path, out: Path, full: QuantPlan, config: QuantConfig, reference: OrtCausalLM,
                samples: list[np.ndarray], opset: int, groups: list[SmoothGroup], smoothing: dict) -> None:
    """SmoothQuant (when there are groups), the mode's quantizer, then 8-bit weight-only blocks, then the float16
    embedding: each pass reads the previous graph and writes a new one in ``out``; the last becomes
    ``model.onnx``, intermediates are deleted."""
    passes = []
    if groups:
        passes.append(lambda src, dst: _smooth(src, dst, groups, config, reference, samples, smoothing))
    if full.chosen:
        nodes = [mm.node for mm in full.chosen]
        if config.mode == QuantMode.INT4 and config.method == Int4Method.GPTQ:
            passes.append(lambda src, dst: _quantize_gptq(src, dst, full.chosen, config, reference))
        elif config.mode == QuantMode.INT4:
            passes.append(lambda src, dst: _quantize_nbits(src, dst, nodes, config, bits=4))
        else:
            passes.append(lambda src, dst: _quantize_int8(src, dst, nodes, config, reference, samples, opset))
    if full.weight_int8:
        nodes8 = [mm.node for mm in full.weight_int8]
        passes.append(lambda src, dst: _quantize_nbits(src, dst, nodes8, config, bits=8))
    if config.embedding_dtype:
        passes.append(_embedding_to_float16)
    stage = model_path
    for index, run_pass in enumerate(passes):
        target = out / (MODEL_FILE if index == len(passes) - 1 else f".stage{index}.onnx")
        run_pass(stage, target)
        _remove_model(stage, keep=model_path)
        stage = target


def _embedding_name(model_path: Path) -> str:
    import onnx

    casts = [n for n in onnx.load(str(model_path), load_external_data=False).graph.node
             if n.op_type == "Cast" and n.name.endswith("/cast_to_float32")]
    return casts[0].output[0]


def _embedding_to_float16(source: Path, target: Path) -> None:
    """Store the token-embedding table (the float initializer a Gather reads rows of) as float16 + a Cast node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    initializers = {t.name: t for t in model.graph.initializer}
    tables = [n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in initializers
              and initializers[n.input[0]].data_type == TensorProto.FLOAT and len(initializers[n.input[0]].dims) == 2]
    if not tables:
        raise UserInputError("embedding_dtype: no float token-embedding table (Gather of an initializer) found")
    name = max(set(tables), key=lambda t: np.prod(initializers[t].dims))
    table = initializers[name]
    half = numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), name=f"{name}.float16")
    model.graph.initializer.remove(table)
    model.graph.initializer.append(half)
    model.graph.node.insert(0, helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT,
                                                name=f"{name}/cast_to_float32"))
    onnx.save_model(model, str(target), save_as_external_data=is_large(source), all_tensors_to_one_file=True,
                    location=f"{target.name}.data")


def _remove_model(path: Path, keep: Path) -> None:
    """Delete an intermediate graph (and its external data) unless it is the untouched source."""
    if path == keep:
        return
    for item in path.parent.glob(path.name + "*"):
        item.unlink()


def _manifest(source: Path, model_path: Path, out: Path, config: QuantConfig, full: QuantPlan, snr: float) -> dict:
    return {
        "command": sys.argv,
        "config": config.to_dict(),
        "source": {"directory": str(source.resolve()), "model_sha256": sha256_file(model_path)},
        "quantized_matmuls": len(full.chosen),
        "quantized_by_role": count_roles(full.chosen),
        "weight_int8_matmuls": len(full.weight_int8),
        "weight_int8_by_role": count_roles(full.weight_int8),
        "unquantized": full.skipped,
        "unquantized_count": len(full.skipped),
        "size_bytes": {"source": _directory_bytes(source), "quantized": _directory_bytes(out)},
        "logits_snr_db": round(snr, 3),
        "snr_floor_db": config.floor,
        "calibration": {"source": config.calib, "samples": config.calib_samples, "seqlen": config.calib_seqlen,
                        "seed": config.seed},
        "versions": runtime_versions(),
    }
