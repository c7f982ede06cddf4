"""TensorRT-RTX with the real builder: tiny dense and sliced models build ahead of time on a CPU-only machine.

These tests run wherever ``import tensorrt_rtx`` works (``pip install 'slice2deploy[tensorrt-rtx]'``), no GPU needed,
and skip with that reason where it does not. Loading and running an engine needs an RTX GPU: those tests carry the
``gpu`` and ``tensorrt`` markers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import torch

from exporters.graph_io import embedding_table
from exporters.onnx import OnnxExportConfig, export_onnx
from exporters.tensorrt import ENGINE_FILE, TrtBuildConfig, make_trt_ready
from exporters.tensorrt.rtx import NETWORK_REPORT_FILE, GraphRefused, refusal, tensorrt_rtx_available
from exporters.tensorrt.sidecar import sidecar_path
from slice2deploy.api import slice_model
from slice2deploy.slicing import SliceConfig
from slice2deploy.utils import UserInputError

from .conftest import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.skipif(not tensorrt_rtx_available(),
                                reason="TensorRT-RTX is not installed (pip install 'slice2deploy[tensorrt-rtx]')")
PRECISIONS = {
    "fp16": {},
    "bf16": {},
    "int8-wo": {"shortcuts": "weight-int8", "head_bits": 8},
    "int4": {"int4_method": "gptq", "weight_int8": ["down_proj"], "shortcuts": "weight-int8", "head_bits": 8},
}


def _config(text, precision: str, **kwargs) -> TrtBuildConfig:
    options = {"target_cc": ["8.6", "12.0"], **PRECISIONS.get(precision, {}), **kwargs}
    return TrtBuildConfig(precision=precision, runtime="tensorrt-rtx", int4_block_size=16, calib=str(text),
                          calib_samples=4, calib_seqlen=16, gptq_samples=4, gptq_seqlen=32, **options)


def _sliced(mode: str):
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    return slice_model(model, ids, None, SliceConfig(mode=mode, sparsity=0.4, round_to=16), progress=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rtx-src")
    models = {"dense": tiny_model("llama"), "per-layer": _sliced("per-layer"), "uniform": _sliced("uniform")}
    for name, model in models.items():
        export_onnx(model, tiny_tokenizer(), root / name, OnnxExportConfig())
    return {name: root / name for name in models}


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("model", ["dense", "per-layer", "uniform"])
def test_engine_builds_without_a_gpu(sources, tiny_text_file, tmp_path, model, precision):
    from exporters.tensorrt import build_engine

    config = _config(tiny_text_file, precision)
    manifest = make_trt_ready(sources[model], tmp_path / "ready", config)
    sidecar = build_engine(tmp_path / "ready", tmp_path / ENGINE_FILE, config)  # dispatches on config.runtime
    engine = tmp_path / ENGINE_FILE
    assert engine.stat().st_size == sidecar["engine_bytes"] > 100_000
    assert sidecar["runtime"] == "tensorrt-rtx" and sidecar["gpu"] is None
    assert sidecar["targets"]["compute_capabilities"] == ["8.6", "12.0"]
    assert sidecar["precision"] == precision and sidecar["build_seconds"] > 0
    assert sidecar["source_onnx"]["sha256"] == manifest["model_sha256"]
    assert json.loads(sidecar_path(engine).read_text()) == sidecar
    summary = json.loads((tmp_path / NETWORK_REPORT_FILE).read_text())["summary"]
    kinds = summary["matmuls_by_weight"]
    if precision in ("fp16", "bf16"):  # strongly typed: the graph's 16-bit float reaches the builder as written
        assert summary["dequantize_layers"] == 0 and "INT4" not in kinds and "INT8" not in kinds
        half, other = ("HALF", "BF16") if precision == "fp16" else ("BF16", "HALF")
        assert kinds[half] > 0 and other not in kinds and other not in summary["weight_mb_by_type"]
    else:  # every MatMul the manifest counts as quantized reaches the builder as INT4/INT8 weights
        assert kinds.get("INT4", 0) + kinds.get("INT8", 0) == manifest["quantized_matmuls"] > 0
        assert summary["quantize_layers"] == 0  # weight-only: no activation quantization
        assert (kinds.get("INT4", 0) > 0) == (precision == "int4")
        assert manifest["validation"]["logits_snr_db"] >= manifest["validation"]["snr_floor_db"]
        assert manifest["embedding"]["bits"] == 8 and summary["gathers_by_table"] == {"INT8": 1}  # the default
    assert not {"HALF", "FLOAT"} & set(summary["gathers_by_table"]) or precision in ("fp16", "bf16")
    if model == "per-layer" and precision in ("int8-wo", "int4"):
        assert manifest["quantized_by_role"]["shortcut"] > 0  # 8-bit shortcuts
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


@pytest.mark.parametrize(("tied", "head_bits"), [(True, 8), (False, None), (True, None)])
def test_int8_embedding_table_stays_int8_in_the_engine(sources, tiny_text_file, tmp_path, tied, head_bits):
    """embedding_bits 8 vs 16 on the same int8-wo graph: the Gather reads an INT8 table (per-row scales) and the
    network holds no 16-bit copy of it; the ONNX Runtime logits of the TensorRT-ready graph stay above the SNR floor
    (make_trt_ready raises below it). A table tied to a float head is left 16-bit, with the reason recorded."""
    from exporters.tensorrt.rtx import build_rtx_engine

    source_dir = sources["dense"]  # the tiny Llama ties its head to the embedding, as SmolLM2 does
    if not tied:
        source_dir = tmp_path / "untied"
        export_onnx(tiny_model("llama", tie_word_embeddings=False), tiny_tokenizer(), source_dir, OnnxExportConfig())
    source = onnx.load(str(source_dir / "model.onnx"))
    name = embedding_table(source)
    vocab, hidden = next(list(t.dims) for t in source.graph.initializer if t.name == name)
    found = {}
    for bits in (16, 8):
        config = _config(tiny_text_file, "int8-wo", head_bits=head_bits, embedding_bits=bits)
        manifest = make_trt_ready(source_dir, tmp_path / f"ready{bits}", config)
        sidecar = build_rtx_engine(tmp_path / f"ready{bits}", tmp_path / f"e{bits}" / ENGINE_FILE, config)
        report = json.loads((tmp_path / f"e{bits}" / NETWORK_REPORT_FILE).read_text())
        assert manifest["validation"]["logits_snr_db"] >= manifest["validation"]["snr_floor_db"]
        assert sidecar["build_config"]["embedding_bits"] == bits == manifest["config"]["embedding_bits"]
        found[bits] = (manifest, report["summary"])
    (manifest8, summary8), (manifest16, summary16) = found[8], found[16]
    assert summary16["gathers_by_table"] == {"HALF": 1} and manifest16["embedding"] == {"bits": 16}
    if tied and head_bits is None:  # an INT8 copy next to the float table the head reads would only add bytes
        assert manifest8["embedding"]["bits"] == 16 and "--head-bits 8" in manifest8["embedding"]["reason"]
        assert summary8["weight_mb_by_type"] == summary16["weight_mb_by_type"]
        return
    assert summary8["gathers_by_table"] == {"INT8": 1} and manifest8["embedding"] == {"table": name, "bits": 8}
    table_mb = vocab * hidden / 1e6
    float_mb = {bits: s["weight_mb_by_type"].get("HALF", 0) + s["weight_mb_by_type"].get("FLOAT", 0)
                for bits, s in ((8, summary8), (16, summary16))}
    int8_mb = summary8["weight_mb_by_type"]["INT8"] - summary16["weight_mb_by_type"]["INT8"]
    assert int8_mb == pytest.approx(table_mb, abs=1e-3)  # the table, 1 byte per entry
    scales_mb = 2 * vocab / 1e6  # one float16 scale per row
    assert float_mb[16] - float_mb[8] == pytest.approx(2 * table_mb - scales_mb, abs=1e-3)  # float16 table gone
    # the gate's floor for int8-wo is 15 dB; per-row INT8 rows cost the tiny model ~3 dB of its ~45 (a wrong scale
    # axis or sign would land far below 30)
    assert manifest8["validation"]["logits_snr_db"] > 30


def test_embedding_bits_are_validated():
    assert TrtBuildConfig(precision="int4").embedding_bits == 8 == TrtBuildConfig(precision="int8-wo").embedding_bits
    assert TrtBuildConfig().embedding_bits == 16 == TrtBuildConfig(precision="int8").embedding_bits
    with pytest.raises(UserInputError, match="weight-only"):
        TrtBuildConfig(precision="fp16", embedding_bits=8)
    with pytest.raises(UserInputError, match="8 or 16"):
        TrtBuildConfig(precision="int4", embedding_bits=4)
    config = TrtBuildConfig(precision="int4", embedding_bits=16)
    assert TrtBuildConfig.from_dict(config.to_dict()) == config


def test_weight_stripped_engine_is_refused_where_it_cannot_be_built(sources, tiny_text_file, tmp_path):
    """TensorRT-RTX 1.7.1 builds refittable engines only on a GPU and for one target (checked: both fail in its
    builder otherwise); the build is refused before it starts, with the reason."""
    from exporters.tensorrt.rtx import build_rtx_engine

    make_trt_ready(sources["dense"], tmp_path / "ready", _config(tiny_text_file, "fp16"))
    with pytest.raises(GraphRefused, match="one compute capability"):
        build_rtx_engine(tmp_path / "ready", tmp_path / ENGINE_FILE, _config(tiny_text_file, "fp16",
                                                                            strip_weights=True))
    if not torch.cuda.is_available():
        with pytest.raises(GraphRefused, match="needs a GPU at build time"):
            build_rtx_engine(tmp_path / "ready", tmp_path / ENGINE_FILE,
                             _config(tiny_text_file, "fp16", strip_weights=True, target_cc=["8.9"]))
    assert not (tmp_path / ENGINE_FILE).exists()


def test_fused_attention_graph_is_refused_before_the_build(tmp_path):
    from exporters.tensorrt.rtx import build_rtx_engine

    fused = tmp_path / "fused"
    export_onnx(tiny_model("llama"), tiny_tokenizer(), fused, OnnxExportConfig(attention="fused"))
    reason = refusal(fused / "model.onnx")
    assert reason and "\n" not in reason and "--attention eager" in reason
    with pytest.raises(GraphRefused, match="TensorRT-RTX cannot build .*--attention eager"):
        build_rtx_engine(fused, tmp_path / ENGINE_FILE, TrtBuildConfig(runtime="tensorrt-rtx"))
    assert not (tmp_path / ENGINE_FILE).exists() and not sidecar_path(tmp_path / ENGINE_FILE).exists()


def test_contrib_ops_are_refused(sources, tmp_path):
    model = onnx.load(str(sources["dense"] / "model.onnx"))
    model.graph.node[0].domain = "com.microsoft"
    model.graph.node[0].op_type = "MatMulNBits"
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert "com.microsoft:MatMulNBits" in refusal(tmp_path / "model.onnx")


def test_int4_widths_not_divisible_by_the_block_are_refused_up_front(tiny_text_file, tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    export_onnx(slice_model(model, ids, None, SliceConfig(sparsity=0.25), progress=False), tiny_tokenizer(),
                tmp_path / "src", OnnxExportConfig())  # widths 24: not a multiple of 16
    with pytest.raises(UserInputError, match="K = 24.*slice with --round-to 16"):
        make_trt_ready(tmp_path / "src", tmp_path / "ready", _config(tiny_text_file, "int4"))
    assert not (tmp_path / "ready").exists()


def test_cli_ships_the_built_engine_in_the_bundle(sources, tiny_text_file, tmp_path, capsys):
    from slice2deploy.cli import main

    out = tmp_path / "bundle"
    status = main(["build-engine", str(sources["per-layer"]), "-o", str(out), "--runtime", "tensorrt-rtx",
                   "--precision", "int4", "--int4-block-size", "16", "--int4-method", "gptq", "--gptq-samples", "4",
                   "--gptq-seqlen", "32", "--weight-int8", "down_proj", "--shortcuts", "weight-int8",
                   "--head-bits", "8", "--target-cc", "8.9", "--calib", str(tiny_text_file), "--calib-samples", "4",
                   "--calib-seqlen", "16"])
    assert status == 0, capsys.readouterr().err
    for name in (ENGINE_FILE, f"{ENGINE_FILE}.json", NETWORK_REPORT_FILE, "run_engine.py", "build.sh", "README.md",
                 "onnx/model.onnx", "onnx/tokenizer.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "slice2deploy_bundle_manifest.json").read_text())
    assert manifest["engine_built"] and manifest["targets"]["compute_capabilities"] == ["8.9"]
    assert ENGINE_FILE in manifest["files_sha256"] and os.access(out / "run_engine.py", os.X_OK)
    assert "TensorRT-RTX engine" in (out / "README.md").read_text()
    assert "ahead of time for compute capabilities 8.9" in capsys.readouterr().out


def test_runtime_and_targets_are_validated():
    with pytest.raises(UserInputError, match="compute capability"):
        TrtBuildConfig(target_cc=["9.0"])
    with pytest.raises(UserInputError, match="runtime"):
        TrtBuildConfig(runtime="onnxruntime")
    with pytest.raises(UserInputError, match="weight-only"):
        TrtBuildConfig(precision="int8", head_bits=8)


def test_runner_refuses_engines_for_other_targets_or_runtimes():
    from exporters.tensorrt import EngineMismatchError
    from exporters.tensorrt.rtx_runner import check_rtx_compatibility

    sidecar = {"runtime": "tensorrt-rtx", "engine_file": ENGINE_FILE, "tensorrt": {"version": "1.7.1.116"},
               "targets": {"compute_capabilities": ["8.6", "8.9"]}}
    check_rtx_compatibility(sidecar, "1.7.1.116", "8.9")
    with pytest.raises(EngineMismatchError, match="built for compute capabilities 8.6, 8.9, this GPU is 9.0"):
        check_rtx_compatibility(sidecar, "1.7.1.116", "9.0")
    with pytest.raises(EngineMismatchError, match="built with TensorRT-RTX 1.7.1.116, this machine has 1.8.0"):
        check_rtx_compatibility(sidecar, "1.8.0", "8.9")
    with pytest.raises(EngineMismatchError, match="not TensorRT-RTX"):
        check_rtx_compatibility({**sidecar, "runtime": None}, "1.7.1.116", "8.9")


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not torch.cuda.is_available(), reason="running a TensorRT-RTX engine needs an RTX-class GPU")
def test_engine_runs_and_matches_onnx_runtime(sources, tiny_text_file, tmp_path):
    import numpy as np

    from exporters.ort import OrtCausalLM
    from exporters.tensorrt.rtx import build_rtx_engine
    from exporters.tensorrt.rtx_runner import RtxCausalLM, current_compute_capability

    config = _config(tiny_text_file, "fp16", target_cc=[current_compute_capability()])
    make_trt_ready(sources["dense"], tmp_path / "ready", config)
    build_rtx_engine(tmp_path / "ready", tmp_path / ENGINE_FILE, config)
    runner = RtxCausalLM(tmp_path / ENGINE_FILE)
    ids = np.array([[1, 5, 7, 9]])
    expected = OrtCausalLM(tmp_path / "ready").forward(ids)[0]
    logits, _ = runner.forward(ids)
    assert np.abs(logits.float().cpu().numpy() - expected).max() < 0.05 * np.abs(expected).max()
