"""The bfloat16 graph (float32 where TensorRT needs it, as in FP16), and its float32 twin for ONNX Runtime's CPU check.

The bfloat16 graph is the FP16 graph (:func:`exporters.tensorrt.fp16.convert_fp16`: the same float32 regions, the
same ±1e4 clamp) with every float16 tensor retyped to bfloat16; initializers are rounded from the float32 source
(clamped like FP16), not from their float16 copies. The float32 regions matter at least as much here: bfloat16 holds
integers exactly only up to 256 (RoPE positions), and its 8-bit mantissa makes norm statistics coarse. TensorRT-RTX
1.7.1 builds such strongly typed bfloat16 networks on this CPU-only machine (checked on tiny graphs and SmolLM2).

ONNX Runtime's CPU provider has no bfloat16 MatMul (``NOT_IMPLEMENTED``), so the graph itself cannot be run here.
The quality gate runs its float32 twin instead: every bfloat16 tensor of the graph becomes a float32 tensor rounded
to bfloat16 (``Cast(to=bfloat16)`` then ``Cast(to=float)``, round-to-nearest-even, which ONNX Runtime's CPU provider
implements), each op computing in float32 between roundings. That reproduces bfloat16 *storage* of every weight and
activation, the part of the error that bfloat16 adds; what it cannot see is arithmetic TensorRT might do in
bfloat16 inside an op (GEMMs accumulate in float32; reductions and elementwise kernels are TensorRT's choice).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..graph_io import MODEL_FILE
from .config import FLOAT, FLOAT16, FP16_CLAMP
from .fp16 import _infer_types, convert_fp16

BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16
TYPE_ATTRIBUTES = ("to", "dtype")  # integer attributes naming an element type (Cast, EyeLike, RandomNormal...)


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even (ml_dtypes, onnx's own dependency)."""
    import ml_dtypes

    return np.ascontiguousarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    import ml_dtypes

    return np.ascontiguousarray(bits, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)


def _tensor_values(tensor) -> np.ndarray:
    from onnx import numpy_helper

    if tensor.data_type == BFLOAT16:  # numpy_helper returns bfloat16 as an ml_dtypes or uint16 array by version
        raw = np.frombuffer(tensor.raw_data, np.uint16) if tensor.raw_data else np.asarray(tensor.int32_data,
                                                                                           np.uint16)
        return from_bfloat16_bits(raw).reshape(tuple(tensor.dims))
    return numpy_helper.to_array(tensor).astype(np.float32)


def _retensor(tensor, values: np.ndarray, data_type: int) -> None:
    """Rewrite ``tensor`` in place (name kept) as ``data_type`` (BFLOAT16 or FLOAT) holding ``values``."""
    raw = to_bfloat16_bits(values).tobytes() if data_type == BFLOAT16 else values.astype(np.float32).tobytes()
    for field in ("float_data", "int32_data", "double_data", "int64_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    tensor.data_type = data_type
    tensor.raw_data = raw


def _value_tensors(model):
    """Every tensor constant in the graph: initializers and the ``value`` of Constant / ConstantOfShape nodes."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.HasField("t"):
                yield attribute.t


def _retype(model, source_values: dict[str, np.ndarray], old: int, new: int) -> None:
    """Every ``old``-typed tensor, Cast target and value type of ``model`` becomes ``new`` (in place)."""
    for tensor in _value_tensors(model):
        if tensor.data_type == old:
            values = source_values.get(tensor.name)
            if values is None or values.shape != tuple(tensor.dims):
                values = _tensor_values(tensor)
            _retensor(tensor, values, new)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name in TYPE_ATTRIBUTES and attribute.i == old:
                attribute.i = new
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if info.type.tensor_type.elem_type == old:
            info.type.tensor_type.elem_type = new


def convert_bf16(model, head_in_float32: bool = True):
    """The bfloat16 graph of a float32 model, float32 kept where the FP16 graph keeps it; returns a model."""
    from onnx import numpy_helper

    source = {t.name: np.clip(numpy_helper.to_array(t), -FP16_CLAMP, FP16_CLAMP).astype(np.float32)
              for t in model.graph.initializer if t.data_type == FLOAT}
    converted = convert_fp16(model, head_in_float32)
    _retype(converted, source, FLOAT16, BFLOAT16)
    return converted


def float32_twin(model):
    """A float32 copy of a bfloat16 graph that ONNX Runtime's CPU provider runs: bfloat16 constants become the same
    values in float32, and every bfloat16 tensor an op writes is rounded to bfloat16 and back. Returns a model."""
    from onnx import helper

    _infer_types(model)
    types = {info.name: info.type.tensor_type.elem_type for info in [*model.graph.input, *model.graph.output,
                                                                      *model.graph.value_info]}
    for node in model.graph.node:
        if node.op_type == "Cast":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
    nodes = []
    for node in model.graph.node:
        nodes.append(node)
        for index, name in enumerate(node.output):
            if types.get(name) != BFLOAT16:
                continue
            node.output[index] = f"{name}/float32"
            nodes += [helper.make_node("Cast", [f"{name}/float32"], [f"{name}/bfloat16"], to=BFLOAT16,
                                       name=f"{name}/round_to_bfloat16"),
                      helper.make_node("Cast", [f"{name}/bfloat16"], [name], to=FLOAT, name=f"{name}/back_to_float")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    _retype(model, {}, BFLOAT16, FLOAT)
    for node in model.graph.node:  # the rounding Casts were retyped too: restore them
        if node.name.endswith("/round_to_bfloat16"):
            next(a for a in node.attribute if a.name == "to").i = BFLOAT16
    del model.graph.value_info[:]
    return model


def write_float32_twin(onnx_dir: Path, target: Path) -> Path:
    """Write the float32 twin of the bfloat16 graph in ``onnx_dir`` (with its tokenizer and config) to ``target``, a
    directory ONNX Runtime's CPU provider (exporters.ort.OrtCausalLM) can load; returns ``target``."""
    import onnx

    from ..graph_io import EXTERNAL_DATA_BYTES, copy_side_files, is_large, save_model

    model_path = Path(onnx_dir) / MODEL_FILE
    target.mkdir(parents=True, exist_ok=True)
    copy_side_files(Path(onnx_dir), target)
    large = is_large(model_path) or model_path.stat().st_size > EXTERNAL_DATA_BYTES // 2  # the twin is 2x larger
    save_model(float32_twin(onnx.load(str(model_path))), target / MODEL_FILE, large)
    return target


__all__ = ["BFLOAT16", "convert_bf16", "float32_twin", "from_bfloat16_bits", "to_bfloat16_bits",
           "write_float32_twin"]
