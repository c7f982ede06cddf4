"""Rotating the weights that touch the residual stream: readers ``W ← W Q``, writers ``W ← Qᵀ W``, embeddings.

Shared by both slicing modes (:mod:`slice2deploy.slicing`, :mod:`slice2deploy.uniform`); float64 inside, stored
in each weight's own dtype.
"""

from __future__ import annotations

import torch
from torch import nn


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


def project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Activations into (or, with ``basis.T``, out of) a basis; float32 at least, stored in x's dtype."""
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (x.to(compute) @ basis.to(device=x.device, dtype=compute)).to(x.dtype)
