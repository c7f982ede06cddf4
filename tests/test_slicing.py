"""Slicing: widths, shapes, honest parameter counts, HF checkpoints, generation."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from slice2deploy.api import SliceConfig, slice_model
from slice2deploy.checkpoint import REMOTE_CODE_FILE, save_sliced
from slice2deploy.evaluate import count_parameters
from slice2deploy.utils import UserInputError
from slice2deploy.widths import uniform_width

from .conftest import tiny_model


def _calibration(model, n=6, length=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n, length), generator=generator)


def _sliced(model_type="llama", sparsity=0.25, **kwargs):
    model = tiny_model(model_type)
    return slice_model(model, _calibration(model), None, SliceConfig(sparsity=sparsity, **kwargs), progress=False)


@pytest.mark.parametrize(("d", "sparsity", "round_to", "expected"), [
    (576, 0.25, 8, 432), (576, 0.1, 8, 512), (576, 0.2, 8, 456), (576, 0.3, 8, 400), (576, 0.0, 8, 576),
    (32, 0.25, 8, 24), (32, 0.9, 8, 8), (4096, 0.3, 128, 2816),
])
def test_uniform_width(d, sparsity, round_to, expected):
    assert uniform_width(d, sparsity, round_to) == expected


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_sparsity_outside_range_is_refused(bad):
    with pytest.raises(UserInputError, match=r"\[0, 1\)"):
        SliceConfig(sparsity=bad)


def test_shapes_follow_the_widths(model_type):
    sliced = _sliced(model_type)
    config = sliced.config
    d, k = config.original_hidden_size, uniform_width(config.original_hidden_size, 0.25)
    first = d if config.tie_head else k  # a tied head keeps the embedding position whole
    assert config.widths == [first] + [k] * (config.positions_per_layer * config.num_hidden_layers)
    layout = config.layout
    dense_layers = tiny_model(model_type).get_submodule(layout["layers"])
    assert sliced.base.get_submodule(layout["embeddings"][0]).weight.shape[1] == first
    for index, layer in enumerate(sliced.base.get_submodule(layout["layers"])):
        widths, branch_widths = config.layer_widths(index), config.layer_branch_widths(index)
        for position, group in enumerate(config.groups):
            for stage in group:
                for path in layout["readers"][stage["name"]]:
                    reader = layer.get_submodule(path)
                    assert reader.weight.shape[1] == widths[position]
                    dense = dense_layers[index].get_submodule(path)
                    assert reader.weight.shape[0] == dense.weight.shape[0], "attention internals must not change"
                branch = branch_widths[layout["stages"].index(stage)]
                for path in layout["writers"][stage["name"]]:
                    assert layer.get_submodule(path).weight.shape[0] == (branch or widths[position + 1])
                if stage["post_norm"]:
                    assert layer.get_submodule(stage["post_norm"]).mix.weight.shape == (widths[position + 1], branch)
            assert widths[position + 1] == k
            assert layer.shortcut(group).weight.shape == (widths[position + 1], widths[position])


@pytest.mark.parametrize("tie", ["keep", "untie"])
def test_parameter_counts_are_honest(tie):
    dense = tiny_model("llama")  # tied embeddings
    dense_count = count_parameters(dense)
    sliced = _sliced("llama", tie=tie)
    counts = count_parameters(sliced)
    cfg = sliced.config
    d, k, L, vocab = cfg.original_hidden_size, cfg.widths[-1], cfg.num_hidden_layers, cfg.vocab_size
    first = cfg.widths[0]
    assert first == (d if tie == "keep" else k)
    assert counts["shortcuts"] == first * k + (2 * L - 1) * k * k
    assert counts["embeddings"] == vocab * first
    assert counts["head"] == (0 if tie == "keep" else vocab * k)
    assert counts["total"] == sum(p.numel() for p in sliced.parameters())
    assert dense_count["embeddings"] == vocab * d and dense_count["head"] == 0  # tied: counted once
    if tie == "keep":
        assert cfg.tie_head and counts["other"] == k * d  # the final norm's mix matrix
    else:
        assert not cfg.tie_head


def test_save_load_gives_identical_logits(tmp_path, model_type):
    sliced = _sliced(model_type)
    ids = _calibration(sliced, n=2, length=10, seed=5)
    with torch.no_grad():
        expected = sliced(input_ids=ids).logits
    save_sliced(sliced, None, tmp_path / "ckpt", {"test": True})
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", REMOTE_CODE_FILE, "slice2deploy_manifest.json"} <= files
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["widths"] == sliced.config.widths and config["base_config"]["model_type"] == model_type
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


@pytest.mark.parametrize("model_type", ["llama", "phi", "gemma3_text"])  # sequential; parallel; post-norms
def test_remote_code_loads_without_slice2deploy(tmp_path, model_type):
    sliced = _sliced(model_type)
    ids = _calibration(sliced, n=1, length=8, seed=3)
    with torch.no_grad():
        expected = sliced(input_ids=ids).logits
    save_sliced(sliced, None, tmp_path / "ckpt", {})
    torch.save({"ids": ids, "logits": expected}, tmp_path / "ref.pt")
    script = f"""
import importlib.abc, sys, torch
class HideProject(importlib.abc.MetaPathFinder):  # as if slice2deploy were not installed
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('slice2deploy', 'exporters'):
            raise ImportError(f'No module named {{name!r}}')
sys.meta_path.insert(0, HideProject())
import transformers as t
ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
try:
    t.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r})
    raise SystemExit('loading without trust_remote_code should have been refused')
except (ValueError, OSError):
    pass
m = t.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'ckpt')!r}, trust_remote_code=True)
assert 'slice2deploy' not in sys.modules
with torch.no_grad():
    out = m(input_ids=ref['ids']).logits
assert torch.equal(out, ref['logits']), (out - ref['logits']).abs().max()
print('remote-code-ok', type(m).__module__)
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "remote-code-ok" in result.stdout


def test_generate_matches_greedy_full_forward(model_type):
    sliced = _sliced(model_type)
    prompt = _calibration(sliced, n=1, length=6, seed=9)
    with torch.no_grad():
        generated = sliced.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                    pad_token_id=0)
        ids = prompt
        for _ in range(12):
            next_id = sliced(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


def test_slicing_reduces_the_error_with_width():
    """More width → closer to the dense model (PCA keeps the important directions first)."""
    dense = tiny_model("llama")
    ids = _calibration(dense, n=8, length=32)
    with torch.no_grad():
        reference = dense(input_ids=ids).logits
    errors = []
    for sparsity in (0.5, 0.25, 0.0):
        sliced = slice_model(copy.deepcopy(dense), ids, None, SliceConfig(sparsity=sparsity), progress=False)
        with torch.no_grad():
            errors.append((sliced(input_ids=ids).logits - reference).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-8


def test_explicit_widths_are_validated():
    model = tiny_model("llama")
    with pytest.raises(UserInputError, match="explicit widths"):
        slice_model(model, _calibration(model), None, SliceConfig(widths=[8, 8]), progress=False)


def test_incoherence_rotation_keeps_the_function_and_spreads_outliers(model_type):
    """A random rotation inside each kept subspace changes coordinates only: logits stay those of plain PCA."""
    model = tiny_model(model_type)
    ids = _calibration(model)
    plain = slice_model(copy.deepcopy(model), ids, None, SliceConfig(sparsity=0.25), progress=False)
    rotated = slice_model(model, ids, None, SliceConfig(sparsity=0.25, incoherence=True), progress=False)
    with torch.no_grad():
        reference, logits = plain(ids).logits, rotated(ids).logits
    assert (reference - logits).abs().max().item() <= 1e-4 * reference.abs().max().item()
    assert rotated.config.slicing["incoherence"] is True
    embed = rotated.config.layout["embeddings"][0]
    a, b = plain.base.get_submodule(embed).weight, rotated.base.get_submodule(embed).weight
    assert not torch.allclose(a, b, atol=1e-3)  # the coordinates did change
    # PCA piles the variance onto the first coordinates; the rotation spreads it (max/mean of column energy)
    energy_plain, energy_rotated = a.pow(2).sum(0), b.pow(2).sum(0)
    assert (energy_rotated.max() / energy_rotated.mean()) < (energy_plain.max() / energy_plain.mean())


def _float_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """Dtypes of the parameters (buffers such as RoPE's inv_freq stay float32 in transformers' own models too)."""
    return {p.dtype for p in model.parameters() if p.is_floating_point()}


@pytest.mark.parametrize("tie", ["keep", "untie"])
@pytest.mark.parametrize("saved", [torch.float32, torch.bfloat16])
def test_checkpoint_loads_and_runs_in_the_dtype_asked_for(tmp_path, model_type, tie, saved):
    """Every parameter follows from_pretrained(dtype=...) and .to()/.half(), whatever dtype the slice was saved in."""
    sliced = _sliced(model_type, tie=tie)
    ids = _calibration(sliced, n=1, length=8, seed=2)
    with torch.no_grad():
        reference = sliced(input_ids=ids).logits
    save_sliced(sliced.to(saved), None, tmp_path / "ckpt", {})
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=dtype)
        assert _float_dtypes(loaded) == {dtype}, (dtype, _float_dtypes(loaded))
        with torch.no_grad():
            logits = loaded(input_ids=ids).logits
        assert logits.dtype == dtype
        scale = reference.abs().max()
        tol = 1e-5 if dtype == saved == torch.float32 else 0.1
        assert ((logits.float() - reference).abs().max() / scale) < tol
    for convert, dtype in ((lambda m: m.half(), torch.float16), (lambda m: m.to(torch.bfloat16), torch.bfloat16),
                           (lambda m: m.float(), torch.float32)):
        converted = convert(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"))
        assert _float_dtypes(converted) == {dtype}
        with torch.no_grad():
            assert converted(input_ids=ids).logits.dtype == dtype
