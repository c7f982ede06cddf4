"""The one-command pipeline: recipes, resume-safe steps, the report end to end on a tiny random model."""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks.pipeline import run_pipeline
from benchmarks.suite.recipe import load_recipe, validate_recipe
from benchmarks.suite.schema import validate_record
from benchmarks.suite.steps import STEP_MANIFEST, Step, run_steps
from slice2deploy.cli import main
from slice2deploy.utils import UserInputError

pytest.importorskip("onnxruntime")
pytest.importorskip("matplotlib")

from exporters.ort import MANIFEST_FILE  # noqa: E402
from exporters.quantize import QUANT_MANIFEST  # noqa: E402

from .conftest import tiny_model, tiny_tokenizer  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
needs_genai = pytest.mark.skipif(find_spec("onnxruntime_genai") is None,
                                 reason="onnxruntime-genai is not installed (pip install -e '.[genai]')")


def tiny_recipe(model: Path, text: Path, /, **changes) -> dict:
    recipe = {
        "name": "tiny", "model": str(model), "profile": "cpu-quick", "sparsities": [0.0, 0.25],
        "slice": {"round_to": 16, "calibration": {"source": str(text), "samples": 4, "seqlen": 32}},
        "eval": {"data": str(text), "seqlen": 32, "max_tokens": 256},
        "bench": {"backends": {"onnxruntime": ["fp32"]}, "prompt_lengths": [8, 16], "headline_prompt": 16,
                  "decode_batches": [1, 2], "decode_prompt": 8, "decode_tokens": 4, "warmup": 1, "repeats": 2},
    }
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            recipe.setdefault(section, {})[name] = value
        else:
            recipe[section] = value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_llama_dir, tiny_text_file):
    """The tiny recipe run twice into one directory: (out, recipe path, first statuses, second statuses, mtimes)."""
    work = tmp_path_factory.mktemp("pipeline")
    recipe = write_recipe(work / "tiny.yaml", tiny_recipe(tiny_llama_dir, tiny_text_file))
    out = work / "out"
    first = run_pipeline(recipe, out, progress=False, log=False)
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in out.glob(f"*/{STEP_MANIFEST}")}
    second = run_pipeline(recipe, out, progress=False, log=False)
    return out, recipe, first, second, mtimes


def test_pipeline_writes_valid_records_report_and_plots(pipeline_run):
    out, _, first, _, _ = pipeline_run
    assert all(s.status == "ran" for s in first)
    assert [s.key for s in first][0] == "slice-sliced-0.25" and first[-1].key == "report"
    report = out / "report"
    records = [json.loads(line) for line in (report / "results.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in records] == ["dense/onnxruntime-cpu/fp32", "sliced-0.25/onnxruntime-cpu/fp32"]
    for record in records:
        assert validate_record(record) == []
        assert record["status"] == "ok" and record["prefill_ms"] > 0 and record["decode_tok_s"] > 0
        assert record["peak_rss_mb"] > 0 and record["size_mb"] > 0 and record["perplexity"] > 1
        assert record["memory_bandwidth_gb_s"] > 0 and record["bandwidth_fraction"] > 0
        assert [p["prompt_tokens"] for p in record["prefill"]] == [8, 16]
        assert [p["batch"] for p in record["decode"]] == [1, 2]
    assert records[1]["size_mb"] < records[0]["size_mb"]  # the sliced export is smaller
    text = (report / "report.md").read_text()
    assert "| sliced-0.25/onnxruntime-cpu/fp32 |" in text and "GB/s" in text
    for name in ("latency_vs_sparsity.png", "perplexity_vs_latency.png", "memory_size.png"):
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({name})" in text
    assert not list(out.glob(".*partial*"))  # no leftovers from atomic writes


def test_rerun_skips_finished_steps(pipeline_run):
    out, _, first, second, mtimes = pipeline_run
    assert [s.key for s in second] == [s.key for s in first]
    assert all(s.status == "skipped" for s in second)
    assert mtimes == {p.parent.name: p.stat().st_mtime_ns for p in out.glob(f"*/{STEP_MANIFEST}")}


def test_changed_config_reruns_only_what_depends_on_it(pipeline_run, tiny_llama_dir, tiny_text_file, tmp_path):
    out, _, _, _, _ = pipeline_run
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_llama_dir, tiny_text_file, **{
        "eval.max_tokens": 128}))
    statuses = {s.key: s.status for s in run_pipeline(recipe, out, progress=False, log=False)}
    ran = sorted(k for k, v in statuses.items() if v == "ran")
    assert ran == ["eval-dense-onnxruntime-cpu-fp32", "eval-sliced-0.25-onnxruntime-cpu-fp32", "report"]
    records = [json.loads(line) for line in (out / "report" / "results.jsonl").read_text().splitlines()]
    assert {r["eval_tokens"] for r in records} == {128}


def test_uniform_refit_recipe_builds_a_standard_sliced_model(pipeline_run, tiny_llama_dir, tiny_text_file,
                                                             tmp_path):
    out, _, _, _, _ = pipeline_run
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_llama_dir, tiny_text_file, **{
        "slice.mode": "uniform", "slice.refit": True}))
    statuses = {s.key: s.status for s in run_pipeline(recipe, out, progress=False, log=False, build_only=True)}
    assert statuses["slice-sliced-0.25"] == "ran" and statuses.get("slice-dense", "skipped") == "skipped"
    assert [v for k, v in statuses.items() if k.startswith("export-sliced-0.25")] == ["ran"]
    config = json.loads((out / "slice-sliced-0.25" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["hidden_size"] == 16
    assert config["slice2deploy"]["refit"] == 1e-3 and config["slice2deploy"]["mode"] == "uniform"


def test_gptq_int4_recipe_on_the_incoherent_slice(tiny_llama_dir, tiny_text_file, tmp_path):
    """The shipped CPU recipe's settings: incoherence, fused-attention export, GPTQ INT4, SmoothQuant INT8."""
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_llama_dir, tiny_text_file, **{
        "slice.incoherence": True, "bench.backends": {"onnxruntime": ["fp32", "int8-dynamic", "int4"]},
        "export.attention": "fused",
        "quantize": {"block_size": 16, "modes": {"int4": {"method": "gptq", "gptq_samples": 4, "gptq_seqlen": 32}},
                     "calib_samples": 2, "smooth_alpha": 0.8}}))
    statuses = {s.key: s.status for s in run_pipeline(recipe, tmp_path / "out", progress=False, log=False,
                                                      build_only=True)}
    assert statuses["quantize-sliced-0.25-int4"] == "ran"
    manifest = json.loads((tmp_path / "out" / "quantize-sliced-0.25-int4" / "onnx" / QUANT_MANIFEST).read_text())
    assert manifest["config"]["method"] == "gptq" and manifest["config"]["gptq_seqlen"] == 32
    assert manifest["logits_snr_db"] >= manifest["snr_floor_db"]
    assert manifest["config"]["smooth_alpha"] is None  # the section's smooth_alpha is an INT8 option
    int8 = json.loads((tmp_path / "out" / "quantize-dense-int8-dynamic" / "onnx" / QUANT_MANIFEST).read_text())
    assert int8["smoothing"]["alpha"] == 0.8 and int8["smoothing"]["groups"] > 0  # the dense model's norms
    export = json.loads((tmp_path / "out" / "export-sliced-0.25-float32" / "onnx" / MANIFEST_FILE).read_text())
    assert export["export_config"]["attention"] == "fused" and export["fused_attention_nodes"] > 0


def _writer(name: str, text: str, fail: bool = False):
    def run(tmp: Path, upstream: dict) -> dict:
        (tmp / name).write_text(text)
        if fail:
            raise RuntimeError("step failed on purpose")
        return {"upstream": sorted(upstream)}

    return run


def test_failed_step_leaves_nothing_that_looks_finished(tmp_path):
    with pytest.raises(RuntimeError, match="on purpose"):
        run_steps([Step("a", "demo", {}, _writer("a.txt", "x")),
                   Step("b", "demo", {}, _writer("b.txt", "y", fail=True), ["a"])], tmp_path, log=False)
    assert (tmp_path / "a" / STEP_MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # neither b nor a temporary directory


def test_tampered_output_or_changed_input_reruns(tmp_path):
    steps = [Step("a", "demo", {"v": 1}, _writer("a.txt", "x")), Step("b", "demo", {}, _writer("b.txt", "y"), ["a"])]
    run_steps(steps, tmp_path, log=False)
    assert [s.status for s in run_steps(steps, tmp_path, log=False)[1]] == ["skipped", "skipped"]
    (tmp_path / "b" / "b.txt").write_text("edited")
    assert [s.status for s in run_steps(steps, tmp_path, log=False)[1]] == ["skipped", "ran"]
    steps[0] = Step("a", "demo", {"v": 1}, _writer("a.txt", "changed output"))
    (tmp_path / "a" / "a.txt").write_text("tampered")
    assert [s.status for s in run_steps(steps, tmp_path, log=False)[1]] == ["ran", "ran"]  # b's input changed


def test_shipped_cpu_recipe_is_valid():
    recipe = load_recipe(RECIPES / "smollm2-cpu.yaml")
    assert recipe.model == "smollm2-135m" and recipe.profile.name == "cpu-quick" and recipe.device == "cpu"
    genai = {"onnxruntime-genai": ["int4"]} if find_spec("onnxruntime_genai") else {}
    assert recipe.backends == {"pytorch": ["fp32"], "onnxruntime": ["fp32", "int8-dynamic", "int4"], **genai}
    # without the genai extra its rows are listed as skipped; with it, its batch-4 decode is
    assert any(("skipped" in line) != bool(genai) and "onnxruntime-genai" in line for line in recipe.skipped)
    assert recipe.export == {"opset": None, "exporter": "torchscript", "attention": "fused",
                             "attention_chunks": None, "decode_graph": True}
    from benchmarks.suite.recipe import quant_settings

    assert quant_settings(recipe.quantize, "int8-dynamic")["smooth_alpha"] == 0.8
    int4 = quant_settings(recipe.quantize, "int4")
    assert int4["quantize_head"] is True and "lm_head" in int4["weight_int8"]
    assert recipe.recover and recipe.recover["method"] == "kd"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("name", ["smollm2-rtx.yaml", "smollm2-datacenter.yaml"])
def test_gpu_recipes_refuse_without_gpu(name):
    with pytest.raises(UserInputError, match=r"'bench.device'.*needs a CUDA GPU"):
        load_recipe(RECIPES / name)


BAD_RECIPES = [
    ({"sparsity": [0.25]}, r"recipe key 'sparsity' is not known"),
    ({"slice.round": 32}, r"recipe key 'slice.round' is not known"),
    ({"slice.calibration": {"samples": 4, "seq": 8}}, r"'slice.calibration.seq' is not known"),
    ({"model": None}, r"recipe key 'model' is required"),
    ({"model": "./no/such/model"}, r"recipe key 'model': no such model"),
    ({"profile": "laptop"}, r"recipe key 'profile': unknown profile 'laptop'"),
    ({"bench.backends": {"pytorch": ["int4"]}}, r"'bench.backends.pytorch': precision 'int4' is not possible"),
    ({"bench.backends": {"jax": ["fp32"]}}, r"'bench.backends.jax': unknown backend"),
    ({"sparsities": [0.0, 1.5]}, r"'sparsities': 1.5 is not a number in \[0, 1\)"),
    ({"bench.headline_prompt": 64}, r"'bench.headline_prompt': 64 is not one of"),
    ({"bench.backends": {"onnxruntime": ["int4"]}, "slice.round_to": 8},
     r"'slice.round_to': 8 is not a multiple of quantize.block_size 32"),
    ({"quantize.modes": {"int3": {}}}, r"recipe key 'quantize.modes.int3' is not known"),
    ({"quantize.modes": {"int4": {"bits": 3}}}, r"recipe key 'quantize.modes.int4.bits' is not known"),
    ({"quantize.modes": {"int4": {"embedding_dtype": "int8"}}}, r"'quantize.modes.int4.embedding_dtype' must be"),
    ({"quantize.modes": {"int4": {"method": "awq"}}}, r"'quantize.modes.int4.method' must be rtn, hqq or gptq"),
    ({"slice.refit": True}, r"section 'slice': refit is a uniform-mode option"),
    ({"slice.mode": "layerwise"}, r"section 'slice': mode must be 'per-layer' or 'uniform'"),
    ({"slice.mode": "uniform", "slice.refit": 0}, r"section 'slice': refit ridge must be > 0"),
    ({"export.attention": "flash"}, r"recipe key 'export.attention' must be eager or fused"),
    ({"export.attention_chunks": 4}, r"'export.attention_chunks' must be null or an integer >= 1 \(> 1 only with"),
    ({"export.attention": "fused", "export.attention_chunks": 0}, r"'export.attention_chunks' must be null"),
    ({"quantize.smooth_alpha": 1.5}, r"'quantize.smooth_alpha' must be null or a number in \(0, 1\)"),
    ({"quantize.modes": {"int8-static": {"smooth_alpha": "on"}}}, r"'quantize.modes.int8-static.smooth_alpha' must"),
    ({"bench.backends": {"onnxruntime-genai": ["fp16"]}}, r"'bench.backends.onnxruntime-genai': precision 'fp16' is "
     r"not possible on onnxruntime-genai \(supported: fp32, int4\); .*builds fp16 for GPUs"),
    ({"bench.if_available": {"onnxruntime-genai": ["int8-dynamic"]}},
     r"'bench.if_available.onnxruntime-genai': precision 'int8-dynamic' is not possible"),
    ({"genai.blocksize": 16}, r"recipe key 'genai.blocksize' is not known"),
    ({"genai.block_size": 48}, r"recipe section 'genai': block size 48 is not one the builder takes"),
    ({"genai.gate_samples": 0}, r"recipe section 'genai': the quality gate needs at least 1 window"),
    ({"genai.builder_extra": "algo_config=k_quant"}, r"recipe key 'genai.builder_extra' must be a list"),
]


@pytest.mark.parametrize("changes, message", BAD_RECIPES)
def test_bad_recipe_names_the_key(changes, message, tiny_llama_dir, tiny_text_file):
    with pytest.raises(UserInputError, match=message):
        validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **changes))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_in_cpu_profile_without_gpu_is_refused(tiny_llama_dir, tiny_text_file):
    with pytest.raises(UserInputError, match=r"'bench.device'.*needs a CUDA GPU"):
        validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **{"bench.device": "cuda"}))


def test_tensorrt_without_tensorrt_is_refused_or_skipped(tiny_llama_dir, tiny_text_file):
    from exporters.tensorrt import tensorrt_available

    if tensorrt_available() and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present")
    with pytest.raises(UserInputError, match=r"'bench.backends.tensorrt': (TensorRT not installed|TensorRT needs)"):
        validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **{"bench.backends": {"tensorrt": ["fp16"]}}))
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **{"bench.if_available": {
        "tensorrt": ["fp16"]}}))
    assert "tensorrt" not in recipe.backends and recipe.skipped[0].startswith("tensorrt (fp16): skipped")


def test_cli_reports_a_bad_recipe(tmp_path, capsys, tiny_llama_dir, tiny_text_file):
    recipe = write_recipe(tmp_path / "bad.yaml", tiny_recipe(tiny_llama_dir, tiny_text_file, **{"slice.roundto": 4}))
    assert main(["pipeline", str(recipe), "-o", str(tmp_path / "out")]) == 2
    assert "recipe key 'slice.roundto' is not known" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # validated before anything is written
    assert main(["pipeline", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "out")]) == 2
    assert "no recipe file" in capsys.readouterr().err


def test_per_mode_quantize_settings():
    from benchmarks.suite.recipe import quant_settings

    quantize = {"block_size": 32, "weight_int8": [], "modes": {"int4": {"weight_int8": ["down_proj"]}}}
    assert quant_settings(quantize, "int4")["weight_int8"] == ["down_proj"]
    assert quant_settings(quantize, "int8-dynamic")["weight_int8"] == []
    assert "modes" not in quant_settings(quantize, "int4")


# -- ONNX Runtime GenAI as a pipeline backend -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gqa_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose heads GenAI's CPU GroupQueryAttention takes (head_dim 16; the shared one has 8)."""
    path = tmp_path_factory.mktemp("tiny-gqa-llama")
    tiny_model("llama", hidden_size=64, head_dim=16).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def genai_recipe(model: Path, text: Path, /, **changes) -> dict:
    """Dense and per-layer 25 % on PyTorch fp32 and GenAI fp32, gated on the tiny text (int4 builds the same way;
    the quality-gate test builds one)."""
    return tiny_recipe(model, text, **{"bench.backends": {"pytorch": ["fp32"], "onnxruntime-genai": ["fp32"]},
                                       "genai": {"calib": str(text), "gate_seqlen": 32, "block_size": 16},
                                       **changes})


@pytest.fixture(scope="module")
def genai_run(tmp_path_factory, gqa_llama_dir, tiny_text_file):
    """The GenAI recipe through the CLI: (exit code, out, records by variant)."""
    work = tmp_path_factory.mktemp("genai-pipeline")
    recipe = write_recipe(work / "genai.yaml", genai_recipe(gqa_llama_dir, tiny_text_file))
    code = main(["pipeline", str(recipe), "-o", str(work / "out")])
    lines = (work / "out" / "report" / "results.jsonl").read_text().splitlines() if code == 0 else []
    return code, work / "out", {r["variant"]: r for r in map(json.loads, lines)}


@needs_genai
def test_genai_rows_are_built_evaluated_and_benchmarked(genai_run):
    code, out, records = genai_run
    assert code == 0
    assert not list(out.glob("export-*"))  # GenAI builds from the checkpoints, not from our ONNX export
    for record in records.values():
        assert validate_record(record) == []
    pytorch, genai = records["dense/pytorch-cpu/fp32"], records["dense/onnxruntime-genai-cpu/fp32"]
    assert genai["status"] == "ok" and genai["backend"] == "onnxruntime-genai" and genai["size_mb"] > 0
    assert genai["prefill_ms"] > 0 and genai["decode_tok_s"] > 0 and genai["peak_rss_mb"] > 0
    assert [p["prompt_tokens"] for p in genai["prefill"]] == [8, 16]
    assert [p["batch"] for p in genai["decode"]] == [1]  # GenAI steps batch 1 only; the report's note says so
    assert genai["eval_tokens"] == pytorch["eval_tokens"]
    assert genai["perplexity"] == pytest.approx(pytorch["perplexity"], rel=1e-4)
    manifest = json.loads((out / "genai-dense-fp32" / STEP_MANIFEST).read_text())
    assert manifest["config"]["precision"] == "fp32" and manifest["config"]["block_size"] is None  # an int4 option
    assert manifest["result"]["logits_snr_db"] > 80
    assert (out / "genai-dense-fp32" / "genai" / "genai_config.json").is_file()


@needs_genai
def test_genai_refusal_of_a_per_layer_slice_is_a_rejected_row(genai_run):
    code, out, records = genai_run
    assert code == 0 and records["sliced-0.25/pytorch-cpu/fp32"]["status"] == "ok"
    record = records["sliced-0.25/onnxruntime-genai-cpu/fp32"]
    assert record["status"] == "rejected" and record["perplexity"] is None and record["prefill_ms"] is None
    assert record["reason"].startswith("GenAI refused: the sliced-0.25 model is a per-layer slice")
    assert "--mode uniform" in record["reason"]
    assert not (out / "genai-sliced-0.25-fp32" / "genai").exists()
    text = (out / "report" / "report.md").read_text()
    assert "| sliced-0.25/onnxruntime-genai-cpu/fp32 | rejected: GenAI refused: the sliced-0.25 model" in text
    assert "| dense/onnxruntime-genai-cpu/fp32 |" in text
    assert "onnxruntime-genai (fp32): decode at batch 2 not measured" in text


@needs_genai
def test_genai_quality_gate_refusal_is_a_rejected_row(gqa_llama_dir, tiny_text_file, tmp_path):
    recipe = write_recipe(tmp_path / "gate.yaml", genai_recipe(gqa_llama_dir, tiny_text_file, **{
        "sparsities": [0.0], "bench.backends": {"onnxruntime-genai": ["int4"]},
        "genai": {"calib": str(tiny_text_file), "gate_seqlen": 32, "block_size": 16, "snr_floor_db": 1000}}))
    statuses = {s.key: s.status for s in run_pipeline(recipe, tmp_path / "out", progress=False, log=False,
                                                      build_only=True)}
    assert statuses == {"genai-dense-int4": "ran", "eval-dense-onnxruntime-genai-cpu-int4": "ran"}
    manifest = json.loads((tmp_path / "out" / "genai-dense-int4" / STEP_MANIFEST).read_text())
    assert manifest["config"]["block_size"] == 16 and manifest["result"]["status"] == "rejected"
    result = json.loads((tmp_path / "out" / "eval-dense-onnxruntime-genai-cpu-int4" / "result.json").read_text())
    assert result["status"] == "rejected" and "quality gate: GenAI logits SNR" in result["reason"]
    assert "below the floor of 1000" in result["reason"]
    assert not (tmp_path / "out" / "genai-dense-int4" / "genai").exists()


def test_genai_without_onnxruntime_genai_is_refused_or_skipped(tiny_llama_dir, tiny_text_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # `import onnxruntime_genai` raises ImportError
    with pytest.raises(UserInputError, match=r"'bench.backends.onnxruntime-genai': ONNX Runtime GenAI is not "
                                             r"installed.*pip install 'slice2deploy\[genai\]'"):
        validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **{"bench.backends": {
            "onnxruntime-genai": ["fp32"]}}))
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **{"bench.if_available": {
        "onnxruntime-genai": ["fp32", "int4"]}}))
    assert "onnxruntime-genai" not in recipe.backends
    assert recipe.skipped == ["onnxruntime-genai (fp32, int4): skipped: ONNX Runtime GenAI is not installed; install "
                              "it with: pip install -e \".[genai]\" (or pip install 'slice2deploy[genai]')"]


def test_genai_on_a_cuda_device_is_refused(tiny_llama_dir, tiny_text_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the device check on a machine without GPU
    with pytest.raises(UserInputError, match=r"'bench.backends.onnxruntime-genai': the pipeline builds and runs "
                                             r"ONNX Runtime GenAI on CPU only \(bench.device is cuda"):
        validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **{
            "bench.device": "cuda", "bench.backends": {"onnxruntime-genai": ["fp32"]}}))


@needs_genai
def test_genai_decode_batches_need_batch_1(tiny_llama_dir, tiny_text_file):
    with pytest.raises(UserInputError, match=r"'bench.decode_batches': onnxruntime-genai steps decode batches up to "
                                             r"1 only \(GenAI appends .*\), and \[2, 4\] has none; add 1"):
        validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **{
            "bench.backends": {"onnxruntime-genai": ["fp32"]}, "bench.decode_batches": [2, 4]}))
    recipe = validate_recipe(tiny_recipe(tiny_llama_dir, tiny_text_file, **{
        "bench.backends": {"onnxruntime-genai": ["int4"]}, "bench.decode_batches": [1, 2, 4]}))
    assert recipe.skipped == ["onnxruntime-genai (int4): decode at batch 2, 4 not measured: its runner steps batches "
                              "up to 1 (GenAI appends tokens to a batch of more than one sequence only once)"]
