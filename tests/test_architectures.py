"""The families beyond Llama/OPT (Qwen3, Phi-3, Phi-2, Gemma-3): export, quantization and uniform mode per family.

Exactness (fold, random rotation), slicing shapes, save/load and generation run for every registered adapter in
test_exactness.py / test_slicing.py; this file adds what those do not parametrize over every family.
"""

from __future__ import annotations

import json

import pytest
import torch

from slice2deploy.slicing import SliceConfig, slice_model
from slice2deploy.uniform import uniform_width_for_sparsity, width_error
from slice2deploy.utils import UserInputError

from .conftest import tiny_model, tiny_tokenizer

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

NEW_TYPES = ["qwen3", "phi3", "phi"]
UNIFORM_TYPES = ["qwen3", "phi3"]  # RMSNorm, sequential, no post-norms: one basis gives the source architecture
UNIFORM_REFUSED = {"phi": "needs an RMSNorm architecture"}


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
    common = {"calib": str(tiny_text_file), "calib_samples": 4, "calib_seqlen": 16}
    for mode, extra in (("int8-dynamic", {}), ("int4", {"block_size": 16})):
        manifest = quantize_onnx(tmp_path / "onnx", tmp_path / mode, QuantConfig(mode=mode, **common, **extra))
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
