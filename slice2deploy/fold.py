"""Norm folding: move every norm's affine part into the linears it feeds, leaving weight-free RMSNorms.

RMSNorm: ``W (γ ⊙ n(x)) = (W diag γ) n(x)``. LayerNorm additionally: ``W (γ ⊙ n(x) + β) + b`` puts ``W β`` into
the reader's bias, and its mean-subtraction is folded into every writer of the residual stream (embedding rows,
writer rows and biases are centred) so the stream stays zero-mean and LayerNorm equals RMSNorm on it.
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from .adapters import Adapter
from .modeling import SlicedRMSNorm, TiedLMHead, _set_submodule


class TieMode(str, Enum):
    """What to do with a head tied to the token embedding."""

    KEEP = "keep"  # stay tied: the final norm's scale becomes a small matrix in front of the head
    UNTIE = "untie"  # give the head its own (folded, rotated, sliced) copy of the matrix


def _as64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def fold_into_reader(linear: nn.Linear, scale: torch.Tensor | None, shift: torch.Tensor | None) -> None:
    """``W (scale ⊙ x + shift) + b`` → ``(W diag scale) x + (W shift + b)``."""
    weight = _as64(linear.weight)
    dtype = linear.weight.dtype
    if shift is not None:
        bias = weight @ _as64(shift)
        if linear.bias is not None:
            bias = bias + _as64(linear.bias)
        linear.bias = nn.Parameter(bias.to(dtype))
    if scale is not None:
        linear.weight = nn.Parameter((weight * _as64(scale)[None, :]).to(dtype))


def center_writer(module: nn.Module) -> None:
    """Subtract the mean over the residual dimension from everything a module writes into the stream."""
    if isinstance(module, nn.Embedding):  # rows are residual vectors
        weight = _as64(module.weight)
        module.weight = nn.Parameter((weight - weight.mean(1, keepdim=True)).to(module.weight.dtype))
        return
    weight = _as64(module.weight)  # (d, in): columns are residual vectors
    module.weight = nn.Parameter((weight - weight.mean(0, keepdim=True)).to(module.weight.dtype))
    if module.bias is not None:
        bias = _as64(module.bias)
        module.bias = nn.Parameter((bias - bias.mean()).to(module.bias.dtype))


def _is_tied(model: nn.Module, adapter: Adapter) -> bool:
    head = model.get_submodule(adapter.head)
    embedding = model.get_submodule(adapter.embeddings[0])
    return head.weight is embedding.weight or head.weight.data_ptr() == embedding.weight.data_ptr()


def fold_norms(model: nn.Module, adapter: Adapter, tie: TieMode = TieMode.KEEP) -> bool:
    """Fold every norm of ``model`` (in place) and return whether the head stays tied to the embedding."""
    config = model.config
    d, eps = adapter.hidden_size(config), adapter.norm_eps(config)
    layers = adapter.get_layers(model)
    embedding = model.get_submodule(adapter.embeddings[0])
    tied = _is_tied(model, adapter) and TieMode(tie) == TieMode.KEEP
    original_embedding = _as64(embedding.weight).clone() if _is_tied(model, adapter) else None
    if adapter.norm_kind == "layer":
        for path in adapter.embeddings:
            center_writer(model.get_submodule(path))
        for layer in layers:
            for stage in adapter.stages:
                for path in stage.writers:
                    center_writer(layer.get_submodule(path))
    for layer in layers:
        fold_layer_norms(layer, adapter, d, eps)
    _fold_final_norm(model, adapter, tied, original_embedding, d, eps)
    return tied


def fold_layer_norms(layer: nn.Module, adapter: Adapter, d: int, eps: float) -> None:
    """Fold one layer's norms: pre-norms into their readers (a norm shared by parallel stages read once, before it
    is replaced), post-norms into a d × d mix matrix ``diag(γ)`` behind a weight-free RMSNorm over the branch."""
    affine = {path: adapter.norm_scale_and_bias(layer.get_submodule(path)) for path in adapter.residual_norm_paths()}
    for stage in adapter.stages:
        scale, shift = affine[stage.norm]
        for path in stage.readers:
            fold_into_reader(layer.get_submodule(path), scale, shift)
        if stage.post_norm:
            like = layer.get_submodule(stage.writers[0]).weight
            _set_submodule(layer, stage.post_norm, _post_norm(affine[stage.post_norm][0], d, eps, like))
    for stage in adapter.stages:
        _set_submodule(layer, stage.norm, SlicedRMSNorm(d, eps))


def _post_norm(scale: torch.Tensor | None, d: int, eps: float, like: torch.Tensor) -> SlicedRMSNorm:
    """``γ ⊙ n(y)`` as ``mix(n(y))`` with mix = diag γ: the mix is then a writer of the residual stream."""
    norm = SlicedRMSNorm(d, eps, width=d, mix_width=d).to(dtype=like.dtype, device=like.device)
    gamma = _as64(scale) if scale is not None else torch.ones(d, dtype=torch.float64)
    norm.mix.weight = nn.Parameter(torch.diag(gamma).to(norm.mix.weight.dtype))
    return norm


def _fold_final_norm(model: nn.Module, adapter: Adapter, tied: bool, original_embedding: torch.Tensor | None,
                     d: int, eps: float) -> None:
    scale, shift = adapter.norm_scale_and_bias(model.get_submodule(adapter.final_norm))
    head = model.get_submodule(adapter.head)
    dtype = head.weight.dtype
    if not tied:
        if original_embedding is not None:  # untie: the head gets its own copy of the original matrix
            head.weight = nn.Parameter(original_embedding.to(dtype))
            model.config.tie_word_embeddings = False
        fold_into_reader(head, scale, shift)
        _set_submodule(model, adapter.final_norm, SlicedRMSNorm(d, eps))
        return
    # Tied: logits = (γ ⊙ n + β) Eᵀ with E the *original* embedding. The stored E may have been centred
    # (LayerNorm): E = E_c + m 1ᵀ, so logits = (n diag γ) E_cᵀ + (n·γ) m + E β. The mix matrix produces
    # [n diag γ, n·γ]; the head multiplies the first part by the (shared) E_c and the extra column by m.
    gamma = _as64(scale) if scale is not None else torch.ones(d, dtype=torch.float64)
    row_mean = original_embedding.mean(1) if adapter.norm_kind == "layer" else None
    extra = 0 if row_mean is None else 1
    norm = SlicedRMSNorm(d, eps, width=d, mix_width=d + extra)
    mix = torch.diag(gamma)
    if extra:
        mix = torch.cat([mix, gamma[None, :]], dim=0)
    norm.mix.weight = nn.Parameter(mix.to(dtype))
    _set_submodule(model, adapter.final_norm, norm)
    embedding = model.get_submodule(adapter.embeddings[0])
    tied_head = TiedLMHead(embedding, bias=shift is not None, extra=extra)
    if shift is not None:
        tied_head.bias.data = (original_embedding @ _as64(shift)).to(dtype)
    if extra:
        tied_head.extra.data = row_mean[:, None].to(dtype)
    _set_submodule(model, adapter.head, tied_head)
