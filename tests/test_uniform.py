"""Uniform-basis mode: exact at full width, a standard checkpoint that plain transformers loads, honest counts."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from slice2deploy.api import SliceConfig, slice_model
from slice2deploy.checkpoint import REMOTE_CODE_FILE, save_sliced
from slice2deploy.evaluate import count_parameters
from slice2deploy.pca import random_orthogonal
from slice2deploy.uniform import Pooling
from slice2deploy.utils import UserInputError

from .conftest import tiny_model, tiny_tokenizer

RMS_TYPES = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def _ids(model, n=6, length=24, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(seed))


def _max_rel_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("model_type", RMS_TYPES)
def test_full_width_with_a_random_basis_is_exact(model_type):
    model = tiny_model(model_type)
    ids = _ids(model)
    with torch.no_grad():
        reference = model(ids).logits
    d = model.config.hidden_size
    rotation = random_orthogonal(d, torch.Generator().manual_seed(1))
    sliced = slice_model(model, ids, None, SliceConfig(mode="uniform", sparsity=0.0),
                         basis_fn=lambda covariance: rotation, progress=False)
    assert type(sliced).__name__ == f"{type(model).__name__}" and sliced.config.hidden_size == d
    with torch.no_grad():
        logits = sliced(ids).logits
    assert _max_rel_diff(reference, logits) <= 1e-4


@pytest.mark.parametrize("pooling", [p.value for p in Pooling])
def test_sliced_widths_norms_and_counts(pooling):
    model = tiny_model("llama")
    dense = count_parameters(model)["total"]
    ids = _ids(model)
    sliced = slice_model(model, ids, None, SliceConfig(mode="uniform", sparsity=0.25, pooling=pooling),
                         progress=False)
    config = sliced.config
    assert config.hidden_size == 24 and config.head_dim == 8 and config.num_attention_heads == 4
    assert config.tie_word_embeddings is False
    assert config.rms_norm_eps == pytest.approx(1e-6 * 32 / 24)
    assert torch.allclose(sliced.model.norm.weight, torch.full((24,), (32 / 24) ** 0.5))
    assert sliced.model.embed_tokens.weight.shape == (96, 24) and sliced.lm_head.weight.shape == (96, 24)
    assert sliced.model.embed_tokens.weight.data_ptr() != sliced.lm_head.weight.data_ptr()
    counts = count_parameters(sliced)["total"]
    assert counts == sum(p.numel() for p in sliced.parameters())
    assert counts != dense
    assert config.slice2deploy["mode"] == "uniform" and config.slice2deploy["pooling"] == pooling
    assert 0 < config.slice2deploy["explained_variance"] <= 1
    with torch.no_grad():
        assert torch.isfinite(sliced(ids).logits).all()


def test_layernorm_models_are_refused():
    model = tiny_model("opt")
    with pytest.raises(UserInputError, match="RMSNorm architecture"):
        slice_model(model, _ids(model), None, SliceConfig(mode="uniform", sparsity=0.25), progress=False)


def test_bad_mode_and_widths():
    with pytest.raises(UserInputError, match="per-layer"):
        SliceConfig(mode="global")
    with pytest.raises(UserInputError, match="single width"):
        SliceConfig(mode="uniform", widths=[16, 24])


def test_checkpoint_loads_with_plain_transformers(tmp_path):
    """The saved model is a standard LlamaForCausalLM: a fresh interpreter loads it without slice2deploy."""
    model = tiny_model("llama")
    ids = _ids(model)
    sliced = slice_model(model, ids, None, SliceConfig(mode="uniform", sparsity=0.25), progress=False)
    out = tmp_path / "uniform"
    save_sliced(sliced, tiny_tokenizer(), out, {"note": "test"})
    assert not (out / REMOTE_CODE_FILE).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    with torch.no_grad():
        expected = sliced(ids[:2]).logits
    torch.save(ids[:2].clone(), tmp_path / "ids.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        "assert not any(name.startswith('slice2deploy') for name in sys.modules), 'slice2deploy was imported'\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
        "with torch.no_grad():\n"
        f"    torch.save(model(ids).logits, {str(tmp_path / 'logits.pt')!r})\n"
        "print(type(model).__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "LlamaForCausalLM"
    logits = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert _max_rel_diff(expected, logits) <= 1e-5


def test_uniform_beats_nothing_kept_and_keeps_generation():
    """Sanity on the tiny model: greedy generation runs with the KV cache of the standard class."""
    model = tiny_model("qwen2")
    reference = copy.deepcopy(model)
    ids = _ids(model)
    sliced = slice_model(model, ids, None, SliceConfig(mode="uniform", sparsity=0.0), progress=False)
    with torch.no_grad():
        out = sliced.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
        expected = reference.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
    assert torch.equal(out, expected)  # full width PCA: the same function, the same greedy tokens


def _cli_slice(tiny_llama_dir, tiny_text_file, out, *extra):
    from slice2deploy.cli import main

    return main(["slice", str(tiny_llama_dir), "-o", str(out), "--calib", str(tiny_text_file), "--calib-samples", "4",
                 "--calib-seqlen", "16", *extra])


def test_cli_uniform_mode_under_a_parameter_budget(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    from transformers import AutoConfig

    from slice2deploy.cli import main
    from slice2deploy.widths import uniform_parameter_count

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    target = (uniform_parameter_count(config, 24) + uniform_parameter_count(config, 16)) // 2  # between two widths
    assert _cli_slice(tiny_llama_dir, tiny_text_file, tmp_path / "u", "--mode", "uniform", "--target-params",
                      str(target), "--round-to", "8") == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "u"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["widths"] == [16] and info["parameters"] == uniform_parameter_count(config, 16) <= target
    assert info["slicing"]["mode"] == "uniform" and info["tie_head"] is False


def test_cli_spectrum_widths_respect_the_budget(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    from slice2deploy.cli import main

    assert _cli_slice(tiny_llama_dir, tiny_text_file, tmp_path / "uni", "--sparsity", "0.25") == 0
    assert _cli_slice(tiny_llama_dir, tiny_text_file, tmp_path / "spec", "--sparsity", "0.25", "--widths",
                      "spectrum") == 0
    capsys.readouterr()
    infos = []
    for name in ("uni", "spec"):
        assert main(["info", str(tmp_path / name), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    uniform, spectrum = infos
    assert spectrum["parameters"] <= uniform["parameters"]  # the same budget, redistributed
    assert spectrum["slicing"]["extra"]["width_plan"]["widths"] == "spectrum"
    assert _cli_slice(tiny_llama_dir, tiny_text_file, tmp_path / "bad", "--mode", "uniform", "--sparsity", "0.25",
                      "--widths", "spectrum") == 2
    assert "--mode per-layer" in capsys.readouterr().err
    assert _cli_slice(tiny_llama_dir, tiny_text_file, tmp_path / "tiny", "--target-params", "10") == 2
    assert "below the smallest" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", RMS_TYPES)
def test_refit_at_full_width_keeps_the_function(model_type):
    """With nothing deleted every regression has an exact solution (the rotated weights): refit changes nothing."""
    model = tiny_model(model_type)
    ids = _ids(model, n=8)
    with torch.no_grad():
        reference = model(ids).logits
    rotation = random_orthogonal(model.config.hidden_size, torch.Generator().manual_seed(1))
    sliced = slice_model(model, ids, None, SliceConfig(mode="uniform", sparsity=0.0, refit=1e-9),
                         basis_fn=lambda covariance: rotation, progress=False)
    refit = sliced.config.slice2deploy["refit_result"]
    assert refit["ridge"] == 1e-9 and refit["final_residual_relative_error"] < 1e-5
    with torch.no_grad():
        logits = sliced(ids).logits
    assert _max_rel_diff(reference, logits) <= 1e-4


@pytest.mark.parametrize("model_type", RMS_TYPES)
def test_refit_at_full_width_keeps_the_function_with_the_default_ridge_and_few_tokens(model_type):
    """The statement holds outside the test's corner: default ridge, calibration smaller than the regressions,
    logits compared on tokens the refit never saw; the underdetermined fit is warned about."""
    model = tiny_model(model_type)
    calibration, held_out = _ids(model, n=2)[:, :8], _ids(model, n=4, seed=7)
    with torch.no_grad():
        reference = model(held_out).logits
    with pytest.warns(UserWarning, match="underdetermined"):
        sliced = slice_model(model, calibration, None, SliceConfig(mode="uniform", sparsity=0.0, refit=1e-3),
                             progress=False)
    with torch.no_grad():
        assert _max_rel_diff(reference, sliced(held_out).logits) <= 1e-4


def _logit_error(model, reference, ids) -> float:
    with torch.no_grad():
        expected = reference(ids).logits
        return float((model(ids).logits - expected).norm() / expected.norm())


def test_refit_moves_the_sliced_model_towards_the_dense_one():
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    ids = _ids(model, n=16)
    plain = slice_model(copy.deepcopy(model), ids, None, SliceConfig(mode="uniform", sparsity=0.25), progress=False)
    refit = slice_model(model, ids, None, SliceConfig(mode="uniform", sparsity=0.25, refit=1e-3), progress=False)
    assert refit.config.hidden_size == plain.config.hidden_size == 24
    assert count_parameters(refit)["total"] == count_parameters(plain)["total"]
    assert _logit_error(refit, reference, ids) < 0.95 * _logit_error(plain, reference, ids)


def test_refit_is_a_uniform_mode_option():
    with pytest.raises(UserInputError, match="uniform-mode option"):
        SliceConfig(refit=1e-3)
    with pytest.raises(UserInputError, match="ridge must be > 0"):
        SliceConfig(mode="uniform", refit=0.0)


def test_cli_refit_writes_a_standard_checkpoint(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from slice2deploy.cli import main

    assert _cli_slice(tiny_llama_dir, tiny_text_file, tmp_path / "r", "--mode", "uniform", "--sparsity", "0.25",
                      "--refit") == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "r"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["slicing"]["refit"] == 1e-3 and info["slicing"]["refit_result"]["ridge"] == 1e-3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "r")
    assert type(loaded).__name__ == "LlamaForCausalLM" and loaded.config.hidden_size == 24
    assert _cli_slice(tiny_llama_dir, tiny_text_file, tmp_path / "bad", "--sparsity", "0.25", "--refit") == 2
    assert "uniform-mode option" in capsys.readouterr().err


def test_incoherence_rotation_in_uniform_mode_keeps_the_function():
    """The uniform norms' weight is one scalar, so rotating the kept basis leaves the sliced function unchanged."""
    model = tiny_model("llama")
    ids = _ids(model)
    plain = slice_model(copy.deepcopy(model), ids, None, SliceConfig(mode="uniform", sparsity=0.25), progress=False)
    rotated = slice_model(model, ids, None, SliceConfig(mode="uniform", sparsity=0.25, incoherence=True,
                                                        rotation_seed=3), progress=False)
    assert rotated.config.slice2deploy["incoherence"] is True and rotated.config.slice2deploy["rotation_seed"] == 3
    assert not torch.allclose(rotated.model.embed_tokens.weight, plain.model.embed_tokens.weight)
    with torch.no_grad():
        assert _max_rel_diff(plain(ids).logits, rotated(ids).logits) <= 1e-4


def test_widths_follow_what_the_config_class_accepts(tmp_path):
    """LlamaConfig refuses hidden sizes that are not a multiple of the head count (it would not save)."""
    from slice2deploy.widths import uniform_width_for_target, valid_widths, width_error

    model = tiny_model("llama", hidden_size=36, num_attention_heads=3, num_key_value_heads=1, head_dim=8)
    assert width_error(model.config, 24) is None and "multiple" in width_error(model.config, 16)
    assert valid_widths(model.config, 8) == [36, 24]
    ids = _ids(model)
    sliced = slice_model(copy.deepcopy(model), ids, None, SliceConfig(mode="uniform", sparsity=0.4, round_to=4),
                         progress=False)
    assert sliced.config.hidden_size == 12  # (1 - 0.4) * 36 = 21.6 -> 20 (round-to 4) -> 12 (a multiple of 3 and 4)
    save_sliced(sliced, None, tmp_path / "s", {"test": True})
    with pytest.raises(UserInputError, match="refuses hidden_size 16"):
        slice_model(copy.deepcopy(model), ids, None, SliceConfig(mode="uniform", widths=[16]), progress=False)
    assert uniform_width_for_target(model.config, 10**9, 4) == 36


@pytest.mark.gpu
def test_uniform_refit_on_a_gpu_stays_on_it():
    """Found on an H200: the standard model was built on the CPU, so refit fed CPU tokens to the CUDA teacher."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_model("llama").to("cuda")
    ids = _ids(model, n=8)
    sliced = slice_model(model, ids, None, SliceConfig(mode="uniform", sparsity=0.25, refit=1e-3, device="cuda"),
                         progress=False)
    assert next(sliced.parameters()).device.type == "cuda"
    with torch.no_grad():
        assert torch.isfinite(sliced(ids.to("cuda")).logits).all()


def test_uniform_slice_stays_on_the_source_device():
    model = tiny_model("llama")
    sliced = slice_model(model, _ids(model), None, SliceConfig(mode="uniform", sparsity=0.25), progress=False)
    assert {p.device for p in sliced.parameters()} == {torch.device("cpu")}
