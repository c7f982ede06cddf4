"""GPTQ INT4: our MatMulNBits packing runs in ONNX Runtime exactly as dequantized, and GPTQ lowers output error."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from exporters.gptq import dequantize, gptq_quantize, probe_grams, replace_with_nbits, rtn_quantize
from exporters.quantize import MATMUL_NBITS_BLOCK_SIZES, QuantConfig
from slice2deploy.utils import UserInputError


def _matmul_model(weight: np.ndarray) -> onnx.ModelProto:
    k, n = weight.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _correlated_inputs(rng: np.random.Generator, tokens: int, k: int) -> np.ndarray:
    """Activations with a decaying spectrum in a random basis (like a residual stream before slicing)."""
    basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
    return ((rng.standard_normal((tokens, k)) * np.geomspace(10.0, 0.1, k)) @ basis.T).astype(np.float32)


@pytest.mark.parametrize("k", [48, 96])  # 3 blocks (odd: a padded zero-point byte) and 6 blocks of 16
def test_nbits_packing_runs_in_onnxruntime_as_dequantized(k):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, 24)).astype(np.float32)
    x = _correlated_inputs(rng, 64, k)
    codes, scales, zeros = gptq_quantize(weight, x.T.astype(np.float64) @ x, block_size=16)
    model = _matmul_model(weight)
    replace_with_nbits(model, "mm", codes, scales, zeros, block_size=16, accuracy_level=None)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    assert "w" not in {init.name for init in model.graph.initializer}  # the float weight is gone
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = x @ dequantize(codes, scales, zeros, 16)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert 0 < np.abs(dequantize(codes, scales, zeros, 16) - weight).max() < 0.5 * np.abs(weight).max()


@pytest.mark.parametrize("block", MATMUL_NBITS_BLOCK_SIZES)
def test_every_accepted_block_size_runs_in_onnxruntime(block):
    """The block sizes QuantConfig admits are the ones ONNX Runtime's kernels run (GPTQ's lazy batch included)."""
    k = 512
    rng = np.random.default_rng(block)
    weight = rng.standard_normal((k, 16)).astype(np.float32)
    x = _correlated_inputs(rng, 32, k)
    QuantConfig(mode="int4", method="gptq", block_size=block)  # admitted
    codes, scales, zeros = gptq_quantize(weight, x.T.astype(np.float64) @ x, block_size=block)
    model = _matmul_model(weight)
    replace_with_nbits(model, "mm", codes, scales, zeros, block_size=block, accuracy_level=None)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = x @ dequantize(codes, scales, zeros, block)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_the_accepted_block_sizes_are_those_onnxruntime_quantizes(bits):
    """ONNX Runtime's blockwise quantizer (MLAS: RTN, HQQ and the 8-bit blocks) takes exactly these sizes."""
    from onnxruntime.capi import _pybind_state as ort_c

    quantize = getattr(ort_c, f"quantize_matmul_{bits}bits")
    k, n = 512, 8
    weight = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    for block in (8, *MATMUL_NBITS_BLOCK_SIZES, 512):
        blocks = k // block
        packed = np.zeros((n, blocks, block * bits // 8), dtype=np.uint8)
        scales = np.zeros(n * blocks, np.float32)
        zeros = np.zeros(n * -(-blocks * bits // 8), np.uint8)
        try:
            quantize(packed, weight, scales, zeros, block, n, k, True)
            runs = True
        except Exception as error:
            assert "block size" in str(error)
            runs = False
        assert runs == (block in MATMUL_NBITS_BLOCK_SIZES), block
        if not runs:
            with pytest.raises(UserInputError, match="16, 32, 64, 128, 256"):
                QuantConfig(mode="int4", block_size=block)


def test_gptq_lowers_the_output_error_below_round_to_nearest():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((128, 32))
    x = _correlated_inputs(rng, 1024, 128).astype(np.float64)
    gram = x.T @ x

    def output_error(codes_scales_zeros) -> float:
        delta = dequantize(*codes_scales_zeros, 32) - weight
        return float(np.trace(delta.T @ gram @ delta) / np.trace(weight.T @ gram @ weight))

    rtn, gptq = output_error(rtn_quantize(weight, 32)), output_error(gptq_quantize(weight, gram, 32))
    assert gptq < 0.5 * rtn, (gptq, rtn)


def test_gptq_with_an_identity_gram_is_round_to_nearest():
    weight = np.random.default_rng(2).standard_normal((64, 8))
    codes, scales, zeros = gptq_quantize(weight, np.eye(64), 16, damp=0.0)
    scaled = weight.T.reshape(8, 4, 16) / scales[..., None]
    np.testing.assert_array_equal(codes.reshape(8, 4, 16), np.clip(np.round(scaled) + zeros[..., None], 0, 15))


def test_gptq_options_are_checked():
    with pytest.raises(UserInputError, match="gptq"):
        QuantConfig(mode="int8-dynamic", method="gptq")
    with pytest.raises(UserInputError, match="gptq_damp"):
        QuantConfig(mode="int4", method="gptq", gptq_damp=0.0)
    with pytest.raises(UserInputError, match="block size"):
        gptq_quantize(np.ones((40, 4)), np.eye(40), 16)


def test_probe_grams_reads_intermediate_tensors_and_weights_the_first_token(tmp_path):
    k = 8
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                               helper.make_node("MatMul", ["r", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None, 4])],
                              [numpy_helper.from_array(np.ones((k, 4), np.float32), "w")])
    source = tmp_path / "src"
    source.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source / "m.onnx"))
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((1, 5, k)).astype(np.float32)} for _ in range(3)]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    grams = probe_grams(source / "m.onnx", ["r"], feeds, scratch, first_token_weight=4.0)
    rows = np.concatenate([np.maximum(f["x"][0], 0) * np.array([[2.0]] + [[1.0]] * 4) for f in feeds])
    np.testing.assert_allclose(grams["r"], rows.T.astype(np.float64) @ rows, rtol=1e-6)
    assert int(grams["__tokens__"]) == 15 and not list(scratch.iterdir())  # the probe graph is cleaned up


def test_gptq_refuses_a_float16_export(tmp_path, tiny_text_file):
    from exporters.onnx import OnnxExportConfig, export_onnx
    from exporters.quantize import quantize_onnx

    from .conftest import tiny_model, tiny_tokenizer

    source = tmp_path / "fp16"
    export_onnx(tiny_model("llama"), tiny_tokenizer(), source, OnnxExportConfig(dtype="float16"))
    config = QuantConfig(mode="int4", method="gptq", block_size=16, calib=str(tiny_text_file), calib_samples=2,
                         calib_seqlen=16, gptq_samples=2, gptq_seqlen=16)
    with pytest.raises(UserInputError, match="float32 export"):
        quantize_onnx(source, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
