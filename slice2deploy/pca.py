"""Streaming covariance and PCA bases of residual-stream activations (float64 throughout)."""

from __future__ import annotations

import torch


class CovarianceAccumulator:
    """``H = Σ XᵀX`` over the non-padding tokens of every batch, accumulated in float64.

    Each batch's product is formed in the activations' precision (at least float32: a sum over at most a few
    thousand rows, relative error ~1e-6, far below the damping) and added to the float64 total; the
    eigendecomposition is float64. This halves the cost of the largest matmul of calibration on CPUs.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add activations ``x`` (B, T, d); ``mask`` (B, T) is 1 for real tokens and 0 for padding."""
        rows = x.reshape(-1, x.shape[-1])  # (B*T, d)
        if mask is not None and not bool(mask.all()):
            rows = rows[mask.reshape(-1).to(torch.bool)]  # padding never enters the covariance
        if rows.dtype not in (torch.float32, torch.float64):
            rows = rows.float()
        self.matrix += (rows.T @ rows).to(device=self.matrix.device, dtype=torch.float64)
        self.tokens += rows.shape[0]


def pca_basis(covariance: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and orthogonal eigenvectors (columns) of a damped covariance.

    The damping adds ``damping * mean(diag(H))`` to the diagonal so rank-deficient covariances (few
    calibration tokens, dead dimensions) still give a well-defined, numerically orthogonal basis.
    """
    h = covariance.to(torch.float64)
    h = h + damping * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    eigenvalues, eigenvectors = torch.linalg.eigh(h)
    order = torch.argsort(eigenvalues, descending=True)
    return eigenvalues[order], eigenvectors[:, order]


def random_orthogonal(dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal matrix (float64), for exactness tests of the rotation machinery."""
    gaussian = torch.randn(dim, dim, dtype=torch.float64, generator=generator)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))[None, :]
