"""ONNX export of causal LMs (dense or sliced) with the KV cache as graph inputs and outputs.

Graph contract (optimum's names, merged decoder with past):
  inputs   input_ids (batch, sequence), attention_mask (batch, total_sequence), position_ids (batch, sequence),
           past_key_values.{i}.key / .value (batch, kv_heads, past_sequence, head_dim)
  outputs  logits (batch, sequence, vocab), present.{i}.key / .value (batch, kv_heads, total_sequence, head_dim)
with total_sequence = past_sequence + sequence. A past of length 0 (empty tensors) is the prefill.

Exporter choice. Both torch.onnx exporters were checked on tiny dense and sliced Llama/OPT with the cache, fp32
and fp16, on the three parity shapes (prefill with past 0, decode, left padding):
- TorchScript (``dynamo=False``, the default here): matches PyTorch to ~1e-7 everywhere, exports a tiny model
  in ~0.5 s, needs no extra package. torch marks it deprecated, hence the option below.
- torch.export (``dynamo=True``, needs onnxscript): matches too, but is 10-20x slower to export.
Both are traced with the *eager* attention implementation (or, with ``attention="fused"``, one ONNX ``Attention`` node
per layer: see exporters/attention.py; TorchScript only). With SDPA, the TorchScript exporter's symbolic
builds its mask in float32 and float16 OPT graphs fail to load (LayerNormalization bound to float and float16),
and the torch.export graph differs from PyTorch at left-padded positions (values nobody reads, which the parity
gate now skips: see exporters/parity.py).
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slice2deploy.utils import UserInputError, atomic_directory, check_output_dir, sha256_bytes, sha256_file

from . import attention as fused_attention
from .decode_graph import write_decode_graph
from .ort import MANIFEST_FILE, MODEL_FILE, OrtCausalLM, graph_summary, require_onnx, runtime_versions
from .parity import Runner, Tolerance, check_parity, parity_cases

DATA_FILE = MODEL_FILE + ".data"
EXTERNAL_DATA_BYTES = int(1.5 * 2**30)  # protobuf refuses files over 2 GiB; keep room for the graph itself
MIN_OPSET = 17  # LayerNormalization is a standard op from 17 on (no decomposition into ReduceMean/Sub/Pow)
TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter has no symbolics beyond opset 20
DYNAMO_MIN_OPSET = 18  # the torch.export-based exporter emits opset 18 at least
# Example shapes for tracing: distinct non-trivial sizes so no axis is mistaken for another or specialised to 1.
TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST = 2, 3, 5


class OnnxDtype(str, Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"

    @property
    def torch(self) -> torch.dtype:
        return {OnnxDtype.FLOAT32: torch.float32, OnnxDtype.FLOAT16: torch.float16}[self]


class Exporter(str, Enum):
    TORCHSCRIPT = "torchscript"
    DYNAMO = "dynamo"


class AttentionKind(str, Enum):
    """How attention is written: ``eager`` (the model's ops, any opset) or ``fused`` (ONNX Attention, opset 23)."""

    EAGER = "eager"
    FUSED = "fused"

    @property
    def default_opset(self) -> int:
        return fused_attention.ONNX_ATTENTION_OPSET if self is AttentionKind.FUSED else 18


# Parity limits (atol, rtol), rtol relative to each output's max |value|; any wrong mask, position or cache wiring
# gives O(1) relative errors, far above both. float32: tiny models agree to ~1e-7, but SmolLM2-135M's logits (scale
# ~10-30, 30 layers, GEMMs summed in another order by MLAS than by PyTorch) differ by 1.1e-4 on prefill, so a
# purely absolute 1e-4 rejects a correct export; 1e-5 of the scale (~100x float32's roundoff) absorbs that.
# float16: unit roundoff 4.9e-4; ORT on CPU casts many float16 ops to float32 and accumulates in another order, so
# outputs drift by tens of ulps across layers; 2% of the output's scale tolerates that and still catches real bugs.
# (atol, rtol) with limit = atol + rtol * max|reference| per output. float32: tiny models agree to ~1e-7, but a real
# model's outputs reach magnitudes of 10-1000 (massive activations in the KV cache) and ONNX Runtime's fused kernels
# sum in another order: sliced SmolLM2 measured 2.8e-4 on values up to 17 (1.6e-5 relative). A real bug is O(1).
DEFAULT_TOLERANCE = {OnnxDtype.FLOAT32: (1e-4, 1e-4), OnnxDtype.FLOAT16: (1e-3, 2e-2)}


@dataclass
class OnnxExportConfig:
    """How to export: dtype, opset (None: 18, or 23 for fused attention), exporter, attention, external data
    (None: only above 1.5 GB) and parity tolerance."""

    dtype: OnnxDtype = OnnxDtype.FLOAT32
    opset: int | None = None
    exporter: Exporter = Exporter.TORCHSCRIPT
    attention: AttentionKind = AttentionKind.EAGER
    external_data: bool | None = None
    atol: float | None = None  # None: DEFAULT_TOLERANCE of the dtype
    rtol: float | None = None
    # a generation graph: logits of the last position only (batch, 1, vocab). Prefill then skips the head's GEMM
    # and the logits tensor for every other prompt position; perplexity needs every position and is refused.
    last_logits: bool = False
    # fused only: each Attention node split into this many causal query blocks (exporters/attention.py); None: 4
    # with fused attention, 1 (no split) with eager
    attention_chunks: int | None = None
    # decode.onnx next to model.onnx (exporters/decode_graph.py): one-token steps through GroupQueryAttention over a
    # shared KV cache, gated against model.onnx; written only when every layer has the fused-attention pattern
    decode_graph: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        self.dtype = _enum(OnnxDtype, self.dtype, "dtype")
        self.exporter = _enum(Exporter, self.exporter, "exporter")
        self.attention = _enum(AttentionKind, self.attention, "attention")
        if self.opset is None:
            self.opset = self.attention.default_opset
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise UserInputError(f"opset must be an integer >= {MIN_OPSET}, got {self.opset!r}")
        if self.attention is AttentionKind.FUSED:
            if self.exporter is not Exporter.TORCHSCRIPT:
                raise UserInputError("attention=fused is traced by the torchscript exporter; use exporter=torchscript")
            if self.opset < fused_attention.ONNX_ATTENTION_OPSET:
                raise UserInputError(f"attention=fused writes ONNX Attention, which needs opset >= "
                                     f"{fused_attention.ONNX_ATTENTION_OPSET}; got {self.opset}")
        if self.attention_chunks is None:
            fused = self.attention is AttentionKind.FUSED
            self.attention_chunks = fused_attention.DEFAULT_CHUNKS if fused else 1
        if isinstance(self.attention_chunks, bool) or not isinstance(self.attention_chunks, int) \
                or self.attention_chunks < 1:
            raise UserInputError(f"attention_chunks must be an integer >= 1, got {self.attention_chunks!r}")
        if self.attention_chunks > 1 and self.attention is not AttentionKind.FUSED:
            raise UserInputError("attention_chunks > 1 splits ONNX Attention nodes: it needs attention=fused")
        if self.attention is not AttentionKind.FUSED and self.exporter is Exporter.TORCHSCRIPT \
                and self.opset > TORCHSCRIPT_MAX_OPSET:
            raise UserInputError(f"the torchscript exporter supports opset {MIN_OPSET}..{TORCHSCRIPT_MAX_OPSET}, "
                                 f"got {self.opset}; use exporter=dynamo for newer opsets")
        if self.exporter is Exporter.DYNAMO and self.opset < DYNAMO_MIN_OPSET:
            raise UserInputError(f"the dynamo exporter needs opset >= {DYNAMO_MIN_OPSET}, got {self.opset}")
        for name in ("atol", "rtol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise UserInputError(f"{name} must be >= 0, got {value}")

    @property
    def tolerance(self) -> Tolerance:
        atol, rtol = DEFAULT_TOLERANCE[self.dtype]
        return Tolerance(atol if self.atol is None else self.atol, rtol if self.rtol is None else self.rtol)

    def to_dict(self) -> dict:
        return {**asdict(self), "dtype": self.dtype.value, "exporter": self.exporter.value,
                "attention": self.attention.value}

    @classmethod
    def from_dict(cls, data: dict) -> OnnxExportConfig:
        return cls(**data)


def _enum(kind: type[Enum], value, name: str):
    try:
        return kind(value)
    except ValueError:
        raise UserInputError(f"unknown {name} {value!r}; choose one of {', '.join(m.value for m in kind)}") from None


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, in graph order."""
    kv = [f"{i}.{part}" for i in range(num_layers) for part in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv)]
    return inputs, ["logits", *(f"present.{n}" for n in kv)]


def dynamic_axes(num_layers: int, last_logits: bool = False) -> dict[str, dict[int, str]]:
    inputs, outputs = io_names(num_layers)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"},
            "logits": {0: "batch"} if last_logits else {0: "batch", 1: "sequence"}}
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in inputs[3:]})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in outputs[1:]})
    return axes


class FlatCacheCausalLM(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *presents)`` with flat KV tensors.

    ONNX graphs take plain tensors; transformers models take a ``Cache``. This rebuilds a ``DynamicCache`` from
    the past tensors (key, value per layer; length 0 for a prefill) and flattens the updated cache again.
    """

    def __init__(self, model: nn.Module, num_layers: int, last_logits: bool = False):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.last_logits = last_logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        # No config: every layer keeps its whole past (a sliding window lives in the mask, not in the cache).
        cache = DynamicCache(list(zip(past[0::2], past[1::2], strict=True)) if past else None)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, use_cache=True, logits_to_keep=1 if self.last_logits else 0)
        presents = [t for layer in out.cache.layers[: self.num_layers] for t in (layer.keys, layer.values)]
        return (out.logits, *presents)


def num_layers_of(model: nn.Module) -> int:
    config = model.config.get_text_config(decoder=True)
    return int(config.num_hidden_layers)


def _model_in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model in ``dtype``: itself when it already is, else a copy (casting in place would lose the original)."""
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return model.eval()
    converted = copy.deepcopy(model).to(dtype).eval()
    converted.config.dtype = dtype  # so the exported config.json states the graph's dtype
    return converted


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _empty_past(flat: FlatCacheCausalLM, batch: int) -> list[torch.Tensor]:
    """Zero-length past tensors of the right kv-heads/head-dim/dtype, read off a one-token forward."""
    device = _device(flat.model)
    ids = torch.zeros((1, 1), dtype=torch.long, device=device)
    with torch.no_grad():
        _, *presents = flat(ids, torch.ones_like(ids), torch.zeros_like(ids))
    return [p[:1, :, :0].expand(batch, -1, -1, -1).contiguous() for p in presents]


def _trace_inputs(flat: FlatCacheCausalLM, vocab_size: int) -> tuple[torch.Tensor, ...]:
    device = _device(flat.model)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (TRACE_BATCH, TRACE_SEQUENCE), generator=generator).to(device)
    mask = torch.ones((TRACE_BATCH, TRACE_PAST + TRACE_SEQUENCE), dtype=torch.long, device=device)
    positions = torch.arange(TRACE_PAST, TRACE_PAST + TRACE_SEQUENCE, device=device).expand(TRACE_BATCH, -1)
    past = [torch.randn((*p.shape[:2], TRACE_PAST, p.shape[3]), generator=generator).to(p)
            for p in _empty_past(flat, TRACE_BATCH)]
    return (ids, mask, positions.contiguous(), *past)


def _export_graph(flat: FlatCacheCausalLM, args: tuple, path: Path, config: OnnxExportConfig) -> None:
    inputs, outputs = io_names(flat.num_layers)
    if config.exporter is Exporter.TORCHSCRIPT:
        # Constant folding stores each Linear weight pre-transposed, so MatMuls read initializers directly (what
        # ORT's quantizers look for); a tied embedding's transposed copy is shared again by _share_transposed.
        with warnings.catch_warnings():
            # The exporter's deprecation notice, and TracerWarnings about Python values in transformers' cache and
            # mask code: each was checked (the parity gate runs other batch, sequence and past lengths).
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            # aten::index of the padding mask: its indices are aranges, never negative (the case the warning is about).
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            torch.onnx.export(flat, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic_axes(flat.num_layers, flat.last_logits),
                              opset_version=min(config.opset, TORCHSCRIPT_MAX_OPSET),
                              do_constant_folding=True, dynamo=False)
        return
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise UserInputError("exporter=dynamo needs onnxscript: pip install 'slice2deploy[onnx]'") from error
    from torch.export import Dim

    dynamic = {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}
    shapes = (dynamic, dynamic, dynamic, tuple({0: Dim.DYNAMIC, 2: Dim.DYNAMIC} for _ in args[3:]))
    program = torch.onnx.export(flat, args, input_names=inputs, output_names=outputs, dynamic_shapes=shapes,
                                opset_version=config.opset, dynamo=True)
    program.save(str(path), external_data=True)


def _share_transposed(model) -> int:
    """Replace each initializer that is the transpose of another one by a Transpose node; return how many.

    Constant folding turns a tied head (logits = x Eᵀ) into a second, transposed copy of the embedding table:
    for SmolLM2 that is 28M duplicated parameters (~20% of the file). Only non-square 2-D tensors are checked.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    matrices = [t for t in graph.initializer if len(t.dims) == 2 and t.dims[0] != t.dims[1]]
    shapes = {tuple(t.dims) for t in matrices}
    candidates = [t for t in matrices if tuple(t.dims[::-1]) in shapes]
    digests = {}
    for tensor in candidates:
        digests.setdefault(sha256_bytes(numpy_helper.to_array(tensor).tobytes()), tensor.name)
    # Folded constants ("onnx::..." names) first, so the named parameter is the one kept.
    candidates.sort(key=lambda t: not t.name.startswith("onnx::"))
    kept, removed = set(), {}
    for tensor in candidates:
        source = digests.get(sha256_bytes(np.ascontiguousarray(numpy_helper.to_array(tensor).T).tobytes()))
        if source is not None and source not in removed and tensor.name not in kept:
            removed[tensor.name] = source
            kept.add(source)
    for tensor in [t for t in candidates if t.name in removed]:
        graph.initializer.remove(tensor)
        graph.node.insert(0, helper.make_node("Transpose", [removed[tensor.name]], [tensor.name], perm=[1, 0],
                                              name=f"{tensor.name}/shared_transpose"))
    return len(removed)


def _finalize_graph(scratch: Path, target: Path, external_data: bool, config: OnnxExportConfig,
                    num_layers: int) -> dict:
    """Re-save the exported graph at ``target`` in our layout (one optional data file); return what was rewritten.

    A last-logits graph gets its logits' sequence axis declared as 1 (the tracer leaves a symbolic name): runners
    and quantizers read that from the graph, which travels with every derived model. A fused-attention graph is
    converted to its opset and gets its Attention nodes (one per layer, or the export fails)."""
    import onnx

    model = onnx.load(str(scratch))
    rewritten = {"shared_transposed_initializers": _share_transposed(model)}
    if config.attention is AttentionKind.FUSED:
        fused = fused_attention.promote_to_onnx_attention(model, config.opset)
        if fused != num_layers:
            raise UserInputError(f"attention=fused: the traced graph has {fused} Attention nodes for {num_layers} "
                                 "layers (this model's attention does not go through transformers' attention "
                                 "functions); export with attention=eager")
        rewritten["fused_attention_nodes"] = fused
        rewritten["causal_chunked_attention_nodes"] = fused_attention.chunk_causal_attention(
            model.graph, config.attention_chunks)
    if config.last_logits:
        logits = next(output for output in model.graph.output if output.name == "logits")
        logits.type.tensor_type.shape.dim[1].Clear()
        logits.type.tensor_type.shape.dim[1].dim_value = 1
    if external_data:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=DATA_FILE, size_threshold=1024)
    else:
        onnx.save_model(model, str(target))
    onnx.checker.check_model(str(target))  # by path: works with external data and above 2 GB
    return rewritten


def _write_graph(flat: FlatCacheCausalLM, config: OnnxExportConfig, out: Path, external_data: bool) -> dict:
    """Trace into a scratch folder, then save model.onnx (+ data) in ``out``; return what was rewritten."""
    scratch = out / ".export"
    scratch.mkdir()
    implementation = "eager" if config.attention is AttentionKind.EAGER else fused_attention.IMPLEMENTATION
    with fused_attention.attention_implementation(flat.model, implementation):
        _export_graph(flat, _trace_inputs(flat, flat.model.config.vocab_size), scratch / MODEL_FILE, config)
    rewritten = _finalize_graph(scratch / MODEL_FILE, out / MODEL_FILE, external_data, config, flat.num_layers)
    shutil.rmtree(scratch)
    return rewritten


def _torch_runner(flat: FlatCacheCausalLM) -> Runner:
    """The PyTorch reference of the parity gate, with numpy in and out (graph names)."""
    names, outputs = io_names(flat.num_layers)
    device = _device(flat.model)

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(inputs[name]).to(device) for name in names]
        with torch.no_grad():
            values = flat(*args)
        return {name: value.detach().cpu().numpy() for name, value in zip(outputs, values, strict=True)}

    return run


def _check_parity(flat: FlatCacheCausalLM, directory: Path, tolerance: Tolerance, long_step: int = 0) -> dict:
    """PyTorch (``flat``) vs ONNX Runtime CPU (``directory``) on the parity cases (``long_step``: a step of that many
    tokens too); raises ParityError."""
    reference = _torch_runner(flat)
    names = io_names(flat.num_layers)[0][3:]
    empty = dict(zip(names, (p.cpu().numpy() for p in _empty_past(flat, 1)), strict=True))

    def empty_past(batch: int) -> dict[str, np.ndarray]:
        return {name: np.repeat(value, batch, axis=0) for name, value in empty.items()}

    cases = parity_cases(flat.model.config.vocab_size, empty_past, reference, long_step=long_step)
    return check_parity(reference, OrtCausalLM(directory, provider="cpu").run_named, cases, tolerance)


def _parameter_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique) * torch.finfo(dtype).bits // 8


def _write_side_files(model: nn.Module, tokenizer, out: Path) -> None:
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def _manifest(out: Path, config: OnnxExportConfig, source: dict | None, num_layers: int, external_data: bool,
              rewritten: dict, parity: dict, seconds: dict) -> dict:
    inputs, outputs = io_names(num_layers)
    graph = graph_summary(out / MODEL_FILE)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "versions": runtime_versions(),
        "source": source if source is not None else {"spec": None, "sha256": None},  # an in-memory model
        "export_config": config.to_dict(),
        "opset": config.opset,
        "dtype": config.dtype.value,
        "exporter": config.exporter.value,
        "external_data": external_data,
        "io": {"inputs": inputs, "outputs": outputs, "dynamic_axes": dynamic_axes(num_layers, config.last_logits)},
        "parameters": graph["parameters"],
        "size_bytes": sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(MODEL_FILE)),
        **rewritten,
        "parity": parity,
        "seconds": seconds,
        "files_sha256": {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()},
    }


def export_onnx(model: nn.Module, tokenizer, out_dir: str | Path, config: OnnxExportConfig | None = None,
                overwrite: bool = False, source: dict | None = None) -> dict:
    """Export a loaded causal LM to ``out_dir`` (graph, config, tokenizer, manifest), gated by parity; return the
    manifest. Raises :class:`~exporters.parity.ParityError` (and writes nothing) when ONNX Runtime disagrees."""
    require_onnx()
    config = config or OnnxExportConfig()
    if config.attention is AttentionKind.FUSED:
        fused_attention.require_support()
    check_output_dir(out_dir, overwrite)
    started = time.perf_counter()
    model = _model_in_dtype(model, config.dtype.torch)
    flat = FlatCacheCausalLM(model, num_layers_of(model), config.last_logits).eval()
    external = config.external_data
    if external is None:
        external = _parameter_bytes(model, config.dtype.torch) > EXTERNAL_DATA_BYTES
    # Validated inside the atomic directory: a failed check (checker, parity) leaves nothing at out_dir.
    # The parity reference is always the model's own eager attention, whichever way the graph writes it.
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        rewritten = _write_graph(flat, config, tmp, external)
        exported = time.perf_counter()
        with fused_attention.attention_implementation(model, "eager"):
            long_step = fused_attention.min_chunked_tokens(config.attention_chunks)  # the blocks' path, if any
            parity = _check_parity(flat, tmp, config.tolerance, long_step)
        _write_side_files(model, tokenizer, tmp)
        decoded = time.perf_counter()
        rewritten["decode_graph"] = write_decode_graph(tmp) if config.decode_graph else {"written": False,
                                                                                         "reason": "turned off"}
        external = external or rewritten["decode_graph"]["written"]  # the two graphs share model.onnx.data
        seconds = {"export": round(exported - started, 2), "parity": round(decoded - exported, 2),
                   "decode_graph": round(time.perf_counter() - decoded, 2)}
        manifest = _manifest(tmp, config, source, flat.num_layers, external, rewritten, parity, seconds)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return {**manifest, "output": str(Path(out_dir).expanduser().resolve())}


def export_pretrained(spec: str, out_dir: str | Path, config: OnnxExportConfig | None = None,
                      overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Load any model slice2deploy accepts (alias, hub id, local or sliced directory, GGUF) and export it."""
    from slice2deploy.api import load

    config = config or OnnxExportConfig()
    require_onnx()  # fail before loading: the parity gate needs onnx and ONNX Runtime
    if config.attention is AttentionKind.FUSED:
        fused_attention.require_support()
    check_output_dir(out_dir, overwrite)
    model, tokenizer, resolved = load(spec, config.dtype.value, "cpu", trust_remote_code)
    source = {"spec": spec, "kind": resolved.kind, "path": resolved.path, "gguf_file": resolved.gguf_file,
              "sha256": resolved.sha256}
    return export_onnx(model, tokenizer, out_dir, config, overwrite=overwrite, source=source)
