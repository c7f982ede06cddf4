"""GPTQ (Frantar et al., ICLR 2023) for the weight MatMuls of an exported ONNX model, stored as ``MatMulNBits``.

Round-to-nearest quantizes every weight on its own. GPTQ quantizes the input rows of ``W`` (K x N, ``y = x W``)
one at a time and spreads each row's rounding error over the rows not yet quantized, weighted by the inverse
of the input Gram matrix ``H = X^T X`` measured on calibration text: it minimises ``|X W - X Q|`` rather than
``|W - Q|``. This matters most for sliced models, whose inputs are PCA coordinates: a few leading coordinates
carry most of the activation energy, so an error on their weights costs far more than the same error elsewhere.

The Gram matrices come from the float model (every quantized MatMul's input exposed as an extra graph output
and accumulated over the calibration sequences), so all layers are solved independently. The first token of
every sequence is weighted up (by default as much as all the sequence's other tokens together): it is the
attention sink that every later token reads, with outsized activations. Unweighted, GPTQ pushes its error onto
that rare token: measured on SmolLM2 INT4, the logits SNR rose but perplexity got worse than round-to-nearest,
the loss concentrated in the first positions of each window (benchmarks/results/int4_gptq_cpu.md). On a PCA slice
the sink lives on the first input coordinate, whose own rounding error GPTQ cannot redistribute: quantize the
``--incoherence`` slice instead (the same function, the sink spread over every coordinate). Quantization is
asymmetric 4-bit per block of ``block_size`` input rows (MatMulNBits' layout: blocks along K, one scale and one
4-bit zero point per output column and block), with the block's clipping range searched on the updated weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from slice2deploy.utils import Slice2DeployError, UserInputError

from .probe import probe_activations

LAZY_BLOCK = 128  # rows updated lazily per step (the GPTQ paper's batching), rounded up to whole blocks
CLIP_GRID = np.linspace(1.0, 0.75, 11)  # shrink factors tried for each block's [min, max] range


def probe_grams(model_path: Path, tensors: list[str], feeds: Iterable[dict], scratch: Path, large: bool = False,
                first_token_weight: float = 1.0, progress: Callable[[Iterable], Iterable] = lambda x: x
                ) -> dict[str, np.ndarray]:
    """``X^T X`` (float64) of every named activation tensor (batch, sequence, K), over all tokens of all ``feeds``
    (each a prefill from position 0), with the first token of every sequence counted ``first_token_weight``
    times, and the token count under the key ``"__tokens__"`` (read through ``probe.probe_activations``)."""
    grams: dict[str, np.ndarray | None] = {name: None for name in tensors}
    tokens = 0
    for outputs in probe_activations(model_path, tensors, feeds, scratch, large, progress):
        tokens += int(np.prod(outputs[tensors[0]].shape[:2]))
        for name, value in outputs.items():
            if value.ndim != 3:
                raise Slice2DeployError(f"GPTQ: {name} has shape {value.shape}; expected (batch, sequence, K)")
            rows = value.astype(np.float64)
            rows[:, 0] *= np.sqrt(first_token_weight)
            rows = rows.reshape(-1, value.shape[-1])
            gram = rows.T @ rows
            grams[name] = gram if grams[name] is None else grams[name] + gram
    if tokens == 0:
        raise UserInputError("GPTQ needs at least one calibration sequence")
    return {**grams, "__tokens__": np.array(tokens)}


def _block_params(w: np.ndarray, bits: int, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point per row of ``w`` (rows = output columns, one quantization block each), with
    the clipping range shrunk to whichever factor of ``CLIP_GRID`` gives the smallest squared error. Symmetric:
    the zero point is fixed at ``2**(bits-1)`` (signed codes -8..7 for 4 bits, what TensorRT's Q/DQ takes) and
    ``max |w|`` maps to ``2**(bits-1) - 1``."""
    top = 2**bits - 1
    lo, hi = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    if symmetric:
        lo, hi = -np.maximum(-lo, hi), np.maximum(-lo, hi)
    best_err = np.full(w.shape[0], np.inf)
    best_scale, best_zero = np.ones(w.shape[0]), np.zeros(w.shape[0])
    for shrink in CLIP_GRID:
        if symmetric:
            scale = np.maximum(hi * shrink / (2 ** (bits - 1) - 1), 1e-12)
            zero = np.full(w.shape[0], 2.0 ** (bits - 1))
        else:
            scale = np.maximum((hi - lo) * shrink / top, 1e-12)
            zero = np.clip(np.round(-lo * shrink / scale), 0, top)
        err = np.square(_fake_quant(w, scale, zero, top) - w).sum(axis=1)
        better = err < best_err
        best_err[better], best_scale[better], best_zero[better] = err[better], scale[better], zero[better]
    return best_scale, best_zero


def _fake_quant(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, top: int) -> np.ndarray:
    """Quantize and dequantize the rows of ``w``, each with its own scale and zero point."""
    scale, zero = scale[:, None], zero[:, None]
    return (np.clip(np.round(w / scale) + zero, 0, top) - zero) * scale


def _inverse_hessian_factor(gram: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``, the form GPTQ's row updates use."""
    h = gram.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h)
    inverse = np.linalg.inv(lower)
    return np.linalg.cholesky(inverse.T @ inverse).T


def gptq_quantize(weight: np.ndarray, gram: np.ndarray, block_size: int, bits: int = 4, damp: float = 0.01,
                  symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``weight`` (K x N, ``y = x W``) with GPTQ against the input Gram matrix ``gram`` (K x K).

    Returns the integer codes (N x K, values in [0, 2**bits)), the scales and the integer zero points
    (N x K/block_size each); ``(codes - zero) * scale`` per block is the dequantized weight, transposed.
    ``symmetric``: every zero point is ``2**(bits-1)`` (TensorRT's Q/DQ format: ``codes - zero`` are the signed
    integers it stores, with no zero-point tensor)."""
    k, n = weight.shape
    if gram.shape != (k, k):
        raise Slice2DeployError(f"GPTQ: Gram matrix {gram.shape} does not match the weight's K = {k}")
    if k % block_size:
        raise UserInputError(f"GPTQ: block size {block_size} must divide K = {k}")
    lazy = -(-LAZY_BLOCK // block_size) * block_size  # a whole number of quantization blocks per lazy batch
    top = 2**bits - 1
    w = weight.T.astype(np.float64).copy()  # N x K: GPTQ walks the input dimension (columns here)
    w[:, np.diag(gram) == 0] = 0.0
    hinv = _inverse_hessian_factor(gram.astype(np.float64), damp)
    codes = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, k // block_size))
    zeros = np.zeros((n, k // block_size))
    for start in range(0, k, lazy):
        stop = min(start + lazy, k)
        w1, err1, h1 = w[:, start:stop].copy(), np.zeros((n, stop - start)), hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = start + i
            if column % block_size == 0:
                scale, zero = _block_params(w1[:, i:i + block_size], bits, symmetric)
                scales[:, column // block_size], zeros[:, column // block_size] = scale, zero
            q = np.clip(np.round(w1[:, i] / scale) + zero, 0, top)
            codes[:, column] = q
            err = (w1[:, i] - (q - zero) * scale) / h1[i, i]
            w1[:, i:] -= np.outer(err, h1[i, i:])
            err1[:, i] = err
        w[:, stop:] -= err1 @ hinv[start:stop, stop:]
    return codes, scales.astype(np.float32), zeros.astype(np.uint8)


def rtn_quantize(weight: np.ndarray, block_size: int, bits: int = 4, symmetric: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same block format by plain round-to-nearest (GPTQ with an identity Gram matrix)."""
    return gptq_quantize(weight, np.eye(weight.shape[0]), block_size, bits, damp=0.0, symmetric=symmetric)


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int) -> np.ndarray:
    """The K x N float weight that ``MatMulNBits`` computes with."""
    n, k = codes.shape
    blocks = codes.reshape(n, k // block_size, block_size).astype(np.float32)
    values = (blocks - zeros[..., None].astype(np.float32)) * scales[..., None]
    return values.reshape(n, k).T


def pack_matmul_nbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block_size: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-bit codes (N x K) into MatMulNBits' initializers: B uint8 [N, K/block, block/2] (two codes per byte,
    the even-indexed one in the low nibble), scales float [N * K/block], zero points uint8 [N * ceil(blocks/2)]
    (packed the same way, per output column)."""
    n, k = codes.shape
    blocks = k // block_size
    pairs = codes.reshape(n, blocks, block_size // 2, 2).astype(np.uint8)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    padded = np.zeros((n, blocks + blocks % 2), dtype=np.uint8)
    padded[:, :blocks] = zeros
    zero_bytes = padded[:, 0::2] | (padded[:, 1::2] << 4)
    return packed, scales.astype(np.float32).reshape(-1), zero_bytes.reshape(-1)


def replace_with_nbits(model, node_name: str, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                       block_size: int, accuracy_level: int | None) -> None:
    """Swap the MatMul ``node_name`` for a 4-bit ``MatMulNBits`` node holding the given codes (in place on
    ``model``); its float weight initializer is dropped when nothing else reads it."""
    from onnx import helper, numpy_helper

    nodes = {node.name: node for node in model.graph.node}
    node = nodes[node_name]
    weight_name = node.input[1]
    n, k = codes.shape
    packed, scale_flat, zero_flat = pack_matmul_nbits(codes, scales, zeros, block_size)
    names = [f"{weight_name}_Q4", f"{weight_name}_scales", f"{weight_name}_zero_points"]
    model.graph.initializer.extend(numpy_helper.from_array(array, name) for array, name
                                   in zip((packed, scale_flat, zero_flat), names, strict=True))
    attributes = {"K": k, "N": n, "bits": 4, "block_size": block_size}
    if accuracy_level is not None:
        attributes["accuracy_level"] = accuracy_level
    replacement = helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                                   name=f"{node.name}_Q4", domain="com.microsoft", **attributes)
    index = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    model.graph.node.insert(index, replacement)
    if not any(weight_name in other.input for other in model.graph.node):
        position = next(i for i, init in enumerate(model.graph.initializer) if init.name == weight_name)
        del model.graph.initializer[position]
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
