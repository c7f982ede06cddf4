"""What per-position widths cost and what the residual stream's spectra say (per-layer mode).

Two pieces, used by the budget planners of :mod:`slice2deploy.widths`:

- :class:`ParameterCost`: the *exact* parameter count of the sliced model as a function of its widths,
  derived from the adapter's declarations (embeddings, readers, writers, shortcuts, final norm, head), so it
  holds for every registered architecture (Llama family, OPT, ...). The count is quadratic in the widths:
  ``constant + Σ_p linear[p]·w_p + Σ_(p,q) w_p·w_q`` (one product per residual shortcut, and the final
  norm's mix for a tied head).
- :func:`collect_spectra`: the eigenvalue spectrum of every residual position's calibration covariance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, get_adapter
from .evaluate import count_parameters
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
    adapter = get_adapter(model.config)
    adapter.check_textbook("the exact parameter cost of spectrum widths")
    layers = adapter.get_layers(model)
    positions = adapter.num_positions(len(layers))
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

    Approximation: ``slice_per_layer`` computes each basis on the activations of the *already sliced* model;
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
