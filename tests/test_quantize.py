"""INT8 / INT4 quantization of exported tiny models: it runs, keeps an SNR floor, and refuses bad input."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from exporters.onnx import OnnxExportConfig, export_onnx
from exporters.quantize import QUANT_MANIFEST, QuantConfig, QuantQualityError, quantize_onnx
from slice2deploy.api import SliceConfig, slice_model
from slice2deploy.utils import UserInputError

from .conftest import tiny_model, tiny_tokenizer


def _export(model, path):
    export_onnx(model, tiny_tokenizer(), path, OnnxExportConfig())
    return path


@pytest.fixture(scope="module")
def dense_onnx(tmp_path_factory):
    return _export(tiny_model("llama"), tmp_path_factory.mktemp("q") / "dense")


@pytest.fixture(scope="module")
def sliced_onnx(tmp_path_factory):
    """A tiny sliced Llama whose widths (24) are not a multiple of 16 or 32."""
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    sliced = slice_model(model, ids, None, SliceConfig(sparsity=0.25), progress=False)
    return _export(sliced, tmp_path_factory.mktemp("q") / "sliced")


def _config(text, **kwargs):
    return QuantConfig(calib=str(text), calib_samples=4, calib_seqlen=16, gptq_samples=8, gptq_seqlen=16, **kwargs)


def _op_types(path):
    return [node.op_type for node in onnx.load(str(path / "model.onnx")).graph.node]


def test_int8_static_qoperator_format(dense_onnx, tiny_text_file, tmp_path):
    manifest = quantize_onnx(dense_onnx, tmp_path / "qop", _config(tiny_text_file, mode="int8-static",
                                                                 static_format="qoperator"))
    ops = _op_types(tmp_path / "qop")
    assert ops.count("QLinearMatMul") == manifest["quantized_matmuls"] == 14 and "DequantizeLinear" in ops
    assert manifest["logits_snr_db"] >= manifest["snr_floor_db"]
    with pytest.raises(UserInputError, match="static_format"):
        QuantConfig(mode="int8-static", static_format="qint")


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static"])
def test_int8_modes(dense_onnx, tiny_text_file, tmp_path, mode):
    manifest = quantize_onnx(dense_onnx, tmp_path / mode, _config(tiny_text_file, mode=mode))
    assert manifest["logits_snr_db"] >= manifest["snr_floor_db"] > 0
    assert manifest["quantized_matmuls"] == 2 * 7  # q k v o gate up down per layer; the (tied) head stays float
    assert manifest["unquantized"][0]["role"] == "head"
    assert json.loads((tmp_path / mode / QUANT_MANIFEST).read_text())["config"]["mode"] == mode
    assert (tmp_path / mode / "tokenizer.json").exists() and (tmp_path / mode / "config.json").exists()
    ops = _op_types(tmp_path / mode)
    graph = onnx.load(str(tmp_path / mode / "model.onnx")).graph
    assert {n.domain for n in graph.node if n.op_type == "QuantizeLinear"} <= {""}  # opset 18: standard Q/DQ
    assert ("MatMulInteger" in ops or "DynamicQuantizeLinear" in ops) if mode == "int8-dynamic" else \
        ("QuantizeLinear" in ops)
    graph = onnx.load(str(tmp_path / mode / "model.onnx")).graph
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:  # attention-score MatMuls (two activations) must stay float
        if node.op_type == "MatMul" and "self_attn/MatMul" in node.name:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)


@pytest.fixture(scope="module")
def fused_onnx(tmp_path_factory):
    """The tiny Llama with attention as ONNX Attention nodes (opset 23)."""
    out = tmp_path_factory.mktemp("q") / "fused"
    export_onnx(tiny_model("llama"), tiny_tokenizer(), out, OnnxExportConfig(attention="fused"))
    return out


@pytest.mark.parametrize(("mode", "options"), [
    ("int8-dynamic", {}), ("int8-static", {}), ("int8-static", {"static_format": "qoperator"}),
    ("int4", {"method": "gptq", "block_size": 16})])
def test_every_mode_on_a_fused_attention_graph(fused_onnx, tiny_text_file, tmp_path, mode, options):
    """Every mode loads and keeps its floor on the opset-23 graph. QDQ there uses com.microsoft Q/DQ: with the
    standard (opset 21+) ones ONNX Runtime's QDQ propagation + S8->U8 passes produce a graph it refuses to load."""
    manifest = quantize_onnx(fused_onnx, tmp_path / "q", _config(tiny_text_file, mode=mode, **options))
    assert manifest["quantized_matmuls"] == 14 and manifest["logits_snr_db"] >= manifest["snr_floor_db"]
    graph = onnx.load(str(tmp_path / "q" / "model.onnx")).graph
    layers = [node for node in graph.node if node.op_type == "If"]  # causal blocks | one node, per layer
    assert len(layers) == 2 and all(n.op_type == "Attention" for layer in layers for a in layer.attribute
                                    if a.name == "else_branch" for n in a.g.node)
    quantizers = {node.domain or "ai.onnx" for node in graph.node if node.op_type == "QuantizeLinear"}
    if mode == "int8-static" and not options:
        assert quantizers == {"com.microsoft"}
    decode = manifest["decode_graph"]  # the quantized graph gets its own decode graph, gated against it
    assert decode["written"] and decode["gate_passed"], decode
    assert decode["gate_snr_db"] >= min(30, decode["gate_general_snr_db"] - 3)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "q" / "decode.onnx")).graph.node}
    assert "GroupQueryAttention" in ops and "If" not in ops


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_int4(dense_onnx, tiny_text_file, tmp_path, method):
    manifest = quantize_onnx(dense_onnx, tmp_path / method, _config(tiny_text_file, mode="int4", block_size=16,
                                                                    method=method))
    assert _op_types(tmp_path / method).count("MatMulNBits") == manifest["quantized_matmuls"] == 14
    assert manifest["logits_snr_db"] >= manifest["snr_floor_db"]


def test_int4_needs_widths_divisible_by_the_block(sliced_onnx, tiny_text_file, tmp_path):
    with pytest.raises(UserInputError, match="--round-to 16"):
        quantize_onnx(sliced_onnx, tmp_path / "o", _config(tiny_text_file, mode="int4", block_size=16))
    assert not (tmp_path / "o").exists()


def test_int4_on_a_sliced_model_rounded_to_the_block(tiny_text_file, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    sliced = slice_model(model, ids, None, SliceConfig(sparsity=0.4, round_to=16), progress=False)
    assert set(sliced.config.widths[1:]) == {16}
    source = _export(sliced, tmp_path / "sliced16")
    manifest = quantize_onnx(source, tmp_path / "int4", _config(tiny_text_file, mode="int4", block_size=16,
                                                                shortcuts="same"))
    assert manifest["quantized_by_role"]["shortcut"] == 4 and manifest["quantized_by_role"]["mix"] == 1
    no_shortcuts = quantize_onnx(source, tmp_path / "int4b", _config(tiny_text_file, mode="int4", block_size=16,
                                                                     shortcuts="float"))
    assert "shortcut" not in no_shortcuts["quantized_by_role"] and no_shortcuts["weight_int8_matmuls"] == 0
    assert sum(u["role"] == "shortcut" for u in no_shortcuts["unquantized"]) == 4
    # the graph agrees with the manifest: shortcuts really are still float MatMuls (onnxruntime's include list is a
    # union with "every MatMul", so a plan is only honoured when the rest is excluded)
    graph = onnx.load(str(tmp_path / "int4b" / "model.onnx")).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == no_shortcuts["quantized_matmuls"]
    assert sum(n.op_type == "MatMul" and "_shortcut/" in n.name for n in graph.node) == 4
    # default: shortcuts as weight-only 8-bit blocks, every other weight MatMul as 4-bit blocks
    default = quantize_onnx(source, tmp_path / "int4c", _config(tiny_text_file, mode="int4", block_size=16))
    assert default["weight_int8_by_role"] == {"shortcut": 4} and "shortcut" not in default["quantized_by_role"]
    nbits = [n for n in onnx.load(str(tmp_path / "int4c" / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nbits}
    assert sorted(bits.values()).count(8) == 4 and sorted(bits.values()).count(4) == default["quantized_matmuls"]
    assert all(b == 8 for name, b in bits.items() if "_shortcut/" in name)
    assert default["logits_snr_db"] > no_shortcuts["logits_snr_db"] - 1.0  # 8-bit shortcuts cost little
    assert not [p for p in (tmp_path / "int4c").iterdir() if p.name.startswith(".stage")]


def test_int8_dynamic_with_weight_only_int8_shortcuts(tiny_text_file, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    sliced = slice_model(model, ids, None, SliceConfig(sparsity=0.4, round_to=16), progress=False)
    source = _export(sliced, tmp_path / "sliced16")
    manifest = quantize_onnx(source, tmp_path / "int8", _config(tiny_text_file, mode="int8-dynamic", block_size=16))
    assert manifest["weight_int8_by_role"] == {"shortcut": 4}
    ops = _op_types(tmp_path / "int8")
    assert ops.count("MatMulNBits") == 4 and ops.count("MatMulInteger") == manifest["quantized_matmuls"]


def test_quality_floor_rejects_and_writes_nothing(dense_onnx, tiny_text_file, tmp_path):
    with pytest.raises(QuantQualityError, match="below the floor"):
        quantize_onnx(dense_onnx, tmp_path / "o", _config(tiny_text_file, mode="int8-dynamic", snr_floor_db=500))
    assert not (tmp_path / "o").exists()


def test_bad_inputs(dense_onnx, tiny_text_file, tmp_path):
    with pytest.raises(UserInputError, match="int8-dynamic"):
        QuantConfig(mode="int3")
    for bad in (8, 24, 512):
        with pytest.raises(UserInputError, match="16, 32, 64, 128, 256"):
            QuantConfig(mode="int4", block_size=bad)
    with pytest.raises(UserInputError, match="differ from the input"):
        quantize_onnx(dense_onnx, dense_onnx, _config(tiny_text_file))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError):
        quantize_onnx(tmp_path / "empty", tmp_path / "o", _config(tiny_text_file))


def test_cli_quantize_then_info_and_eval(dense_onnx, tiny_text_file, tmp_path, capsys):
    from slice2deploy.cli import main

    out = tmp_path / "cli-int8"
    assert main(["quantize", str(dense_onnx), "-o", str(out), "--mode", "int8-dynamic", "--calib",
                 str(tiny_text_file), "--calib-samples", "2", "--calib-seqlen", "16", "--smooth-alpha", "0.8"]) == 0
    printed = capsys.readouterr().out
    assert "MatMuls quantized" in printed and "SmoothQuant (alpha 0.8): 12 MatMuls in 6 groups smoothed" in printed
    assert json.loads((out / QUANT_MANIFEST).read_text())["config"]["smooth_alpha"] == 0.8
    assert main(["info", str(out)]) == 0
    assert "onnx" in capsys.readouterr().out
    assert main(["eval", str(out), "--data", str(tiny_text_file), "--seqlen", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["backend"] == "onnxruntime" and result["perplexity"] > 1
    assert main(["quantize", str(dense_onnx), "-o", str(tmp_path / "x"), "--mode", "int4", "--block-size", "24"]) == 2
    assert "choose one of 16, 32, 64, 128, 256" in capsys.readouterr().err
    gptq = tmp_path / "cli-gptq"
    assert main(["quantize", str(dense_onnx), "-o", str(gptq), "--mode", "int4", "--block-size", "16", "--method",
                 "gptq", "--calib", str(tiny_text_file), "--gptq-samples", "3", "--gptq-seqlen", "16"]) == 0
    config = json.loads((gptq / QUANT_MANIFEST).read_text())["config"]
    assert (config["method"], config["gptq_samples"], config["gptq_seqlen"]) == ("gptq", 3, 16)
    assert main(["quantize", str(dense_onnx), "-o", str(tmp_path / "y"), "--mode", "int8-dynamic", "--method",
                 "gptq"]) == 2
    assert "INT4 weight quantizer" in capsys.readouterr().err


def test_keep_float_and_gemm_handling(tiny_text_file, tmp_path):
    source = _export(tiny_model("opt"), tmp_path / "opt")
    manifest = quantize_onnx(source, tmp_path / "int8", _config(tiny_text_file, mode="int8-dynamic",
                                                                keep_float=("fc2",)))
    kept = [u for u in manifest["unquantized"] if u["reason"].startswith("kept in float")]
    assert len(kept) == 2 and all("fc2" in u["node"] for u in kept)
    int4 = quantize_onnx(source, tmp_path / "int4", _config(tiny_text_file, mode="int4", block_size=16))
    gemms = [u for u in int4["unquantized"] if "MatMul nodes only" in u["reason"]]
    source_gemms = [n for n in onnx.load(str(source / "model.onnx")).graph.node if n.op_type == "Gemm"]
    assert len(gemms) == len(source_gemms) > 0  # counted and reported, never silently skipped
    assert _op_types(tmp_path / "int4").count("MatMulNBits") == int4["quantized_matmuls"] > 0


def test_mixed_precision_and_float16_embedding(dense_onnx, tiny_text_file, tmp_path):
    out = tmp_path / "mixed"
    manifest = quantize_onnx(dense_onnx, out, _config(tiny_text_file, mode="int4", block_size=16,
                                                      weight_int8=("down_proj",), embedding_dtype="float16"))
    graph = onnx.load(str(out / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nbits}
    assert [b for name, b in bits.items() if "down_proj" in name] == [8, 8]
    assert sum(b == 4 for b in bits.values()) == manifest["quantized_matmuls"] == 12
    assert manifest["weight_int8_by_role"] == {"linear": 2}
    table = manifest["embedding_float16"]
    assert table and any(n.op_type == "Cast" and n.output[0] == table for n in graph.node)
    stored = {t.name: t.data_type for t in graph.initializer}
    assert stored[f"{table}.float16"] == onnx.TensorProto.FLOAT16 and table not in stored
    plain = quantize_onnx(dense_onnx, tmp_path / "plain", _config(tiny_text_file, mode="int4", block_size=16))
    assert manifest["size_bytes"]["quantized"] < plain["size_bytes"]["quantized"]
    assert manifest["logits_snr_db"] >= plain["logits_snr_db"] - 0.5  # fp16 table, 8-bit down_proj: no worse
    assert not [p for p in out.iterdir() if p.name.startswith(".stage")]


def test_a_tied_head_is_untied_and_stored_as_8_bit_blocks(dense_onnx, tiny_text_file, tmp_path):
    """--quantize-head on a tied head: the head reads its own 8-bit copy, the Gather keeps the (float16) table."""
    from exporters.graph_io import HEAD_WEIGHT
    from slice2deploy.utils import sha256_file

    before = sha256_file(dense_onnx / "model.onnx")
    kwargs = {"mode": "int4", "block_size": 16, "weight_int8": ("down_proj", "lm_head"), "embedding_dtype": "float16"}
    manifest = quantize_onnx(dense_onnx, tmp_path / "head8", _config(tiny_text_file, quantize_head=True, **kwargs))
    graph = onnx.load(str(tmp_path / "head8" / "model.onnx")).graph
    head = next(n for n in graph.node if "lm_head" in n.name)
    assert head.op_type == "MatMulNBits" and next(a.i for a in head.attribute if a.name == "bits") == 8
    assert head.input[1].startswith(HEAD_WEIGHT)
    assert manifest["head_untied"] and manifest["weight_int8_by_role"] == {"linear": 2, "head": 1}
    assert manifest["source"]["model_sha256"] == before == sha256_file(dense_onnx / "model.onnx")  # input untouched
    gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == manifest["embedding_float16"])
    assert gather is not None and not [n for n in graph.node if n.op_type == "Transpose" and "embed" in n.input[0]]
    float_head = quantize_onnx(dense_onnx, tmp_path / "head32", _config(tiny_text_file, **kwargs))
    assert not float_head["head_untied"]
    assert manifest["logits_snr_db"] >= float_head["logits_snr_db"] - 1.0  # 8-bit head blocks: close to float


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
def test_accuracy_level_is_stamped_on_every_nbits_node(dense_onnx, tiny_text_file, tmp_path, method):
    manifest = quantize_onnx(dense_onnx, tmp_path / method, _config(tiny_text_file, mode="int4", block_size=16,
                                                                    method=method, accuracy_level=4,
                                                                    weight_int8=("down_proj",)))
    nodes = [n for n in onnx.load(str(tmp_path / method / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 14 and manifest["config"]["accuracy_level"] == 4
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nodes)
    with pytest.raises(UserInputError, match="accuracy_level"):
        QuantConfig(accuracy_level=7)


def _outlier_llama():
    """A tiny Llama whose norm weights carry a few outlier channels (like SmolLM2's): per-tensor INT8 suffers."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 100.0
            layer.post_attention_layernorm.weight[[5]] *= 100.0
    return model


@pytest.fixture(scope="module")
def outlier_onnx(tmp_path_factory):
    return _export(_outlier_llama(), tmp_path_factory.mktemp("q") / "outlier")


def test_smoothing_keeps_the_float_function_and_changes_the_weights(outlier_onnx, tiny_text_file, tmp_path):
    import numpy as np
    from onnx import numpy_helper

    from exporters.ort import OrtCausalLM
    from exporters.quantize import _calibration_inputs, weight_matmuls
    from exporters.smooth import channel_maxima, smooth_initializers, smoothable_groups

    model = onnx.load(str(outlier_onnx / "model.onnx"))
    groups = smoothable_groups(model, {mm.node for mm in weight_matmuls(model)})
    # per layer: q/k/v read the input norm, gate/up the post-attention norm, down_proj the MLP product (scaled
    # through up_proj's columns); the final norm feeds the tied head (not a smoothable weight)
    assert sorted(len(g.matmuls) for g in groups) == [1, 1, 2, 2, 3, 3]
    runner = OrtCausalLM(outlier_onnx)
    samples = _calibration_inputs(runner, _config(tiny_text_file))
    feeds = [runner._feeds(ids, None, None, None) for ids in samples]
    maxima = channel_maxima(outlier_onnx / "model.onnx", [g.activation for g in groups], feeds, tmp_path)
    assert not list(tmp_path.iterdir())  # the probe graph is deleted
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    summary = smooth_initializers(model, groups, maxima, alpha=0.8)
    assert all(s["smoothed_max_ratio"] < s["activation_max_ratio"] for s in summary.values())
    after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    changed = [g.source for g in groups if not np.allclose(before[g.source], after[g.source])]
    assert len(changed) == len(groups)
    (tmp_path / "smoothed").mkdir()
    for item in outlier_onnx.iterdir():
        if item.name != "model.onnx":
            (tmp_path / "smoothed" / item.name).write_bytes(item.read_bytes())
    onnx.save_model(model, str(tmp_path / "smoothed" / "model.onnx"))
    smoothed = OrtCausalLM(tmp_path / "smoothed")
    for ids in samples[:2]:
        reference, result = runner.forward(ids)[0], smoothed.forward(ids)[0]
        assert np.abs(reference - result).max() <= 1e-4 * max(1.0, np.abs(reference).max())


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-static"])
def test_smoothing_raises_int8_quality_on_outlier_channels(outlier_onnx, tiny_text_file, tmp_path, mode):
    common = {"mode": mode, "snr_floor_db": 0, "keep_float": ("down_proj",)}  # the outliers are in the norms
    plain = quantize_onnx(outlier_onnx, tmp_path / "plain", _config(tiny_text_file, **common))
    smooth = quantize_onnx(outlier_onnx, tmp_path / "smooth", _config(tiny_text_file, **common, smooth_alpha=0.8))
    assert plain["smoothing"] is None
    assert smooth["smoothing"]["groups"] == 4 and smooth["smoothing"]["matmuls"] == 10
    assert smooth["quantized_matmuls"] == plain["quantized_matmuls"] == 12
    assert smooth["logits_snr_db"] > plain["logits_snr_db"] + 3.0, (plain["logits_snr_db"], smooth["logits_snr_db"])
    assert not [p for p in (tmp_path / "smooth").iterdir() if p.name.startswith(".")]  # no probe or stage left


def test_smoothing_only_touches_groups_being_quantized(outlier_onnx, sliced_onnx, tiny_text_file, tmp_path):
    kept = quantize_onnx(outlier_onnx, tmp_path / "kept", _config(tiny_text_file, mode="int8-dynamic",
                                                                   keep_float=("q_proj",), smooth_alpha=0.5))
    assert kept["smoothing"]["groups"] == 4 and kept["smoothing"]["matmuls"] == 6  # gate/up and down_proj
    no_down = quantize_onnx(outlier_onnx, tmp_path / "no-down", _config(
        tiny_text_file, mode="int8-dynamic", keep_float=("down_proj",), smooth_alpha=0.5))
    assert no_down["smoothing"]["groups"] == 4 and no_down["smoothing"]["matmuls"] == 10  # q/k/v and gate/up
    sliced = quantize_onnx(sliced_onnx, tmp_path / "sliced", _config(tiny_text_file, mode="int8-dynamic",
                                                                     smooth_alpha=0.5))
    # a slice's norms are weight-free (their scales are in the weights): only the MLP products are left
    assert sliced["smoothing"]["groups"] == 2 and sliced["smoothing"]["matmuls"] == 2


def test_smoothing_settings_are_checked(tmp_path):
    from slice2deploy.cli import main

    with pytest.raises(UserInputError, match="INT8 option"):
        QuantConfig(mode="int4", smooth_alpha=0.5)
    with pytest.raises(UserInputError, match="INT8 option"):
        QuantConfig(mode="int8-dynamic", smooth_alpha=1.5)
    assert main(["quantize", str(tmp_path), "-o", str(tmp_path / "o"), "--mode", "int4", "--smooth-alpha",
                 "0.5"]) == 2


def test_refusal_hint_names_this_models_outlier_modules(outlier_onnx, tiny_text_file, tmp_path):
    """The advice comes from the model's own activations (here the attention inputs), not from SmolLM2's."""
    with pytest.raises(QuantQualityError) as refused:
        quantize_onnx(outlier_onnx, tmp_path / "o", _config(tiny_text_file, mode="int8-dynamic", snr_floor_db=500))
    message = str(refused.value)
    assert "SmolLM2" not in message and "down_proj" not in message, message
    assert any(f"--keep-float {kind}" in message for kind in ("q_proj", "k_proj", "v_proj")), message
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_peak_to_rms_and_kinds():
    import numpy as np

    from exporters.outliers import matmul_kind, mixed_precision_hint, peak_to_typical

    assert matmul_kind("/model/layers.3/mlp/down_proj/MatMul") == "down_proj"
    assert peak_to_typical(np.ones((4, 8))) == pytest.approx(1.0)
    channel = np.ones((16, 32))
    channel[:, 3] = 100.0  # one outlier channel: the typical channel is still 1
    assert peak_to_typical(channel) == pytest.approx(100.0)
    hint = mixed_precision_hint([("fc2", 80.0), ("fc1", 5.0)], int8=False)
    assert "--weight-int8 fc2" in hint and "80x" in hint and "5x" in hint
    assert mixed_precision_hint([("fc2", 80.0)], int8=True, already=["fc2"]) == ""


def test_default_block_size_follows_the_widths(tiny_text_file, tmp_path):
    """A default slice (round-to 8) quantized with the default INT4 settings: block 16 where 32 does not divide."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    sliced = slice_model(model, ids, None, SliceConfig(sparsity=0.25), progress=False)
    assert sliced.config.widths[-1] == 48  # 48 % 32 != 0
    onnx_dir = _export(sliced, tmp_path / "onnx")
    manifest = quantize_onnx(onnx_dir, tmp_path / "int4", _config(tiny_text_file, mode="int4", block_size=None))
    assert manifest["config"]["block_size"] == 16 and manifest["block_size_chosen_from_widths"]
    manifest = quantize_onnx(onnx_dir, tmp_path / "int8", _config(tiny_text_file, mode="int8-dynamic",
                                                                    block_size=None))
    assert manifest["config"]["block_size"] == 16 and manifest["weight_int8_by_role"] == {"shortcut": 4}
    with pytest.raises(UserInputError, match="K = 48"):
        quantize_onnx(onnx_dir, tmp_path / "int4-32", _config(tiny_text_file, mode="int4", block_size=32))


def test_below_the_floor_the_measured_outlier_kind_is_kept_float(outlier_onnx, tiny_text_file, tmp_path):
    """Default INT8 that misses the floor tries once more with the most outlier-heavy MatMul kind in float."""
    plain = quantize_onnx(outlier_onnx, tmp_path / "plain", _config(tiny_text_file, mode="int8-dynamic"))
    assert plain["auto_mixed_precision"] is None
    floor = plain["logits_snr_db"] + 0.1  # just out of reach without mixed precision
    manifest = quantize_onnx(outlier_onnx, tmp_path / "auto", _config(tiny_text_file, mode="int8-dynamic",
                                                                      snr_floor_db=floor))
    auto = manifest["auto_mixed_precision"]
    assert auto["snr_db_before"] == pytest.approx(plain["logits_snr_db"], abs=1e-3)
    assert auto["snr_db_after"] >= floor and manifest["config"]["keep_float"] == auto["keep_float"]
    assert any("keep_float" in item["reason"] for item in manifest["unquantized"])
    with pytest.raises(QuantQualityError, match="nothing was written"):
        quantize_onnx(outlier_onnx, tmp_path / "off", _config(tiny_text_file, mode="int8-dynamic", snr_floor_db=floor,
                                                              auto_mixed_precision=False))
    assert not (tmp_path / "off").exists()
