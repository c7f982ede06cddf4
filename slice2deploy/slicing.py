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
from .capture import LayerInputs, capture_layer_inputs
from .fold import TieMode, fold_norms
from .modeling import SlicedConfig, SlicedDecoderLayer, SlicedForCausalLM, SlicedRMSNorm
from .pca import CovarianceAccumulator, pca_basis, random_orthogonal
from .rotation import project, rotate_embedding, rotate_reader, rotate_writer
from .utils import UserInputError
from .widths import per_layer_widths, validate_sparsity

DEFAULT_REFIT_RIDGE = 1e-3  # refit=True in a recipe; measured on SmolLM2 (benchmarks/results/slicing_modes_smollm2.md)

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


def _covariance_of(batches: list[LayerInputs], values: list[torch.Tensor], dim: int) -> CovarianceAccumulator:
    covariance = CovarianceAccumulator(dim, device=values[0].device)
    for batch, value in zip(batches, values):
        covariance.add(value, batch.mask)
    return covariance


def _slice_branch(layer: SlicedDecoderLayer, stage: Stage, batches: list[LayerInputs], width: int,
                  damping: float) -> None:
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


def _slice_group(layer: SlicedDecoderLayer, group: tuple[Stage, ...], batches: list[LayerInputs], basis: torch.Tensor,
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
        batch.hidden = project(output, kept)
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


def slice_per_layer(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    config: SliceConfig, basis_fn: BasisFn | None = None, progress: bool = True) -> nn.Module:
    """Slice ``model`` (consumed: its modules are transformed in place) to a ``SlicedForCausalLM``: a basis per
    residual position (the paper). ``basis_fn`` defaults to PCA of each position's calibration covariance; tests
    pass random orthogonal bases to check that rotation alone is exact. Both modes: ``slice2deploy.api.slice_model``.
    """
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
        widths = per_layer_widths(config, d, adapter.num_positions(len(layers)), tied)
        if config.incoherence:
            basis_fn = incoherent_basis_fn(basis_fn, widths, config.rotation_seed)
        batches = capture_layer_inputs(model, adapter, input_ids, attention_mask, config.batch_size, device)
        basis = basis_fn(0, _covariance_of(batches, [b.hidden for b in batches], d))  # source coordinates
        basis_first = basis[:, : widths[0]]
        for path in adapter.embeddings:
            rotate_embedding(model.get_submodule(path), basis_first)
        for batch in batches:
            batch.hidden = project(batch.hidden, basis_first)
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
