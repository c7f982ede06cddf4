"""The CLI end to end on a tiny local model, and every bad input the slicing issue lists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from slice2deploy.cli import main

from .conftest import tiny_model, tiny_tokenizer

CALIB = ["--calib-samples", "4", "--calib-seqlen", "16"]


@pytest.fixture(scope="module")
def sliced_dir(tiny_llama_dir, tiny_text_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "sliced"
    code = main(["slice", str(tiny_llama_dir), "--sparsity", "0.25", "-o", str(out), "--calib", str(tiny_text_file),
                 *CALIB])
    assert code == 0
    return out


def test_slice_writes_a_complete_checkpoint(sliced_dir, tiny_llama_dir, tiny_text_file):
    names = {p.name for p in sliced_dir.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_slice2deploy.py", "tokenizer.json",
            "slice2deploy_manifest.json"} <= names
    manifest = json.loads((sliced_dir / "slice2deploy_manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 4 and manifest["calibration"]["seqlen"] == 16
    assert len(manifest["calibration"]["text_sha256"]) == 64
    assert manifest["source_model"]["kind"] == "local" and manifest["source_model"]["sha256"]
    assert manifest["versions"]["transformers"]
    assert manifest["parameters"]["sliced"]["total"] < manifest["parameters"]["dense"]["total"]
    assert not [p for p in sliced_dir.parent.iterdir() if p.name.startswith(".sliced")], "no temporary leftovers"


def test_info_eval_generate(sliced_dir, tiny_text_file, capsys):
    assert main(["info", str(sliced_dir)]) == 0
    out = capsys.readouterr().out
    assert "widths" in out and "24" in out
    assert main(["eval", str(sliced_dir), "--data", str(tiny_text_file), "--seqlen", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"perplexity", "tokens", "windows", "parameters"} <= set(result)
    assert result["perplexity"] > 1 and result["windows"] >= 1
    assert main(["generate", str(sliced_dir), "--prompt", "the river", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the river")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_eval_reports_the_dtype_that_ran(sliced_dir, tiny_text_file, capsys, dtype):
    argv = ["eval", str(sliced_dir), "--data", str(tiny_text_file), "--seqlen", "16", "--json", "--dtype", dtype]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == dtype and result["perplexity"] > 1


def test_eval_windows_cover_the_text(tiny_llama_dir, tiny_text_file, capsys):
    assert main(["eval", str(tiny_llama_dir), "--data", str(tiny_text_file), "--seqlen", "16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    from slice2deploy.data import load_text, token_stream

    total = token_stream(tiny_tokenizer(), load_text(str(tiny_text_file), "evaluation")).numel()
    assert result["tokens"] == total
    assert result["windows"] == -(-total // 16) - (1 if total % 16 == 1 else 0)


def _fails(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("sparsity", ["1.0", "-0.1"])
def test_bad_sparsity(tiny_llama_dir, tmp_path, capsys, sparsity):
    _fails(["slice", str(tiny_llama_dir), "--sparsity", sparsity, "-o", str(tmp_path / "o"), *CALIB], capsys,
           "sparsity must be in [0, 1)")
    assert not (tmp_path / "o").exists()


def test_non_empty_output_is_refused_unless_overwrite(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["slice", str(tiny_llama_dir), "--sparsity", "0.5", "-o", str(out), "--calib", str(tiny_text_file), *CALIB]
    _fails(argv, capsys, "not empty")
    assert (out / "keep.txt").read_text() == "precious"
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_calibration_longer_than_context(tiny_llama_dir, tiny_text_file, tmp_path, capsys):
    _fails(["slice", str(tiny_llama_dir), "--sparsity", "0.25", "-o", str(tmp_path / "o"), "--calib",
            str(tiny_text_file), "--calib-samples", "2", "--calib-seqlen", "4096"], capsys,
           "exceeds the model's context")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, tiny_text_file, capsys):
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=96, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    _fails(["slice", str(tmp_path / "gpt2"), "--sparsity", "0.25", "-o", str(tmp_path / "o"), "--calib",
            str(tiny_text_file), *CALIB], capsys,
           "supported model types: gemma3_text, llama, mistral, opt, phi, phi3, qwen2, qwen3")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("post_norm_width", ["full", "kept"])
def test_post_norm_width_flag(tmp_path, tiny_text_file, post_norm_width):
    tiny_model("gemma3_text").save_pretrained(tmp_path / "gemma")
    tiny_tokenizer().save_pretrained(tmp_path / "gemma")
    assert main(["slice", str(tmp_path / "gemma"), "--sparsity", "0.25", "--post-norm-width", post_norm_width,
                 "-o", str(tmp_path / "o"), "--calib", str(tiny_text_file), *CALIB]) == 0
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    width = config["widths"][-1] if post_norm_width == "kept" else config["original_hidden_size"]
    assert config["slicing"]["post_norm_width"] == post_norm_width
    assert config["branch_widths"] == [[width, width]] * config["base_config"]["num_hidden_layers"]


def test_post_norm_width_help_states_default(capsys):
    with pytest.raises(SystemExit):
        main(["slice", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--post-norm-width {full,kept}" in help_text and "(default full)" in help_text


def test_parameter_budget_refuses_families_the_cost_does_not_model(tmp_path, tiny_text_file, capsys):
    tiny_model("gemma3_text").save_pretrained(tmp_path / "gemma")
    tiny_tokenizer().save_pretrained(tmp_path / "gemma")
    _fails(["slice", str(tmp_path / "gemma"), "--target-params", "1e4", "-o", str(tmp_path / "o"), "--calib",
            str(tiny_text_file), *CALIB], capsys, "per-layer width budgets")
    assert not (tmp_path / "o").exists()


def test_missing_file(tmp_path, capsys):
    _fails(["eval", str(tmp_path / "nope.gguf")], capsys, "no such file")


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    _fails(["eval", str(bad)], capsys, "broken.gguf")


def test_hub_name_offline(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _fails(["slice", "someone/some-model", "--sparsity", "0.25", "-o", str(tmp_path / "o"), *CALIB], capsys,
           "smollm2-135m")
    assert not (tmp_path / "o").exists()


def test_hub_dataset_offline(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _fails(["eval", str(tiny_llama_dir), "--data", "wikitext2", "--seqlen", "16"], capsys, "builtin")


def test_cuda_without_gpu(tiny_llama_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    _fails(["eval", str(tiny_llama_dir), "--device", "cuda"], capsys, "no CUDA GPU")


def test_missing_optional_dependency_names_its_extra(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A command whose optional dependency is absent ends with one line naming the extra, exit 2, nothing written."""
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ModuleNotFoundError
    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(tiny_llama_dir), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slice2deploy export: error:") and "[onnx]" in err[0], err
    assert not out.exists()


def test_missing_module_deep_in_a_command_is_one_line(monkeypatch, capsys):
    """The CLI's last line of defence: any lazily imported optional module maps to its extra, not a traceback."""
    import argparse

    import slice2deploy.cli as cli

    def needs_matplotlib(args):
        import matplotlib  # noqa: F401

    parser = argparse.ArgumentParser()
    parser.set_defaults(handler=needs_matplotlib, command="report")
    monkeypatch.setattr(cli, "build_parser", lambda argv=None: parser)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("slice2deploy report: error: the Python package 'matplotlib' is not installed; install it with: "
                   "pip install -e \".[plot]\" (or pip install 'slice2deploy[plot]')")
