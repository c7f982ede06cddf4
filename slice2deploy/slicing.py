"""The SliceGPT driver: fold, then rotate each residual position into its PCA basis and slice, layer by layer.

Calibration activations are propagated through the *already sliced* model, so each basis is computed on the
signal the sliced model really sees. Only the current position's activations (N × T × d, model dtype) and
one d × d float64 covariance are held at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, Stage, get_adapter
from .fold import TieMode, fold_norms
from .modeling import SlicedConfig, SlicedDecoderLayer, SlicedForCausalLM, SlicedRMSNorm
from .pca import CovarianceAccumulator, pca_basis, random_orthogonal
from .schedule import uniform_widths, validate_sparsity
from .utils import UserInputError

# basis(position, covariance) -> orthogonal d × d matrix (float64) in the covariance's coordinates, columns sorted
# by importance (PCA: eigenvectors by decreasing eigenvalue)
BasisFn = Callable[[int, CovarianceAccumulator], torch.Tensor]


@dataclass
class SliceConfig:
    """Everything that decides the result of ``slice_model`` (recorded in the sliced model's config)."""

    sparsity: float = 0.25
    round_to: int = 8
    mode: str = "per-layer"  # "per-layer" (the paper: a basis per position) or "uniform" (one basis, standard arch)
    pooling: str = "token"  # uniform mode: how positions' covariances are pooled (slice2deploy.uniform.Pooling)
    tie: TieMode = TieMode.KEEP
    damping: float = 0.01
    batch_size: int = 8
    device: str = "cpu"
    widths: list[int] | None = None  # explicit per-position widths (overrides sparsity/round_to)
    incoherence: bool = False  # rotate each kept subspace by a seeded random orthogonal matrix (see below)
    rotation_seed: int = 0
    refit: float | None = None  # uniform mode: ridge of the least-squares refit against the dense model (None: off)
    # post-normed branches (Gemma-3): "full" keeps each branch output at width d before its norm (exact, but the
    # writers are not sliced), "kept" slices it to the stage's output width (approximate: see _slice_branch)
    post_norm_width: str = "full"
    version: int = 1
    extra: dict = field(default_factory=dict)  # provenance (calibration source, seed, ...), stored verbatim

    def __post_init__(self) -> None:
        validate_sparsity(self.sparsity)
        self.tie = TieMode(self.tie)
        if self.round_to < 1:
            raise UserInputError(f"round_to must be >= 1, got {self.round_to}")
        if self.batch_size < 1:
            raise UserInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.damping < 0:
            raise UserInputError(f"damping must be >= 0, got {self.damping}")
        if self.mode not in ("per-layer", "uniform"):
            raise UserInputError(f"mode must be 'per-layer' or 'uniform', got {self.mode!r}")
        if self.refit is not None and self.mode != "uniform":
            raise UserInputError("refit is a uniform-mode option (--mode uniform)")
        if self.refit is not None and not self.refit > 0:
            raise UserInputError(f"refit ridge must be > 0, got {self.refit}")
        if self.post_norm_width not in ("full", "kept"):
            raise UserInputError(f"post_norm_width must be 'full' or 'kept', got {self.post_norm_width!r}")
        if self.mode == "uniform" and self.widths is not None and len(set(self.widths)) != 1:
            raise UserInputError("uniform mode has one width for every position; pass a single width")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["tie"] = self.tie.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> SliceConfig:
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass
class _Batch:
    hidden: torch.Tensor  # (B, T, width of the current position), on the storage device
    mask: torch.Tensor  # (B, T) 1 = real token
    kwargs: dict  # what the model passes to the decoder layer being sliced (masks, rotary embeddings, ...)
    layer_kwargs: list[dict] = field(default_factory=list)  # per layer: sliding/full layers get different ones

    def use_layer(self, index: int) -> None:
        if self.layer_kwargs:
            self.kwargs = self.layer_kwargs[index]


class _StopForward(Exception):
    pass


class _KwargsRecorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records what the model loop passes it, returns its input.

    Models with per-layer attention types (Gemma-3's sliding/full layers, Qwen2/3 max_window_layers) give each
    layer its own mask and rotary embedding; this records them all at the cost of the embedding and the masks.
    """

    def __init__(self, layer: nn.Module, index: int, sink: dict, last: bool):
        super().__init__()
        for key, value in vars(layer).items():  # plain attributes the model loop may read (attention_type, ...)
            if not key.startswith("_") and key != "training" and not isinstance(value, nn.Module):
                setattr(self, key, value)
        self.index, self.last, self._sink = index, last, sink

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("decoder layers are expected to get keyword arguments besides the hidden states")
        if self.index == 0:
            self._sink["hidden"] = hidden_states
        self._sink.setdefault("kwargs", []).append(dict(kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


def capture_layer_inputs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         batch_size: int, device: torch.device) -> list[_Batch]:
    """Run the model's embedding and layer loop with recorders in place of the decoder layers: keep the first
    layer's inputs and every layer's keyword arguments (the layers are restored afterwards)."""
    layers = adapter.get_layers(model)
    originals = list(layers)
    batches = []
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            sink: dict = {}
            for index, layer in enumerate(originals):
                layers[index] = _KwargsRecorder(layer, index, sink, index == len(originals) - 1)
            ids = input_ids[start : start + batch_size].to(device)
            mask = attention_mask[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _StopForward:
                pass
            batches.append(_Batch(sink["hidden"].detach(), mask, sink["kwargs"][0], sink["kwargs"]))
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return batches


def rotate_reader(linear: nn.Linear, basis: torch.Tensor) -> None:
    """Reader ``y = W x``: ``W ← W Q`` (Q is d × k, the kept columns of the position's basis)."""
    weight = linear.weight.detach().to(torch.float64)
    linear.weight = nn.Parameter((weight @ basis).to(linear.weight.dtype))
    linear.in_features = basis.shape[1]


def rotate_writer(linear: nn.Linear, basis: torch.Tensor) -> None:
    """Writer ``y = W x + b`` into the stream: ``W ← Qᵀ W``, ``b ← Qᵀ b``."""
    weight = linear.weight.detach().to(torch.float64)
    linear.weight = nn.Parameter((basis.T @ weight).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias = nn.Parameter((basis.T @ linear.bias.detach().to(torch.float64)).to(linear.bias.dtype))
    linear.out_features = basis.shape[1]


def rotate_embedding(embedding: nn.Embedding, basis: torch.Tensor) -> None:
    weight = embedding.weight.detach().to(torch.float64)
    embedding.weight = nn.Parameter((weight @ basis).to(embedding.weight.dtype))
    embedding.embedding_dim = basis.shape[1]


def _project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Activations into (or, with ``basis.T``, out of) a basis; float32 at least, stored in x's dtype."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (x.to(compute) @ basis.to(device=x.device, dtype=compute)).to(x.dtype)


def pca_basis_fn(damping: float) -> BasisFn:
    def basis(position: int, covariance: CovarianceAccumulator) -> torch.Tensor:
        return pca_basis(covariance.matrix, damping)[1]

    return basis


def incoherent_basis_fn(basis_fn: BasisFn, widths: list[int], seed: int) -> BasisFn:
    """Follow ``basis_fn`` by a seeded Haar-random rotation of each position's kept columns.

    The kept subspace (what slicing keeps) is unchanged, so the sliced model computes the same function;
    only the coordinates inside it change. PCA puts the residual stream's outlier directions (massive
    activations that the dense model's norm scales used to damp) on single coordinates, which per-tensor
    INT8 activation quantization cannot represent; a random rotation spreads them over all k coordinates
    (incoherence processing, as in QuIP#/QuaRot) so quantized sliced models lose far less.
    """

    def basis(position: int, covariance: CovarianceAccumulator) -> torch.Tensor:
        full = basis_fn(position, covariance).clone()
        width = widths[position]
        generator = torch.Generator().manual_seed(seed * 100_003 + position)
        rotation = random_orthogonal(width, generator).to(full.device)
        full[:, :width] = full[:, :width] @ rotation
        return full

    return basis


def _covariance_of(batches: list[_Batch], values: list[torch.Tensor], dim: int) -> CovarianceAccumulator:
    covariance = CovarianceAccumulator(dim, device=values[0].device)
    for batch, value in zip(batches, values):
        covariance.add(value, batch.mask)
    return covariance


def _slice_branch(layer: SlicedDecoderLayer, stage: Stage, batches: list[_Batch], width: int, damping: float) -> None:
    """Slice a post-normed branch output ``y`` (d) to its top-``width`` principal directions P (an approximation).

    Exact would be ``mix(n_d(y))`` with y at full width: n_d divides by ``√(‖y‖²/d)``, which needs every coordinate,
    so the writers could not shrink. Here the writers produce ``Pᵀy`` (width × in) and the norm sees only the kept
    part, whose energy is a fraction f of ‖y‖² on calibration data: ``n_d(y) ≈ √f · Pᵀy / √(‖Pᵀy‖²/d + eps·f)``;
    √f goes into the mix (``mix ← √f · mix P``), eps·f is neglected (eps ~1e-6 against ‖y‖²/d).
    """
    post_norm, d = layer.get_submodule(stage.post_norm), layer.get_submodule(stage.post_norm).original_dim
    covariance, current = CovarianceAccumulator(d, device=batches[0].hidden.device), {}
    handle = post_norm.register_forward_pre_hook(lambda module, args: covariance.add(args[0], current["mask"]))
    try:
        with torch.no_grad():
            for batch in batches:
                current["mask"] = batch.mask
                layer.branch(stage.as_dict(), getattr(layer, stage.norm)(batch.hidden), batch.kwargs)
    finally:
        handle.remove()
    eigenvalues, vectors = pca_basis(covariance.matrix, damping)
    kept = vectors[:, :width]
    fraction = float(eigenvalues[:width].sum() / eigenvalues.sum())
    for path in stage.writers:
        rotate_writer(layer.get_submodule(path), kept)
    mix = post_norm.mix
    weight = mix.weight.detach().to(torch.float64) @ kept * fraction**0.5
    mix.weight, mix.in_features = nn.Parameter(weight.to(mix.weight.dtype)), width


def _slice_group(layer: SlicedDecoderLayer, group: tuple[Stage, ...], batches: list[_Batch], basis: torch.Tensor,
                 width_in: int, width_out: int, position: int, basis_fn: BasisFn,
                 branch_width: int | None = None, damping: float = 0.01) -> torch.Tensor:
    """Rotate/slice one stage group (a stage, or all stages of a parallel block); return its output basis (d × d).

    ``basis`` is the input position's basis in source coordinates; ``batches[i].hidden`` holds the input in
    its first ``width_in`` coordinates and is moved to the output basis. The residual writers are first expressed in
    the input basis, so the output ``y = [x, 0] + Σ branches`` needs no projection back to source coordinates; the
    output basis is found in input-basis coordinates and composed with ``basis``.
    """
    for stage in group:
        for path in stage.readers:
            rotate_reader(layer.get_submodule(path), basis[:, :width_in])
        for path in stage.residual_writers:
            rotate_writer(layer.get_submodule(path), basis)
        if stage.post_norm and branch_width is not None and branch_width < basis.shape[0]:
            _slice_branch(layer, stage, batches, branch_width, damping)
    stages = [stage.as_dict() for stage in group]
    outputs = []
    with torch.no_grad():
        for batch in batches:
            output = layer.group_branches(stages, batch.hidden, batch.kwargs)  # (B, T, d), input-basis coordinates
            output[..., :width_in] += batch.hidden
            outputs.append(output)
    relative = basis_fn(position, _covariance_of(batches, outputs, basis.shape[0]))  # d × d, input coordinates
    kept = relative[:, :width_out]
    for stage in group:
        for path in stage.residual_writers:
            rotate_writer(layer.get_submodule(path), kept)
    shortcut = layer.shortcut(stages)
    shortcut.weight = nn.Parameter(kept[:width_in].T.contiguous().to(shortcut.weight.dtype))  # (Q_inᵀ Q_out)ᵀ
    for batch, output in zip(batches, outputs):
        batch.hidden = _project(output, kept)
    return basis @ relative


def _finish_head(model: nn.Module, adapter: Adapter, tied: bool, basis_last: torch.Tensor,
                 basis_first: torch.Tensor) -> None:
    """The head reads the last position; a tied head reads the first basis through the final norm's mix."""
    final_norm = model.get_submodule(adapter.final_norm)
    if tied:
        mix = final_norm.mix
        weight = mix.weight.detach().to(torch.float64) @ basis_last  # reader of the last position
        d = basis_first.shape[0]
        rotated = torch.cat([basis_first.T @ weight[:d], weight[d:]], dim=0)  # writer into the first basis
        mix.weight = nn.Parameter(rotated.to(mix.weight.dtype))
        mix.in_features, mix.out_features = rotated.shape[1], rotated.shape[0]
    else:
        rotate_reader(model.get_submodule(adapter.head), basis_last)


def num_positions(adapter: Adapter, num_layers: int) -> int:
    return num_layers * len(adapter.groups()) + 1


def plan_widths(config: SliceConfig, d: int, positions: int, tied: bool) -> list[int]:
    """Uniform widths; a head tied to the embedding keeps the embedding position at full width.

    A tied head can only use the embedding's kept subspace, and the embedding position's PCA (token
    embeddings) knows nothing about what the head needs: slicing it too cost ~2x perplexity on SmolLM2 at
    25% sparsity. Keeping that one position whole costs ~0.3 M parameters (a few d x k matrices in layer 0
    and the final mix) and keeps the shared vocab x d matrix stored once.
    """
    if config.widths is None:
        widths = uniform_widths(d, positions, config.sparsity, config.round_to)
        if tied:
            widths[0] = d
        return widths
    widths = [int(w) for w in config.widths]
    if len(widths) != positions or not all(1 <= w <= d for w in widths):
        raise UserInputError(f"explicit widths must be {positions} integers in [1, {d}]")
    return widths


def slice_model(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                config: SliceConfig, basis_fn: BasisFn | None = None, progress: bool = True) -> nn.Module:
    """Slice ``model`` (consumed: its modules are transformed in place) on the given calibration tokens.

    Per-layer mode returns a ``SlicedForCausalLM``; uniform mode a model of the source class with a smaller
    ``hidden_size`` (see ``slice2deploy.uniform``). ``basis_fn`` defaults to PCA of each position's calibration
    covariance; tests pass random orthogonal bases to check that rotation alone is exact.
    """
    if config.mode == "uniform":
        return _slice_uniform(model, input_ids, attention_mask, config, basis_fn, progress)
    adapter = get_adapter(model.config)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    device = torch.device(config.device)
    model.eval().to(device)
    basis_fn = basis_fn or pca_basis_fn(config.damping)
    started = time.perf_counter()
    with torch.no_grad():
        tied = fold_norms(model, adapter, config.tie)
        d, eps = adapter.hidden_size(model.config), adapter.norm_eps(model.config)
        layers = adapter.get_layers(model)
        stages, groups = [stage.as_dict() for stage in adapter.stages], adapter.groups()
        widths = plan_widths(config, d, num_positions(adapter, len(layers)), tied)
        if config.incoherence:
            basis_fn = incoherent_basis_fn(basis_fn, widths, config.rotation_seed)
        batches = capture_layer_inputs(model, adapter, input_ids, attention_mask, config.batch_size, device)
        basis = basis_fn(0, _covariance_of(batches, [b.hidden for b in batches], d))  # source coordinates
        basis_first = basis[:, : widths[0]]
        for path in adapter.embeddings:
            rotate_embedding(model.get_submodule(path), basis_first)
        for batch in batches:
            batch.hidden = _project(batch.hidden, basis_first)
        position, branch_widths = 0, []
        for index in tqdm(range(len(layers)), desc="slicing layers", disable=not progress):
            layer_widths = widths[position : position + len(groups) + 1]
            layer = SlicedDecoderLayer(layers[index], stages, layer_widths, [True] * len(groups), d, eps,
                                       adapter.topology.value)
            layers[index] = layer
            for batch in batches:
                batch.use_layer(index)
            branch_widths.append([None] * len(stages))
            for group in groups:
                position += 1
                branch_width = widths[position] if config.post_norm_width == "kept" else d
                for stage in group:
                    if stage.post_norm:
                        branch_widths[-1][adapter.stages.index(stage)] = branch_width
                basis = _slice_group(layer, group, batches, basis, widths[position - 1], widths[position], position,
                                     basis_fn, branch_width, config.damping)
        _finish_head(model, adapter, tied, basis[:, : widths[-1]], basis_first)
    sliced_config = _sliced_config(model, adapter, config, widths, tied, d, eps)
    if any(stage.post_norm for stage in adapter.stages):
        sliced_config.branch_widths = branch_widths
    sliced_config.slicing["seconds"] = round(time.perf_counter() - started, 3)
    sliced = SlicedForCausalLM(sliced_config, base=model)
    sliced.generation_config = model.generation_config
    return sliced.eval()


def _slice_uniform(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   config: SliceConfig, basis_fn, progress: bool) -> nn.Module:
    from .uniform import slice_uniform, uniform_width_for_sparsity

    width = config.widths[0] if config.widths else uniform_width_for_sparsity(model.config, config.sparsity,
                                                                              config.round_to)
    model.eval().to(torch.device(config.device))
    standard, info = slice_uniform(model, input_ids, attention_mask, width, config.pooling, config.damping,
                                   config.batch_size, basis_fn, progress, refit_ridge=config.refit,
                                   rotation_seed=config.rotation_seed if config.incoherence else None)
    standard.config.slice2deploy = {**info, **config.to_dict(), "widths": None}
    return standard


def _sliced_config(model: nn.Module, adapter: Adapter, config: SliceConfig, widths: list[int], tied: bool,
                   d: int, eps: float) -> SlicedConfig:
    head = model.get_submodule(adapter.head)
    final_norm = model.get_submodule(adapter.final_norm)
    num_layers = len(adapter.get_layers(model))
    base_config = model.config.to_dict()
    base_config["tie_word_embeddings"] = False
    extra = getattr(head, "extra", None)
    return SlicedConfig(
        base_config=base_config,
        original_hidden_size=d,
        widths=list(widths),
        layout=adapter.runtime_layout(),
        shortcuts=[[True] * len(adapter.groups()) for _ in range(num_layers)],
        norm_eps=eps,
        tie_head=tied,
        head_bias=head.bias is not None,
        final_mix=isinstance(final_norm, SlicedRMSNorm) and final_norm.mix is not None,
        head_extra=0 if extra is None else int(extra.shape[1]),
        slicing={"method": "slicegpt", "mode": "per-layer", **config.to_dict()},
        architectures=["SlicedForCausalLM"],
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
