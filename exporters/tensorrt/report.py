"""What TensorRT's parser made of a graph, read from the network definition before the build.

Without a GPU an engine cannot be loaded or inspected, so this is the proof of what it holds: layer types, Q/DQ
layers, the bytes of constant weights by data type, and for every matrix multiply whether its weight arrives as
INT4, INT8 or float (traced back from the MatMul's second input through shape-only layers to a DequantizeLinear
of a constant), and the same for the table every Gather reads (an INT8 embedding table shows as INT8).
"""

from __future__ import annotations

from collections import Counter

BITS = {"FLOAT": 32, "HALF": 16, "BF16": 16, "INT8": 8, "INT4": 4, "INT32": 32, "INT64": 64, "BOOL": 8,
        "UINT8": 8, "FP8": 8}
NUMPY_NAMES = {"float32": "FLOAT", "float16": "HALF", "int8": "INT8", "int32": "INT32", "int64": "INT64",
               "bool": "BOOL", "uint8": "UINT8"}
PASS_THROUGH = ("SHUFFLE", "CAST", "IDENTITY")  # layers a weight may pass through between a constant and a GEMM


def _as(layer, cls):
    """TensorRT's Python API returns the ILayer base class; the subclass is set on it to read its fields."""
    layer.__class__ = cls
    return layer


def _weights(trt, layer) -> tuple[str, int]:
    """(data type name, element count) of a constant layer's weights."""
    weights = _as(layer, trt.IConstantLayer).weights
    if hasattr(weights, "dtype") and not isinstance(weights.dtype, trt.DataType):  # a numpy array
        return NUMPY_NAMES.get(str(weights.dtype), str(weights.dtype).upper()), int(weights.size)
    return weights.dtype.name, int(weights.size)


def _producers(network) -> dict:
    found = {}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            found[layer.get_output(j).name] = layer
    return found


def _weight_kind(trt, layer, producers: dict, constants: dict[str, str], index: int = 1) -> str:
    """INT4 / INT8 (a DequantizeLinear of a constant of that type), FLOAT/HALF (a constant), or activation: what
    reaches input ``index`` (a MatMul's weight: 1; a Gather's table: 0)."""
    source = producers.get(layer.get_input(index).name) if layer.num_inputs > index else None
    while source is not None and source.type.name in PASS_THROUGH:
        source = producers.get(source.get_input(0).name)
    if source is None:
        return "activation"
    if source.type.name == "DEQUANTIZE":
        origin = producers.get(source.get_input(0).name)
        return constants.get(origin.name, "activation") if origin is not None else "activation"
    if source.type.name == "CONSTANT":
        return constants.get(source.name, "FLOAT")
    return "activation"


def network_report(trt, network) -> dict:
    """A JSON-able description of a parsed network: ``summary`` (counts and weight megabytes by type),
    ``matmuls`` (each matrix multiply's name and weight kind) and ``gathers`` (the name and table kind of each Gather
    of a constant table, such as the token embedding; Gathers of activations, shape arithmetic, are left out).
    Weight bytes are element count x bits / 8 of every constant, the same total the engine stores before TensorRT's
    own folding and fusion."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    types = Counter(layer.type.name for layer in layers)
    constants, weight_bytes = {}, Counter()
    for layer in layers:
        if layer.type.name == "CONSTANT":
            dtype, count = _weights(trt, layer)
            constants[layer.name] = dtype
            weight_bytes[dtype] += count * BITS.get(dtype, 32) // 8
    producers = _producers(network)
    matmuls = [{"name": layer.name, "weight": _weight_kind(trt, layer, producers, constants)}
               for layer in layers if layer.type.name == "MATRIX_MULTIPLY"]
    gathers = [{"name": layer.name, "table": _weight_kind(trt, layer, producers, constants, index=0)}
               for layer in layers if layer.type.name == "GATHER"]
    gathers = [g for g in gathers if g["table"] != "activation"]  # shape arithmetic gathers from activations
    kinds = Counter(m["weight"] for m in matmuls)
    summary = {
        "layers": len(layers),
        "layer_types": dict(sorted(types.items())),
        "quantize_layers": types.get("QUANTIZE", 0),
        "dequantize_layers": types.get("DEQUANTIZE", 0),
        "weight_mb_by_type": {k: round(v / 1e6, 3) for k, v in sorted(weight_bytes.items())},
        "weight_mb": round(sum(weight_bytes.values()) / 1e6, 3),
        "matmuls_by_weight": dict(sorted(kinds.items())),
        "gathers_by_table": dict(sorted(Counter(g["table"] for g in gathers).items())),
    }
    return {"summary": summary, "matmuls": matmuls, "gathers": gathers}


__all__ = ["network_report"]
