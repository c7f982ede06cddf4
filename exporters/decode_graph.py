"""A decode graph next to ``model.onnx``: one new token per row, ONNX Runtime's ``GroupQueryAttention`` over a KV cache
that past and present share in place.

Why. A decode step of the general graph copies each layer's whole KV cache (``Concat(past, new)`` makes ``present``)
and runs ~30 small ops around attention per layer: Reshape/Transpose of q, k, v and of the output, the causal-block
``If``, the additive mask. On 2 CPU cores that overhead, not the weights, is what separated our INT4 decode from ONNX
Runtime GenAI's (1,063 nodes per step against its 343). GenAI's builder (onnxruntime-genai ``models/builder.py``)
uses the contrib op ``com.microsoft::GroupQueryAttention`` with ``past_present_share_buffer``: past and present are
one preallocated (batch, kv_heads, capacity, head_dim) buffer, the op writes the new row at ``seqlens_k`` and attends
over ``seqlens_k + 1`` rows. We keep the general graph for prefill (its blocked causal attention is ~2x faster than
GQA's prompt path) and add this graph for the steps after it, so per-layer slices, GPTQ and SmoothQuant graphs
get the same decode path.

The rewrite, per layer, matched exactly (anything else is refused with the reason)::

    q_proj -> Reshape -> Transpose -> RotaryEmbedding ------------------------------> Attention -> Transpose
    k_proj -> Reshape -> Transpose -> RotaryEmbedding -> Concat(past.key)   -> present.key ->^      -> Reshape -> o_proj
    v_proj -> Reshape -> Transpose -> Concat(past.value) -> present.value ----------------->^

becomes ``RotaryEmbedding(q_proj, num_heads=H)``, ``RotaryEmbedding(k_proj, num_heads=KV)`` (the same cos/sin
tensors, so every RoPE variant the export computes stays exact), ``v_proj`` -> ``GroupQueryAttention`` -> ``o_proj``.
The mask construction and the cache Concats become dead and are pruned. Inputs: ``input_ids`` (batch, 1),
``position_ids`` (batch, 1), ``seqlens_k`` (batch,) int32 = cached rows, ``total_sequence_length`` () int32 = cached
rows + 1, ``past_key_values.*`` (batch, kv_heads, capacity, head_dim); outputs ``logits`` and ``present.*`` (the same
buffers when bound to them). Rows must hold no left padding (GQA's rows are valid from 0 to ``seqlens_k``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DECODE_FILE = "decode.onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"  # shared by both graphs: the decode graph adds no weights
# The gate: teacher-forced one-token steps through both graphs, scored against model.onnx's prefill of the same
# tokens. A float32 decode graph agrees to ~1e-5 (>120 dB); with INT4 weights and int8 activations (accuracy_level
# 4) one-token steps differ from the prefill by 25-42 dB in either graph (measured on SmolLM2 and its uniform
# slice: rounding of the int8 activations flips with the summation order); a wrong position or cache row is < 10 dB.
GATE_SNR_DB = 30.0
GATE_MARGIN_DB = 3.0
GATE_PROMPT, GATE_STEPS = 24, 6
SEQLENS = "seqlens_k"
TOTAL_LENGTH = "total_sequence_length"
CAPACITY = "capacity"  # the dim_param of the shared cache's sequence axis
MS_DOMAIN = "com.microsoft"


class DecodeGraphError(ValueError):
    """The graph does not have the attention pattern the rewrite needs (the reason says which part)."""


@dataclass
class _Layer:
    index: int
    query: str  # (batch, 1, heads * head_dim): q_proj's output, before the head reshape
    key: str
    value: str
    query_caches: tuple[str, str]  # the cos/sin the old RotaryEmbedding nodes read: (batch, 1, rotary_dim / 2)
    key_caches: tuple[str, str]
    rotary_attributes: list
    scale: float
    output: str  # what o_proj reads: (batch, 1, heads * head_dim)
    anchor: object  # the attention node (Attention or the causal-block If); the new nodes go where it was
    replaced: list  # every node the rewrite removes


class _Graph:
    def __init__(self, graph):
        self.graph = graph
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def producer(self, name: str, op_type: str, where: str):
        node = self.producers.get(name)
        if node is None or node.op_type != op_type:
            found = "a graph input" if node is None else node.op_type
            raise DecodeGraphError(f"{where}: expected {op_type} producing {name!r}, found {found}")
        return node

    def only_consumer(self, name: str, op_type: str, where: str):
        nodes = self.consumers.get(name, [])
        if len(nodes) != 1 or nodes[0].op_type != op_type:
            raise DecodeGraphError(f"{where}: expected one {op_type} reading {name!r}, found "
                                   f"{[n.op_type for n in nodes] or 'none'}")
        return nodes[0]

    def graph_input_behind(self, name: str, where: str) -> str:
        """Follow single-input Concat/Identity nodes (exporter artefacts) back to a graph input."""
        inputs = {i.name for i in self.graph.input}
        while name not in inputs:
            node = self.producers.get(name)
            if node is None or node.op_type not in ("Concat", "Identity") or len(node.input) != 1:
                raise DecodeGraphError(f"{where}: the cache Concat does not read a past_key_values input")
            name = node.input[0]
        return name


def _attribute(node, name: str, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _head_chain(g: _Graph, name: str, rotated: bool, where: str) -> tuple[str, object | None]:
    """Walk ``[RotaryEmbedding <-] Transpose(0,2,1,3) <- Reshape <- projection`` back from ``name`` (a RotaryEmbedding
    output when ``rotated``); returns (projection output, the rotary node or None)."""
    rotary = g.producer(name, "RotaryEmbedding", where) if rotated else None
    if rotary is not None and (len(rotary.input) > 3 and rotary.input[3]):
        raise DecodeGraphError(f"{where}: RotaryEmbedding with position_ids is not handled")
    transpose = g.producer(rotary.input[0] if rotary is not None else name, "Transpose", where)
    if list(_attribute(transpose, "perm", [])) != [0, 2, 1, 3]:
        raise DecodeGraphError(f"{where}: the head transpose is not (0, 2, 1, 3)")
    reshape = g.producer(transpose.input[0], "Reshape", where)
    return reshape.input[0], rotary


def _attention_node(g: _Graph, present_key: str, where: str):
    """The Attention node (or the causal-block If around it) that reads ``present_key``; returns (node, Attention)."""
    readers = [n for n in g.consumers.get(present_key, []) if n.op_type == "Attention"]
    if not readers:  # inside the causal-block If: its else branch is the one-Attention path
        for node in g.graph.node:
            if node.op_type != "If":
                continue
            branch = _attribute(node, "else_branch")
            inner = [n for n in branch.node if n.op_type == "Attention" and present_key in n.input]
            if len(inner) == 1 and len(branch.node) == 1:
                return node, inner[0]
        raise DecodeGraphError(f"{where}: no Attention reads {present_key!r}")
    if len(readers) != 1:
        raise DecodeGraphError(f"{where}: {len(readers)} Attention nodes read {present_key!r}")
    return readers[0], readers[0]


def _match_layer(g: _Graph, index: int) -> tuple[_Layer, str, str]:
    where = f"layer {index}"
    key_concat = g.producer(f"present.{index}.key", "Concat", where)
    value_concat = g.producer(f"present.{index}.value", "Concat", where)
    if len(key_concat.input) != 2 or len(value_concat.input) != 2:
        raise DecodeGraphError(f"{where}: the cache Concat does not append one new block to the past")
    past_key = g.graph_input_behind(key_concat.input[0], where)
    past_value = g.graph_input_behind(value_concat.input[0], where)
    anchor, attention = _attention_node(g, f"present.{index}.key", where)
    if list(attention.input[1:3]) != [f"present.{index}.key", f"present.{index}.value"]:
        raise DecodeGraphError(f"{where}: attention does not read the layer's own present key/value")
    if any(_attribute(attention, name) for name in ("is_causal", "softcap", "qk_matmul_output_mode")):
        raise DecodeGraphError(f"{where}: attention uses options GroupQueryAttention is not given here")
    query, q_rotary = _head_chain(g, attention.input[0], True, where)
    key, k_rotary = _head_chain(g, key_concat.input[1], True, where)
    value, _ = _head_chain(g, value_concat.input[1], False, where)
    transpose = g.only_consumer(anchor.output[0], "Transpose", where)
    reshape = g.only_consumer(transpose.output[0], "Reshape", where)
    # Only the nodes whose outputs the new ones redefine go here; the head reshapes, the mask and the old rotary
    # nodes are pruned afterwards if nothing else reads them.
    replaced = [key_concat, value_concat, anchor, reshape]
    layer = _Layer(index, query, key, value, tuple(q_rotary.input[1:3]), tuple(k_rotary.input[1:3]),
                   [a for a in q_rotary.attribute if a.name != "num_heads"],
                   float(_attribute(attention, "scale", 0.0)), reshape.output[0], anchor, replaced)
    return layer, past_key, past_value


def _new_nodes(layer: _Layer, past: tuple[str, str], heads: int, kv_heads: int, head_dim: int) -> list:
    from onnx import helper

    prefix = f"/slice2deploy/decode/layers.{layer.index}"
    rotated = []
    for name, caches, count in ((layer.query, layer.query_caches, heads), (layer.key, layer.key_caches, kv_heads)):
        node = helper.make_node("RotaryEmbedding", [name, *caches], [f"{name}/rotated3d"],
                                name=f"{prefix}/{name.rsplit('/', 2)[-2]}/RotaryEmbedding", num_heads=count)
        node.attribute.extend(layer.rotary_attributes)
        rotated.append(node)
    scale = layer.scale or head_dim**-0.5
    gqa = helper.make_node("GroupQueryAttention",
                           [rotated[0].output[0], rotated[1].output[0], layer.value, *past, SEQLENS, TOTAL_LENGTH],
                           [layer.output, f"present.{layer.index}.key", f"present.{layer.index}.value"],
                           name=f"{prefix}/GroupQueryAttention", domain=MS_DOMAIN, num_heads=heads,
                           kv_num_heads=kv_heads, scale=scale)
    return [*rotated, gqa]


def _reads(node) -> Iterable[str]:
    """Every value ``node`` reads, its subgraphs' outer-scope reads included."""
    yield from node.input
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.type == attribute.GRAPH else []:
            for inner in sub.node:
                yield from _reads(inner)


def _topological(graph) -> None:
    """Order the nodes so that each comes after the producers of what it reads (stable otherwise)."""
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output}
    nodes = list(graph.node)
    placed: set[int] = set()
    order: list[int] = []

    def place(index: int) -> None:
        stack = [(index, False)]
        while stack:
            current, expanded = stack.pop()
            if current in placed:
                continue
            if expanded:
                placed.add(current)
                order.append(current)
                continue
            stack.append((current, True))
            stack.extend((producers[name], False) for name in _reads(nodes[current])
                         if name in producers and producers[name] not in placed)

    for index in range(len(nodes)):
        place(index)
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _prune(graph) -> None:
    """Drop nodes nothing reads (transitively), then unread inputs and initializers."""
    needed = {o.name for o in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for field in (graph.input, graph.initializer):
        unused = [item for item in field if item.name not in needed]
        for item in unused:
            field.remove(item)


def build_decode_graph(model, num_heads: int):
    """The decode graph of ``model`` (an ``onnx.ModelProto`` of our causal-LM contract), as a new ModelProto that
    reads the same initializers (same names; external-data references are kept as they are).

    ``num_heads``: query heads (config ``num_attention_heads``); KV heads and head size come from the past inputs.
    Raises :class:`DecodeGraphError` when any layer lacks the pattern in the module docstring.
    """
    import onnx
    from onnx import TensorProto, helper

    decode = onnx.ModelProto()
    decode.CopyFrom(model)
    graph = decode.graph
    g = _Graph(graph)
    pasts = sorted((i for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")),
                   key=lambda i: int(i.name.split(".")[1]))
    if not pasts:
        raise DecodeGraphError("the graph has no past_key_values inputs")
    dims = pasts[0].type.tensor_type.shape.dim
    kv_heads, head_dim = dims[1].dim_value, dims[3].dim_value
    if not kv_heads or not head_dim or num_heads % kv_heads:
        raise DecodeGraphError(f"cannot read KV heads / head size from {pasts[0].name} (or {num_heads} query heads "
                               f"are not a multiple of {kv_heads} KV heads)")
    layers = [_match_layer(g, index) for index in range(len(pasts))]
    by_anchor = {id(layer.anchor): (layer, (past_key, past_value)) for layer, past_key, past_value in layers}
    removed = {id(node) for layer, _, _ in layers for node in layer.replaced}
    nodes = []
    for node in graph.node:
        if id(node) in by_anchor:
            layer, past = by_anchor[id(node)]
            nodes.extend(_new_nodes(layer, past, num_heads, kv_heads, head_dim))
        elif id(node) not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend([helper.make_tensor_value_info(SEQLENS, TensorProto.INT32, ["batch"]),
                        helper.make_tensor_value_info(TOTAL_LENGTH, TensorProto.INT32, [])])
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[2].dim_param = CAPACITY
    _topological(graph)  # the new nodes sit where the If was, which the exporter may have put before q_proj
    _prune(graph)
    if not any(o.domain == MS_DOMAIN for o in decode.opset_import):
        decode.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return decode


def _weights_in_shared_data(directory: Path, model):
    """``model`` (directory's model.onnx, loaded without external data) with its weights in ``model.onnx.data``:
    when they were inside the file, model.onnx is re-saved with them in the data file and reloaded. Its initializers
    then point into the data file, which a second graph can point into too."""
    import onnx

    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return model
    model_path, scratch = directory / MODEL_FILE, directory / (MODEL_FILE + ".tmp")
    onnx.save_model(model, str(scratch), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)
    scratch.replace(model_path)
    return onnx.load(str(model_path), load_external_data=False)


def write_decode_graph(directory: str | Path, num_heads: int | None = None) -> dict:
    """Write ``decode.onnx`` next to ``model.onnx`` in an export directory and gate it; return the manifest record.

    ``num_heads`` defaults to config.json's ``num_attention_heads``. model.onnx keeps its nodes; its weights move to
    ``model.onnx.data`` when they were inside the file, so that both graphs read one copy on disk. The gate runs
    :data:`GATE_STEPS` teacher-forced steps after a :data:`GATE_PROMPT`-token prompt through both graphs, scored
    against model.onnx's prefill (:func:`_gate`). A graph without the pattern, or one that fails the gate, gets no
    decode graph (the record says why); nothing raises for that, since the general graph decodes correctly alone.
    """
    directory = Path(directory)
    if num_heads is None:
        config = json.loads((directory / "config.json").read_text()) if (directory / "config.json").is_file() else {}
        num_heads = config.get("num_attention_heads")
    if not num_heads:
        return {"written": False, "reason": "config.json has no num_attention_heads"}
    import onnx

    model = onnx.load(str(directory / MODEL_FILE), load_external_data=False)
    try:
        decode = build_decode_graph(model, num_heads)
    except DecodeGraphError as error:
        return {"written": False, "reason": str(error)}
    references = {t.name: t for t in _weights_in_shared_data(directory, model).graph.initializer}
    for tensor in decode.graph.initializer:  # the same tensors, as references into model.onnx.data
        tensor.CopyFrom(references[tensor.name])
    target = directory / DECODE_FILE
    onnx.save_model(decode, str(target))  # initializers stay references into model.onnx.data
    record = {"written": True, "file": DECODE_FILE, "nodes": len(decode.graph.node), **_gate(directory)}
    if not record["gate_passed"]:
        target.unlink()
        record.update(written=False, reason=record.get("gate_error") or (
            f"decode graph logits SNR {record['gate_snr_db']:.1f} dB against model.onnx's prefill is below "
            f"{GATE_SNR_DB} dB and more than {GATE_MARGIN_DB} dB below model.onnx's own one-token steps "
            f"({record['gate_general_snr_db']:.1f} dB)"))
    return record


def _snr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    noise = float(np.square(reference - candidate).sum())
    return float("inf") if noise == 0 else round(float(10.0 * np.log10(np.square(reference).sum() / noise)), 2)


def _gate(directory: Path) -> dict:
    """Teacher-forced one-token steps through both graphs, each scored against model.onnx's prefill of the same
    tokens (the logits of the last position of a prefill up to each step): logits SNRs and the decode graph's max
    |difference|. The decode graph passes at :data:`GATE_SNR_DB`, or within :data:`GATE_MARGIN_DB` of the general
    graph's own steps (INT4 with int8 activations: the two orders of the same sums differ by 25-40 dB there)."""
    from .ort import OrtCausalLM

    try:
        model = OrtCausalLM(directory)
    except Exception as error:  # noqa: BLE001 (any runtime refusal of the graph is a failed gate, reported)
        return {"gate_passed": False, "gate_error": f"{type(error).__name__}: {error}"}
    vocab = int(model.config.get("vocab_size") or 32)
    tokens = np.random.default_rng(0).integers(0, vocab, (1, GATE_PROMPT + GATE_STEPS))
    _, past = model.forward(tokens[:, :GATE_PROMPT], np.ones((1, GATE_PROMPT), np.int64))
    cache = past
    prefill, general, decode = [], [], []
    for step in range(GATE_PROMPT, GATE_PROMPT + GATE_STEPS):
        token = tokens[:, step : step + 1]
        prefill.append(model.forward(tokens[:, : step + 1], np.ones((1, step + 1), np.int64))[0][:, -1])
        logits, past = model.forward(token, np.ones((1, step + 1), np.int64), past=past)
        general.append(logits[:, -1])
        logits, cache = model.forward(token, past=cache)
        decode.append(logits[:, -1])
    prefill, general, decode = (np.stack(x).astype(np.float64) for x in (prefill, general, decode))
    decode_snr, general_snr = _snr_db(prefill, decode), _snr_db(prefill, general)
    return {"gate_passed": decode_snr >= min(GATE_SNR_DB, general_snr - GATE_MARGIN_DB),
            "gate_snr_db": decode_snr, "gate_general_snr_db": general_snr,
            "gate_max_abs_diff": float(np.abs(prefill - decode).max()), "gate_steps": GATE_STEPS}


class SharedKVCache(Sequence):
    """The KV cache of decode-graph steps: per layer a key and a value buffer of shape (batch, kv_heads, capacity,
    head_dim), whose first ``length`` rows are valid. GroupQueryAttention writes row ``length`` in place.

    Indexing gives ``(key, value)`` views of the valid rows, so code written for the general graph's list of arrays
    reads it unchanged. Caches derived from one another share buffers; stepping from one that is no longer the
    newest (``is_current`` false) copies first, so no other cache's rows are overwritten.
    """

    def __init__(self, buffers: list[tuple[np.ndarray, np.ndarray]], length: int, state: dict):
        self.buffers, self.length, self._state = buffers, length, state

    @classmethod
    def from_past(cls, past: Sequence, capacity: int) -> SharedKVCache:
        """Copy a general-graph cache [(key, value) of (batch, kv_heads, length, head_dim)] into new buffers."""
        import onnxruntime as ort

        length = int(np.shape(past[0][0])[2])
        buffers, values = [], []
        for key, value in past:
            pair = []
            for array in (key, value):
                array = np.asarray(array)
                buffer = np.zeros((*array.shape[:2], max(capacity, length), array.shape[3]), array.dtype)
                buffer[:, :, :length] = array
                pair.append(buffer)
            buffers.append(tuple(pair))
            values.append(tuple(ort.OrtValue.ortvalue_from_numpy(b) for b in pair))
        return cls(buffers, length, {"length": length, "ortvalues": values})

    def __len__(self) -> int:
        return len(self.buffers)

    def __getitem__(self, index):
        key, value = self.buffers[index]
        return key[:, :, : self.length], value[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return int(self.buffers[0][0].shape[2])

    @property
    def is_current(self) -> bool:
        return self._state["length"] == self.length

    def ready_for_step(self) -> SharedKVCache:
        """This cache if it can take one more row in place; else a copy with room (capacity doubled)."""
        if self.is_current and self.length < self.capacity:
            return self
        return SharedKVCache.from_past(self, max(2 * self.capacity, self.length + 1))

    def advanced(self) -> SharedKVCache:
        """The cache after a step wrote row ``length``."""
        self._state["length"] = self.length + 1
        return SharedKVCache(self.buffers, self.length + 1, self._state)


def decode_step(session, input_ids: np.ndarray, cache: SharedKVCache) -> tuple[np.ndarray, SharedKVCache]:
    """One token per row through the decode graph: logits (batch, 1, vocab) and the advanced cache.

    Rows hold no left padding: each row's position and cached length is ``cache.length``.
    """
    batch = input_ids.shape[0]
    cache = cache.ready_for_step()
    feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
             "position_ids": np.full((batch, 1), cache.length, np.int64),
             SEQLENS: np.full(batch, cache.length, np.int32),
             TOTAL_LENGTH: np.array(cache.length + 1, np.int32)}
    binding = session.io_binding()
    names = {i.name for i in session.get_inputs()}
    for name, value in feeds.items():
        if name in names:
            binding.bind_cpu_input(name, value)
    binding.bind_output("logits")
    for index, (key, value) in enumerate(cache._state["ortvalues"]):
        for kind, buffer in (("key", key), ("value", value)):
            binding.bind_ortvalue_input(f"past_key_values.{index}.{kind}", buffer)
            binding.bind_ortvalue_output(f"present.{index}.{kind}", buffer)
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy(), cache.advanced()


__all__ = ["CAPACITY", "DECODE_FILE", "GATE_MARGIN_DB", "GATE_SNR_DB", "SEQLENS", "TOTAL_LENGTH", "DecodeGraphError",
           "SharedKVCache", "build_decode_graph", "decode_step", "write_decode_graph"]
