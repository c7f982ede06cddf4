"""Weight-only INT4 / INT8 Q/DQ graphs with the ONNX Runtime path's quality tools, for TensorRT and TensorRT-RTX.

TensorRT(-RTX) runs weight-only GEMMs from a ``DequantizeLinear`` of a constant integer weight feeding a MatMul:
INT4 blocked along K (scale of shape (K/block, N), ``block_size`` attribute, opset 21), INT8 per output channel
(scale of shape (N,)). Both are symmetric (no zero point: TensorRT's Q/DQ layers take zero points of 0 only).

Choices shared with ``exporters.quantize`` (one implementation serving both paths):
- the plan (:func:`exporters.quantize.quant_plan`): which weight MatMuls are quantized, which stay float and why,
  ``weight_int8`` patterns (e.g. ``down_proj``, whose inputs carry massive outliers) and residual shortcuts stored
  as 8-bit;
- GPTQ (:func:`exporters.gptq.gptq_quantize`, here with ``symmetric=True``) against Gram matrices of the float
  inputs measured on the calibration text (:func:`exporters.gptq.probe_grams`);
- a tied head untied into its own initializer so it can be stored at 8 (or 4) bits while the embedding table the
  Gather reads is stored on its own (:func:`quantize_embedding`).

The token-embedding table (``embedding_bits`` 8, the weight-only default) is stored as INT8 with one symmetric scale
per vocabulary row: ``Gather(DequantizeLinear(table_int8, row_scales, axis=0), ids)``. Checked with TensorRT-RTX
1.7.1 on this CPU-only machine (tiny graphs, 8192 x 256 table): that form builds and the engine holds the table as
INT8 (engine 2.30 MB vs 4.38 MB with a float16 table; "Total Weights Memory" 2.15 MB, no larger scratch memory, the
whole graph in one Myelin node). The forms that dequantize after the Gather are refused or grow the engine: a Gather
of an INT8 constant followed by Cast, or by a DequantizeLinear with gathered (non-constant) scales, fails the build
("Quantized constant ... is only allowed before DQ or PLUGIN"); a UINT8 table is converted to INT32 by the parser
(4x the bytes). Whether the engine dequantizes only the gathered rows at run time was not observable without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slice2deploy.utils import UserInputError

from ..graph_io import calibration_samples, embedding_table, is_large, prefill_feeds, untie_head
from ..ort import OrtCausalLM
from ..quantize import QuantConfig, QuantMode, WeightMatMul, quant_plan, weight_matmuls
from .config import Precision, TrtBuildConfig

INT4, INT8 = 22, 3  # onnx.TensorProto element types


@dataclass(frozen=True)
class WeightOnlyChoice:
    """One weight MatMul and the bits it is stored with (4: blocked along K; 8: per output channel)."""

    matmul: WeightMatMul
    bits: int


def plan_weight_only(model, config: TrtBuildConfig) -> tuple[list[WeightOnlyChoice], list[dict]]:
    """The weight-only plan on a graph whose tied head (if any) is already untied: (choices, skipped with reasons).

    Raises UserInputError up front when a 4-bit MatMul's K is not a multiple of the block size (a sliced model's
    residual widths must be: slice with ``--round-to`` equal to the block size)."""
    base = 4 if config.precision is Precision.INT4 else 8
    quant = QuantConfig(mode=QuantMode.INT4, block_size=config.int4_block_size,
                        quantize_head=config.head_bits is not None, keep_float=tuple(config.keep_float),
                        weight_int8=tuple(config.weight_int8), shortcuts=config.shortcuts, calib=config.calib)
    full = quant_plan(weight_matmuls(model), quant)
    choices = [WeightOnlyChoice(mm, config.head_bits if mm.role == "head" else base) for mm in full.chosen]
    choices += [WeightOnlyChoice(mm, 8) for mm in full.weight_int8]
    misfits = [c.matmul for c in choices if c.bits == 4 and c.matmul.k % config.int4_block_size]
    if misfits:
        widths = sorted({mm.k for mm in misfits})
        raise UserInputError(f"int4 blocks of {config.int4_block_size} along K: {len(misfits)} MatMul(s) have K in "
                             f"{widths} (e.g. {misfits[0].node}), not multiples of the block; slice with --round-to "
                             f"{config.int4_block_size} or keep them in float (--keep-float)")
    if not choices:
        raise UserInputError(f"no weight MatMul to quantize to {config.precision.value}")
    return choices, full.skipped


def _pack_int4(values: np.ndarray) -> bytes:
    """Signed 4-bit values (-8..7) in ONNX's INT4 layout: two per byte, the first in the low nibble."""
    flat = values.astype(np.int8).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.int8(0))
    return ((flat[0::2] & 0x0F) | ((flat[1::2] & 0x0F) << 4)).astype(np.uint8).tobytes()


def int4_tensors(codes: np.ndarray, scales: np.ndarray, name: str) -> tuple:
    """GPTQ's symmetric codes (N x K in 0..15, zero 8) and scales (N x K/block) as the (K, N) INT4 weight and
    (K/block, N) float32 scale initializers of a blocked DequantizeLinear (axis 0)."""
    from onnx import helper, numpy_helper

    signed = (codes.astype(np.int16) - 8).T  # (K, N)
    weight = helper.make_tensor(f"{name}_int4", INT4, list(signed.shape), _pack_int4(signed), raw=True)
    return weight, numpy_helper.from_array(np.ascontiguousarray(scales.T.astype(np.float32)), f"{name}_scale")


def int8_tensors(weight: np.ndarray, name: str) -> tuple:
    """Symmetric round-to-nearest per output channel: the (K, N) INT8 weight and its (N,) float32 scale."""
    from onnx import numpy_helper

    scale = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0  # (N,)
    codes = np.clip(np.round(weight / scale), -127, 127).astype(np.int8)
    return numpy_helper.from_array(codes, f"{name}_int8"), numpy_helper.from_array(scale.astype(np.float32),
                                                                                   f"{name}_scale")


def _insert_dequantize(model, node_name: str, weight, scale, block_size: int | None) -> None:
    """Feed MatMul ``node_name`` its weight through DequantizeLinear(weight, scale); drop the float initializer."""
    from onnx import helper

    node = next(n for n in model.graph.node if n.name == node_name)
    old = node.input[1]
    attributes = {"axis": 0, "block_size": block_size} if block_size else {"axis": 1}
    dequantize = helper.make_node("DequantizeLinear", [weight.name, scale.name], [f"{old}_dequantized"],
                                  name=f"{node_name}/weight_DequantizeLinear", **attributes)
    model.graph.initializer.extend([weight, scale])
    model.graph.node.insert(list(model.graph.node).index(node), dequantize)
    node.input[1] = dequantize.output[0]
    if not any(old in other.input for other in model.graph.node):
        position = next(i for i, init in enumerate(model.graph.initializer) if init.name == old)
        del model.graph.initializer[position]


def quantize_embedding(model) -> dict:
    """Store the token-embedding table the Gather reads as INT8 with per-row scales, in place: the Gather reads
    ``DequantizeLinear(table_int8, scale, axis=0)`` and the float initializer goes. Returns what was done, for the
    manifest: ``{"table", "bits": 8}``, or ``{"table", "bits": 16, "reason"}`` when the table was left as it was.

    A table that something besides the Gather reads (a tied head kept in float) is left alone: the graph would hold
    an INT8 copy next to the float one and grow, not shrink."""
    from onnx import helper, numpy_helper

    name = embedding_table(model)
    if name is None:
        return {"table": None, "bits": 16, "reason": "no Gather of a float32 table in the graph"}
    readers = {n.op_type for n in model.graph.node if name in n.input}
    if readers != {"Gather"}:
        return {"table": name, "bits": 16, "reason": f"also read by {', '.join(sorted(readers - {'Gather'}))} (a tied "
                "head kept in float): an INT8 copy would add to it; quantize the head (head_bits / --head-bits 8) to "
                "untie it"}
    table = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)).astype(np.float32)
    codes, scale = int8_tensors(table.T, name)  # per output channel of the (hidden, vocab) transpose = per row
    codes = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(codes).T), codes.name)
    dequantize = helper.make_node("DequantizeLinear", [codes.name, scale.name], [f"{name}_dequantized"],
                                  name=f"{name}/embedding_DequantizeLinear", axis=0)
    model.graph.initializer.extend([codes, scale])
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == name]
    model.graph.node.insert(min(list(model.graph.node).index(g) for g in gathers), dequantize)
    for gather in gathers:
        gather.input[0] = dequantize.output[0]
    position = next(i for i, init in enumerate(model.graph.initializer) if init.name == name)
    del model.graph.initializer[position]
    return {"table": name, "bits": 8}


def _grams(model_path: Path, model, choices: list[WeightOnlyChoice], config: TrtBuildConfig,
           reference: OrtCausalLM, scratch: Path) -> dict[str, np.ndarray]:
    """Gram matrices X^T X of the float inputs of the 4-bit MatMuls (GPTQ), measured on the source graph."""
    from .. import gptq

    readers = {node.name: node.input[0] for node in model.graph.node if node.input}
    tensors = sorted({readers[c.matmul.node] for c in choices if c.bits == 4})
    if not tensors or config.int4_method != "gptq":
        return {}
    samples = calibration_samples(reference, config.calib, config.gptq_samples, config.gptq_seqlen, config.seed)
    feeds = (prefill_feeds(reference, ids) for ids in samples)
    return gptq.probe_grams(model_path, tensors, feeds, scratch, large=is_large(model_path),
                            first_token_weight=float(config.gptq_seqlen))


def quantize_weight_only(model_path: Path, config: TrtBuildConfig, reference: OrtCausalLM, scratch: Path
                         ) -> tuple:
    """The weight-only Q/DQ graph of the float32 source at ``model_path``: (model, choices, skipped)."""
    import onnx
    from onnx import numpy_helper

    from ..gptq import gptq_quantize, rtn_quantize

    model = onnx.load(str(model_path))
    if config.head_bits is not None:
        untie_head(model)
    choices, skipped = plan_weight_only(model, config)
    grams = _grams(model_path, model, choices, config, reference, scratch)
    readers = {node.name: node.input[0] for node in model.graph.node if node.input}
    inits = {t.name: t for t in model.graph.initializer}
    for choice in choices:
        mm = choice.matmul
        weight = numpy_helper.to_array(inits[mm.weight]).astype(np.float32)  # (K, N)
        if choice.bits == 8:
            tensors, block = int8_tensors(weight, mm.weight), None
        else:
            gram = grams.get(readers[mm.node])
            codes, scales, _ = (rtn_quantize(weight, config.int4_block_size, 4, symmetric=True) if gram is None else
                                gptq_quantize(weight, gram, config.int4_block_size, 4, damp=config.gptq_damp,
                                              symmetric=True))
            tensors, block = int4_tensors(codes, scales, mm.weight), config.int4_block_size
        _insert_dequantize(model, mm.node, *tensors, block)
    return model, choices, skipped


__all__ = ["WeightOnlyChoice", "int4_tensors", "int8_tensors", "plan_weight_only", "quantize_embedding",
           "quantize_weight_only", "untie_head"]
