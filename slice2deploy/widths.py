"""Every width decision: how many coordinates each residual position keeps.

- by sparsity: :func:`uniform_width` / :func:`uniform_widths`, and :func:`per_layer_widths` (what
  ``SliceConfig`` asks of the per-layer mode: uniform, or explicit widths);
- under a parameter budget, per-layer mode: :func:`widths_for_target` (uniform) and :func:`spectrum_widths`
  (greedy on each position's eigenvalue spectrum), both on a :class:`~slice2deploy.spectrum.ParameterCost`;
  :func:`budget_widths` measures the cost (and spectra) of a dense model and picks one of them;
- uniform mode (one hidden size, a standard checkpoint): :func:`valid_widths`,
  :func:`uniform_width_for_sparsity`, :func:`uniform_width_for_target`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from enum import Enum

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from .adapters import get_adapter
from .fold import TieMode
from .spectrum import ParameterCost, collect_spectra, parameter_cost
from .utils import UserInputError

# --- by sparsity -------------------------------------------------------------------------------------------------

def validate_sparsity(sparsity: float) -> float:
    if not 0.0 <= float(sparsity) < 1.0:
        raise UserInputError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def uniform_width(hidden_size: int, sparsity: float, round_to: int = 8) -> int:
    """Keep ``(1 - sparsity) * d`` coordinates, rounded *down* to a multiple of ``round_to`` (never below it).

    Rounding to a hardware multiple keeps GEMM shapes friendly (tensor cores, INT4 blocks); rounding down
    means the model is at least as sparse as asked. At sparsity 0 the full width is kept.
    """
    validate_sparsity(sparsity)
    if round_to < 1:
        raise UserInputError(f"round-to must be a positive integer, got {round_to}")
    if sparsity == 0:
        return hidden_size
    width = int((1.0 - sparsity) * hidden_size)
    width -= width % round_to
    return max(width, min(round_to, hidden_size))


def uniform_widths(hidden_size: int, num_positions: int, sparsity: float, round_to: int = 8) -> list[int]:
    """The same width at every residual position."""
    return [uniform_width(hidden_size, sparsity, round_to)] * num_positions


def per_layer_widths(config, d: int, positions: int, tied: bool) -> list[int]:
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


# --- under a parameter budget (per-layer mode) -----------------------------------------------------------

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
    if cost.tied:  # the tied embedding position keeps full width (see per_layer_widths)
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


def check_budget_supported(model: nn.Module) -> None:
    """Refuse parameter budgets for families the exact cost model does not describe (parallel blocks, post-norms):
    a budget met only approximately would break the promise that the sliced model fits it."""
    get_adapter(model.config).check_textbook("per-layer width budgets (--target-params, --widths spectrum)")


def budget_widths(model: nn.Module, target_params: int, rule: str = "spectrum", input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, tie: TieMode | str = TieMode.KEEP, round_to: int = 8,
                min_width: int | None = None, objective: Objective | str = Objective.BULK_VARIANCE,
                batch_size: int = 8, device: str | torch.device = "cpu") -> list[int]:
    """Widths for ``SliceConfig(widths=...)`` whose real count is <= ``target_params``: ``rule`` "uniform" or
    "spectrum" (which needs the calibration ``input_ids``; one extra forward pass of the dense model).

    Call it on the dense model *before* ``slice_model`` consumes it, with the same tie mode and calibration.
    """
    check_budget_supported(model)
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


# --- uniform mode: one hidden size ------------------------------------------------------------------

def uniform_config(config, k: int, d: int, eps: float):
    """The source config with ``hidden_size = k``: head geometry kept, eps rescaled, head untied."""
    new = copy.deepcopy(config)
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    new.hidden_size = k
    new.head_dim = head_dim
    new.rms_norm_eps = eps * d / k
    new.tie_word_embeddings = False
    return new


def width_error(config, width: int) -> str | None:
    """Why the source family's config class refuses ``hidden_size = width`` (None when it accepts it).

    Some classes validate more than the modelling code needs: transformers' ``LlamaConfig`` demands
    ``hidden_size % num_attention_heads == 0`` even with an explicit ``head_dim`` and refuses to save otherwise,
    so a standard Llama checkpoint can only have such widths (SmolLM2, 9 heads: multiples of 9).
    """
    d = int(config.hidden_size)
    candidate = uniform_config(config, width, d, float(getattr(config, "rms_norm_eps", 1e-6)))
    validate = getattr(candidate, "validate", None)
    if validate is None:
        return None
    try:
        validate()
    except Exception as error:  # noqa: BLE001 - transformers raises several types; the message is what matters
        cause = getattr(error, "__cause__", None) or error
        return str(cause).strip().splitlines()[-1]
    return None


def valid_widths(config, round_to: int = 8) -> list[int]:
    """Widths (descending) the standard checkpoint can have: multiples of ``round_to`` its config accepts, and d."""
    d = int(config.hidden_size)
    candidates = sorted({d, *range(round_to, d + 1, round_to)}, reverse=True)
    return [width for width in candidates if width == d or width_error(config, width) is None]


def uniform_width_for_sparsity(config, sparsity: float, round_to: int = 8) -> int:
    """The largest valid width at most ``(1 - sparsity) d`` (see :func:`valid_widths`)."""
    limit = uniform_width(int(config.hidden_size), sparsity, round_to)
    allowed = [width for width in valid_widths(config, round_to) if width <= limit]
    if not allowed:
        raise UserInputError(f"no uniform width <= {limit} is a multiple of {round_to} that "
                             f"{type(config).__name__} accepts ({width_error(config, limit)}); change --round-to")
    if allowed[0] != limit:
        warnings.warn(f"uniform width {allowed[0]} instead of {limit}: {type(config).__name__} refuses hidden_size "
                      f"{limit} ({width_error(config, limit)}); a smaller --round-to gives more choice", stacklevel=2)
    return allowed[0]


def uniform_parameter_count(config, width: int) -> int:
    """Exact parameters of the uniform-mode model of hidden size ``width`` (built on the meta device)."""
    d = int(config.hidden_size)
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(uniform_config(config, width, d, eps))
    return sum(p.numel() for p in model.parameters())


def uniform_width_for_target(config, target_params: int, round_to: int = 8) -> int:
    """The largest valid width (see :func:`valid_widths`) whose uniform-mode model has <= ``target_params``."""
    candidates = valid_widths(config, round_to)
    for width in candidates:
        if uniform_parameter_count(config, width) <= target_params:
            return width
    smallest = uniform_parameter_count(config, candidates[-1])
    raise UserInputError(f"target of {target_params:,} parameters is below the smallest uniform-mode model "
                         f"({smallest:,} at width {candidates[-1]})")
