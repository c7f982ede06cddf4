"""TensorRT path: TensorRT-ready graphs (checker + ONNX Runtime quality), profiles, sidecar checks, the deploy bundle's
build.sh (parsed, syntax-checked and run against a stub trtexec), and the CLI without TensorRT.

Engine build and run need TensorRT and a GPU: those tests carry the ``tensorrt`` marker and skip where ``import
tensorrt`` fails (everywhere slice2deploy's own CI runs, since TensorRT cannot be installed there).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from enum import IntEnum
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporters.onnx import OnnxExportConfig, export_onnx
from exporters.ort import OrtCausalLM
from exporters.tensorrt import (
    ENGINE_FILE,
    TRT_ONNX_MANIFEST,
    EngineMismatchError,
    ShapeRange,
    TensorRTUnavailable,
    TrtBuildConfig,
    TrtReadyQualityError,
    build_engine,
    check_engine_compatibility,
    check_trt_major,
    graph_inputs,
    input_shapes,
    make_trt_ready,
    network_flags,
    profile_preset,
    qdq_report,
    read_sidecar,
    sidecar_path,
    sidecar_static,
    version_tuple,
)
from exporters.tensorrt.bundle import BUILD_SCRIPT, BUNDLE_MANIFEST, REMOVED_IN_TRT11, SHAPES_FILE
from exporters.tensorrt.cli import EXIT_NO_TENSORRT, add_build_engine_parser, run_build_engine
from exporters.tensorrt.fp16 import _drop_cast_round_trips
from slice2deploy.utils import UserInputError

from .conftest import tiny_model, tiny_tokenizer


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


# One skip mark, so the reason names what is missing first: TensorRT (everywhere here), then a GPU.
requires_engine = (pytest.mark.skipif(True, reason="TensorRT is not installed") if not _tensorrt_importable() else
                   pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT is installed but no CUDA GPU"))
KV_INPUTS = [f"past_key_values.{i}.{part}" for i in range(2) for part in ("key", "value")]
ALL_INPUTS = ["input_ids", "attention_mask", "position_ids", *KV_INPUTS]


def _config(text, **kwargs) -> TrtBuildConfig:
    return TrtBuildConfig(calib=str(text), calib_samples=4, calib_seqlen=16, **kwargs)


@pytest.fixture(scope="module")
def dense_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("trt") / "dense"
    export_onnx(tiny_model("llama"), tiny_tokenizer(), path, OnnxExportConfig())
    return path


@pytest.fixture(scope="module")
def trt_ready(dense_onnx, tiny_text_file, tmp_path_factory):
    """precision -> (manifest, directory), each made once per module."""
    made = {}

    def make(precision: str):
        if precision not in made:
            out = tmp_path_factory.mktemp("ready") / precision
            made[precision] = make_trt_ready(dense_onnx, out, _config(tiny_text_file, precision=precision)), out
        return made[precision]

    return make


@pytest.fixture(scope="module")
def cli_run(dense_onnx, tiny_text_file, tmp_path_factory):
    """build-engine run through its handler with TensorRT made unimportable: (status, stderr, bundle directory)."""
    out = tmp_path_factory.mktemp("cli") / "bundle"
    parser = argparse.ArgumentParser(prog="slice2deploy")
    add_build_engine_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build-engine", str(dense_onnx), "-o", str(out), "--calib", str(tiny_text_file),
                              "--calib-samples", "4", "--calib-seqlen", "16"])
    stderr, stdout = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        patch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError even where it is installed
        patch.setitem(sys.modules, "tensorrt_rtx", None)  # and TensorRT-RTX too
        status = args.handler(args)
    return status, stderr.getvalue(), out


# -- TensorRT-ready graphs -------------------------------------------------------------------------------------------
def _types(model) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {t.name: t.data_type for t in inferred.graph.initializer}
    for info in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        types[info.name] = info.type.tensor_type.elem_type
    return types


def _check_float_placement(model, half: int = TensorProto.FLOAT16) -> None:
    """float16 (or ``half``) everywhere except what TensorRT must compute in float32; KV cache in ``half``, logits
    float32."""
    graph, types = model.graph, _types(model)
    io_types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    assert io_types["logits"] == TensorProto.FLOAT
    assert all(io_types[name] == half for name in io_types if name.startswith(("past_", "present.")))
    producers = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type in ("Softmax", "Pow", "ReduceMean", "Sqrt", "Cos", "Sin"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
        if node.op_type == "MatMul" and "lm_head" not in node.name:
            assert types[node.input[0]] == half, node.name
        if node.op_type == "Cast":  # no float32 -> float16 -> float32 round trips left by the converter
            assert producers.get(node.input[0]) is None or producers[node.input[0]].op_type != "Cast", node.name
    head = next(n for n in graph.node if n.op_type == "MatMul" and "lm_head" in n.name)
    assert all(types[name] == TensorProto.FLOAT for name in head.input)


def test_bf16_graph_is_checked_through_its_float32_twin(trt_ready, tmp_path):
    """bf16: the FP16 graph's float32 placement with bfloat16 for float16; ONNX Runtime's CPU provider cannot run it
    (no bfloat16 MatMul), so the gate measured its float32 twin, which rounds every bfloat16 tensor."""
    from exporters.tensorrt.bf16 import BFLOAT16, from_bfloat16_bits, to_bfloat16_bits, write_float32_twin

    values = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 100
    assert np.array_equal(from_bfloat16_bits(to_bfloat16_bits(values.numpy())),
                          values.to(torch.bfloat16).float().numpy())  # round to nearest even, as torch does
    manifest, out = trt_ready("bf16")
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    model = onnx.load(str(out / "model.onnx"))
    _check_float_placement(model, half=BFLOAT16)
    assert TensorProto.FLOAT16 not in set(_types(model).values())
    assert {t.data_type for t in model.graph.initializer if t.dims} <= {BFLOAT16, TensorProto.FLOAT,
                                                                        TensorProto.INT64}
    quality, fp16_quality = manifest["validation"], trt_ready("fp16")[0]["validation"]
    assert "float32 twin" in quality["measured_on"] and quality["logits_snr_db"] >= quality["snr_floor_db"] == 25
    # bfloat16 keeps 8 mantissa bits to float16's 11: ~18 dB less SNR when the twin really rounds every tensor
    assert 10 < fp16_quality["logits_snr_db"] - quality["logits_snr_db"] < 30
    twin = write_float32_twin(out, tmp_path / "twin")
    casts = [n for n in onnx.load(str(twin / "model.onnx")).graph.node if n.op_type == "Cast"
             and n.attribute[0].i == BFLOAT16]
    assert casts and all(n.name.endswith("/round_to_bfloat16") for n in casts)
    assert OrtCausalLM(twin).forward(np.array([[1, 5, 7]]))[0].shape == (1, 3, 96)


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_trt_ready_graph_passes_checker_and_quality_floor(trt_ready, dense_onnx, precision):
    manifest, out = trt_ready(precision)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    quality = manifest["validation"]
    assert quality["logits_snr_db"] >= quality["snr_floor_db"] > 0
    assert json.loads((out / TRT_ONNX_MANIFEST).read_text())["validation"] == quality
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert [name for name, _ in graph_inputs(out / "model.onnx")] == ALL_INPUTS
    model = onnx.load(str(out / "model.onnx"))
    _check_float_placement(model)
    ops = [n.op_type for n in model.graph.node]
    if precision == "fp16":
        assert quality["max_rel_diff"] <= quality["max_rel_diff_limit"] == 0.02
        assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    else:
        assert manifest["quantized_matmuls"] == 14  # q k v o gate up down x 2 layers; the tied head stays float
        assert [u["role"] for u in manifest["unquantized"]] == ["head"]


def test_int8_graph_follows_tensorrt_qdq_rules(trt_ready):
    manifest, out = trt_ready("int8")
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    quants = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dequants = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dequants if n.input[0] in inits]
    assert len(quants) == len(weights) == 14 and manifest["qdq"]["per_channel"] == 14
    for node in quants:  # activations: per tensor, symmetric, float16 scale
        assert list(inits[node.input[1]].dims) == [] and inits[node.input[1]].data_type == TensorProto.FLOAT16
        assert not numpy_helper.to_array(inits[node.input[2]]).any()
    for node in weights:  # weights: int8, one scale per output channel (axis 1 of a (K, N) MatMul weight)
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        assert weight.data_type == TensorProto.INT8 and list(scale.dims) == [weight.dims[1]]
        assert next(a.i for a in node.attribute if a.name == "axis") == 1
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:  # attention-score MatMuls (two activations) stay float
        if node.op_type == "MatMul" and "self_attn/MatMul" in node.name:
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in node.input)
        if node.op_type in ("QuantizeLinear",):  # GEMM outputs are never quantized (TensorRT advice)
            assert producers[node.input[0]].op_type != "MatMul"


def test_int4_graph_is_blocked_weight_only(trt_ready):
    _, out = trt_ready("int4")
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    dequants = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dequants) == 14 and not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    for node in dequants:
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        attrs = {a.name: a.i for a in node.attribute}
        assert weight.data_type == TensorProto.INT4 and attrs["block_size"] == 32 and attrs["axis"] == 0
        assert list(scale.dims) == [weight.dims[0] // 32, weight.dims[1]]
        assert scale.data_type == TensorProto.FLOAT16 and len(node.input) == 2  # symmetric: no zero point
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 21


def test_weight_only_embedding_table_is_int8_per_row(trt_ready, dense_onnx, tiny_text_file, tmp_path):
    """embedding_bits 8 (the weight-only default): the Gather reads DequantizeLinear(INT8 table, one float16 scale per
    row, axis 0) and no float table is left. A table tied to a float head stays 16-bit: the manifest says why."""
    tied_float_head, _ = trt_ready("int4")
    assert tied_float_head["embedding"]["bits"] == 16 and "tied head" in tied_float_head["embedding"]["reason"]
    manifest = make_trt_ready(dense_onnx, tmp_path / "wo", _config(tiny_text_file, precision="int8-wo", head_bits=8))
    model = onnx.load(str(tmp_path / "wo" / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    table = [n for n in model.graph.node if n.name.endswith("/embedding_DequantizeLinear")]
    assert len(table) == 1 and manifest["embedding"]["bits"] == 8 and manifest["embedding"]["table"] not in inits
    assert {n.op_type for n in model.graph.node if table[0].output[0] in n.input} == {"Gather"}
    codes, row_scale = inits[table[0].input[0]], inits[table[0].input[1]]
    assert codes.data_type == TensorProto.INT8 and list(row_scale.dims) == [codes.dims[0]]
    assert {a.name: a.i for a in table[0].attribute} == {"axis": 0} and row_scale.data_type == TensorProto.FLOAT16
    assert not [t for t in model.graph.initializer if list(t.dims) == list(codes.dims) and t is not codes]
    assert manifest["qdq"]["DequantizeLinear"] == manifest["quantized_matmuls"] + 1
    assert manifest["validation"]["logits_snr_db"] >= manifest["validation"]["snr_floor_db"]


def test_keep_float_leaves_named_matmuls_unquantized(dense_onnx, tiny_text_file, tmp_path):
    manifest = make_trt_ready(dense_onnx, tmp_path / "int8", _config(tiny_text_file, precision="int8",
                                                                       keep_float=["down_proj"]))
    kept = [u["node"] for u in manifest["unquantized"] if u["reason"] == "kept in float (keep_float)"]
    assert len(kept) == 2 and all("down_proj" in node for node in kept)
    assert manifest["quantized_matmuls"] == manifest["qdq"]["QuantizeLinear"] == 12
    with pytest.raises(UserInputError, match="leaves no weight MatMul"):
        make_trt_ready(dense_onnx, tmp_path / "none", _config(tiny_text_file, precision="int8", keep_float=["/"]))


def test_int4_reports_what_the_quantizer_left_in_float(tiny_text_file, tmp_path):
    """A LayerNorm model (OPT): FP16 keeps LayerNormalization in float32, and the linears that export as Gemm, which
    onnxruntime's INT4 quantizer skips with only a log line, are listed as unquantized instead of being counted."""
    source = tmp_path / "opt"
    export_onnx(tiny_model("opt"), tiny_tokenizer(), source, OnnxExportConfig())
    manifest = make_trt_ready(source, tmp_path / "int4", _config(tiny_text_file, precision="int4", int4_block_size=16))
    left = [u for u in manifest["unquantized"] if "Gemm" in u["reason"]]
    assert left and manifest["quantized_matmuls"] + manifest["unquantized_count"] == 13  # 12 linears + the head
    assert manifest["qdq"]["DequantizeLinear"] == manifest["quantized_matmuls"] + 1  # + the INT8 embedding table
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    types = _types(model)
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(types[n.input[0]] == TensorProto.FLOAT for n in norms)


def test_qdq_report_rejects_what_tensorrt_cannot_build(trt_ready):
    _, out = trt_ready("int8")
    model = onnx.load(str(out / "model.onnx"))
    quant = next(n for n in model.graph.node if n.op_type == "QuantizeLinear")
    zero = next(t for t in model.graph.initializer if t.name == quant.input[2])
    zero.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.int8), zero.name))
    with pytest.raises(TrtReadyQualityError, match="zero point"):
        qdq_report(model)


def test_bad_sources_and_the_quality_floor_write_nothing(dense_onnx, trt_ready, tiny_text_file, tmp_path):
    with pytest.raises(TrtReadyQualityError, match="below the floor"):
        make_trt_ready(dense_onnx, tmp_path / "o", _config(tiny_text_file, snr_floor_db=500))
    with pytest.raises(UserInputError, match="already quantized"):
        make_trt_ready(trt_ready("int8")[1], tmp_path / "o", _config(tiny_text_file))
    with pytest.raises(UserInputError, match="differ from the input"):
        make_trt_ready(dense_onnx, dense_onnx, _config(tiny_text_file))
    fused = tmp_path / "fused"
    export_onnx(tiny_model("llama"), tiny_tokenizer(), fused, OnnxExportConfig(attention="fused"))
    with pytest.raises(UserInputError, match="export with --attention eager for TensorRT"):
        make_trt_ready(fused, tmp_path / "o", _config(tiny_text_file))
    assert not (tmp_path / "o").exists()


def test_cast_round_trips_are_removed():
    """float32 -> float16 -> float32 between two float32 nodes reads the float32 value directly."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="first"),
             helper.make_node("Cast", ["a"], ["a16"], to=TensorProto.FLOAT16, name="down"),
             helper.make_node("Cast", ["a16"], ["a32"], to=TensorProto.FLOAT, name="up"),
             helper.make_node("Relu", ["a32"], ["y"], name="second")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    model = onnx.shape_inference.infer_shapes(model)
    assert _drop_cast_round_trips(model) == 2
    assert [n.name for n in model.graph.node] == ["first", "second"] and model.graph.node[1].input[0] == "a"
    onnx.checker.check_model(model)


# -- profiles --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["rtx", "datacenter", "jetson"])
def test_profiles_cover_every_dynamic_input(dense_onnx, preset):
    inputs = graph_inputs(dense_onnx / "model.onnx")
    profile = profile_preset(preset, 128)
    shapes = input_shapes(inputs, profile)
    assert list(shapes) == ALL_INPUTS  # every input of the export is dynamic
    for name, dims in inputs:
        low, opt, high = shapes[name]
        assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
        assert [d for d in dims if isinstance(d, int)] == [d for d, s in zip(low, dims, strict=True)
                                                         if isinstance(s, int)]
    for level, which in enumerate(("min", "opt", "max")):
        batch, seq, past = (getattr(r, which) for r in (profile.batch, profile.sequence, profile.past))
        assert shapes["input_ids"][level] == (batch, seq)
        assert shapes["attention_mask"][level] == (batch, seq + past)  # total = past + new tokens
        assert shapes["past_key_values.1.value"][level] == (batch, 2, past, 8)
    assert shapes["past_key_values.0.key"][0][2] == 0  # the prefill's empty cache is inside the profile


def test_profiles_are_clipped_to_the_model_context():
    full, clipped = profile_preset("datacenter"), profile_preset("datacenter", 128)
    assert full.past.max > 128 and full.sequence.max > 128
    assert clipped.sequence.max == 128 and clipped.past.max == 127
    assert clipped.sequence.min <= clipped.sequence.opt <= clipped.sequence.max
    assert profile_preset("jetson").workspace_mib < profile_preset("rtx").workspace_mib


def test_unknown_dynamic_axis_is_an_error():
    with pytest.raises(UserInputError, match="frames"):
        input_shapes([("input_ids", ("batch", "frames"))], profile_preset("rtx"))
    with pytest.raises(UserInputError, match="no dynamic input"):
        input_shapes([("x", (1, 4))], profile_preset("rtx"))


def test_config_validation_and_round_trip():
    config = TrtBuildConfig(precision="int4", profile="jetson", int4_block_size=64, workspace_mib=512,
                            keep_float=["down_proj"])
    assert TrtBuildConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.resolved_profile().workspace_mib == 512
    assert TrtBuildConfig().snr_floor == 30.0 and config.snr_floor == 8.0
    for bad, match in [({"precision": "fp8"}, "fp16, bf16, int8, int4"),
                       ({"profile": "tpu"}, "rtx, datacenter, jetson"),
                       ({"int4_block_size": 24}, "16, 32, 64, 128, 256"), ({"workspace_mib": 8}, "at least 64")]:
        with pytest.raises(UserInputError, match=match):
            TrtBuildConfig(**bad)
    with pytest.raises(UserInputError):
        ShapeRange(4, 2, 8)


# -- versions, sidecar and the engine check (pure Python) -------------------------------------------------------------
def _sidecar(trt="10.3.0", name="NVIDIA GeForce RTX 4090", cc="8.9") -> dict:
    profile = profile_preset("rtx", 128)
    shapes = input_shapes([("input_ids", ("batch", "sequence"))], profile)
    return {**sidecar_static("fp16", profile, shapes, {"path": "onnx/model.onnx", "sha256": "0" * 64}),
            "engine_file": ENGINE_FILE, "tensorrt": {"version": trt}, "gpu": {"name": name, "compute_capability": cc}}


def _device(trt="10.3.0", name="NVIDIA GeForce RTX 4090", cc="8.9") -> dict:
    return {"tensorrt": trt, "gpu": {"name": name, "compute_capability": cc}}


def test_engine_check_accepts_the_machine_it_was_built_on():
    check_engine_compatibility(_sidecar(), _device())
    check_engine_compatibility(_sidecar(trt="10.3.0.26"), _device(trt="10.3.0"))  # build numbers do not matter


@pytest.mark.parametrize("current, match", [
    (_device(trt="10.4.0"), "built with TensorRT 10.3.0, this machine has TensorRT 10.4.0"),
    (_device(trt="11.0.0"), "TensorRT 11.0.0"),
    (_device(name="NVIDIA H100 80GB HBM3", cc="9.0"), "compute capability 8.9 .* this GPU is 9.0"),
    (_device(name="NVIDIA GeForce RTX 4080"), "same compute capability"),
])
def test_engine_check_refuses_another_gpu_or_tensorrt(current, match):
    with pytest.raises(EngineMismatchError, match=match) as error:
        check_engine_compatibility(_sidecar(), current)
    assert "rebuild it on this machine" in str(error.value)


def test_engine_check_options_and_unverified_sidecars(tmp_path):
    check_engine_compatibility(_sidecar(), _device(name="NVIDIA GeForce RTX 4080"), allow_other_gpu_model=True)
    with pytest.raises(EngineMismatchError, match="does not record"):
        check_engine_compatibility(_sidecar(name=None, cc=None), _device())
    with pytest.raises(EngineMismatchError, match="no sidecar"):
        read_sidecar(tmp_path / ENGINE_FILE)


def test_version_helpers_and_network_flags():
    assert version_tuple("10.3.0.26") == (10, 3, 0) and version_tuple("11") == (11, 0, 0)
    assert check_trt_major("10.16.0") == 10 and check_trt_major("11.4.1") == 11
    with pytest.raises(UserInputError, match="not supported"):
        check_trt_major("8.6.1")

    class Flag(IntEnum):
        STRONGLY_TYPED = 1  # its position in a real build does not matter: the flag is 1 << int(member)

    fake_trt = SimpleNamespace(NetworkDefinitionCreationFlag=Flag)
    assert network_flags(fake_trt, 10) == 1 << 1  # 10.x: strong typing is opt-in
    assert network_flags(fake_trt, 11) == 0  # 11.x: always strongly typed, the flag is deprecated


def test_build_engine_without_tensorrt_raises_the_install_hint(trt_ready, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)  # neither TensorRT nor TensorRT-RTX
    _, out = trt_ready("fp16")
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):
        build_engine(out, tmp_path / ENGINE_FILE)
    assert not (tmp_path / ENGINE_FILE).exists()


# -- the CLI and the deploy bundle -----------------------------------------------------------------------------------
def test_cli_without_tensorrt_writes_the_bundle_and_fails_in_one_line(cli_run):
    status, stderr, out = cli_run
    assert status == EXIT_NO_TENSORRT != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr
    assert "TensorRT is not installed" in lines[0] and "pip install tensorrt" in lines[0]
    for name in (BUILD_SCRIPT, SHAPES_FILE, "README.md", BUNDLE_MANIFEST, "onnx/model.onnx", "onnx/tokenizer.json",
                 f"onnx/{TRT_ONNX_MANIFEST}"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / BUNDLE_MANIFEST).read_text())
    assert manifest["engine_built"] is False and manifest["precision"] == "fp16"
    assert not (out / ENGINE_FILE).exists()
    assert OrtCausalLM(out / "onnx").forward(np.array([[1, 5, 7]]))[0].shape == (1, 3, 96)


def test_cli_parser_flags():
    parser = argparse.ArgumentParser(prog="slice2deploy")
    add_build_engine_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["build-engine", "in", "-o", "out", "--precision", "int4", "--profile", "jetson",
                              "--bundle-only", "--overwrite", "--keep-float", "down_proj", "--keep-float", "o_proj"])
    assert (args.precision, args.profile, args.bundle_only, args.overwrite) == ("int4", "jetson", True, True)
    assert args.keep_float == ["down_proj", "o_proj"]
    assert args.handler is run_build_engine
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["build-engine", "in", "-o", "out", "--precision", "fp8"])


def _branch(script: str, label: str) -> str:
    """The text of one `case` branch of build.sh (from `  10)` to its `;;`)."""
    match = re.search(rf"^  {label}\)\n(.*?)^    ;;", script, flags=re.S | re.M)
    assert match, label
    return match.group(1)


def test_build_script_names_every_input_and_no_removed_flags(cli_run):
    _, _, out = cli_run
    script_path = out / BUILD_SCRIPT
    subprocess.run(["bash", "-n", str(script_path)], check=True)
    script = script_path.read_text()
    shapes = json.loads((out / SHAPES_FILE).read_text())
    inputs = [name for name, dims in graph_inputs(out / "onnx/model.onnx") if any(isinstance(d, str) for d in dims)]
    assert sorted(shapes) == sorted(inputs) == sorted(ALL_INPUTS)
    for which in ("min", "opt", "max"):
        line = re.search(rf"^{which.upper()}_SHAPES=(.*)$", script, flags=re.M).group(1)
        parsed = dict(item.split(":") for item in line.strip("'").split(","))
        assert sorted(parsed) == sorted(inputs)
        assert {name: [int(d) for d in dims.split("x")] for name, dims in parsed.items()} == \
            {name: shape[which] for name, shape in shapes.items()}
    trt10, trt11 = _branch(script, "10"), _branch(script, "11")
    for branch in (trt10, trt11):
        for flag in ("--onnx=", "--saveEngine=", "--timingCacheFile=", "--memPoolSize=workspace:", "--minShapes=",
                     "--optShapes=", "--maxShapes=", "--skipInference"):
            assert flag in branch
    commands = [re.sub(r"#.*", "", b) for b in (trt10, trt11)]  # flags in comments do not count
    assert "--stronglyTyped" in commands[0] and "--stronglyTyped" not in commands[1]
    assert not any(flag in command for command in commands for flag in REMOVED_IN_TRT11)


def _stub_tools(bin_dir: Path, banner: str | None) -> None:
    bin_dir.mkdir()
    first = f'echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{banner}] [b1] # trtexec $*"' if banner else "true"
    (bin_dir / "trtexec").write_text(f"""#!/usr/bin/env bash
{first}
if [ "$1" = "--help" ]; then exit 0; fi
printf '%s\\n' "$@" > "$STUB_LOG"
for arg in "$@"; do
  case "$arg" in
    --saveEngine=*|--timingCacheFile=*) echo stub > "${{arg#*=}}" ;;
  esac
done
""")
    (bin_dir / "nvidia-smi").write_text('#!/usr/bin/env bash\necho "NVIDIA GeForce RTX 4090, 8.9"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


@pytest.mark.parametrize("banner, major", [("100300", 10), ("110000", 11)])
def test_build_script_runs_the_right_trtexec_variant(cli_run, tmp_path, banner, major):
    """build.sh against a stub trtexec: version detected from the banner, exact arguments, a sidecar the runner's
    check accepts on the same (fake) machine and refuses on another."""
    bundle = shutil.copytree(cli_run[2], tmp_path / "bundle")
    _stub_tools(tmp_path / "bin", banner)
    log = tmp_path / "args.txt"
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "STUB_LOG": str(log)}
    subprocess.run(["bash", str(bundle / BUILD_SCRIPT)], env=env, check=True, capture_output=True, text=True)
    args = log.read_text().splitlines()
    assert ("--stronglyTyped" in args) == (major == 10)
    assert f"--onnx={bundle / 'onnx/model.onnx'}" in args and f"--saveEngine={bundle / ENGINE_FILE}" in args
    shapes = json.loads((bundle / SHAPES_FILE).read_text())
    max_arg = next(a for a in args if a.startswith("--maxShapes="))
    assert all(f"{name}:{'x'.join(map(str, s['max']))}" in max_arg for name, s in shapes.items())
    sidecar = read_sidecar(bundle / ENGINE_FILE)
    version = f"{major}.{int(banner[-4:-2])}.{int(banner[-2:])}"
    assert sidecar["tensorrt"]["version"] == version and sidecar["builder"] == "trtexec"
    assert sidecar["precision"] == "fp16" and sidecar["shapes"] == shapes
    assert sidecar["source_onnx"]["sha256"] == json.loads((bundle / "onnx" / TRT_ONNX_MANIFEST).read_text())[
        "model_sha256"]
    check_engine_compatibility(sidecar, _device(trt=version))
    with pytest.raises(EngineMismatchError):
        check_engine_compatibility(sidecar, _device(trt=version, name="NVIDIA H100 80GB HBM3", cc="9.0"))


def test_build_script_without_a_version_banner_asks_for_trt_major(cli_run, tmp_path):
    bundle = shutil.copytree(cli_run[2], tmp_path / "bundle")
    _stub_tools(tmp_path / "bin", None)
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "STUB_LOG": str(tmp_path / "args.txt")}
    result = subprocess.run(["bash", str(bundle / BUILD_SCRIPT)], env=env, capture_output=True, text=True)
    assert result.returncode == 2 and "TRT_MAJOR" in result.stderr
    dry = subprocess.run(["bash", str(bundle / BUILD_SCRIPT)], env={**env, "TRT_MAJOR": "11", "DRY_RUN": "1"},
                         capture_output=True, text=True, check=True)
    assert "--maxShapes=" in dry.stdout and not (tmp_path / "args.txt").exists()


# -- engine build and run: only where TensorRT and a GPU exist --------------------------------------------------------
@pytest.fixture
def built_engine(trt_ready, tmp_path, tiny_text_file):
    def build(precision: str):
        _, onnx_dir = trt_ready(precision)
        sidecar = build_engine(onnx_dir, tmp_path / ENGINE_FILE, _config(tiny_text_file, precision=precision))
        return tmp_path / ENGINE_FILE, sidecar, onnx_dir

    return build


@pytest.mark.tensorrt
@pytest.mark.gpu
@requires_engine
@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_engine_build_and_run_match_onnx_runtime(built_engine, precision):
    from exporters.tensorrt import TrtCausalLM

    engine_path, sidecar, onnx_dir = built_engine(precision)
    assert sidecar_path(engine_path).is_file() and (engine_path.parent / "timing.cache").is_file()
    assert sidecar["precision"] == precision and sidecar["builder"] == "python"
    engine, reference = TrtCausalLM(engine_path), OrtCausalLM(onnx_dir)
    ids = np.random.default_rng(0).integers(3, 96, (2, 12))
    logits, past = engine.forward(ids[:, :-1])  # prefill, then one decode step through the engine's own cache
    step, _ = engine.forward(ids[:, -1:], torch.ones((2, 12), dtype=torch.long), past=past)
    ref_logits, ref_past = reference.forward(ids[:, :-1])
    ref_step, _ = reference.forward(ids[:, -1:], past=ref_past)
    for ours, theirs in ((logits, ref_logits), (step, ref_step)):
        ours = ours.float().cpu().numpy().astype(np.float64)
        noise = max(float(np.square(ours - theirs).sum()), 1e-30)
        assert 10 * np.log10(float(np.square(theirs).sum()) / noise) >= 20  # same graph, another runtime
    assert engine.generate(ids[:1, :4], max_new_tokens=3).shape == (1, 7)


@pytest.mark.tensorrt
@pytest.mark.gpu
@requires_engine
def test_runner_refuses_an_engine_from_another_gpu(built_engine):
    from exporters.tensorrt import TrtCausalLM

    engine_path, sidecar, _ = built_engine("fp16")
    sidecar["gpu"]["compute_capability"] = "1.0"
    sidecar_path(engine_path).write_text(json.dumps(sidecar))
    with pytest.raises(EngineMismatchError, match="compute capability 1.0"):
        TrtCausalLM(engine_path)
