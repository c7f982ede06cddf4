"""The float16 graph: float32 kept where TensorRT needs it (norm statistics, RoPE angles, softmax, logits)."""

from __future__ import annotations

from .config import FLOAT, FLOAT16, FLOAT32_OP_TYPES, FP16_CLAMP


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _consumers(graph) -> dict[str, list]:
    found: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _elem_types(model) -> dict[str, int]:
    """Element type of every named tensor (inputs, initializers, inferred values, Cast outputs)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    for info in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    for node in model.graph.node:
        if node.op_type == "Cast":
            types[node.output[0]] = _cast_to(node)
    return types


def _cast_to(node) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _norm_region(node, producers: dict, consumers: dict) -> set[str]:
    """RMSNorm statistics around one ReduceMean(Pow(x, 2)): the input Cast, Pow, ReduceMean, eps Add, Sqrt,
    Div/Reciprocal and the Mul that applies them. x² overflows float16 past |x| = 256, which LLM residual streams
    with massive activations reach (TensorRT would compute these in float16 as written; ONNX Runtime's CPU provider
    silently uses float32, so only this placement protects the engine)."""
    power = producers.get(node.input[0])
    if power is None or power.op_type != "Pow":
        return set()
    region = {power.name, node.name}
    source = producers.get(power.input[0])
    if source is not None and source.op_type == "Cast":
        region.add(source.name)  # keeps its to=float, so the statistics start from float32
    frontier = [node]
    while frontier:
        current = frontier.pop()
        for consumer in consumers.get(current.output[0], []):
            if consumer.name in region:
                continue
            if consumer.op_type in ("Add", "Sqrt", "Div", "Reciprocal"):
                region.add(consumer.name)
                frontier.append(consumer)
            elif consumer.op_type == "Mul":
                region.add(consumer.name)
    return region


def _rope_region(seeds: list, producers: dict, types: dict[str, int]) -> set[str]:
    """Cos/Sin and every float ancestor back to the integer positions. float16 holds integers exactly only up to
    2048: converted naively, positions 6001 and 6002 both become 6000 (checked in ONNX Runtime). SmolLM2's logits
    moved little from it (60.7 vs 61.2 dB SNR at positions 6000+), so this guards long contexts rather than being a
    measured gain on short ones."""
    region, frontier = set(), list(seeds)
    while frontier:
        node = frontier.pop()
        if node.name in region:
            continue
        region.add(node.name)
        for name in node.input:
            producer = producers.get(name)
            if producer is not None and any(types.get(out) == FLOAT for out in producer.output):
                frontier.append(producer)
    return region


def _head_nodes(graph, producers: dict) -> set[str]:
    """The MatMul/Gemm computing the logits, found by walking back from the output through shape-only ops."""
    node = producers.get("logits")
    while node is not None and node.op_type in ("Cast", "Identity", "Reshape"):
        node = producers.get(node.input[0])
    return {node.name} if node is not None and node.op_type in ("MatMul", "Gemm") else set()


def _infer_types(model) -> None:
    """Fill ``model.graph.value_info`` with inferred types, inferring on a weight-free skeleton (initializers become
    typed graph inputs), so this works for models above protobuf's 2 GiB limit too."""
    import onnx
    from onnx import helper

    graph = model.graph
    typed = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in graph.initializer]
    skeleton = helper.make_model(helper.make_graph(graph.node, "skeleton", [*graph.input, *typed], graph.output),
                                 opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    del graph.value_info[:]
    graph.value_info.extend(inferred.graph.value_info)


def float32_nodes(model, head_in_float32: bool = True) -> set[str]:
    """Names of the nodes the FP16 graph keeps in float32 (besides FLOAT32_OP_TYPES); needs inferred types."""
    graph = model.graph
    producers, consumers, types = _producers(graph), _consumers(graph), _elem_types(model)
    keep: set[str] = set()
    for node in graph.node:
        if node.op_type == "ReduceMean":
            keep |= _norm_region(node, producers, consumers)
    keep |= _rope_region([n for n in graph.node if n.op_type in ("Cos", "Sin")], producers, types)
    if head_in_float32:
        keep |= _head_nodes(graph, producers)
    return keep


def _drop_cast_round_trips(model) -> int:
    """Remove Cast pairs the converter leaves between neighbouring float32 nodes; return how many Casts went.

    onnxruntime's converter casts every kept-float32 node's output to float16 and the next kept node's input back
    to float32: float32 -> float16 -> float32 would round the RMSNorm's x² through float16 (and overflow it). Such a
    pair, float16 -> float32 -> float16 (exact) and same-type chains read the pair's input instead. Repeated until
    stable, since removing one pair can expose the next.
    """
    removed = 0
    while rename := _round_trip_renames(model):
        _apply_renames(model.graph, rename)
        removed += _remove_dead_casts(model.graph, {o.name for o in model.graph.output})
    return removed


def _round_trip_renames(model) -> dict[str, str]:
    producers, types = _producers(model.graph), _elem_types(model)
    rename = {}
    for node in model.graph.node:
        first = producers.get(node.input[0]) if node.op_type == "Cast" else None
        if first is None or first.op_type != "Cast":
            continue
        source, middle, target = first.input[0], _cast_to(first), _cast_to(node)
        if types.get(source) == target and {target, middle} == {FLOAT, FLOAT16}:
            rename[node.output[0]] = source
        elif middle == target:
            rename[node.output[0]] = first.output[0]
    return rename


def _apply_renames(graph, rename: dict[str, str]) -> None:
    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = resolve(name)
        if node.op_type == "Cast" and node.output[0] in outputs and node.output[0] in rename:
            # a graph output keeps its name: its Cast becomes an Identity of the pair's input
            node.op_type, node.input[0] = "Identity", resolve(node.output[0])
            del node.attribute[:]


def _remove_dead_casts(graph, outputs: set[str]) -> int:
    removed = 0
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if n.op_type == "Cast" and n.output[0] not in used]
        if not dead:
            return removed
        for node in dead:
            graph.node.remove(node)
        removed += len(dead)


def convert_fp16(model, head_in_float32: bool = True):
    """The float16 graph of a float32 (or Q/DQ) model, with float32 kept where TensorRT needs it; returns a model.

    KV-cache inputs/outputs become float16 (half the cache memory); logits stay float32. Uses onnxruntime's
    maintained converter (onnxruntime.transformers.float16): onnxconverter-common 1.16's converter keeps
    ``keep_io_types`` all-or-nothing and leaves ``Cast(to=float)`` nodes untouched, which gives this graph a
    float32 input on a float16 Mul that the checker rejects.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    _infer_types(model)
    keep = float32_nodes(model, head_in_float32)
    converted = convert_float_to_float16(model, keep_io_types=["logits"], op_block_list=list(FLOAT32_OP_TYPES),
                                         node_block_list=sorted(keep), max_finite_val=FP16_CLAMP,
                                         disable_shape_infer=True)
    wrapped = OnnxModel(converted)
    wrapped.topological_sort()  # the converter appends its Casts at the end of the node list
    _drop_cast_round_trips(wrapped.model)
    return wrapped.model


def _require_opset(model, opset: int) -> None:
    """Raise the default-domain opset import. Between 18 and 21 the ops these graphs use only gained types
    (int4/float8, bfloat16), block_size and Pad's wrap mode; no existing behaviour changed."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < opset:
            entry.version = opset

