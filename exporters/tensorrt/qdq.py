"""INT8 (W8A8) and INT4 (weight-only, blocked) Q/DQ graphs in the form TensorRT's explicit quantization takes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from slice2deploy.utils import UserInputError

from ..graph_io import PrefillReader, is_large
from ..ort import OrtCausalLM
from ..quantize import WeightMatMul, plan, weight_matmuls
from .config import Precision, TrtBuildConfig, TrtReadyQualityError
from .fp16 import _producers


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


def quantize_int8_qdq(source: Path, target: Path, nodes: list[str], runner: OrtCausalLM,
                      samples: list[np.ndarray]) -> None:
    """INT8 Q/DQ as TensorRT's explicit quantization expects: symmetric (zero points 0), int8 weights per output
    channel (axis 1 of a (K, N) MatMul weight, a 1-D scale), activations per tensor (scalar scale, MinMax ranges)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(source), str(target), PrefillReader(runner, samples), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    nodes_to_quantize=nodes, op_types_to_quantize=["MatMul", "Gemm"],
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=is_large(source),
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

