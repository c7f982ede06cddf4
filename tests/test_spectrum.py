"""Spectrum-driven widths: exact parameter counts, spectra, budgets."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from slice2deploy.api import SliceConfig, slice_model
from slice2deploy.evaluate import count_parameters
from slice2deploy.pca import pca_basis
from slice2deploy.spectrum import (
    ParameterCost,
    collect_spectra,
    parameter_cost,
    parameter_cost_from_config,
    sliced_parameter_count,
)
from slice2deploy.utils import UserInputError
from slice2deploy.widths import allowed_widths, budget_widths, spectrum_widths, widths_for_target

from .conftest import tiny_model


def _calibration(model, n=4, length=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, length), generator=generator)


def _modelled(model_type):
    """The exact cost models sequential pre-norm blocks; other families are refused (tested in test_architectures)."""
    from slice2deploy.adapters import registered_adapters

    try:
        registered_adapters()[model_type]().check_textbook("spectrum cost")
    except UserInputError:
        pytest.skip(f"{model_type}: the parameter cost does not model its blocks (refused with a clear error)")


def _slice(model, widths, tie="keep"):
    return slice_model(copy.deepcopy(model), _calibration(model), None, SliceConfig(widths=widths, tie=tie),
                       progress=False)


@pytest.mark.parametrize("tie", ["keep", "untie"])
def test_count_is_exact_for_random_widths(model_type, tie):
    _modelled(model_type)
    model = tiny_model(model_type)
    cost = parameter_cost(model, tie)
    assert cost.dense == count_parameters(model)["total"]
    rng = random.Random(hash((model_type, tie)) % 1000)
    for _ in range(3):
        widths = [rng.randint(1, cost.hidden_size) for _ in range(cost.num_positions)]
        sliced = _slice(model, widths, tie)
        assert sliced.config.widths == widths
        assert sliced_parameter_count(cost, widths) == count_parameters(sliced)["total"]
        assert sliced.config.tie_head == cost.tied


@pytest.mark.parametrize("tie", ["keep", "untie"])
def test_cost_from_config_needs_no_weights(model_type, tie):
    _modelled(model_type)
    model = tiny_model(model_type)
    assert parameter_cost_from_config(model.config, tie) == parameter_cost(model, tie)


def test_change_matches_count():
    cost = parameter_cost(tiny_model("llama"))
    widths = [cost.hidden_size] + [16] * (cost.num_positions - 1)
    for position in range(cost.num_positions):
        wider = list(widths)
        wider[position] = 24
        assert cost.change(widths, position, 24) == cost.count(wider) - cost.count(widths)


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_spectra_are_those_slicing_sees_at_full_width(model_type):
    """At full width slicing is exact, so its per-position covariances have the dense (folded) stream's spectra."""
    model = tiny_model(model_type)
    ids = _calibration(model)
    spectra = collect_spectra(model, ids)
    seen: dict[int, torch.Tensor] = {}

    def basis_fn(position, covariance):
        eigenvalues = torch.linalg.eigvalsh(covariance.matrix / covariance.tokens).flip(0)
        seen[position] = eigenvalues.clamp_min(0)
        return pca_basis(covariance.matrix, 0.01)[1]

    d = model.config.hidden_size
    positions = len(spectra)
    slice_model(copy.deepcopy(model), ids, None, SliceConfig(widths=[d] * positions), basis_fn=basis_fn,
                progress=False)
    assert sorted(seen) == list(range(positions))
    for position, spectrum in enumerate(spectra):
        assert spectrum.dtype == torch.float64 and spectrum.shape == (d,)
        assert bool((spectrum[:-1] >= spectrum[1:]).all()), "descending"
        torch.testing.assert_close(spectrum, seen[position], atol=1e-4 * float(spectrum[0]), rtol=1e-3)


def test_padding_never_enters_the_spectra():
    model = tiny_model("llama")
    ids = _calibration(model)
    junk = torch.randint(0, model.config.vocab_size, (ids.shape[0], 5))
    padded = torch.cat([ids, junk], dim=1)  # right padding: causal attention leaves the real tokens unchanged
    mask = torch.cat([torch.ones_like(ids), torch.zeros_like(junk)], dim=1)
    for plain, masked in zip(collect_spectra(model, ids), collect_spectra(model, padded, mask, batch_size=3)):
        torch.testing.assert_close(plain, masked, atol=1e-5 * float(plain[0]), rtol=1e-4)


def _no_step_fits(cost: ParameterCost, widths: list[int], target: int, round_to: int) -> bool:
    choices = allowed_widths(cost.hidden_size, round_to, round_to)
    used = cost.count(widths)
    for position, width in enumerate(widths):
        wider = [w for w in choices if w > width]
        if wider and not (cost.tied and position == 0) and used + cost.change(widths, position, wider[0]) <= target:
            return False
    return True


@pytest.mark.parametrize(("model_type", "tie"), [("llama", "keep"), ("opt", "untie")])
def test_spectrum_widths_respect_the_budget(model_type, tie):
    model = tiny_model(model_type)
    cost = parameter_cost(model, tie)
    spectra = collect_spectra(model, _calibration(model))
    d, round_to = cost.hidden_size, 8
    for fraction in (0.6, 0.8):
        target = int(fraction * cost.dense)
        widths = spectrum_widths(spectra, cost, target, round_to=round_to)
        assert all(w % round_to == 0 or w == d for w in widths)
        assert widths[0] == d if cost.tied else True
        sliced = _slice(model, widths, tie)
        assert count_parameters(sliced)["total"] == cost.count(widths) <= target
        assert _no_step_fits(cost, widths, target, round_to), "as close to the target as the rounding allows"


def test_uniform_widths_for_target_is_the_largest_that_fits():
    model = tiny_model("llama")
    cost = parameter_cost(model)
    target = int(0.8 * cost.dense)
    widths = widths_for_target(cost, target, round_to=8)
    k = widths[-1]
    assert widths == [cost.hidden_size] + [k] * (cost.num_positions - 1)  # tied: embedding position whole
    assert count_parameters(_slice(model, widths))["total"] <= target
    assert cost.count([cost.hidden_size] + [k + 8] * (cost.num_positions - 1)) > target


def test_spectrum_widths_follow_the_spectra():
    """Positions whose variance sits in a few directions get narrower than positions with a flat spectrum."""
    cost = parameter_cost(tiny_model("llama", hidden_size=64, intermediate_size=128))
    d = cost.hidden_size
    flat = torch.ones(d, dtype=torch.float64)
    steep = 0.5 ** torch.arange(d, dtype=torch.float64)
    spectra = [flat if position % 2 else steep for position in range(cost.num_positions)]
    uniform = widths_for_target(cost, int(0.75 * cost.dense))
    widths = spectrum_widths(spectra, cost, cost.count(uniform))
    assert widths != uniform
    assert cost.count(widths) <= cost.count(uniform)
    assert min(widths[1::2]) > max(widths[2::2])  # odd positions are flat, even (after the embedding) steep


def test_impossible_budgets():
    model = tiny_model("llama")
    cost = parameter_cost(model)
    spectra = [torch.ones(cost.hidden_size, dtype=torch.float64)] * cost.num_positions
    with pytest.raises(UserInputError, match="below the smallest"):
        spectrum_widths(spectra, cost, 1000)
    with pytest.raises(UserInputError, match="below the smallest"):
        widths_for_target(cost, 1000)
    with pytest.raises(UserInputError, match="spectra"):
        spectrum_widths(spectra[:-1], cost, cost.dense)
    full = [cost.hidden_size] * cost.num_positions
    assert spectrum_widths(spectra, cost, 10 * cost.dense) == full  # above the full-width count: full widths
    with pytest.raises(UserInputError, match="integers in"):
        cost.count([0] * cost.num_positions)


def test_bulk_variance_ignores_massive_directions():
    """A massive-activation direction makes the plain variance fraction look explained at any width; the bulk
    objective (variance beyond the always-kept top min_width directions) treats such positions like the others."""
    cost = parameter_cost(tiny_model("llama", hidden_size=64, intermediate_size=128))
    d = cost.hidden_size
    bulk = 0.97 ** torch.arange(d, dtype=torch.float64)
    massive = bulk.clone()
    massive[0] = 1e4 * float(bulk.sum())
    spectra = [massive if position % 2 else bulk for position in range(cost.num_positions)]
    target = cost.count(widths_for_target(cost, int(0.75 * cost.dense)))
    plain = spectrum_widths(spectra, cost, target, objective="variance")
    assert max(plain[1::2]) <= 16 and min(plain[2::2]) == d  # massive positions starved, the others full
    balanced = spectrum_widths(spectra, cost, target, objective="bulk-variance")
    assert min(balanced[1::2]) > max(plain[1::2]) and max(balanced[2::2]) < d


@pytest.mark.parametrize("rule", ["uniform", "spectrum"])
def test_plan_widths_then_slice(rule):
    model = tiny_model("opt")
    ids = _calibration(model)
    target = int(0.8 * count_parameters(model)["total"])
    widths = budget_widths(model, target, rule, input_ids=ids, tie="untie")
    sliced = slice_model(copy.deepcopy(model), ids, None, SliceConfig(widths=widths, tie="untie"), progress=False)
    assert count_parameters(sliced)["total"] <= target
    with pytest.raises(UserInputError, match="below the smallest"):
        budget_widths(model, 100, rule, input_ids=ids)
