"""``export genai`` and the GenAI runner on tiny random-weight Llamas: dense and uniform slice, fp32 and int4, built
by the real onnxruntime-genai model builder and run by its runtime (no mocks). Skipped where onnxruntime-genai is not
installed (the genai extra); the config checks run everywhere."""

from __future__ import annotations

import json
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from exporters.genai import GenAIExportConfig, export_genai
from slice2deploy.api import SliceConfig, slice_model
from slice2deploy.checkpoint import save_sliced
from slice2deploy.cli import main
from slice2deploy.runners import backend_for, open_runner
from slice2deploy.utils import UserInputError

from .conftest import tiny_model, tiny_tokenizer

needs_genai = pytest.mark.skipif(find_spec("onnxruntime_genai") is None,
                                 reason="onnxruntime-genai is not installed (pip install -e '.[genai]')")
# GroupQueryAttention's CPU kernel needs head_dim % 16 == 0; the registry's tiny Llama has 8.
GQA_TINY = {"hidden_size": 64, "head_dim": 16}
GATE_SEQLEN = 64


def _ids(vocab: int, n: int = 4, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """Three HF directories: the dense tiny Llama, its uniform slice (hidden 48: a plain LlamaForCausalLM) and its
    per-layer slice (shortcut matrices)."""
    root = tmp_path_factory.mktemp("genai-sources")
    dense = tiny_model("llama", **GQA_TINY)
    dense.save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    ids = _ids(dense.config.vocab_size, n=8)
    for mode in ("uniform", "per-layer"):
        sliced = slice_model(tiny_model("llama", **GQA_TINY), ids, None, SliceConfig(mode=mode, sparsity=0.25),
                             progress=False)
        save_sliced(sliced, tiny_tokenizer(), root / mode, {"note": "test"})
    return {name: root / name for name in ("dense", "uniform", "per-layer")}


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory, tiny_text_file) -> dict:
    """GenAI builds of dense and uniform at fp32 and int4 (four builder runs for the whole module)."""
    root = tmp_path_factory.mktemp("genai-builds")
    out = {}
    for source in ("dense", "uniform"):
        for precision in ("fp32", "int4"):
            config = GenAIExportConfig(precision=precision, block_size=16 if precision == "int4" else None,
                                       calib=str(tiny_text_file), gate_seqlen=GATE_SEQLEN)
            target = root / f"{source}-{precision}"
            out[source, precision] = (target, export_genai(str(sources[source]), target, config))
    return out


def test_config_refuses_what_the_builder_cannot_do():
    with pytest.raises(UserInputError, match="fp16 is built for GPUs"):
        GenAIExportConfig(precision="fp16")
    assert GenAIExportConfig(precision="fp16", provider="cuda").precision.value == "fp16"
    with pytest.raises(UserInputError, match="int4 only"):
        GenAIExportConfig(precision="fp32", block_size=32)
    with pytest.raises(UserInputError, match="16, 32, 64, 128, 256"):
        GenAIExportConfig(precision="int4", block_size=48)
    with pytest.raises(UserInputError, match="unknown precision"):
        GenAIExportConfig(precision="int3")
    config = GenAIExportConfig(precision="int4", block_size=64, accuracy_level=4,
                               builder_extra=("algo_config=k_quant",))
    assert config.builder_options() == ["block_size=64", "accuracy_level=4", "algo_config=k_quant"]
    assert config.ratio_limit == 1.25 and GenAIExportConfig(precision="fp32").ratio_limit == 1.01
    with pytest.raises(UserInputError, match="use --block-size"):
        GenAIExportConfig(builder_extra=("int4_block_size=16",))
    with pytest.raises(UserInputError, match="KEY=VALUE"):
        GenAIExportConfig(builder_extra=("algo_config",))
    with pytest.raises(UserInputError, match=">= 1"):
        GenAIExportConfig(max_perplexity_ratio=0.9)
    assert GenAIExportConfig(**{k: v for k, v in config.to_dict().items()}).to_dict() == config.to_dict()


@needs_genai
@pytest.mark.parametrize("source", ["dense", "uniform"])
@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_export_writes_genai_directory_with_manifest(built, source, precision):
    directory, manifest = built[source, precision]
    names = {p.name for p in directory.iterdir()}
    assert {"genai_config.json", "model.onnx", "slice2deploy_genai_manifest.json", "config.json"} <= names
    saved = json.loads((directory / "slice2deploy_genai_manifest.json").read_text())
    assert saved["config"]["precision"] == precision and saved["source"]["sha256"]
    assert saved["versions"]["onnxruntime-genai"]
    gate = saved["quality_gate"]
    assert gate["logits_snr_db"] >= gate["snr_floor_db"] and gate["windows"] == 4 and gate["seqlen"] == GATE_SEQLEN
    if precision == "fp32":
        assert gate["logits_snr_db"] > 80 and abs(gate["perplexity_ratio"] - 1) < 1e-4
    graph_ops = (directory / "model.onnx").read_bytes()
    assert b"GroupQueryAttention" in graph_ops and (b"MatMulNBits" in graph_ops) == (precision == "int4")
    assert backend_for(directory).name == "onnxruntime-genai"  # not the ONNX Runtime runner, despite model.onnx


@needs_genai
@pytest.mark.parametrize("source", ["dense", "uniform"])
def test_fp32_perplexity_matches_pytorch(built, sources, tiny_text_file, source):
    from slice2deploy.data import load_text, token_stream

    genai = open_runner(built[source, "fp32"][0])
    reference = open_runner(sources[source])
    tokens = token_stream(reference.tokenizer, load_text(str(tiny_text_file), "evaluation"))
    ours = genai.perplexity(tokens, seqlen=32, max_tokens=512, progress=False)
    theirs = reference.perplexity(tokens, seqlen=32, max_tokens=512, progress=False)
    assert ours.windows == theirs.windows and ours.predicted_tokens == theirs.predicted_tokens
    assert ours.perplexity == pytest.approx(theirs.perplexity, rel=1e-5)


@needs_genai
@pytest.mark.parametrize("source", ["dense", "uniform"])
def test_greedy_generation_equals_transformers(built, sources, source):
    from transformers import AutoModelForCausalLM

    from exporters.genai_runtime import GenAICausalLM

    model = AutoModelForCausalLM.from_pretrained(sources[source]).eval()
    prompt = _ids(model.config.vocab_size, n=1, length=10, seed=3)
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
    genai = GenAICausalLM(built[source, "fp32"][0])
    produced = genai.generate(prompt.numpy(), 16)
    # GenAI stops at genai_config's eos; compare up to where it stopped
    assert produced.shape[1] > prompt.shape[1]
    np.testing.assert_array_equal(produced[0], expected[0, : produced.shape[1]].numpy())


@needs_genai
def test_forward_with_the_cache_matches_one_full_forward(built):
    runner = open_runner(built["uniform", "fp32"][0])
    ids = _ids(96, n=1, length=12, seed=5).numpy()
    full = runner.forward(ids, None)[0]
    logits, past = runner.forward(ids[:, :8], None)
    steps = [logits]
    for position in range(8, 12):
        logits, past = runner.forward(ids[:, position : position + 1], past)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4, rtol=1e-4)


@needs_genai
def test_per_layer_slice_is_refused_before_any_work(sources, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "genai", str(sources["per-layer"]), "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("slice2deploy export: error:") and "per-layer slice" in error and "--mode uniform" in error
    assert len(error.strip().splitlines()) == 1 and not out.exists()


@needs_genai
def test_nothing_is_written_when_the_quality_gate_fails(sources, tmp_path, tiny_text_file, capsys):
    out = tmp_path / "out"
    argv = ["export", "genai", str(sources["dense"]), "-o", str(out), "--precision", "fp32", "--snr-floor", "1000",
            "--calib", str(tiny_text_file), "--gate-seqlen", str(GATE_SEQLEN)]
    assert main(argv) == 2
    assert "below the floor of 1000" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a partial temporary directory


@needs_genai
def test_the_gate_refuses_a_perplexity_above_the_ratio_limit(sources, tmp_path, tiny_text_file, capsys):
    """An SNR floor alone is not enough: the ratio limit refuses what the floor lets through, and writes nothing."""
    out = tmp_path / "out"
    argv = ["export", "genai", str(sources["dense"]), "-o", str(out), "--precision", "int4", "--snr-floor", "0",
            "--max-ppl-ratio", "1.0000001", "--calib", str(tiny_text_file), "--gate-seqlen", str(GATE_SEQLEN)]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "above the limit of 1x" in error and "PyTorch's" in error
    assert list(tmp_path.iterdir()) == []
