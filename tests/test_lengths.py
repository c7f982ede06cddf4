"""One rule for sequence lengths, asked by every entry point before any work (issue: inputs real users hit)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slice2deploy.cli import main
from slice2deploy.runners import check_length
from slice2deploy.utils import UserInputError

from .conftest import tiny_model, tiny_tokenizer

CONTEXT = 48  # OPT's learned position table: a longer window cannot run at all


@pytest.fixture(scope="module")
def short_opt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("short-opt")
    tiny_model("opt", max_position_embeddings=CONTEXT).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def short_opt_onnx(short_opt, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    out = tmp_path_factory.mktemp("short-opt-onnx") / "onnx"
    assert main(["export", "onnx", str(short_opt), "-o", str(out)]) == 0
    return out


def test_check_length():
    check_length(48, 48, "a window")
    check_length(10_000, None, "a window")  # unknown context: nothing to check
    with pytest.raises(UserInputError, match="a window of 49 tokens exceeds the model's context of 48 tokens; lower"):
        check_length(49, 48, "a window", "--x")


def _refused(argv: list[str], capsys, written: Path | None = None, before_loading: bool = True) -> str:
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    last = err[-1]
    assert last.startswith("slice2deploy ") and "exceeds the model's context of 48" in last, err
    assert not any("Traceback" in line for line in err), err
    assert not before_loading or not any("Loading weights" in line for line in err), err
    assert written is None or not written.exists()
    return last


def test_every_entry_point_refuses_a_window_past_the_context(short_opt, short_opt_onnx, tiny_text_file, tmp_path,
                                                              capsys):
    long_prompt = " ".join(["the river"] * 40)  # 80 tokens
    text = ["--calib", str(tiny_text_file), "--calib-samples", "2"]
    _refused(["slice", str(short_opt), "--sparsity", "0.25", "-o", str(tmp_path / "s"), *text, "--calib-seqlen", "64"],
             capsys,
             tmp_path / "s")
    _refused(["eval", str(short_opt), "--data", str(tiny_text_file), "--seqlen", "64"], capsys)
    _refused(["eval", str(short_opt_onnx), "--data", str(tiny_text_file), "--seqlen", "64"], capsys)
    # the prompt's length needs the tokenizer, which comes with the model
    _refused(["generate", str(short_opt), "--prompt", long_prompt, "--max-new-tokens", "2"], capsys,
             before_loading=False)
    _refused(["generate", str(short_opt_onnx), "--prompt", "the river", "--max-new-tokens", "60"], capsys)
    _refused(["quantize", str(short_opt_onnx), "-o", str(tmp_path / "q"), "--mode", "int8-static", *text,
              "--calib-seqlen", "64"], capsys, tmp_path / "q")
    _refused(["quantize", str(short_opt_onnx), "-o", str(tmp_path / "g"), "--mode", "int4", "--method", "gptq",
              *text, "--calib-seqlen", "16", "--gptq-seqlen", "64"], capsys, tmp_path / "g")
    _refused(["build-engine", str(short_opt_onnx), "-o", str(tmp_path / "e"), "--precision", "int8", "--bundle-only",
              *text, "--calib-seqlen", "64"], capsys, tmp_path / "e")


def test_gptq_default_window_fits_a_short_context(short_opt_onnx, tiny_text_file, tmp_path):
    from exporters.quantize import QUANT_MANIFEST

    out = tmp_path / "g"
    assert main(["quantize", str(short_opt_onnx), "-o", str(out), "--mode", "int4", "--method", "gptq", "--calib",
                 str(tiny_text_file), "--calib-samples", "2", "--calib-seqlen", "16", "--gptq-samples", "2"]) == 0
    import json

    assert json.loads((out / QUANT_MANIFEST).read_text())["config"]["gptq_seqlen"] == CONTEXT


def test_pipeline_refuses_profile_lengths_before_any_step(short_opt, tiny_text_file, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    recipe = {
        "name": "short", "model": str(short_opt), "profile": "cpu-quick", "sparsities": [0.0],
        "eval": {"data": str(tiny_text_file), "seqlen": 32, "max_tokens": 64},
        "bench": {"backends": {"pytorch": ["fp32"]}, "prompt_lengths": [16, 64], "headline_prompt": 16,
                  "decode_batches": [1], "decode_prompt": 8, "decode_tokens": 4, "warmup": 1, "repeats": 1},
    }
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(recipe))
    message = _refused(["pipeline", str(path), "-o", str(tmp_path / "out")], capsys)
    assert "prompt_lengths" in message
    assert not any((tmp_path / "out").glob("*/step.json")), "no step ran"
