"""Per-position widths from the residual stream's eigenvalue spectra under a global parameter budget.

Three pieces, all for the per-layer mode of :func:`slice2deploy.slicing.slice_model`:

- :class:`ParameterCost`: the *exact* parameter count of the sliced model as a function of its widths,
  derived from the adapter's declarations (embeddings, readers, writers, shortcuts, final norm, head), so it
  holds for every registered architecture (Llama family, OPT, ...). The count is quadratic in the widths:
  ``constant + Σ_p linear[p]·w_p + Σ_(p,q) w_p·w_q`` (one product per residual shortcut, and the final
  norm's mix for a tied head).
- :func:`collect_spectra`: the eigenvalue spectrum of every residual position's calibration covariance.
- :func:`spectrum_widths` / :func:`widths_for_target`: widths (multiples of ``round_to``) whose real
  count is at most a target, spectrum-driven (greedy) or uniform.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, get_adapter
from .fold import TieMode
from .pca import CovarianceAccumulator
from .utils import UserInputError


@dataclass(frozen=True)
class ParameterCost:
    """Exact parameter count of a per-layer sliced model: ``constant + Σ linear[p] w_p + Σ_(p,q)∈products w_p w_q``.

    ``tied``: the head stays tied to the token embedding (then the embedding position is kept at full width by
    the width planners). ``dense``: the unsliced model's count (shared tensors once).
    """

    hidden_size: int
    constant: int
    linear: tuple[int, ...]
    products: tuple[tuple[int, int], ...]
    tied: bool
    dense: int

    @property
    def num_positions(self) -> int:
        return len(self.linear)

    def check(self, widths: Sequence[int]) -> list[int]:
        widths = [int(w) for w in widths]
        if len(widths) != self.num_positions or not all(1 <= w <= self.hidden_size for w in widths):
            raise UserInputError(f"widths must be {self.num_positions} integers in [1, {self.hidden_size}]")
        return widths

    def count(self, widths: Sequence[int]) -> int:
        """Parameters of the sliced model with these widths (what ``count_parameters(...)['total']`` reports)."""
        w = self.check(widths)
        return (self.constant + sum(c * x for c, x in zip(self.linear, w))
                + sum(w[p] * w[q] for p, q in self.products))

    def change(self, widths: Sequence[int], position: int, width: int) -> int:
        """Parameters added (negative: removed) by setting ``widths[position] = width``."""
        delta = width - widths[position]
        others = sum(widths[q] for p, q in self.products if p == position)
        others += sum(widths[p] for p, q in self.products if q == position)
        return delta * (self.linear[position] + others)


def _shares_weight(a: nn.Module, b: nn.Module) -> bool:
    if a.weight is b.weight:
        return True
    return a.weight.device.type != "meta" and a.weight.data_ptr() == b.weight.data_ptr()


def _ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def _stage_terms(layer: nn.Module, stage, adapter: Adapter, position: int, linear: list[int]) -> int:
    """Add one stage's width-dependent terms to ``linear``; return its width-independent parameters."""
    _, shift = adapter.norm_scale_and_bias(layer.get_submodule(stage.norm))
    constant = 0
    for path in stage.readers:  # out × w_in, plus a bias (its own, or the folded LayerNorm shift)
        reader = layer.get_submodule(path)
        linear[position] += reader.out_features
        if reader.bias is not None or shift is not None:
            constant += reader.out_features
    for path in stage.writers:  # w_out × in, plus w_out bias rows
        writer = layer.get_submodule(path)
        linear[position + 1] += writer.in_features + (writer.bias is not None)
    return constant


def parameter_cost(model: nn.Module, tie: TieMode | str = TieMode.KEEP) -> ParameterCost:
    """The :class:`ParameterCost` of slicing ``model`` (dense, folded or not; not modified) in per-layer mode."""
    from .evaluate import count_parameters
    from .slicing import num_positions

    adapter = get_adapter(model.config)
    adapter.check_textbook("the exact parameter cost of spectrum widths")
    layers = adapter.get_layers(model)
    positions = num_positions(adapter, len(layers))
    linear, products, constant = [0] * positions, [], 0
    accounted: set[int] = set()
    for path in adapter.embeddings:
        embedding = model.get_submodule(path)
        linear[0] += embedding.weight.shape[0]
        accounted |= _ids(embedding)
    for index, layer in enumerate(layers):
        for offset, stage in enumerate(adapter.stages):
            position = index * len(adapter.stages) + offset
            constant += _stage_terms(layer, stage, adapter, position, linear)
            products.append((position, position + 1))  # the shortcut: always present in per-layer mode
            for path in (stage.norm, *stage.readers, *stage.writers):
                accounted |= _ids(layer.get_submodule(path))
    final_norm, head = model.get_submodule(adapter.final_norm), model.get_submodule(adapter.head)
    _, shift = adapter.norm_scale_and_bias(final_norm)
    tied = _shares_weight(head, model.get_submodule(adapter.embeddings[0])) and TieMode(tie) == TieMode.KEEP
    vocab = head.weight.shape[0]
    if tied:  # see fold._fold_final_norm: mix (w_last → w_0 + extra), head bias, rank-one extra column
        extra = int(adapter.norm_kind == "layer")
        products.append((positions - 1, 0))
        linear[-1] += extra
        constant += vocab * extra + (vocab if shift is not None else 0)
    else:
        linear[-1] += vocab
        constant += vocab if (head.bias is not None or shift is not None) else 0
    accounted |= _ids(final_norm) | _ids(head)
    constant += sum(p.numel() for p in model.parameters() if id(p) not in accounted)  # attention internals, ...
    return ParameterCost(adapter.hidden_size(model.config), constant, tuple(linear), tuple(products), tied,
                         count_parameters(model)["total"])


def parameter_cost_from_config(config, tie: TieMode | str = TieMode.KEEP) -> ParameterCost:
    """:func:`parameter_cost` of the architecture a config describes (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return parameter_cost(model, tie)


def sliced_parameter_count(cost: ParameterCost, widths: Sequence[int]) -> int:
    """Exact parameter count of the per-layer sliced model with ``widths`` (embeddings, head, shortcuts included)."""
    return cost.count(widths)


# --- spectra -----------------------------------------------------------------------------------------------------

def position_covariances(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         batch_size: int = 8, device: str | torch.device = "cpu",
                         transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         progress: bool = False) -> list[CovarianceAccumulator]:
    """One forward pass of the dense model; the covariance of the stream entering every norm (padding masked).

    Position 0 is the embedding output, position ``l·S + s`` the input of stage s of layer l, the last one the
    final norm's input. ``transform`` maps each (B, T, d) activation before it is accumulated. The model is not
    modified; its hooks are always removed.
    """
    adapter = get_adapter(model.config)
    adapter.check_textbook("collecting per-position covariances")
    d = adapter.hidden_size(model.config)
    norms = [layer.get_submodule(stage.norm) for layer in adapter.get_layers(model) for stage in adapter.stages]
    norms.append(model.get_submodule(adapter.final_norm))
    accumulators = [CovarianceAccumulator(d, device=device) for _ in norms]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    current: dict[str, torch.Tensor] = {}

    def hook_for(accumulator: CovarianceAccumulator):
        def hook(module, args):
            x = args[0].detach()
            accumulator.add(x if transform is None else transform(x), current["mask"])
        return hook

    handles = [norm.register_forward_pre_hook(hook_for(acc)) for norm, acc in zip(norms, accumulators)]
    try:
        with torch.no_grad():
            for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="calibration", disable=not progress):
                ids = input_ids[start : start + batch_size].to(device)
                current["mask"] = attention_mask[start : start + batch_size].to(device)
                model(input_ids=ids, attention_mask=current["mask"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return accumulators


def collect_spectra(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    batch_size: int = 8, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Eigenvalues (descending, float64, per token) of every residual position's calibration covariance.

    One forward pass of the *dense* model (folded or not: it is not modified, its hooks are removed), one d × d
    float64 accumulator per position, padding masked. Position 0 is the embedding output, position
    ``l·S + s`` the input of stage s of layer l (the input of that stage's norm), the last one the final
    norm's input. Folding RMSNorms leaves the stream unchanged; folding LayerNorms centres it, so for
    LayerNorm families the covariance is projected on the zero-mean subspace (exactly the folded model's).

    Approximation: ``slice_model`` computes each basis on the activations of the *already sliced* model;
    these spectra are those of the dense stream, so later positions differ slightly from what slicing sees.
    """

    adapter = get_adapter(model.config)
    accumulators = position_covariances(model, input_ids, attention_mask, batch_size, device)
    centre = adapter.norm_kind == "layer"
    return [_spectrum(acc, centre) for acc in accumulators]


def _spectrum(accumulator: CovarianceAccumulator, centre: bool) -> torch.Tensor:
    h = accumulator.matrix / max(accumulator.tokens, 1)  # (d, d)
    if centre:  # the folded stream is P x with P = I - 11ᵀ/d
        d = h.shape[0]
        projector = torch.eye(d, dtype=h.dtype, device=h.device) - 1.0 / d
        h = projector @ h @ projector
    eigenvalues = torch.linalg.eigvalsh(h).clamp_min(0).flip(0)
    return eigenvalues.cpu()


# --- width allocation --------------------------------------------------------------------------------------------

class Objective(str, Enum):
    """What a position gains from keeping more coordinates (per position, normalised by its total variance).

    Measured on SmolLM2-135M (benchmarks/results/widths_smollm2.md, equal real parameters): bulk-variance ties
    uniform widths at the 0.25 budget and is slightly worse at 0.40; plain variance is worse at both (it starves
    the massive-activation positions). Uniform widths remain the safe default of ``slice_model``.
    """

    VARIANCE = "variance"  # explained fraction of the variance: Σ_{i<w} λ_i / Σ λ_i
    LOG_RESIDUAL = "log-residual"  # -log of the unexplained fraction (floored): halving any residual pays alike
    # explained fraction of the variance *beyond the top min_width eigenvalues*, which every position keeps anyway:
    # a few massive-activation directions (98% of the variance of half of SmolLM2's positions) then no longer
    # make a position look fully explained at any width
    BULK_VARIANCE = "bulk-variance"


def allowed_widths(hidden_size: int, round_to: int, min_width: int) -> list[int]:
    """Multiples of ``round_to`` in [min_width, d], plus d itself (full width is always allowed)."""
    if round_to < 1:
        raise UserInputError(f"round_to must be >= 1, got {round_to}")
    widths = [w for w in range(round_to, hidden_size + 1, round_to) if w >= min_width]
    return widths if widths and widths[-1] == hidden_size else [*widths, hidden_size]


def _scores(spectrum: torch.Tensor, objective: Objective, floor: float, kept: int) -> list[float]:
    """score[w] for w = 0..d: how much of the position a width w keeps (``kept``: the smallest width)."""
    lam = spectrum.to(torch.float64).clamp_min(0)
    if objective == Objective.BULK_VARIANCE:
        lam = torch.cat([torch.zeros(kept, dtype=lam.dtype), lam[kept:]])
    total = float(lam.sum()) or 1.0
    explained = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(lam, 0)]) / total  # (d + 1,)
    if objective in (Objective.VARIANCE, Objective.BULK_VARIANCE):
        return explained.tolist()
    return (-torch.log((1.0 - explained).clamp_min(0) + floor)).tolist()


def _start_widths(cost: ParameterCost, choices: list[int]) -> list[int]:
    widths = [choices[0]] * cost.num_positions
    if cost.tied:  # the tied embedding position keeps full width (see slicing._plan_widths)
        widths[0] = cost.hidden_size
    return widths


def _full_widths(cost: ParameterCost) -> list[int]:
    return [cost.hidden_size] * cost.num_positions


def _check_budget(cost: ParameterCost, start: list[int], target_params: int) -> None:
    smallest = cost.count(start)
    if target_params < smallest:
        raise UserInputError(
            f"target of {target_params:,} parameters is below the smallest allowed sliced model ({smallest:,} with "
            f"widths of {min(start)}); raise the target or lower min_width/round_to (dense: {cost.dense:,})")


def spectrum_widths(spectra: Sequence[torch.Tensor], cost: ParameterCost, target_params: int, round_to: int = 8,
                    min_width: int | None = None, objective: Objective | str = Objective.BULK_VARIANCE,
                    floor: float = 1e-3) -> list[int]:
    """Per-position widths with ``cost.count(widths) <= target_params``, greedy on spectrum gain per parameter.

    Starts at the smallest allowed widths (``min_width``, default ``round_to``; a tied embedding position at
    full width) and repeatedly widens, by one step of ``round_to``, the position whose gain (``objective``,
    from its spectrum) per added parameter is largest among the steps that still fit the budget; stops when
    none fits, so the count is within one step of the target. A target at or above the full-width sliced
    model's count returns full widths (per-layer slicing at full width is *larger* than the dense model:
    shortcuts). A target below the smallest allowed model raises ``UserInputError``.
    """
    if len(spectra) != cost.num_positions:
        raise UserInputError(f"{len(spectra)} spectra for {cost.num_positions} residual positions")
    objective = Objective(objective)
    choices = allowed_widths(cost.hidden_size, round_to, round_to if min_width is None else min_width)
    widths = _start_widths(cost, choices)
    _check_budget(cost, widths, target_params)
    if target_params >= cost.count(_full_widths(cost)):
        return _full_widths(cost)
    scores = [_scores(s, objective, floor, choices[0]) for s in spectra]
    following = {w: choices[i + 1] for i, w in enumerate(choices[:-1])}
    used = cost.count(widths)
    while True:
        best, best_ratio = None, -math.inf
        for position, width in enumerate(widths):
            wider = following.get(width)
            if wider is None or (cost.tied and position == 0):
                continue
            added = cost.change(widths, position, wider)
            if used + added > target_params:
                continue
            ratio = (scores[position][wider] - scores[position][width]) / added
            if ratio > best_ratio:
                best, best_ratio = (position, wider, added), ratio
        if best is None:
            return widths
        position, widths[position], added = best
        used += added


def widths_for_target(cost: ParameterCost, target_params: int, round_to: int = 8) -> list[int]:
    """Uniform widths (the largest multiple of ``round_to``, or d) whose real count is <= ``target_params``.

    A tied embedding position keeps full width, as in ``slice_model``'s uniform plan; a target at or above the
    full-width count returns full widths; a target below the ``round_to``-wide model raises ``UserInputError``.
    """
    choices = allowed_widths(cost.hidden_size, round_to, round_to)
    start = _start_widths(cost, choices)
    _check_budget(cost, start, target_params)
    best = start
    for width in choices:
        widths = [width] * cost.num_positions
        if cost.tied:
            widths[0] = cost.hidden_size
        if cost.count(widths) > target_params:
            break
        best = widths
    return best


def plan_widths(model: nn.Module, target_params: int, rule: str = "spectrum", input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, tie: TieMode | str = TieMode.KEEP, round_to: int = 8,
                min_width: int | None = None, objective: Objective | str = Objective.BULK_VARIANCE,
                batch_size: int = 8, device: str | torch.device = "cpu") -> list[int]:
    """Widths for ``SliceConfig(widths=...)`` whose real count is <= ``target_params``: ``rule`` "uniform" or
    "spectrum" (which needs the calibration ``input_ids``; one extra forward pass of the dense model).

    Call it on the dense model *before* ``slice_model`` consumes it, with the same tie mode and calibration.
    """
    cost = parameter_cost(model, tie)
    if rule == "uniform":
        return widths_for_target(cost, target_params, round_to)
    if rule != "spectrum":
        raise UserInputError(f"unknown widths rule {rule!r}; choose uniform or spectrum")
    if input_ids is None:
        raise UserInputError("spectrum widths need calibration input_ids")
    _check_budget(cost, _start_widths(cost, allowed_widths(cost.hidden_size, round_to, min_width or round_to)),
                  target_params)  # fail before the forward pass
    spectra = collect_spectra(model, input_ids, attention_mask, batch_size, device)
    return spectrum_widths(spectra, cost, target_params, round_to, min_width, objective)
