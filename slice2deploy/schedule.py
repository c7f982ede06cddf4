"""Widths of the residual stream at every position."""

from __future__ import annotations

from .utils import UserInputError


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
