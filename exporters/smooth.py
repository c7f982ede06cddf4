"""SmoothQuant (Xiao et al., ICML 2023) for the INT8 modes, whose activations are quantized per tensor.

A norm's output ``a = r * g`` (``g`` the norm's per-channel weight) feeds several weight MatMuls ``a W``. A few
channels of ``a`` are far larger than the rest, so one per-tensor scale leaves the other channels with a handful
of levels. SmoothQuant moves part of each channel's range into the weights, which are quantized per output
channel and have range to spare: ``a W = (a / s) (s W)`` for any positive per-channel ``s``, with

    s_j = max|a_j|^alpha / max|W_j,:|^(1 - alpha)

(``max|a_j|`` measured on calibration text, ``W`` the group's weights side by side). The multiplication goes
into the rows of every weight that reads ``a``, the division into whatever made ``a``'s channels, so the float
graph computes the same function with no new node. Two producers qualify:

- a norm, ``a = r * g``: the division goes into its per-channel weight ``g`` (q/k/v and gate/up read these);
- the MLP's product ``a = act(x Wg) * (x Wu)``: it goes into the columns of ``Wu``, which INT8 quantizes per
  column anyway, so its own quantization does not change (down_proj reads this).

A group is smoothed only when every reader of ``a`` (shape reads aside) is a weight MatMul being quantized and
no other node reads the initializers involved. A slice's norms are weight-free (their scales are folded into
the weights already): only its MLP products can be smoothed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slice2deploy.utils import UserInputError

from .ort import all_nodes
from .probe import probe_activations

SHAPE_ONLY = ("Shape", "Size")  # readers of a tensor's shape alone: unaffected by scaling its values
SCALE_RANGE = (1e-5, 1e5)  # clip on s: a dead channel (max 0) must not zero a weight row or blow up a norm weight


@dataclass(frozen=True)
class SmoothGroup:
    """Weight MatMuls that read one activation, and the initializer whose last axis scales its channels."""

    activation: str
    source: str
    matmuls: tuple[str, ...]
    weights: tuple[str, ...]


def smoothable_groups(model, nodes: set[str]) -> list[SmoothGroup]:
    """The groups of ``model`` (loaded with or without external data) whose MatMuls are all in ``nodes``."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in all_nodes(graph):
        for name in node.input:
            readers.setdefault(name, []).append(node)
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    groups = []
    for node in graph.node:
        if node.op_type != "Mul" or node.output[0] in outputs:
            continue
        source = _scale_source(node, initializers, readers, producers, outputs)
        matmuls = _value_readers(node.output[0], readers)
        if source is None or not matmuls:
            continue
        width = initializers[source].dims[-1]
        if all(_reads_as_weight_matmul(mm, node.output[0], width, nodes, initializers, readers) for mm in matmuls):
            groups.append(SmoothGroup(node.output[0], source, tuple(mm.name for mm in matmuls),
                                      tuple(mm.input[1] for mm in matmuls)))
    return groups


def _value_readers(tensor: str, readers: dict) -> list:
    return [r for r in readers.get(tensor, []) if r.op_type not in SHAPE_ONLY]


def _scale_source(mul, initializers: dict, readers: dict, producers: dict, outputs: set[str]) -> str | None:
    """The initializer whose last axis can absorb ``1 / s`` for the output of ``mul``: a norm's per-channel weight
    (``r * g``), or the weight of a MatMul whose output only this Mul reads (the MLP's ``act(x Wg) * (x Wu)``:
    dividing column j of ``Wu`` divides channel j of the product)."""
    from onnx import TensorProto

    def own_float(name: str, rank: int) -> bool:
        tensor = initializers.get(name)
        return (tensor is not None and tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == rank
                and tensor.dims[-1] > 1 and len(readers[name]) == 1)

    norms = [name for name in mul.input if own_float(name, 1)]
    if norms:
        return norms[0] if len(norms) == 1 else None
    for name in mul.input:
        producer = producers.get(name)
        if (producer is not None and producer.op_type == "MatMul" and len(producer.input) == 2
                and own_float(producer.input[1], 2) and name not in outputs
                and [r.name for r in _value_readers(name, readers)] == [mul.name] and list(mul.input).count(name) == 1):
            return producer.input[1]
    return None


def _reads_as_weight_matmul(node, activation: str, width: int, nodes: set[str], initializers: dict,
                            readers: dict) -> bool:
    """``node`` is a quantized MatMul ``activation @ W`` with a float ``W`` (width x N) that nothing else reads."""
    from onnx import TensorProto

    weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
    return (node.op_type == "MatMul" and node.name in nodes and node.input[0] == activation
            and weight is not None and weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2
            and weight.dims[0] == width and len(readers[node.input[1]]) == 1)


def channel_maxima(model_path: Path, activations: list[str], feeds, scratch: Path, large: bool = False,
                   progress=lambda x: x) -> dict[str, np.ndarray]:
    """max |a_j| of every named activation (..., K) over all calibration tokens."""
    maxima: dict[str, np.ndarray] = {}
    for outputs in probe_activations(model_path, activations, feeds, scratch, large, progress):
        for name, value in outputs.items():
            top = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = top if name not in maxima else np.maximum(maxima[name], top)
    if not maxima:
        raise UserInputError("SmoothQuant needs at least one calibration sequence")
    return maxima


def smoothing_scales(activation_max: np.ndarray, weight_max: np.ndarray, alpha: float) -> np.ndarray:
    """Per-channel ``s = max|a|^alpha / max|W|^(1 - alpha)``; channels with a zero maximum keep ``s = 1``."""
    if not 0.0 < alpha < 1.0:
        raise UserInputError(f"SmoothQuant alpha must be in (0, 1), got {alpha}")
    act, wgt = activation_max.astype(np.float64), weight_max.astype(np.float64)
    live = (act > 0) & (wgt > 0)
    scales = np.ones_like(act)
    scales[live] = act[live] ** alpha / wgt[live] ** (1.0 - alpha)
    return np.clip(scales, *SCALE_RANGE)


def smooth_initializers(model, groups: list[SmoothGroup], maxima: dict[str, np.ndarray], alpha: float) -> dict:
    """Fold each group's scales into ``model`` (loaded with its weights) in place; return a summary per group."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}

    def replace(name: str, value: np.ndarray) -> None:
        initializers[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))

    summary = {}
    for group in groups:
        weights = [numpy_helper.to_array(initializers[name]).astype(np.float64) for name in group.weights]
        weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scales = smoothing_scales(maxima[group.activation], weight_max, alpha)
        source = numpy_helper.to_array(initializers[group.source]).astype(np.float64)
        replace(group.source, source / scales)  # a norm weight (K,) or an up projection's columns (K_in, K)
        for name, weight in zip(group.weights, weights, strict=True):
            replace(name, weight * scales[:, None])
        summary[group.activation] = {"matmuls": len(group.matmuls),
                                     "activation_max_ratio": _spread(maxima[group.activation]),
                                     "smoothed_max_ratio": _spread(maxima[group.activation] / scales)}
    return summary


def _spread(maxima: np.ndarray) -> float:
    """Largest channel maximum over the median one: how badly a per-tensor scale fits the channels."""
    median = float(np.median(maxima))
    return round(float(maxima.max()) / median, 2) if median > 0 else float("inf")
