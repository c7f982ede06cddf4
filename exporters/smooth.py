"""SmoothQuant (Xiao et al., ICML 2023) for the INT8 modes, whose activations are quantized per tensor.

A norm's output ``a = r * g`` (``g`` the norm's per-channel weight) feeds several weight MatMuls ``a W``. A few
channels of ``a`` are far larger than the rest, so one per-tensor scale leaves the other channels with a handful
of levels. SmoothQuant moves part of each channel's range into the weights, which are quantized per output
channel and have range to spare: ``a W = (a / s) (s W)`` for any positive per-channel ``s``, with

    s_j = max|a_j|^alpha / max|W_j,:|^(1 - alpha)

(``max|a_j|`` measured on calibration text, ``W`` the group's weights side by side). The division is folded
into the norm's weight (``g / s``) and the multiplication into the rows of every weight that reads ``a``, so
the float graph computes the same function with no new node. A group is smoothed only when every reader of
``a`` (shape reads aside) is a weight MatMul being quantized, and the norm weight and the MatMul weights have no
other reader.
Sliced models have weight-free norms (their scales are folded into the weights already): nothing to smooth.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slice2deploy.utils import UserInputError

from .probe import probe_activations

SHAPE_ONLY = ("Shape", "Size")  # readers of a tensor's shape alone: unaffected by scaling its values
SCALE_RANGE = (1e-5, 1e5)  # clip on s: a dead channel (max 0) must not zero a weight row or blow up a norm weight


@dataclass(frozen=True)
class SmoothGroup:
    """Weight MatMuls that read one norm output, and the norm's per-channel weight that produced it."""

    activation: str
    norm_weight: str
    matmuls: tuple[str, ...]
    weights: tuple[str, ...]


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _all_nodes(sub)


def smoothable_groups(model, nodes: set[str]) -> list[SmoothGroup]:
    """The groups of ``model`` (loaded with or without external data) whose MatMuls are all in ``nodes``."""
    from onnx import TensorProto

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, list] = {}
    for node in _all_nodes(graph):
        for name in node.input:
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    groups = []
    for node in graph.node:
        if node.op_type != "Mul" or node.output[0] in outputs:
            continue
        norm = [name for name in node.input if name in initializers and len(initializers[name].dims) == 1
                and initializers[name].data_type == TensorProto.FLOAT and len(readers[name]) == 1]
        matmuls = [r for r in readers.get(node.output[0], []) if r.op_type not in SHAPE_ONLY]
        if len(norm) != 1 or not matmuls:
            continue
        width = initializers[norm[0]].dims[0]
        if all(_reads_as_weight_matmul(mm, node.output[0], width, nodes, initializers, readers) for mm in matmuls):
            groups.append(SmoothGroup(node.output[0], norm[0], tuple(mm.name for mm in matmuls),
                                      tuple(mm.input[1] for mm in matmuls)))
    return groups


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
        norm = numpy_helper.to_array(initializers[group.norm_weight]).astype(np.float64)
        replace(group.norm_weight, norm / scales)
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
