"""Uniform-basis slicing: one orthogonal basis for the whole residual stream, no shortcut matrices.

Per-layer SliceGPT gives every residual position its own basis, so each residual connection needs a
``Q_inᵀ Q_out`` matrix and the result is a custom architecture. With a single basis ``Q`` (d × k) for every
position the shortcuts are identities and vanish: the result is the *source architecture* with
``hidden_size = k`` (head dimension, head counts and intermediate size kept), which any config-driven runtime
loads. Exactness needs two things:

- norm scales γ are folded into the readers (``W ← W diag γ``), then every reader is ``W Q`` and every writer
  ``Qᵀ W``; the embedding is ``E Q`` and the head ``W_head diag γ_final Q``;
- the source's RMSNorm normalises by d. A standard RMSNorm over k coordinates with weight ``√(d/k)`` and
  ``eps · d/k`` computes ``x / √(Σx²/d + eps)`` exactly: ``√(d/k) · x / √(Σx²/k + eps·d/k)``.

A tied head cannot stay tied: the final norm's γ would have to be a diagonal in the rotated basis, which it
is not (the diagonal approximation was measured useless). The head is untied and counted honestly.

The basis is the top-k eigenvectors of a pooled covariance of all residual positions, each position's
covariance weighted so that no position (or token) dominates: see ``Pooling``.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from enum import Enum

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from .adapters import Adapter, get_adapter
from .fold import TieMode, fold_norms
from .pca import CovarianceAccumulator, pca_basis, random_orthogonal
from .rotation import rotate_embedding, rotate_reader, rotate_writer
from .spectrum import position_covariances
from .utils import UserInputError
from .widths import uniform_config, uniform_width_for_sparsity, width_error


class Pooling(str, Enum):
    """How the residual positions' covariances are combined into one."""

    SUM = "sum"  # plain sum: positions with large activations (late layers) dominate
    TRACE = "trace"  # every position's covariance divided by its trace (the prototype)
    TOKEN = "token"  # every token normalised to unit length before pooling (what the norms' readers see)


# basis(covariance d × d float64) -> orthogonal d × d, columns by decreasing importance (tests pass random ones)
UniformBasisFn = Callable[[torch.Tensor], torch.Tensor]


def _unit_tokens(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def pooled_covariance(accumulators: list[CovarianceAccumulator], pooling: Pooling) -> torch.Tensor:
    """Combine per-position covariances (each divided by its token count) into one d × d matrix."""
    pooled = torch.zeros_like(accumulators[0].matrix)
    for accumulator in accumulators:
        covariance = accumulator.matrix / max(accumulator.tokens, 1)
        if pooling == Pooling.TRACE:
            covariance = covariance / torch.trace(covariance).clamp_min(1e-30)
        pooled += covariance
    return pooled


def rotate_all(model: nn.Module, adapter: Adapter, basis: torch.Tensor) -> None:
    """Rotate and slice every weight that touches the (folded) residual stream with one basis (d × k)."""
    for path in adapter.embeddings:
        rotate_embedding(model.get_submodule(path), basis)
    for layer in adapter.get_layers(model):
        for stage in adapter.stages:
            for path in stage.readers:
                rotate_reader(layer.get_submodule(path), basis)
            for path in stage.writers:
                rotate_writer(layer.get_submodule(path), basis)
    rotate_reader(model.get_submodule(adapter.head), basis)


def _standard_model(model: nn.Module, adapter: Adapter, k: int, d: int, eps: float) -> PreTrainedModel:
    """Build the source class at hidden size k and load the rotated weights; norms get weight √(d/k)."""
    config = uniform_config(model.config, k, d, eps)
    dtype = next(model.parameters()).dtype
    standard = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = standard.load_state_dict(model.state_dict(), strict=False)
    norm_weights = {f"{adapter.layers}.{i}.{stage.norm}.weight" for i in range(len(adapter.get_layers(model)))
                    for stage in adapter.stages} | {f"{adapter.final_norm}.weight"}
    if set(missing) != norm_weights or unexpected:
        extra_missing = sorted(set(missing) - norm_weights)
        raise RuntimeError(f"uniform slicing: state-dict mismatch (missing {extra_missing}, unexpected "
                           f"{sorted(unexpected)})")
    with torch.no_grad():
        for name in norm_weights:
            standard.get_parameter(name).fill_(math.sqrt(d / k))
    standard.generation_config = model.generation_config
    return standard.to(next(model.parameters()).device).eval()  # where the source was (a GPU slice stays there)


def check_uniform_supported(adapter: Adapter) -> None:
    """Uniform mode rebuilds the *source* class at hidden size k: refuse families whose norms it cannot express."""
    if adapter.norm_kind != "rms":
        raise UserInputError("uniform mode needs an RMSNorm architecture (Llama, Mistral, Qwen2/3, Phi-3): a "
                             "LayerNorm over the rotated stream would subtract a mean the stream no longer has; "
                             "use --mode per-layer")
    if any(stage.post_norm for stage in adapter.stages):
        raise UserInputError("uniform mode cannot keep post-norms exact (Gemma-2/3): the source class normalises each "
                             "branch output over its k kept coordinates with a per-coordinate scale, but the rotated "
                             "output needs its full-width norm and a scale that is not diagonal in the new basis; "
                             "use --mode per-layer")


def slice_uniform(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, width: int,
                  pooling: Pooling | str = Pooling.TOKEN, damping: float = 0.01, batch_size: int = 8,
                  basis_fn: UniformBasisFn | None = None, progress: bool = True,
                  refit_ridge: float | None = None, rotation_seed: int | None = None,
                  ) -> tuple[PreTrainedModel, dict]:
    """Slice ``model`` (consumed) to a standard model of hidden size ``width``; return it and what was done.

    ``refit_ridge``: when set, refit the sliced model's linears against the dense model by ridge regression on
    the same calibration tokens (``slice2deploy.refit``). ``rotation_seed``: when set, rotate the kept basis by a
    seeded random orthogonal k × k matrix (incoherence: the norms' weight is one scalar, so the function is the
    same; outlier coordinates are spread for INT8 activation quantization).
    """
    adapter = get_adapter(model.config)
    check_uniform_supported(adapter)
    pooling = Pooling(pooling)
    d, eps = adapter.hidden_size(model.config), adapter.norm_eps(model.config)
    if not 1 <= width <= d:
        raise UserInputError(f"uniform width must be in [1, {d}], got {width}")
    if width != d and (why := width_error(model.config, width)):
        raise UserInputError(f"uniform width {width}: {type(model.config).__name__} refuses hidden_size {width} "
                             f"({why}), so the result could not be saved as a standard checkpoint; pick another width")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    started = time.perf_counter()
    model.eval()
    device = next(model.parameters()).device
    transform = _unit_tokens if pooling == Pooling.TOKEN else None
    accumulators = position_covariances(model, input_ids, attention_mask, batch_size, device, transform, progress)
    pooled = pooled_covariance(accumulators, pooling)
    full = basis_fn(pooled) if basis_fn is not None else pca_basis(pooled, damping)[1]
    eigenvalues = torch.linalg.eigvalsh(pooled).flip(0)
    kept_basis = full[:, :width]
    if rotation_seed is not None:
        kept_basis = kept_basis @ random_orthogonal(width, torch.Generator().manual_seed(rotation_seed))
    teacher = copy.deepcopy(model) if refit_ridge is not None else None
    with torch.no_grad():
        fold_norms(model, adapter, TieMode.UNTIE)
        rotate_all(model, adapter, kept_basis.to(device))
        standard = _standard_model(model, adapter, width, d, eps)
    refit = None
    if teacher is not None:
        from .refit import refit_uniform

        refit = refit_uniform(teacher, standard, kept_basis, input_ids, attention_mask, refit_ridge, batch_size,
                              progress)
    kept = float(eigenvalues[:width].sum() / eigenvalues.sum())
    info = {"method": "slicegpt", "mode": "uniform", "pooling": pooling.value, "width": width,
            "original_hidden_size": d, "damping": damping, "rotation_seed": rotation_seed,
            "explained_variance": round(kept, 6), "refit_result": refit,
            "seconds": round(time.perf_counter() - started, 3)}
    return standard, info


def slice_uniform_mode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       config, basis_fn: UniformBasisFn | None = None, progress: bool = True) -> PreTrainedModel:
    """:func:`slice_uniform` at the width a ``SliceConfig`` asks for; the config is recorded in the model's."""
    width = config.widths[0] if config.widths else uniform_width_for_sparsity(model.config, config.sparsity,
                                                                              config.round_to)
    model.eval().to(torch.device(config.device))
    standard, info = slice_uniform(model, input_ids, attention_mask, width, config.pooling, config.damping,
                                   config.batch_size, basis_fn, progress, refit_ridge=config.refit,
                                   rotation_seed=config.rotation_seed if config.incoherence else None)
    standard.config.slice2deploy = {**info, **config.to_dict(), "widths": None}
    return standard
