"""The families beyond Llama/OPT (Qwen3, Phi-3, Phi-2, Gemma-3): export, quantization and uniform mode per family.

Exactness (fold, random rotation), slicing shapes, save/load and generation run for every registered adapter in
test_exactness.py / test_slicing.py; this file adds what those do not parametrize over every family.
"""

from __future__ import annotations

import json

import pytest
import torch

from slice2deploy.api import SliceConfig, slice_model
from slice2deploy.utils import UserInputError
from slice2deploy.widths import uniform_width_for_sparsity, width_error

from .conftest import tiny_model, tiny_tokenizer

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

NEW_TYPES = ["qwen3", "phi3", "phi", "gemma3_text"]
UNIFORM_TYPES = ["qwen3", "phi3"]  # RMSNorm, sequential, no post-norms: one basis gives the source architecture
UNIFORM_REFUSED = {"phi": "needs an RMSNorm architecture", "gemma3_text": "post-norms"}


def _calibration(model, n=6, length=24):
    return torch.randint(0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(0))


def _sliced(model_type: str, **kwargs):
    model = tiny_model(model_type)
    return slice_model(model, _calibration(model), None, SliceConfig(**kwargs), progress=False)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["dense", "sliced"])
@pytest.mark.parametrize("model_type", NEW_TYPES)
def test_onnx_export_passes_its_parity_gate(model_type, kind, tmp_path):
    from exporters.onnx import MANIFEST_FILE, OnnxExportConfig, export_onnx

    model = tiny_model(model_type) if kind == "dense" else _sliced(model_type, sparsity=0.25)
    export_onnx(model, tiny_tokenizer(), tmp_path, OnnxExportConfig())
    recorded = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert recorded["parity"]["passed"]
    worst = max(max(case["max_abs_diff"].values()) for case in recorded["parity"]["cases"].values())
    print(f"{model_type} {kind}: ONNX parity max |diff| {worst:.1e}")
    assert worst <= 1e-4


@pytest.mark.parametrize("model_type", NEW_TYPES)
def test_int8_and_int4_quantization_run(model_type, tmp_path, tiny_text_file):
    from exporters.onnx import OnnxExportConfig, export_onnx
    from exporters.quantize import QuantConfig, quantize_onnx

    sliced = _sliced(model_type, sparsity=0.4, round_to=16)  # widths of 16: one INT4 block
    export_onnx(sliced, tiny_tokenizer(), tmp_path / "onnx", OnnxExportConfig())
    # The floor is the runner's gate, lowered for INT4: random tiny weights in 16-wide blocks lose ~6-10 dB (Gemma's
    # post-norm mixes, γ ≈ 2 here, sit on the residual path). This checks that quantization runs and stays sane.
    common = {"calib": str(tiny_text_file), "calib_samples": 4, "calib_seqlen": 16}
    for mode, extra in (("int8-dynamic", {}), ("int4", {"block_size": 16, "snr_floor_db": 3.0})):
        manifest = quantize_onnx(tmp_path / "onnx", tmp_path / mode, QuantConfig(mode=mode, **common, **extra))
        print(f"{model_type} {mode}: {manifest['quantized_matmuls']} MatMuls, SNR {manifest['logits_snr_db']:.1f} dB")
        assert manifest["quantized_matmuls"] > 0 and manifest["logits_snr_db"] >= manifest["snr_floor_db"]


@pytest.mark.parametrize("model_type", UNIFORM_TYPES)
def test_uniform_mode_gives_the_source_class_at_a_narrower_width(model_type):
    model = tiny_model(model_type)
    width = uniform_width_for_sparsity(model.config, 0.25)
    assert width < model.config.hidden_size and width_error(model.config, width) is None
    sliced = _sliced(model_type, sparsity=0.25, mode="uniform")
    assert type(sliced) is type(model) and sliced.config.hidden_size == width
    with torch.no_grad():
        assert torch.isfinite(sliced(_calibration(model)).logits).all()


@pytest.mark.parametrize("model_type", sorted(UNIFORM_REFUSED))
def test_uniform_mode_is_refused_with_the_reason(model_type):
    with pytest.raises(UserInputError, match=UNIFORM_REFUSED[model_type]):
        _sliced(model_type, sparsity=0.25, mode="uniform")


def test_parallel_blocks_have_one_position_and_one_shortcut_per_layer():
    sliced = _sliced("phi", sparsity=0.25)
    config = sliced.config
    assert config.layout["topology"] == "parallel" and config.positions_per_layer == 1
    assert len(config.widths) == config.num_hidden_layers + 1
    shortcuts = [name for name, _ in sliced.named_modules() if name.endswith("_shortcut")]
    assert len(shortcuts) == config.num_hidden_layers and all(n.endswith("attn_mlp_shortcut") for n in shortcuts)


def test_spectrum_widths_refuse_families_they_do_not_model():
    from slice2deploy.spectrum import parameter_cost

    with pytest.raises(UserInputError, match="parallel blocks"):
        parameter_cost(tiny_model("phi"))


def _count(model) -> int:
    from slice2deploy.evaluate import count_parameters

    return count_parameters(model)["total"]


def test_post_norm_branches_full_is_exact_layout_and_kept_is_smaller():
    """Gemma-3: "full" keeps each post-normed branch at width d (writers unsliced, a k × d mix); "kept" slices it."""
    model = tiny_model("gemma3_text")
    ids = _calibration(model)
    with torch.no_grad():
        reference = model(ids).logits
    d = model.config.hidden_size
    full = _sliced("gemma3_text", sparsity=0.25)
    kept = _sliced("gemma3_text", sparsity=0.25, post_norm_width="kept")
    k = full.config.widths[-1]
    assert full.config.branch_widths == [[d, d]] * model.config.num_hidden_layers
    assert kept.config.branch_widths == [[k, k]] * model.config.num_hidden_layers
    layer = kept.base.model.layers[0]
    assert layer.self_attn.o_proj.weight.shape[0] == k and layer.post_attention_layernorm.mix.weight.shape == (k, k)
    assert _count(kept) < _count(full)
    with torch.no_grad():
        errors = [float((m(ids).logits - reference).norm() / reference.norm()) for m in (full, kept)]
    print(f"gemma3 tiny 25%: relative logit error full {errors[0]:.3f}, kept {errors[1]:.3f}")
    assert all(0 < e < 1 for e in errors)


def test_post_norm_kept_at_full_width_is_exact():
    model = tiny_model("gemma3_text")
    ids = _calibration(model)
    with torch.no_grad():
        reference = model(ids).logits
    sliced = slice_model(model, ids, None, SliceConfig(sparsity=0.0, post_norm_width="kept"), progress=False)
    with torch.no_grad():
        assert (sliced(ids).logits - reference).abs().max().item() <= 1e-4


def test_per_layer_keyword_arguments_reach_sliding_and_full_layers():
    """Tiny Gemma-3 alternates sliding (window 8) and full layers on 24 tokens: calibrating every layer with layer
    0's mask would make the sliced full-attention layer see a window; rotation at full width must stay exact."""
    from slice2deploy.adapters import get_adapter
    from slice2deploy.capture import capture_layer_inputs

    model = tiny_model("gemma3_text")
    ids = _calibration(model)
    batches = capture_layer_inputs(model, get_adapter(model.config), ids, torch.ones_like(ids), 8, torch.device("cpu"))
    recorded = batches[0].layer_kwargs
    assert len(recorded) == model.config.num_hidden_layers
    cos = [kwargs["position_embeddings"][0] for kwargs in recorded]  # local and global rotary bases differ
    assert not torch.equal(cos[0], cos[1]) and torch.equal(cos[0], cos[2])
    masks = [kwargs["attention_mask"] for kwargs in recorded]  # the full layer's may be None (causal SDPA)
    assert masks[1] is None or not torch.equal(masks[0], masks[1])
    assert type(model.model.layers[0]).__name__ == "Gemma3DecoderLayer", "layers must be restored"
