"""ONNX export with the KV cache and the ONNX Runtime runner, on tiny dense and sliced models (CPU)."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from exporters.onnx import DATA_FILE, MANIFEST_FILE, MODEL_FILE, OnnxExportConfig, export_onnx, io_names
from exporters.ort import OrtCausalLM, fused_ops_report
from exporters.parity import ParityError, Tolerance, check_parity
from slice2deploy.api import SliceConfig, slice_model
from slice2deploy.cli import main
from slice2deploy.evaluate import perplexity
from slice2deploy.utils import UserInputError

from .conftest import TINY_TEXT, tiny_model, tiny_tokenizer

pytest.importorskip("onnxruntime")  # the exporters import it lazily; without the onnx extra, skip the file
onnx = pytest.importorskip("onnx")

FP32_LIMIT = 1e-4
VARIANTS = ["llama-dense", "opt-dense", "llama-sliced", "opt-sliced",
            # attention as one ONNX Attention node per layer (opset 23); tiny Llama has grouped KV heads (4 / 2)
            "llama-dense-fused", "opt-dense-fused", "llama-sliced-fused", "opt-sliced-fused"]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Hidden size 32: threads only add overhead, and on a busy 2-core machine OpenMP's spin-waits double the time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(variant: str) -> torch.nn.Module:
    model_type, kind = variant.split("-")[:2]
    model = tiny_model(model_type)
    if kind == "sliced":
        calibration = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
        model = slice_model(model, calibration, None, SliceConfig(sparsity=0.25), progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def export_of(tmp_path_factory):
    """``export_of(variant)`` -> (model, directory, manifest), each variant exported once per module."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            model, out = _model(variant), tmp_path_factory.mktemp("onnx") / variant
            config = OnnxExportConfig(attention="fused" if variant.endswith("-fused") else "eager")
            manifest = export_onnx(model, tiny_tokenizer(), out, config, source={"spec": variant})
            cache[variant] = model, out, manifest
        return cache[variant]

    return get


@pytest.fixture(params=VARIANTS)
def exported(request, export_of):
    return export_of(request.param)


def _torch_step(model, ids, mask, positions, past=None):
    """The model itself (its default attention, a fresh DynamicCache): logits and [(key, value)] per layer."""
    cache = DynamicCache([(torch.from_numpy(k), torch.from_numpy(v)) for k, v in past] if past else None)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions), cache=cache, use_cache=True)
    return out.logits.numpy(), [(layer.keys.numpy(), layer.values.numpy()) for layer in out.cache.layers]


def _max_diffs(expected, actual) -> list[float]:
    (logits_a, past_a), (logits_b, past_b) = expected, actual
    pairs = [(logits_a, logits_b)] + [(x, y) for a, b in zip(past_a, past_b, strict=True)
                                      for x, y in zip(a, b, strict=True)]
    for x, y in pairs:
        assert x.shape == y.shape
    return [float(np.abs(x - y).max()) for x, y in pairs]


def _positions(mask: np.ndarray, past: int) -> np.ndarray:
    return np.clip(np.cumsum(mask, axis=1) - 1, 0, None)[:, past:]


# -- export and parity -------------------------------------------------------------------------------------------
def test_manifest_records_parity_on_every_output_and_shape(exported):
    model, out, manifest = exported
    num_layers = model.config.num_hidden_layers
    inputs, outputs = io_names(num_layers)
    assert {MODEL_FILE, "config.json", "generation_config.json", "tokenizer.json", MANIFEST_FILE} <= {
        p.name for p in out.iterdir()}
    onnx.checker.check_model(str(out / MODEL_FILE))
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    assert [i.name for i in graph.input] == inputs and [o.name for o in graph.output] == outputs
    recorded = json.loads((out / MANIFEST_FILE).read_text())
    fused = out.name.endswith("-fused")
    assert recorded["parity"]["passed"] and recorded["opset"] == (23 if fused else 18)
    assert recorded["dtype"] == "float32" and recorded["export_config"]["attention"] == ("fused" if fused else "eager")
    ops = collections.Counter(node.op_type for node in graph.node)
    if fused:  # one Attention per layer (in 4 causal blocks for long inputs), no attention arithmetic around it
        assert recorded["fused_attention_nodes"] == recorded["causal_chunked_attention_nodes"] == num_layers
        branches = {kind: [collections.Counter(n.op_type for n in a.g.node) for node in graph.node
                           if node.op_type == "If" for a in node.attribute if a.name == kind]
                    for kind in ("then_branch", "else_branch")}
        assert ops["If"] == num_layers and "Attention" not in ops
        assert [b["Attention"] for b in branches["then_branch"]] == [4] * num_layers
        assert branches["else_branch"] == [{"Attention": 1}] * num_layers
        assert "Softmax" not in ops and "Expand" not in {n.op_type for n in graph.node if "self_attn" in n.name}
        assert ops["RotaryEmbedding"] == (2 * num_layers if out.name.startswith("llama") else 0)  # q and k
    else:
        assert "Attention" not in ops and "RotaryEmbedding" not in ops and ops["Softmax"] == num_layers
    assert recorded["parity"]["tolerance"] == {"atol": 1e-4, "rtol": 1e-4}
    assert recorded["source"] == {"spec": out.name} and recorded["versions"]["onnxruntime"]
    assert recorded["io"]["inputs"] == inputs and recorded["files_sha256"][MODEL_FILE]
    # A tied head is stored once (its transpose is a node), so the graph holds exactly the model's parameters.
    assert recorded["parameters"] == sum(p.numel() for p in model.parameters())
    # model.onnx, plus model.onnx.data when a decode graph shares the weights with it
    assert recorded["size_bytes"] == sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(MODEL_FILE))
    assert recorded["decode_graph"]["written"] == (fused and out.name.startswith("llama"))
    cases = recorded["parity"]["cases"]
    assert set(cases) == {"prefill", "decode", "left_padding"} | ({"long_step"} if fused else set())
    if fused:  # long enough for the causal blocks, after a past, row 0 padded
        assert cases["long_step"]["inputs"] == {"batch": 2, "sequence": 64, "past_sequence": 8, "padded_tokens": 3}
    assert cases["prefill"]["inputs"] == {"batch": 2, "sequence": 8, "past_sequence": 0, "padded_tokens": 0}
    assert cases["decode"]["inputs"] == {"batch": 2, "sequence": 1, "past_sequence": 8, "padded_tokens": 0}
    assert cases["left_padding"]["inputs"]["padded_tokens"] > 0
    for case in cases.values():
        assert set(case["max_abs_diff"]) == set(outputs)
        assert max(case["max_abs_diff"].values()) <= FP32_LIMIT


def test_parity_recomputed_against_the_model_itself(exported):
    """Independent of the gate: the model as loaded (SDPA attention, its own cache) vs the ONNX Runtime runner."""
    model, out, _ = exported
    runner = OrtCausalLM(out)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, model.config.vocab_size, (2, 8))
    mask = np.ones_like(ids)
    prefill = _torch_step(model, ids, mask, _positions(mask, 0))
    assert max(_max_diffs(prefill, runner.forward(ids, mask, _positions(mask, 0)))) <= FP32_LIMIT
    step, mask = ids[:, :1], np.ones((2, 9), dtype=np.int64)
    decode = _torch_step(model, step, mask, _positions(mask, 8), prefill[1])
    assert max(_max_diffs(decode, runner.forward(step, mask, _positions(mask, 8), prefill[1]))) <= FP32_LIMIT
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    padded = _torch_step(model, ids, mask, _positions(mask, 0))
    ort_padded = runner.forward(ids, mask, _positions(mask, 0))
    # Padded query rows attend to nothing real and their values are never used; compare the real tokens.
    real = mask.astype(bool)
    assert np.abs(padded[0][real] - ort_padded[0][real]).max() <= FP32_LIMIT
    for torch_kv, ort_kv in zip(padded[1], ort_padded[1], strict=True):
        for x, y in zip(torch_kv, ort_kv, strict=True):  # every layer: the full row, and the padded row's real tokens
            assert np.abs(x[1] - y[1]).max() <= FP32_LIMIT and np.abs(x[0, :, 3:] - y[0, :, 3:]).max() <= FP32_LIMIT


def test_greedy_generation_equals_pytorch(exported):
    model, out, _ = exported
    prompt = np.random.default_rng(2).integers(3, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                  pad_token_id=0).numpy()
    generated = OrtCausalLM(out).generate(prompt, max_new_tokens=16)
    assert generated.shape == (1, 22)
    np.testing.assert_array_equal(generated, expected)


def test_left_padded_batch_generation_equals_pytorch(exported):
    model, out, _ = exported
    prompt = np.random.default_rng(3).integers(3, model.config.vocab_size, (2, 6))
    mask = np.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = 0, 0
    with torch.no_grad():
        expected = model.generate(torch.from_numpy(prompt), attention_mask=torch.from_numpy(mask), max_new_tokens=8,
                                  min_new_tokens=8, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(OrtCausalLM(out).generate(prompt, 8, attention_mask=mask), expected)


def test_perplexity_equals_pytorch_on_the_same_windows(exported):
    model, out, _ = exported
    tokens = torch.tensor(tiny_tokenizer()(TINY_TEXT)["input_ids"])[:300]
    expected = perplexity(model, tokens, seqlen=32, batch_size=4, progress=False)
    result = OrtCausalLM(out).perplexity(tokens, seqlen=32, batch_size=4)
    assert (result.windows, result.tokens, result.predicted_tokens) == (
        expected.windows, expected.tokens, expected.predicted_tokens)
    assert math.isclose(result.perplexity, expected.perplexity, rel_tol=1e-4)


def test_sampling_is_seeded_and_top_k_1_is_greedy(exported):
    _, out, _ = exported
    runner = OrtCausalLM(out)
    prompt = np.arange(3, 9)[None]
    first = runner.generate(prompt, 8, do_sample=True, temperature=0.8, top_k=20, seed=7)
    assert np.array_equal(first, runner.generate(prompt, 8, do_sample=True, temperature=0.8, top_k=20, seed=7))
    greedy = runner.generate(prompt, 8)
    assert np.array_equal(runner.generate(prompt, 8, do_sample=True, top_k=1, seed=3), greedy)


@pytest.mark.parametrize("variant", ["llama-sliced", "opt-dense", "llama-sliced-fused"])
def test_last_logits_generation_graph(export_of, variant, tmp_path):
    model, full_dir, _ = export_of(variant)
    out = tmp_path / "last"
    attention = "fused" if variant.endswith("-fused") else "eager"
    manifest = export_onnx(model, tiny_tokenizer(), out, OnnxExportConfig(last_logits=True, attention=attention))
    assert manifest["parity"]["max_abs_diff"] <= FP32_LIMIT
    full, last = OrtCausalLM(full_dir), OrtCausalLM(out)
    assert last.last_logits_only and not full.last_logits_only
    ids = np.random.default_rng(5).integers(3, model.config.vocab_size, (2, 9))
    logits = last.forward(ids)[0]
    assert logits.shape == (2, 1, model.config.vocab_size)
    np.testing.assert_allclose(logits[:, 0], full.forward(ids)[0][:, -1], atol=1e-5)
    np.testing.assert_array_equal(last.generate(ids[:1], max_new_tokens=12), full.generate(ids[:1], max_new_tokens=12))
    with pytest.raises(UserInputError, match="generation graph"):
        last.perplexity(np.arange(40) % model.config.vocab_size, seqlen=16)


def test_cpu_outputs_are_the_runtime_buffers_as_writable_numpy(export_of):
    """The runner hands out ONNX Runtime's output buffers (DLPack, no copy): the values session.run returns, as
    ordinary writable arrays that outlive the call."""
    _, out, _ = export_of("llama-dense")
    runner = OrtCausalLM(out)
    ids = np.random.default_rng(4).integers(0, 96, (2, 7))
    feeds = runner._feeds(ids, None, None, None)
    copied = runner.session.run(runner.output_names, feeds)
    logits, past = runner.forward(ids)
    again, _ = runner.forward(ids[:, :3])  # a second call does not touch the first call's arrays
    assert isinstance(logits, np.ndarray) and logits.flags.writeable and again.shape[1] == 3
    assert np.array_equal(logits, copied[0]) and np.array_equal(past[1][1], copied[4])
    logits[0, 0, 0] += 1.0


def test_generation_stops_at_eos(tmp_path):
    model = _model("llama-dense")
    prompt = np.arange(3, 9)[None]
    with torch.no_grad():
        first = model(input_ids=torch.from_numpy(prompt)).logits[0, -1].argmax().item()
    generated = OrtCausalLM(_export_to(model, tmp_path / "eos")).generate(prompt, 8, eos_token_id=first)
    assert generated.shape == (1, 7) and generated[0, -1] == first


# -- float16, tolerance, errors ----------------------------------------------------------------------------------
def _export_to(model, out: Path, **config) -> Path:
    export_onnx(model, None, out, OnnxExportConfig(**config))
    return out


@pytest.mark.parametrize("attention", ["eager", "fused"])
def test_float16_export_passes_its_gate(tmp_path, attention):
    out = _export_to(_model("llama-sliced"), tmp_path / "fp16", dtype="float16", attention=attention)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["dtype"] == "float16" and manifest["parity"]["passed"]
    assert manifest.get("fused_attention_nodes", 0) == (2 if attention == "fused" else 0)
    assert manifest["parity"]["tolerance"] == {"atol": 1e-3, "rtol": 2e-2}
    graph = onnx.load(str(out / MODEL_FILE), load_external_data=False).graph
    assert graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    runner = OrtCausalLM(out)
    assert runner.dtype == "float16" and runner.generate(np.arange(3, 9)[None], 4).shape == (1, 10)


def test_parity_failure_names_every_failing_output_and_writes_nothing(tmp_path, monkeypatch):
    def broken(self, inputs):
        outputs = dict(zip(self.output_names, self.session.run(self.output_names, inputs), strict=True))
        outputs["logits"] = outputs["logits"] + 0.5
        return outputs

    monkeypatch.setattr(OrtCausalLM, "run_named", broken)
    with pytest.raises(ParityError) as error:
        export_onnx(_model("opt-sliced"), None, tmp_path / "out", OnnxExportConfig())
    message = str(error.value)
    for case in ("prefill", "decode", "left_padding"):
        assert f"{case}/logits: max |Δ| 0.5" in message
    assert "present" not in message and len(error.value.failures) == 3
    assert list(tmp_path.iterdir()) == [], "a failed export leaves nothing behind"


def test_parity_limits_nan_and_shape_mismatch():
    reference = {"logits": np.array([[10.0, -20.0]]), "present.0.key": np.ones((1, 2))}

    def run(inputs):
        return {"logits": inputs["logits"], "present.0.key": inputs["present"]}

    cases = [("ok", {"logits": reference["logits"] + 2e-4, "present": reference["present.0.key"]}),
             ("nan", {"logits": np.full((1, 2), np.nan), "present": reference["present.0.key"]}),
             ("shape", {"logits": reference["logits"], "present": np.ones((1, 3))})]
    with pytest.raises(ParityError) as error:
        check_parity(lambda _: reference, run, cases, Tolerance(atol=1e-4, rtol=1e-5))  # limit on logits: 3e-4
    assert [(f["case"], f["output"]) for f in error.value.failures] == [("nan", "logits"), ("shape", "present.0.key")]
    assert error.value.report["cases"]["ok"]["limit"]["logits"] == pytest.approx(3e-4)


def test_external_data_and_its_absence(tmp_path):
    model = _model("llama-dense")
    out = tmp_path / "external"
    manifest = export_onnx(model, None, out, OnnxExportConfig(external_data=True))
    assert manifest["external_data"] and (out / DATA_FILE).is_file()
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes  # the data file is as readable as the rest
    runner = OrtCausalLM(out)
    assert runner.parameters == sum(p.numel() for p in model.parameters())  # tied head stored once
    (out / DATA_FILE).unlink()
    with pytest.raises(UserInputError, match=r"external data file\(s\) model.onnx.data, missing"):
        OrtCausalLM(out)


def test_directory_without_onnx(tmp_path):
    with pytest.raises(UserInputError, match="holds no model.onnx"):
        OrtCausalLM(tmp_path)
    with pytest.raises(UserInputError, match="not a directory"):
        OrtCausalLM(tmp_path / "absent")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider")
def test_cuda_without_a_gpu(export_of, monkeypatch):
    import onnxruntime

    _, out, _ = export_of("llama-sliced")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(UserInputError, match="no CUDAExecutionProvider"):
            OrtCausalLM(out, provider="cuda")
    # onnxruntime-gpu without a usable GPU lists the provider, then runs the session on the CPU: refuse that.
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider",
                                                                        "CPUExecutionProvider"])
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="fell back to CPU"):
            OrtCausalLM(out, provider="cuda")
    with pytest.raises(UserInputError, match="unknown ONNX Runtime device"):
        OrtCausalLM(out, provider="tpu")


@pytest.mark.parametrize(("options", "match"), [
    ({"opset": 16}, "opset must be an integer >= 17"),
    ({"opset": 21}, "torchscript exporter supports opset 17..20"),
    ({"dtype": "bfloat16"}, "unknown dtype 'bfloat16'"),
    ({"exporter": "magic"}, "unknown exporter"),
    ({"atol": -1.0}, "atol must be >= 0"),
    ({"attention": "flash"}, "unknown attention 'flash'"),
    ({"attention": "fused", "opset": 20}, "needs opset >= 23"),
    ({"attention": "fused", "exporter": "dynamo"}, "traced by the torchscript exporter"),
    ({"attention_chunks": 4}, "needs attention=fused"),
    ({"attention": "fused", "attention_chunks": 0}, "attention_chunks must be an integer >= 1"),
])
def test_config_validation(options, match):
    with pytest.raises(UserInputError, match=match):
        OnnxExportConfig(**options)


def test_config_round_trip():
    config = OnnxExportConfig(dtype="float16", opset=17, external_data=True, atol=1e-3)
    assert OnnxExportConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.tolerance.rtol == 2e-2
    assert OnnxExportConfig().opset == 18 and OnnxExportConfig(attention="fused").opset == 23
    assert OnnxExportConfig().attention_chunks == 1 and OnnxExportConfig(attention="fused").attention_chunks == 4


def test_parity_compares_only_positions_that_are_read():
    """A padded position's outputs are a convention (eager: uniform average over masked keys; ONNX Attention:
    zeros), so the gate skips them; any difference at a real position still fails."""
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    rng = np.random.default_rng(0)
    reference = {"logits": rng.standard_normal((2, 4, 5)), "present.0.key": rng.standard_normal((2, 3, 4, 2))}
    padded_only = {name: value.copy() for name, value in reference.items()}
    padded_only["logits"][0, :2] += 1.0
    padded_only["present.0.key"][0, :, 1] += 1.0
    cases = [("left_padding", {"input_ids": np.zeros((2, 4), dtype=np.int64), "attention_mask": mask})]
    report = check_parity(lambda _: reference, lambda _: padded_only, cases, Tolerance(atol=1e-6))
    assert report["passed"] and report["max_abs_diff"] == 0.0
    for name, index in (("logits", (0, 2)), ("present.0.key", (0, 1, 3))):
        real = {key: value.copy() for key, value in padded_only.items()}
        real[name][index] += 1.0
        with pytest.raises(ParityError, match=f"left_padding/{name}"):
            check_parity(lambda _: reference, lambda _, r=real: r, cases, Tolerance(atol=1e-6))


def test_fused_attention_refuses_an_old_runtime(monkeypatch, tmp_path):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", "1.22.1")
    with pytest.raises(UserInputError, match=r"onnxruntime >= 1.23 \(installed: onnx .*, onnxruntime 1.22.1\)"):
        export_onnx(_model("llama-dense"), None, tmp_path / "o", OnnxExportConfig(attention="fused"))
    assert not (tmp_path / "o").exists()


def test_eager_and_fused_graphs_differ_only_at_padded_positions(export_of):
    """Why the gate skips padded positions: ONNX Attention zeroes a query that sees only masked keys."""
    (_, eager, _), (_, fused, _) = export_of("llama-dense"), export_of("llama-dense-fused")
    ids = np.random.default_rng(2).integers(0, 96, (2, 6))
    mask = np.ones_like(ids)
    mask[0, :3] = 0
    outputs = [OrtCausalLM(d).forward(ids, mask, _positions(mask, 0))[0] for d in (eager, fused)]
    diff = np.abs(outputs[0] - outputs[1]).max(axis=-1)
    assert diff[mask == 1].max() <= FP32_LIMIT and diff[mask == 0].min() > 1e-3


def test_causal_blocks_give_the_unsplit_result(export_of, tmp_path):
    """Query blocks that skip hidden keys compute what one Attention node computes: long prompts (blocks), a past
    plus a long step with padding (blocks), short steps (one node), and greedy generation through all three."""
    model, chunked, _ = export_of("llama-dense-fused")
    whole = tmp_path / "whole"
    export_onnx(model, None, whole, OnnxExportConfig(attention="fused", attention_chunks=1))
    graph = onnx.load(str(whole / MODEL_FILE), load_external_data=False).graph
    assert "If" not in {n.op_type for n in graph.node}
    runners = [OrtCausalLM(d) for d in (chunked, whole)]
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 96, (2, 70))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    first = [r.forward(ids, mask, _positions(mask, 0)) for r in runners]
    step = rng.integers(0, 96, (2, 67))
    step_mask = np.concatenate([mask, np.ones_like(step)], axis=1)
    second = [r.forward(step, step_mask, _positions(step_mask, 70), past) for r, (_, past) in zip(runners, first)]
    real = mask == 1
    assert np.abs(first[0][0] - first[1][0])[real].max() <= 1e-6
    assert np.abs(second[0][0] - second[1][0]).max() <= 1e-6
    assert max(np.abs(a - b)[:, :, -67:].max() for (a0, b0), (a1, b1) in zip(second[0][1], second[1][1])
               for a, b in ((a0, a1), (b0, b1))) <= 1e-6
    prompt = rng.integers(0, 96, (1, 80))
    assert (runners[0].generate(prompt, 12) == runners[1].generate(prompt, 12)).all()


def test_fused_rotary_patches_only_llamas_rotary_and_restores_it():
    from transformers.models.llama import modeling_llama
    from transformers.models.opt import modeling_opt

    from exporters.attention import fused_rotary

    original = modeling_llama.apply_rotary_pos_emb
    with fused_rotary(_model("llama-sliced")) as patched:
        assert patched == 1 and modeling_llama.apply_rotary_pos_emb is not original
        q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
        cos, sin = torch.randn(2, 5, 4).repeat(1, 1, 2), torch.randn(2, 5, 4).repeat(1, 1, 2)
        for got, expected in zip(modeling_llama.apply_rotary_pos_emb(q, k, cos, sin),  # outside an export: eager
                                 original(q, k, cos, sin), strict=True):
            assert torch.equal(got, expected)
    assert modeling_llama.apply_rotary_pos_emb is original
    with fused_rotary(_model("opt-dense")) as patched:
        assert patched == 0 and not hasattr(modeling_opt, "apply_rotary_pos_emb")


def test_chunking_leaves_unmasked_attention_alone():
    from onnx import TensorProto, helper

    from exporters.attention import chunk_causal_attention

    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("q", "k", "v")]
    graph = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"])], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    assert chunk_causal_attention(graph, 4) == 0 and [n.op_type for n in graph.node] == ["Attention"]


def test_output_directory_must_be_empty(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UserInputError, match="not empty"):
        export_onnx(_model("llama-dense"), None, tmp_path, OnnxExportConfig())
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_fused_ops_report(exported):
    model, out, _ = exported
    report = fused_ops_report(out)
    assert report["nodes_after"] < report["nodes_before"] and report["removed"]
    if out.name == "llama-dense":  # RMSNorm -> SimplifiedLayerNormalization; sliced norms divide by d, no fusion
        assert report["fused"]["SimplifiedLayerNormalization"] == 2 * model.config.num_hidden_layers + 1


@pytest.mark.slow  # ~6 s: torch.export is 10-20x slower than the default TorchScript exporter
def test_dynamo_exporter(tmp_path):
    pytest.importorskip("onnxscript")
    manifest = export_onnx(_model("opt-sliced"), None, tmp_path / "dyn", OnnxExportConfig(exporter="dynamo"))
    assert manifest["exporter"] == "dynamo" and manifest["parity"]["max_abs_diff"] <= FP32_LIMIT


# -- CLI and imports ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["eager", "fused"])
def test_cli_export_then_eval_and_generate(tiny_llama_dir, tiny_text_file, tmp_path, capsys, attention):
    out = tmp_path / "onnx"
    assert main(["export", "onnx", str(tiny_llama_dir), "-o", str(out), "--attention", attention]) == 0
    printed = capsys.readouterr().out
    assert "parity vs PyTorch" in printed and f"{attention} attention" in printed
    assert ("decode graph: decode.onnx" if attention == "fused" else "no decode graph: layer 0") in printed
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["source"]["kind"] == "local" and manifest["source"]["sha256"]
    eval_args = ["--data", str(tiny_text_file), "--seqlen", "16", "--json"]
    assert main(["eval", str(out), *eval_args]) == 0
    onnx_result = json.loads(capsys.readouterr().out)
    assert main(["eval", str(tiny_llama_dir), *eval_args]) == 0
    torch_result = json.loads(capsys.readouterr().out)
    assert onnx_result["backend"] == "onnxruntime" and torch_result["backend"] == "pytorch"
    for key in ("tokens", "windows", "predicted_tokens", "parameters"):
        assert onnx_result[key] == torch_result[key], key
    assert math.isclose(onnx_result["perplexity"], torch_result["perplexity"], rel_tol=1e-4)
    texts = []
    for model_dir in (out, tiny_llama_dir):
        assert main(["generate", str(model_dir), "--prompt", "the river", "--max-new-tokens", "6"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].startswith("the river")
    assert main(["export", "onnx", str(tiny_llama_dir), "-o", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--seqlen", "16"]) == 2  # an empty directory is not a model
    capsys.readouterr()
    (tmp_path / MANIFEST_FILE).write_text("{}")
    assert main(["eval", str(tmp_path), "--seqlen", "16"]) == 2
    assert "holds no model.onnx" in capsys.readouterr().err


def test_import_slice2deploy_does_not_import_onnxruntime():
    code = ("import sys, slice2deploy, slice2deploy.api, slice2deploy.cli, exporters; "
            "heavy = [m for m in ('onnxruntime', 'onnx', 'onnxscript') if m in sys.modules]; "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
