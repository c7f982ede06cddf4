"""Which weight MatMuls read outlier-heavy activations: the advice a refused quantization gives, from measurements.

Per-tensor INT8 activations and coarse weight blocks both lose most where a MatMul's input has a few channels
far larger than the rest (the "massive activations" of LLM residual streams and MLP products; Sun et al., 2024,
"Massive Activations in Large Language Models"). We measure, on the calibration text, each MatMul input's peak
against its typical channel, ``max|x| / median_j rms(x[..., j])`` (a per-tensor INT8 scale is set by the peak;
the typical channel is what it must still resolve), and group MatMuls by kind (the module name in the node path,
e.g. ``down_proj``), so the hint names this model's own modules instead of another model's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


def matmul_kind(node_name: str) -> str:
    """The module a MatMul node belongs to: ``/model/layers.3/mlp/down_proj/MatMul`` -> ``down_proj``."""
    parts = [part for part in node_name.split("/") if part]
    return parts[-2] if len(parts) >= 2 else node_name


def peak_to_typical(x: np.ndarray) -> float:
    """``max|x| / median_j rms(x[..., j])`` for activations ``x`` (..., channels): 1 for a constant magnitude,
    large when a few channels or tokens dwarf the rest."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, np.shape(x)[-1])
    typical = float(np.median(np.sqrt(np.mean(x * x, axis=0))))
    return float(np.abs(x).max() / typical) if typical > 0 else 0.0


def outlier_ratios(model_path: Path, inputs_by_node: dict[str, str], feeds: Iterable[dict], scratch: Path,
                   large: bool) -> list[tuple[str, float]]:
    """Per MatMul kind, the largest :func:`peak_to_typical` of its input over ``feeds``, sorted from the worst.

    ``inputs_by_node`` maps each MatMul node name to its activation input's tensor name.
    """
    from .probe import probe_activations

    tensors = sorted(set(inputs_by_node.values()))
    worst: dict[str, float] = {}
    for values in probe_activations(model_path, tensors, feeds, scratch, large=large):
        for node, tensor in inputs_by_node.items():
            kind = matmul_kind(node)
            worst[kind] = max(worst.get(kind, 0.0), peak_to_typical(values[tensor]))
    return sorted(worst.items(), key=lambda item: -item[1])


def mixed_precision_hint(ratios: list[tuple[str, float]], int8: bool, already: Iterable[str] = ()) -> str:
    """One sentence naming the outlier-heavy MatMul kind and the flags that keep it at higher precision."""
    candidates = [(kind, ratio) for kind, ratio in ratios if not any(name in kind for name in already)]
    if not candidates:
        return ""
    kind, ratio = candidates[0]
    rest = max((r for _, r in candidates[1:]), default=0.0)
    flag = f"--keep-float {kind}" if int8 else f"--weight-int8 {kind} (or --keep-float {kind})"
    smooth = " or SmoothQuant (--smooth-alpha 0.8)" if int8 else ""
    return (f" Measured on the calibration text, the inputs of {kind} peak at {ratio:.0f}x their typical channel "
            f"(other MatMul kinds at most {rest:.0f}x): try {flag}{smooth}.")
