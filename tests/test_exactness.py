"""The math that must hold: folding and rotation are exact; every adapter has a tiny fixture."""

from __future__ import annotations

import copy

import pytest
import torch

from slice2deploy.adapters import Adapter, Stage, StageKind, get_adapter, register_adapter, registered_adapters
from slice2deploy.api import SliceConfig, slice_model
from slice2deploy.fold import TieMode, fold_norms
from slice2deploy.modeling import SlicedRMSNorm
from slice2deploy.pca import random_orthogonal
from slice2deploy.utils import UserInputError

TOLERANCE = 1e-4


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _residual_norms(model, adapter):
    """The norms of the residual stream (declared by the adapter); per-head q/k norms inside attention stay."""
    layers = adapter.get_layers(model)
    return [layer.get_submodule(path) for layer in layers for path in adapter.residual_norm_paths()] + [
        model.get_submodule(adapter.final_norm)]


def _ids(model, batch=3, length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


@pytest.mark.parametrize("tie", ["keep", "untie"])
def test_folding_is_exact(tiny, tie):
    ids = _ids(tiny)
    reference = _logits(tiny, ids)
    folded = copy.deepcopy(tiny)
    adapter = get_adapter(folded.config)
    fold_norms(folded, adapter, TieMode(tie))
    norms = _residual_norms(folded, adapter)
    assert norms and all(isinstance(m, SlicedRMSNorm) for m in norms), "every residual norm must become weight-free"
    diff = (_logits(folded, ids) - reference).abs().max().item()
    print(f"{tiny.config.model_type} fold tie={tie}: max |dlogits| = {diff:.2e}")
    assert diff <= TOLERANCE


@pytest.mark.parametrize("tie", ["keep", "untie"])
def test_random_rotation_at_full_width_is_exact(tiny, tie):
    ids = _ids(tiny)
    reference = _logits(tiny, ids)
    generator = torch.Generator().manual_seed(123)

    def random_basis(position, covariance):
        return random_orthogonal(covariance.matrix.shape[0], generator)

    sliced = slice_model(copy.deepcopy(tiny), ids, None, SliceConfig(sparsity=0.0, tie=tie), basis_fn=random_basis,
                         progress=False)
    assert set(sliced.config.widths) == {tiny.config.hidden_size}
    diff = (_logits(sliced, ids) - reference).abs().max().item()
    print(f"{tiny.config.model_type} random rotation tie={tie}: max |dlogits| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_pca_rotation_at_full_width_is_exact(tiny):
    ids = _ids(tiny, batch=4, length=24)
    sliced = slice_model(copy.deepcopy(tiny), ids, None, SliceConfig(sparsity=0.0), progress=False)
    assert (_logits(sliced, ids) - _logits(tiny, ids)).abs().max().item() <= TOLERANCE


def test_padding_never_enters_the_covariance(tiny):
    """Changing the tokens under the padding mask must not change the sliced model at all."""
    ids = _ids(tiny, batch=4, length=20)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[3, 5:] = 0
    other = ids.clone()
    other[mask == 0] = (other[mask == 0] + 7) % tiny.config.vocab_size
    config = SliceConfig(sparsity=0.25)
    first = slice_model(copy.deepcopy(tiny), ids, mask, config, progress=False)
    second = slice_model(copy.deepcopy(tiny), other, mask, SliceConfig(sparsity=0.25), progress=False)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_every_registered_adapter_has_a_tiny_fixture():
    for model_type, adapter in registered_adapters().items():
        assert adapter.tiny_config, model_type
        assert model_type in adapter.model_types


def test_adapter_contract_is_checked_at_definition():
    with pytest.raises(TypeError, match="tiny_config"):

        class NoFixture(Adapter):  # noqa: F841
            model_types = ("nofixture",)
            embeddings = ("model.embed_tokens",)
            layers = "model.layers"
            final_norm = "model.norm"
            stages = (Stage("mlp", StageKind.MLP, "norm", ("up",), ("down",), ("mlp",)),)

    with pytest.raises(TypeError, match="exactly one"):
        Stage("attn", StageKind.ATTENTION, "norm", ("q",), ("o",), ("a", "b"))


def test_duplicate_registration_is_refused():
    with pytest.raises(TypeError, match="already has adapter"):
        register_adapter(type("Again", (registered_adapters()["llama"],), {}))


def test_unsupported_architecture_lists_supported_ones():
    config = type("Cfg", (), {"model_type": "gpt2"})()
    with pytest.raises(UserInputError, match="llama.*opt|opt.*llama"):
        get_adapter(config)
