"""Benchmark suite pieces: the record schema, per-variant measurement, memory bandwidth, the report."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.suite.measure import measure_variant, memory_bandwidth
from benchmarks.suite.report import markdown, pareto_front, summary_table
from benchmarks.suite.schema import RECORD_SCHEMA, check_records, validate_record

POINT = {"batch": 1, "prompt_tokens": 16, "median_ms": 2.0, "min_ms": 1.5, "max_ms": 2.5, "repeats": 3}
RECORD = {
    "schema_version": 1, "run_id": "r", "date": "2026-01-01T00:00:00+00:00", "recipe": "t", "profile": "cpu-quick",
    "variant": "dense/onnxruntime-cpu/int4", "model": "dense", "backend": "onnxruntime", "device": "cpu",
    "precision": "int4", "sparsity": 0.0, "status": "ok", "reason": None, "prefill_ms": 2.0, "prefill_tokens": 16,
    "prefill": [POINT], "decode_tok_s": 100.0, "decode": [{**POINT, "new_tokens": 4, "tok_s": 100.0}],
    "peak_rss_mb": 300.0, "gpu_peak_mb": None, "size_mb": 1.5, "parameters": 1000, "perplexity": 12.5,
    "eval_tokens": 256, "weight_bytes": 4000, "decode_weight_gb_s": 0.1, "memory_bandwidth_gb_s": 10.0,
    "bandwidth_fraction": 0.01, "machine": {"cpu": "x", "cores": 2, "device_name": "x (2 cores)"},
    "versions": {"torch": torch.__version__},
}


def test_schema_accepts_a_valid_record():
    assert validate_record(RECORD) == []
    check_records([RECORD])
    assert set(RECORD_SCHEMA["required"]) >= {"variant", "backend", "precision", "sparsity", "prefill_ms",
                                              "decode_tok_s", "peak_rss_mb", "size_mb", "perplexity", "device"}


@pytest.mark.parametrize("edit, problem", [
    (lambda r: r.pop("perplexity"), "missing required field 'perplexity'"),
    (lambda r: r.update(backend="jax"), "'jax' is not one of"),
    (lambda r: r.update(prefill_ms="fast"), "record.prefill_ms: expected number or null"),
    (lambda r: r.update(sparsity=1.5), "1.5 > maximum 1"),
    (lambda r: r["decode"][0].update(batch=0), "record.decode[0].batch: 0 < minimum 1"),
    (lambda r: r.update(colour="red"), "unexpected field 'colour'"),
])
def test_schema_rejects_broken_records(edit, problem):
    record = copy.deepcopy(RECORD)
    edit(record)
    assert any(problem in error for error in validate_record(record)), validate_record(record)
    with pytest.raises(ValueError, match="do not match the schema"):
        check_records([record])


def test_measure_variant_pytorch_cpu(tiny_llama_dir, tiny_text_file):
    settings = {"prompt_lengths": [4, 12], "decode_batches": [1, 3], "decode_prompt": 6, "decode_tokens": 3,
                "warmup": 1, "repeats": 2, "threads": 1}
    result = measure_variant({"variant": "dense/pytorch-cpu/fp32", "backend": "pytorch",
                              "artifact": str(tiny_llama_dir), "precision": "fp32", "device": "cpu",
                              "data": str(tiny_text_file), "settings": settings})
    assert [p["prompt_tokens"] for p in result["prefill"]] == [4, 12]
    assert all(p["min_ms"] <= p["median_ms"] <= p["max_ms"] and p["repeats"] == 2 for p in result["prefill"])
    decode = {p["batch"]: p for p in result["decode"]}
    assert set(decode) == {1, 3} and all(p["tok_s"] > 0 and p["new_tokens"] == 3 for p in decode.values())
    assert decode[3]["tok_s"] == pytest.approx(3000 / decode[3]["median_ms"], rel=1e-3)
    assert result["weight_bytes"] == 4 * result["parameters"] and result["size_bytes"] > 0
    assert result["peak_rss_mb"] > 0 and result["gpu_peak_mb"] is None


def test_memory_bandwidth_is_measured():
    measured = memory_bandwidth("cpu", mib=16, repeats=2)
    assert measured["gb_s"] > 0 and measured["best_gb_s"] >= measured["gb_s"] and "copy" in measured["method"]


def test_pareto_front():
    points = [(1.0, 30.0), (2.0, 20.0), (2.5, 25.0), (3.0, 10.0), (4.0, 10.0)]
    assert pareto_front(points) == [(1.0, 30.0), (2.0, 20.0), (3.0, 10.0)]


def test_report_shows_rejected_variants_and_ratios():
    sliced = {**copy.deepcopy(RECORD), "variant": "sliced-0.25/onnxruntime-cpu/int4", "model": "sliced-0.25",
              "sparsity": 0.25, "prefill_ms": 1.0, "perplexity": 25.0}
    rejected = {**copy.deepcopy(RECORD), "variant": "sliced-0.3/onnxruntime-cpu/int4", "status": "rejected",
                "reason": "quality gate: SNR 3 dB < 8 dB", "perplexity": None, "prefill_ms": None}
    table = summary_table([RECORD, sliced, rejected])
    assert "| sliced-0.25/onnxruntime-cpu/int4 | 1.5 | 25.00 | 2.00x | 1 | 0.50x |" in table
    assert "rejected: quality gate: SNR 3 dB < 8 dB" in table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_variant_pytorch_cuda(tiny_llama_dir, tiny_text_file):
    settings = {"prompt_lengths": [8], "decode_batches": [2], "decode_prompt": 4, "decode_tokens": 2,
                "warmup": 1, "repeats": 2, "threads": None}
    result = measure_variant({"variant": "dense/pytorch-cuda/fp16", "backend": "pytorch",
                              "artifact": str(tiny_llama_dir), "precision": "fp16", "device": "cuda",
                              "data": str(tiny_text_file), "settings": settings})
    assert result["gpu_peak_mb"] > 0 and result["weight_bytes"] == 2 * result["parameters"]
    assert memory_bandwidth("cuda", mib=64)["gb_s"] > 0


def test_markdown_mentions_machine_and_method():
    class Recipe:  # the attributes markdown reads
        name, model = "t", "m"
        eval = {"data": "builtin", "max_tokens": 256, "seqlen": 32}
        skipped = ["tensorrt (fp16): skipped: TensorRT not installed"]

        class profile:  # noqa: N801
            name, decode_tokens, decode_prompt, warmup, repeats = "cpu-quick", 4, 8, 1, 2

    machine = {"machine": {"device_name": "x (2 cores)", "cpu": "x", "cores": 2, "memory_gib": 4.0, "gpu": None},
               "bandwidth": {"gb_s": 10.0, "method": "copy"}, "versions": {"torch": "2"}}
    text = markdown(Recipe, [RECORD], machine, ["memory_size.png"])
    assert "10.0 GB/s" in text and "TensorRT not installed" in text and "![memory_size.png]" in text


def test_rewriting_a_results_file_keeps_its_hand_written_notes(tmp_path):
    from benchmarks.suite.results import with_hand_notes

    path = tmp_path / "r.md"
    assert with_hand_notes(path, "# new\n| a |\n") == "# new\n| a |\n"  # no file yet
    notes = "\n## Notes (by hand)\n- kept\n\n## Notes (later)\n- kept too\n"
    path.write_text("# old\n| b |\n" + notes)
    assert with_hand_notes(path, "# new\n| a |\n") == "# new\n| a |\n" + notes
    path.write_text("# old without notes\n")
    assert with_hand_notes(path, "# new\n") == "# new\n"
