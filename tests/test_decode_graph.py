"""decode.onnx (exporters/decode_graph.py): GroupQueryAttention over a KV cache shared in place, next to model.onnx."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from slice2deploy.api import SliceConfig, slice_model

from .conftest import tiny_model, tiny_tokenizer

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from exporters.decode_graph import DECODE_FILE, SharedKVCache, build_decode_graph, decode_step  # noqa: E402
from exporters.onnx import OnnxExportConfig, export_onnx  # noqa: E402
from exporters.ort import MANIFEST_FILE, OrtCausalLM  # noqa: E402

FP32_LIMIT = 1e-4


@pytest.fixture(scope="module")
def fused_llama(tmp_path_factory):
    """A 25 % sliced tiny Llama (4 query / 2 KV heads) exported with fused attention: (model, directory)."""
    torch.manual_seed(0)
    model = tiny_model("llama")
    calibration = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    model = slice_model(model, calibration, None, SliceConfig(sparsity=0.25), progress=False).eval()
    out = tmp_path_factory.mktemp("decode") / "llama-sliced-fused"
    export_onnx(model, tiny_tokenizer(), out, OnnxExportConfig(attention="fused"))
    return model, out


def _general_steps(runner: OrtCausalLM, prompt: np.ndarray, tokens: np.ndarray) -> list[np.ndarray]:
    """Logits of each token in ``tokens`` (1, n) fed one at a time through model.onnx (explicit mask)."""
    logits, past = runner.forward(prompt, np.ones_like(prompt))
    out = []
    for step in range(tokens.shape[1]):
        length = prompt.shape[1] + step + 1
        logits, past = runner.forward(tokens[:, step : step + 1], np.ones((prompt.shape[0], length), np.int64),
                                      past=past)
        out.append(logits)
    return out


def test_export_writes_a_gated_decode_graph_that_shares_the_weights(fused_llama):
    model, out = fused_llama
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    record = manifest["decode_graph"]
    assert record["written"] and record["file"] == DECODE_FILE and record["gate_passed"]
    assert record["gate_snr_db"] > 80 and record["gate_general_snr_db"] > 80  # float32: the same numbers
    decode = onnx.load(str(out / DECODE_FILE), load_external_data=False)
    ops = [n.op_type for n in decode.graph.node]
    layers = model.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers and "Attention" not in ops and "If" not in ops
    assert not any(n.op_type == "Concat" and any(i.startswith("past_key_values") for i in n.input)
                   for n in decode.graph.node)  # the cache is never copied
    # every weight is a reference into model.onnx.data: the decode graph adds no weight bytes on disk
    big = [t for t in decode.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert {e.value for t in big for e in t.external_data if e.key == "location"} == {"model.onnx.data"}
    assert (out / DECODE_FILE).stat().st_size < (out / "model.onnx").stat().st_size  # fewer nodes, no weights
    assert DECODE_FILE in manifest["files_sha256"]


def test_decode_steps_equal_the_general_graph_and_pytorch(fused_llama):
    model, out = fused_llama
    runner = OrtCausalLM(out)
    assert runner.decode_session is not None
    rng = np.random.default_rng(1)
    prompt = rng.integers(3, model.config.vocab_size, (2, 5))
    tokens = rng.integers(3, model.config.vocab_size, (2, 6))
    expected = _general_steps(runner, prompt, tokens)
    _, past = runner.forward(prompt)
    past = SharedKVCache.from_past(past, capacity=6)  # fills after one step: the others grow it (copy, doubled)
    for step in range(tokens.shape[1]):
        logits, past = runner.forward(tokens[:, step : step + 1], past=past)
        assert isinstance(past, SharedKVCache) and past.length == prompt.shape[1] + step + 1
        np.testing.assert_allclose(logits, expected[step], atol=FP32_LIMIT, rtol=0)
    assert past.capacity >= 11
    # the cache reads like the general graph's list of (key, value): PyTorch's cache after the same tokens
    ids = torch.from_numpy(np.concatenate([prompt, tokens], axis=1))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    for (key, value), layer in zip(past, cache.layers, strict=True):
        np.testing.assert_allclose(key, layer.keys.numpy(), atol=FP32_LIMIT)
        np.testing.assert_allclose(value, layer.values.numpy(), atol=FP32_LIMIT)


def test_stepping_from_an_older_cache_copies_instead_of_overwriting(fused_llama):
    model, out = fused_llama
    runner = OrtCausalLM(out)
    prompt = np.arange(3, 10)[None]
    _, past = runner.forward(prompt)
    a, first = runner.forward(np.array([[11]]), past=past)
    b, second = runner.forward(np.array([[12]]), past=first)
    again, branch = runner.forward(np.array([[13]]), past=first)  # first is no longer the newest: a copy
    assert branch.buffers[0][0] is not second.buffers[0][0]
    b2, _ = runner.forward(np.array([[12]]), past=first)
    np.testing.assert_array_equal(b, b2)  # second's rows were left alone
    reference = _general_steps(runner, prompt, np.array([[11, 13]]))[1]
    np.testing.assert_allclose(again, reference, atol=FP32_LIMIT, rtol=0)


def test_generate_uses_the_decode_graph_and_equals_the_general_graph(fused_llama):
    model, out = fused_llama
    prompt = np.random.default_rng(2).integers(3, model.config.vocab_size, (1, 6))
    with_decode, without = OrtCausalLM(out), OrtCausalLM(out, decode_graph=False)
    assert without.decode_session is None
    calls = []
    session = with_decode.decode_session

    class Counting:  # the real session, with its calls counted
        def __getattr__(self, name):
            if name == "run_with_iobinding":
                calls.append(name)
            return getattr(session, name)

    with_decode.decode_session = Counting()
    generated = with_decode.generate(prompt, max_new_tokens=10)
    assert len(calls) == 9  # every step after the prefill
    np.testing.assert_array_equal(generated, without.generate(prompt, max_new_tokens=10))


def test_no_decode_graph_without_the_pattern_or_when_turned_off(tmp_path):
    model = tiny_model("llama").eval()
    eager = export_onnx(model, None, tmp_path / "eager", OnnxExportConfig())
    assert not eager["decode_graph"]["written"] and "no Attention reads" in eager["decode_graph"]["reason"]
    assert not (tmp_path / "eager" / DECODE_FILE).exists() and OrtCausalLM(tmp_path / "eager").decode_session is None
    off = export_onnx(model, None, tmp_path / "off", OnnxExportConfig(attention="fused", decode_graph=False))
    assert off["decode_graph"] == {"written": False, "reason": "turned off"}
    assert not (tmp_path / "off" / DECODE_FILE).exists() and not (tmp_path / "off" / "model.onnx.data").exists()
    opt = export_onnx(tiny_model("opt").eval(), None, tmp_path / "opt", OnnxExportConfig(attention="fused"))
    assert not opt["decode_graph"]["written"]  # OPT has no rotary: its attention keeps the general graph


def test_build_refuses_a_graph_without_cache_inputs(fused_llama):
    from exporters.decode_graph import DecodeGraphError

    _, out = fused_llama
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    with pytest.raises(DecodeGraphError, match="query heads"):
        build_decode_graph(model, num_heads=3)  # 3 is not a multiple of the 2 KV heads
    del model.graph.input[3:]
    with pytest.raises(DecodeGraphError, match="no past_key_values"):
        build_decode_graph(model, num_heads=4)


def test_decode_step_positions_follow_the_cache_length(fused_llama):
    """A batch of two unpadded rows: both rows' positions are the cache length."""
    model, out = fused_llama
    runner = OrtCausalLM(out)
    prompt = np.random.default_rng(3).integers(3, model.config.vocab_size, (2, 4))
    _, past = runner.forward(prompt)
    cache = SharedKVCache.from_past(past, capacity=16)
    logits, cache = decode_step(runner.decode_session, np.array([[5], [6]]), cache)
    expected, _ = runner.forward(np.array([[5], [6]]), np.ones((2, 5), np.int64), np.array([[4], [4]]), past)
    np.testing.assert_allclose(logits, expected, atol=FP32_LIMIT, rtol=0)


def test_the_gate_refuses_a_wrong_decode_graph(fused_llama, tmp_path, monkeypatch):
    """A decode graph that reads the wrong cache rows (positions shifted by one) is measured, refused and removed."""
    import shutil

    from exporters import decode_graph

    _, out = fused_llama
    shutil.copytree(out, tmp_path / "copy")
    (tmp_path / "copy" / DECODE_FILE).unlink()
    real_step = decode_graph.decode_step

    def off_by_one(session, input_ids, cache):
        cache = cache.ready_for_step()
        cache.length -= 1  # overwrites the last cached row and attends one row short
        cache._state["length"] -= 1
        return real_step(session, input_ids, cache)

    monkeypatch.setattr("exporters.ort.decode_step", off_by_one)
    record = decode_graph.write_decode_graph(tmp_path / "copy")
    assert not record["written"] and not record["gate_passed"] and record["gate_snr_db"] < 30
    assert "below 30.0 dB" in record["reason"] and not (tmp_path / "copy" / DECODE_FILE).exists()
