"""Fused attention for ONNX export: one standard ONNX ``Attention`` node (opset 23) per layer.

The eager export spells attention out as ~20 nodes per layer (repeat of the KV heads with Expand/Reshape,
QKᵀ, scale, mask Add, Softmax, AV, Transposes). On ONNX Runtime CPU those small ops cost as much as a quarter of a
SmolLM2 prefill and, unlike the projections, they do not shrink when the residual stream is sliced. ONNX
``Attention`` takes grouped KV heads natively, so one kernel call replaces them.

How it is traced. transformers routes every attention call through ``ALL_ATTENTION_FUNCTIONS[impl]``; we register
:data:`IMPLEMENTATION` there (with the eager mask builder, so the mask is the additive ``(batch, 1, sequence,
total_sequence)`` float tensor eager attention gets). During an ONNX export our function calls a
``torch.autograd.Function`` whose ``symbolic`` emits a placeholder ``slice2deploy::Attention`` node (the TorchScript
exporter stops at opset 20, where ``Attention`` does not exist yet); :func:`promote_to_onnx_attention` then converts
the graph to opset 23 and turns each placeholder into the standard op. Outside an export the same function computes
eager attention, so the PyTorch reference of the parity gate is the eager math, byte for byte the same formula.

The node receives rotated Q/K, the full (past + new) K/V, and the additive mask, exactly what eager attention
receives; the KV-cache concatenation and the mask construction stay ordinary graph ops. Two more rewrites ride along:

- rotary embeddings: where a model family's ``apply_rotary_pos_emb`` is Llama's (checked by bytecode), each of q and
  k is rotated by one ``RotaryEmbedding`` node (opset 23) instead of Slice/Neg/Concat/Mul/Add (:func:`fused_rotary`);
- causal query blocks: each Attention node is split so that no block computes scores the mask hides
  (:func:`chunk_causal_attention`; same numbers, ~40% less attention work in a long prefill).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from slice2deploy.utils import UserInputError

IMPLEMENTATION = "slice2deploy_onnx_attention"
PLACEHOLDER_DOMAIN = "slice2deploy"
ONNX_ATTENTION_OPSET = 23  # first opset with the standard Attention op
ORT_ATTENTION_VERSION = (1, 23)  # ONNX Runtime's CPU kernel for it (onnxruntime#25156); the parity gate checks GQA


def _eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """softmax(Q Kᵀ · scale + mask) V with KV heads shared by groups of query heads; (batch, heads, seq, head_dim)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value)


class _OnnxAttention(torch.autograd.Function):
    """Eager attention when run; one ``slice2deploy::Attention`` node when traced by the TorchScript exporter."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scale: float):  # noqa: ARG004 (autograd's signature)
        return _eager_attention(query, key, value, mask, scale)

    @staticmethod
    def symbolic(g, query, key, value, mask, scale: float):
        inputs = [query, key, value] if mask is None or mask.node().mustBeNone() else [query, key, value, mask]
        output = g.op(f"{PLACEHOLDER_DOMAIN}::Attention", *inputs, scale_f=scale)
        output.setType(query.type())  # (batch, heads, sequence, head_dim), like the query
        return output


def _attention_function(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns (batch, sequence, heads, head_dim) like eager."""
    unsupported = [name for name in ("softcap", "s_aux", "sinks") if kwargs.get(name) is not None]
    if unsupported:
        raise UserInputError(f"fused ONNX attention does not implement {', '.join(unsupported)}; "
                             "export with attention='eager'")
    if dropout and module.training:
        raise UserInputError("fused ONNX attention is for inference; put the model in eval mode")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if torch.onnx.is_in_onnx_export():
        output = _OnnxAttention.apply(query, key, value, attention_mask, scale)
    else:
        output = _eager_attention(query, key, value, attention_mask, scale)
    return output.transpose(1, 2).contiguous(), None


class _OnnxRotary(torch.autograd.Function):
    """Rotate-half RoPE of (batch, heads, sequence, head_dim) with (batch, sequence, head_dim) cos/sin whose two
    halves repeat (Llama's layout); one ``slice2deploy::RotaryEmbedding`` node (on the half caches) when traced."""

    @staticmethod
    def forward(ctx, x, cos, sin, half: int):  # noqa: ARG004 (autograd's signature)
        from transformers.models.llama.modeling_llama import rotate_half

        return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)

    @staticmethod
    def symbolic(g, x, cos, sin, half: int):
        bounds = [g.op("Constant", value_t=torch.tensor([v], dtype=torch.long)) for v in (0, half, -1)]
        caches = [g.op("Slice", cache, bounds[0], bounds[1], bounds[2]) for cache in (cos, sin)]
        output = g.op(f"{PLACEHOLDER_DOMAIN}::RotaryEmbedding", x, *caches)
        output.setType(x.type())
        return output


def _code(function) -> bytes:
    import inspect

    return inspect.unwrap(function).__code__.co_code


def _fused_rotary(original):
    """``apply_rotary_pos_emb`` that, inside an ONNX export, writes q and k's rotation as RotaryEmbedding nodes."""

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = args[0] if args else kwargs.get("unsqueeze_dim", 1)
        if (torch.onnx.is_in_onnx_export() and len(args) + len(kwargs) <= 1 and unsqueeze_dim == 1 and q.dim() == 4
                and k.dim() == 4 and cos.dim() == 3 and cos.shape[-1] == q.shape[-1] == k.shape[-1]
                and q.shape[-1] % 2 == 0):
            half = int(q.shape[-1]) // 2  # static (head_dim), a plain int in the graph
            return _OnnxRotary.apply(q, cos, sin, half), _OnnxRotary.apply(k, cos, sin, half)
        return original(q, k, cos, sin, *args, **kwargs)

    return apply_rotary_pos_emb


@contextlib.contextmanager
def fused_rotary(model: nn.Module) -> Iterator[int]:
    """While open, the model's ``apply_rotary_pos_emb`` writes ONNX RotaryEmbedding nodes when traced; yields how
    many modeling modules were patched. Only modules whose rotary functions are Llama's, bytecode for bytecode (the
    many "Copied from Llama" families): other layouts (interleaved, partial rotary) keep their own ops."""
    import sys

    from transformers.models.llama import modeling_llama

    reference_names = ("apply_rotary_pos_emb", "rotate_half")
    reference = tuple(_code(getattr(modeling_llama, f)) for f in reference_names)
    modules = {sys.modules[type(m).__module__] for m in model.modules() if type(m).__module__ in sys.modules}
    patched = [module for module in modules if all(callable(getattr(module, f, None)) for f in reference_names)
               and tuple(_code(getattr(module, f)) for f in reference_names) == reference]
    originals = {module: module.apply_rotary_pos_emb for module in patched}
    try:
        for module, original in originals.items():
            module.apply_rotary_pos_emb = _fused_rotary(original)
        yield len(patched)
    finally:
        for module, original in originals.items():
            module.apply_rotary_pos_emb = original


def register() -> None:
    """Make :data:`IMPLEMENTATION` a transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(IMPLEMENTATION, _attention_function)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)


@contextlib.contextmanager
def attention_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name`` (``"eager"`` or :data:`IMPLEMENTATION`), then restore."""
    if name == IMPLEMENTATION:
        register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        with fused_rotary(model) if name == IMPLEMENTATION else contextlib.nullcontext():
            yield
    finally:
        model.set_attn_implementation(previous)


def require_support() -> None:
    """Fail early, with the upgrade to make, when onnx or ONNX Runtime predates the Attention op."""
    import onnx
    import onnxruntime

    runtime = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    if onnx.defs.onnx_opset_version() < ONNX_ATTENTION_OPSET or runtime < ORT_ATTENTION_VERSION:
        raise UserInputError(f"attention=fused writes ONNX Attention (opset {ONNX_ATTENTION_OPSET}): it needs onnx >= "
                             f"1.18 and onnxruntime >= {'.'.join(map(str, ORT_ATTENTION_VERSION))} (installed: onnx "
                             f"{onnx.__version__}, onnxruntime {onnxruntime.__version__}); upgrade them or export "
                             "with attention=eager")


def promote_to_onnx_attention(model, opset: int) -> int:
    """Convert ``model`` (an onnx ModelProto traced at opset <= 20) to ``opset`` >= 23 and turn every placeholder
    into the standard ``Attention`` op; return how many there were. The model is changed in place."""
    import onnx
    from onnx import helper, version_converter

    if opset < ONNX_ATTENTION_OPSET:
        raise UserInputError(f"fused attention needs opset >= {ONNX_ATTENTION_OPSET}, got {opset}")
    # The converter serializes the whole model it is given (protobuf's 2 GiB limit, a copy of every weight), so it
    # gets the graph without initializers; from opset 20 to 23 no op of these graphs reads a constant to convert.
    # (each initializer is declared as a graph input of the skeleton instead: the converter wants every name defined).
    skeleton = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import)
    for field in ("node", "input", "output", "value_info"):
        getattr(skeleton.graph, field).extend(getattr(model.graph, field))
    skeleton.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                for t in model.graph.initializer)
    converted = version_converter.convert_version(skeleton, opset)  # placeholders in their own domain pass through
    for field in ("node", "value_info"):
        model.graph.ClearField(field)
        getattr(model.graph, field).extend(getattr(converted.graph, field))
    del model.opset_import[:]
    model.opset_import.extend(converted.opset_import)
    fused = 0
    for node in model.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN and node.op_type in ("Attention", "RotaryEmbedding"):
            node.domain = ""
            fused += node.op_type == "Attention"
    leftover = [f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain == PLACEHOLDER_DOMAIN]
    if leftover:
        raise RuntimeError(f"unexpected placeholder nodes in the traced graph: {sorted(set(leftover))}")
    imports = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    return fused


CHUNK_PREFIX = "slice2deploy_causal_chunks"
DEFAULT_CHUNKS = 4  # SmolLM2 512-token prefill: attention 122 -> 76-84 ms per call (8 blocks: no better; decode same)
CHUNK_MIN_QUERIES = 16  # fewer rows per block: one Attention call is cheaper than the blocks' extra ops


def min_chunked_tokens(chunks: int, min_queries: int = CHUNK_MIN_QUERIES) -> int:
    """The fewest new tokens for which a graph split into ``chunks`` blocks runs them (0: it is not split)."""
    return chunks * min_queries if chunks > 1 else 0


def chunk_causal_attention(graph, chunks: int, min_queries: int = CHUNK_MIN_QUERIES) -> int:
    """Split every masked ``Attention`` node of ``graph`` into ``chunks`` query blocks that skip hidden keys.

    Causal attention computes the full (sequence x total) score matrix although a query at position ``i`` (after
    ``past`` cached tokens) only sees keys ``[0, past + i]``. Query block ``[a, b)`` here reads keys ``[0, past + b)``
    and the matching rows and columns of the mask; the keys it drops are hidden from every query of the block, so the
    result is the same number for number (softmax of a masked score is an exact 0) and a prefill of ``n`` chunks does
    ``(n + 1) / 2n`` of the work. ONNX Runtime refuses an Attention call with no query, so the blocks run only when
    every one has at least ``min_queries`` rows: an ``If`` on the new-token count keeps one node for short inputs
    (decode steps). Token counts come from the graph inputs ``input_ids`` (batch, sequence) and ``attention_mask``
    (batch, past + sequence). Nodes without a mask input are left alone; returns how many nodes were split.
    """
    from onnx import TensorProto, helper

    if chunks < 2:
        return 0
    targets = [n for n in graph.node if n.domain == "" and n.op_type == "Attention" and len(n.input) == 4
               and n.input[3] and all(not name for name in n.output[1:])]
    if not targets:
        return 0
    names = {i.name for i in graph.input}
    if not {"input_ids", "attention_mask"} <= names:
        raise UserInputError("chunked attention needs the graph inputs input_ids and attention_mask")

    def name(suffix: str) -> str:
        return f"{CHUNK_PREFIX}/{suffix}"

    def ints(suffix: str, values: list[int]):
        return helper.make_node("Constant", [], [name(suffix)], value=helper.make_tensor(
            name(suffix), TensorProto.INT64, [len(values)], values))

    shared = [ints("zero", [0]), ints("chunks", [chunks]),
              ints("min_tokens", [min_chunked_tokens(chunks, min_queries)]), ints("axis", [-2]),
              ints("last_axis", [-1]),
              helper.make_node("Shape", ["input_ids"], [name("sequence")], start=1, end=2),
              helper.make_node("Shape", ["attention_mask"], [name("total")], start=1, end=2),
              helper.make_node("Sub", [name("total"), name("sequence")], [name("past")]),
              helper.make_node("GreaterOrEqual", [name("sequence"), name("min_tokens")], [name("split")])]
    for j in range(1, chunks):  # block j is rows [bound j, bound j+1), bound j = floor(sequence * j / chunks)
        shared += [ints(f"j{j}", [j]),
                   helper.make_node("Mul", [name("sequence"), name(f"j{j}")], [name(f"scaled{j}")]),
                   helper.make_node("Div", [name(f"scaled{j}"), name("chunks")], [name(f"bound{j}")]),
                   helper.make_node("Add", [name("past"), name(f"bound{j}")], [name(f"keys{j}")])]
    bounds = [name("zero"), *(name(f"bound{j}") for j in range(1, chunks)), name("sequence")]
    shared += [helper.make_node("Sub", [bounds[j + 1], bounds[j]], [name(f"size{j}")]) for j in range(chunks)]
    shared.append(helper.make_node("Concat", [name(f"size{j}") for j in range(chunks)], [name("sizes")], axis=0))
    mask_blocks: dict[str, list[str]] = {}  # every layer reads the same mask: its blocks are cut once
    for mask in dict.fromkeys(node.input[3] for node in targets):
        rows = [name(f"{mask}/rows{j}") for j in range(chunks)]
        shared.append(helper.make_node("Split", [mask, name("sizes")], rows, axis=-2))
        shared += [helper.make_node("Slice", [rows[j], name("zero"), name(f"keys{j + 1}"), name("last_axis")],
                                    [name(f"{mask}/block{j}")]) for j in range(chunks - 1)]
        mask_blocks[mask] = [name(f"{mask}/block{j}") for j in range(chunks - 1)] + [rows[-1]]
    first = list(graph.node).index(targets[0])  # every mask is made before the first attention: shared go there
    for node in targets:
        query, key, value, mask = node.input
        output = node.output[0]
        queries = [f"{output}/chunk{j}/query" for j in range(chunks)]
        blocks = [helper.make_node("Split", [query, name("sizes")], queries, axis=-2)]
        for j in range(chunks):
            part = f"{output}/chunk{j}"
            keys, values = key, value  # the last block reads every key
            if j < chunks - 1:
                keys, values = f"{part}/key", f"{part}/value"
                blocks += [helper.make_node("Slice", [key, name("zero"), name(f"keys{j + 1}"), name("axis")], [keys]),
                           helper.make_node("Slice", [value, name("zero"), name(f"keys{j + 1}"), name("axis")],
                                            [values])]
            blocks.append(helper.make_node("Attention", [queries[j], keys, values, mask_blocks[mask][j]], [part],
                                           name=f"{node.name}/chunk{j}"))
            blocks[-1].attribute.extend(node.attribute)
        blocks.append(helper.make_node("Concat", [f"{output}/chunk{j}" for j in range(chunks)],
                                       [f"{output}/chunked"], axis=-2))
        whole = helper.make_node("Attention", list(node.input), [f"{output}/whole"], name=f"{node.name}/whole")
        whole.attribute.extend(node.attribute)
        branch_output = helper.make_empty_tensor_value_info  # outputs: name only (type from the nodes)
        split = helper.make_node(
            "If", [name("split")], [output], name=f"{node.name}/causal_chunks",
            then_branch=helper.make_graph(blocks, f"{node.name}/chunked", [], [branch_output(f"{output}/chunked")]),
            else_branch=helper.make_graph([whole], f"{node.name}/whole", [], [branch_output(f"{output}/whole")]))
        graph.node.insert(list(graph.node).index(node), split)
        graph.node.remove(node)
    for offset, node in enumerate(shared):
        graph.node.insert(first + offset, node)
    return len(targets)
