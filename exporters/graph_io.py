"""Graph I/O shared by the quantizers (``exporters.quantize``) and the TensorRT path (``exporters.tensorrt``).

One copy of what both need around an exported ONNX directory: whether a graph must be saved with external data,
copying the tokenizer/config next to a new graph, saving a graph, the calibration token samples, the prefill feeds
onnxruntime's calibration reads, and counting quantized MatMuls by role. Nothing here imports onnxruntime at module
import.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

MODEL_FILE = "model.onnx"  # the export directory layout (exporters.ort.MODEL_FILE)
GRAPH_SUFFIXES = (".onnx", ".data", ".onnx_data")
# Above this size a graph is written with its weights as external data: protobuf refuses files over 2 GiB, and the
# margin covers the graph growing in a pass (Q/DQ scales, Cast nodes).
EXTERNAL_DATA_BYTES = 1536 << 20


def is_large(model_path: Path) -> bool:
    """True when the graph file plus its own external data (files named ``<model>.*``) exceed 1.5 GiB."""
    model_path = Path(model_path)
    data = [p for p in model_path.parent.iterdir() if p.name.startswith(model_path.name) and p != model_path]
    return sum(p.stat().st_size for p in [model_path, *data]) > EXTERNAL_DATA_BYTES


def save_model(model, path: Path, large: bool) -> None:
    """Save ``model`` at ``path``; ``large``: weights in one external file ``<path>.data`` (tensors >= 1 KiB)."""
    import onnx

    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def copy_side_files(source: Path, target: Path) -> None:
    """Copy config.json, generation_config.json and the tokenizer files; never a graph, its data or a manifest."""
    for path in Path(source).iterdir():
        graph = path.name.startswith(MODEL_FILE) or path.name.endswith(GRAPH_SUFFIXES)
        if path.is_file() and not graph and "manifest" not in path.name:
            shutil.copy2(path, Path(target) / path.name)


def calibration_samples(runner, calib: str, samples: int, seqlen: int, seed: int) -> list[np.ndarray]:
    """``samples`` token arrays of shape (1, seqlen), int64, from ``calib`` (builtin or a local file) and the
    runner's tokenizer (slice2deploy.data.calibration_batch)."""
    from slice2deploy.data import calibration_batch, load_text

    ids, _ = calibration_batch(runner.tokenizer(), load_text(calib, "calibration"), samples, seqlen, seed)
    return [row[None].numpy().astype(np.int64) for row in ids]


def prefill_feeds(runner, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The graph feeds of one prefill of ``ids`` (batch, sequence): all-ones mask, positions 0.., empty cache."""
    return runner._feeds(np.asarray(ids, dtype=np.int64), None, None, None)


class PrefillReader:
    """onnxruntime's CalibrationDataReader protocol: one prefill (empty cache) per calibration sequence."""

    def __init__(self, runner, samples: list[np.ndarray]):
        self._feeds = iter([prefill_feeds(runner, ids) for ids in samples])

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


def count_roles(matmuls: Iterable) -> dict[str, int]:
    """How many of ``matmuls`` (objects with a ``role``: linear, shortcut, mix, head) have each role."""
    roles: dict[str, int] = {}
    for mm in matmuls:
        roles[mm.role] = roles.get(mm.role, 0) + 1
    return roles


def embedding_table(model) -> str | None:
    """The token-embedding table: the largest 2-D float32 initializer a Gather reads rows of (None if there is none).
    Position tables (GPT-2's wpe) are Gathers of initializers too; the token table is the larger one."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
              and inits[n.input[0]].data_type == TensorProto.FLOAT and len(inits[n.input[0]].dims) == 2}
    return max(sorted(tables), key=lambda t: int(np.prod(inits[t].dims)), default=None)


HEAD_WEIGHT = "lm_head.weight.untied"  # the initializer an untied head reads


def untie_head(model) -> bool:
    """Give a tied head (``MatMul(hidden, Transpose(table))`` in a node named ``*lm_head*``) its own (hidden, vocab)
    initializer, in place; the Transpose goes when nothing else reads it.

    Returns True when a head was untied. The graph then holds the table twice: quantizing the head is what makes
    that pay (the Gather keeps reading the table, e.g. as float16; the head reads an INT8/INT4 copy)."""
    from onnx import numpy_helper

    producers = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "MatMul" or "lm_head" not in node.name or node.input[1] in inits:
            continue
        transpose = producers.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
            continue
        table = numpy_helper.to_array(inits[transpose.input[0]])  # (vocab, hidden)
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), HEAD_WEIGHT))
        node.input[1] = HEAD_WEIGHT
        if not any(transpose.output[0] in other.input for other in model.graph.node):
            model.graph.node.remove(transpose)
        return True
    return False


__all__ = ["EXTERNAL_DATA_BYTES", "HEAD_WEIGHT", "PrefillReader", "calibration_samples", "copy_side_files",
           "count_roles", "embedding_table", "is_large", "prefill_feeds", "save_model", "untie_head"]
