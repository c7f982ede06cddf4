"""Recovery after slicing (slice2deploy.recover): distillation, LoRA merge, checkpoints, data, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slice2deploy.cli import main
from slice2deploy.recover import (
    RecoverConfig,
    add_lora,
    backbone_and_head,
    chunk_loss,
    chunked_backward,
    heldout_kl,
    merge_lora,
    recover,
    state_dir_for,
)
from slice2deploy.recover_data import pack_stream, window_order
from slice2deploy.utils import UserInputError

from .conftest import TINY_TEXT, tiny_model, tiny_tokenizer

MODES = ("uniform", "per-layer")


def _slice(dense: Path, text: Path, out: Path, mode: str) -> Path:
    extra = ["--refit"] if mode == "uniform" else []
    assert main(["slice", str(dense), "-o", str(out), "--mode", mode, "--sparsity", "0.25", "--calib", str(text),
                 "--calib-samples", "4", "--calib-seqlen", "16", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def slices(tiny_llama_dir, tiny_text_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slices")
    return {mode: _slice(tiny_llama_dir, tiny_text_file, root / mode, mode) for mode in MODES}


def _config(**overrides) -> RecoverConfig:
    return RecoverConfig(**{"tokens": 4096, "seqlen": 32, "batch_size": 4, "lr": 2e-3, "checkpoint_every": 0,
                            **overrides})


def _heldout_windows(seqlen: int = 32) -> torch.Tensor:
    """Text the training never saw: the tiny corpus' sentences in reverse order."""
    sentences = [s.strip() for s in TINY_TEXT.split(". ") if s.strip()][:4]
    ids = tiny_tokenizer()(". ".join(reversed(sentences)) * 4, add_special_tokens=False)["input_ids"]
    return pack_stream(torch.tensor(ids), seqlen)


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["kd", "kd+lora"])
def test_distillation_lowers_the_kl_to_the_teacher_on_heldout_tokens(slices, tiny_llama_dir, tiny_text_file,
                                                                      tmp_path, mode, method):
    out = recover(slices[mode], _config(method=method, data=str(tiny_text_file)), tmp_path / "out", progress=False)
    teacher, windows = _load(tiny_llama_dir), _heldout_windows()
    before = heldout_kl(_load(slices[mode]), teacher, windows)
    after = heldout_kl(_load(out), teacher, windows)
    assert after < 0.7 * before, (before, after)
    manifest = json.loads((out / "slice2deploy_manifest.json").read_text())["recovery"]
    assert manifest["steps"] == 4096 // (4 * 32) and manifest["tokens"] == 4096
    assert manifest["data"]["split"] == "calibration" and len(manifest["data"]["tokens_sha256"]) == 64
    assert manifest["teacher"]["spec"] == str(tiny_llama_dir)  # the source the slice recorded
    assert manifest["config"]["method"] == method and manifest["loss"]["last"] < manifest["loss"]["first"]
    assert not state_dir_for(out.resolve()).exists()


def test_lora_on_next_token_loss_lowers_the_loss(slices, tiny_text_file, tmp_path):
    out = recover(slices["uniform"], _config(method="lora", data=str(tiny_text_file)), tmp_path / "out",
                  progress=False)
    loss = json.loads((out / "slice2deploy_manifest.json").read_text())["recovery"]["loss"]
    assert loss["mean_last_10pct"] < loss["first"]
    assert json.loads((out / "config.json").read_text())["slice2deploy"]["recovery"]["method"] == "lora"


def test_uniform_recovery_stays_a_plain_checkpoint_and_exports_with_parity(slices, tiny_text_file, tmp_path):
    from exporters.onnx import OnnxExportConfig, export_pretrained

    out = recover(slices["uniform"], _config(method="kd+lora", data=str(tiny_text_file), tokens=512),
                  tmp_path / "out", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    script = ("import sys; from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
              "assert not any(n.startswith('slice2deploy') for n in sys.modules)\n"
              "print(type(m).__name__, sum('lora' in n for n, _ in m.named_parameters()))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["LlamaForCausalLM", "0"]
    manifest = export_pretrained(str(out), tmp_path / "onnx", OnnxExportConfig())
    assert manifest["parity"]["max_abs_diff"] < 1e-3


def test_per_layer_recovery_loads_with_and_without_slice2deploy_and_exports(slices, tiny_text_file, tmp_path):
    from exporters.onnx import OnnxExportConfig, export_pretrained
    from slice2deploy.modeling import SlicedForCausalLM

    out = recover(slices["per-layer"], _config(method="kd", data=str(tiny_text_file), tokens=512), tmp_path / "out",
                  progress=False)
    model = _load(out)
    assert isinstance(model, SlicedForCausalLM) and model.config.slicing["recovery"]["method"] == "kd"
    ids = torch.tensor([[1, 5, 9, 3, 7, 11, 4, 6]])
    with torch.no_grad():
        expected = model(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    script = ("import sys, torch; from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
              "assert not any(n.startswith('slice2deploy') for n in sys.modules)\n"
              f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)\n"
              f"with torch.no_grad(): torch.save(m(ids).logits, {str(tmp_path / 'logits.pt')!r})\n")
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.allclose(torch.load(tmp_path / "logits.pt", weights_only=True), expected, atol=1e-5)
    manifest = export_pretrained(str(out), tmp_path / "onnx", OnnxExportConfig())
    assert manifest["parity"]["max_abs_diff"] < 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_lora_merge_is_exact(slices, mode):
    model = _load(slices[mode])
    peft_model = add_lora(model, RecoverConfig(method="lora", lora_rank=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter): make the adapters do something
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    ids = torch.randint(3, 96, (2, 12), generator=generator)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
        merged_model = merge_lora(peft_model)
        merged = merged_model(input_ids=ids).logits
        plain = _load(slices[mode])(input_ids=ids).logits
    assert (unmerged - plain).abs().max() > 1e-2  # the adapters changed the function
    assert (merged - unmerged).abs().max() <= 1e-4
    assert not any("lora" in name for name, _ in merged_model.named_parameters())


def test_chunked_backward_equals_the_full_loss_gradient():
    """Chunked logits + early backward give the gradient of the unchunked KL + CE (the memory bound is free)."""
    student, teacher = tiny_model("llama", seed=1), tiny_model("llama", seed=2)
    ids = torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(0))
    config = RecoverConfig(kd_weight=1.0, ce_weight=0.5, temperature=2.0, kl_chunk=7)
    (s_body, s_head), (t_body, t_head) = backbone_and_head(student), backbone_and_head(teacher)
    with torch.no_grad():
        t_hidden = t_body(input_ids=ids).last_hidden_state
    total = chunked_backward(s_body(input_ids=ids).last_hidden_state, t_hidden, ids, s_head, t_head, config, 0.1)
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    from slice2deploy.recover import next_token_labels

    full_config = RecoverConfig(kd_weight=1.0, ce_weight=0.5, temperature=2.0, kl_chunk=10_000)
    loss = chunk_loss(s_body(input_ids=ids).last_hidden_state, t_hidden, next_token_labels(ids), s_head, t_head,
                      full_config)
    (loss * 0.1).backward()
    value = float(loss.detach())
    assert abs(total - value) < 1e-3 * abs(value)
    for name, param in student.named_parameters():
        assert torch.allclose(param.grad, chunked[name], atol=1e-6, rtol=1e-4), name


def test_interrupted_run_resumes_to_the_same_weights(slices, tiny_text_file, tmp_path, monkeypatch):
    import slice2deploy.recover as module

    config = _config(data=str(tiny_text_file), tokens=8 * 128, checkpoint_every=3)
    reference = _load(recover(slices["uniform"], config, tmp_path / "reference", progress=False))
    original, calls = module._micro_step, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 5, after the checkpoint of step 3
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "_micro_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        recover(slices["uniform"], config, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and state_dir_for((tmp_path / "out").resolve()).is_dir()
    monkeypatch.setattr(module, "_micro_step", original)
    out = recover(slices["uniform"], config, tmp_path / "out", progress=False)
    assert json.loads((out / "slice2deploy_manifest.json").read_text())["recovery"]["resumed_from_step"] == 3
    resumed = _load(out)
    for (name, a), (_, b) in zip(reference.named_parameters(), resumed.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_checkpoint_of_another_run_is_refused(slices, tiny_text_file, tmp_path, monkeypatch):
    import slice2deploy.recover as module

    config = _config(data=str(tiny_text_file), tokens=4 * 128, checkpoint_every=1)
    monkeypatch.setattr(module, "merge_lora", lambda model: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(module, "_finish", lambda run: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        recover(slices["uniform"], config, tmp_path / "out", progress=False)
    monkeypatch.undo()
    with pytest.raises(UserInputError, match="different recovery run"):
        recover(slices["uniform"], _config(data=str(tiny_text_file), tokens=4 * 128, lr=1e-4), tmp_path / "out",
                progress=False)


# ------------------------------------------------------------------------------------------------ bad inputs


def _fails(argv: list[str], capsys, match: str) -> None:
    capsys.readouterr()  # drop what earlier steps printed
    assert main(argv) == 2
    err = capsys.readouterr().err  # may hold the model loaders' progress bars before the error
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("slice2deploy recover: error:"), err
    assert match in errors[0] and "Traceback" not in err, err


def _recover_argv(slice_dir: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return ["recover", str(slice_dir), "-o", str(out), "--data", str(text), "--tokens", "512", "--seqlen", "32",
            *extra]


def _shuffled_tokenizer():
    """The tiny tokenizer's words with other ids: same size, another tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = tiny_tokenizer().get_vocab()
    words = sorted(vocab, key=vocab.get)
    shuffled = {w: i for i, w in enumerate(words[:3] + words[3:][::-1])}
    backend = Tokenizer(models.WordLevel(vocab=shuffled, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_teacher_with_another_tokenizer(slices, tiny_text_file, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(teacher)
    _shuffled_tokenizer().save_pretrained(teacher)
    out = tmp_path / "out"
    _fails(_recover_argv(slices["uniform"], out, tiny_text_file, "--teacher", str(teacher)), capsys,
           "another tokenizer")
    assert not out.exists() and not state_dir_for(out.resolve()).exists()


def test_teacher_of_another_width(slices, tiny_text_file, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    tiny_model("llama", hidden_size=48).save_pretrained(teacher)
    tiny_tokenizer().save_pretrained(teacher)
    out = tmp_path / "out"
    _fails(_recover_argv(slices["per-layer"], out, tiny_text_file, "--teacher", str(teacher)), capsys,
           "hidden size 48")
    assert not out.exists()


def test_empty_data_and_zero_budget(slices, tmp_path, capsys, tiny_text_file):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    out = tmp_path / "out"
    _fails(_recover_argv(slices["uniform"], out, empty), capsys, "contains no text")
    _fails(_recover_argv(slices["uniform"], out, tiny_text_file)[:-4] + ["--tokens", "0"], capsys,
           "recovery tokens must be > 0")
    _fails(_recover_argv(slices["uniform"], out, tiny_text_file)[:-4] + ["--tokens", "100"], capsys,
           "less than one optimizer step")
    short = tmp_path / "short.txt"
    short.write_text("The river flows through the old town.")
    _fails(_recover_argv(slices["uniform"], out, short), capsys, "fewer than one window")
    assert not out.exists()


def test_non_empty_output_is_refused(slices, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _fails(_recover_argv(slices["uniform"], out, tiny_text_file), capsys, "not empty")
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("options, match", [
    ({"method": "sgd"}, "sgd"), ({"seqlen": 1}, "seqlen"), ({"kd_weight": 0, "ce_weight": 0}, "nothing to train"),
    ({"dtype": "float16"}, "dtype"), ({"device": "tpu"}, "device"), ({"lr": 0}, "lr"),
])
def test_config_validation(options, match):
    with pytest.raises(ValueError, match=match):
        RecoverConfig(**options)


def test_config_defaults_by_method_and_round_trip():
    assert (RecoverConfig(method="kd").kd_weight, RecoverConfig(method="kd").ce_weight) == (1.0, 0.0)
    assert (RecoverConfig(method="lora").kd_weight, RecoverConfig(method="lora").ce_weight) == (0.0, 1.0)
    assert not RecoverConfig(method="lora").uses_teacher and RecoverConfig(method="kd+lora").uses_lora
    config = RecoverConfig(method="kd+lora", tokens=1000, lr=3e-4)
    assert RecoverConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_packing_and_seeded_order():
    windows = pack_stream(torch.arange(103), 10)
    assert windows.shape == (10, 10) and torch.equal(windows[1], torch.arange(10, 20))
    order = window_order(10, 25, seed=3)
    assert order.shape == (25,) and torch.equal(order, window_order(10, 25, seed=3))
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:20].tolist()) == list(range(10))
    assert not torch.equal(order[:10], window_order(10, 10, seed=4))


def test_recipe_recover_section():
    from benchmarks.suite.recipe import validate_recipe

    base = {"model": "smollm2-135m", "bench": {"backends": {"pytorch": ["fp32"]}}}
    assert validate_recipe(base).recover is None
    assert validate_recipe({**base, "recover": {"method": "kd+lora", "tokens": 50_000}}).recover == {
        "method": "kd+lora", "tokens": 50_000}
    with pytest.raises(UserInputError, match="recover.steps"):
        validate_recipe({**base, "recover": {"steps": 3}})
    with pytest.raises(UserInputError, match="recipe section 'recover'.*tokens"):
        validate_recipe({**base, "recover": {"tokens": 0}})


def test_bfloat16_autocast_path_runs_and_saves_float32(slices, tiny_text_file, tmp_path):
    """The GPU path (bf16 autocast, bf16 teacher, fp32 master weights), exercised on the CPU."""
    out = recover(slices["per-layer"], _config(method="kd+lora", data=str(tiny_text_file), tokens=512,
                                               dtype="bfloat16"), tmp_path / "out", progress=False)
    manifest = json.loads((out / "slice2deploy_manifest.json").read_text())["recovery"]
    assert manifest["compute_dtype"] == "bfloat16" and manifest["teacher"]["dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in _load(out).parameters())


def test_pipeline_recover_key_recovers_the_sliced_model(tiny_llama_dir, tiny_text_file, tmp_path):
    """``recover:`` in a recipe: the slice step keeps the recovered model, and the export step uses it."""
    import yaml

    from benchmarks.pipeline import run_pipeline

    recipe = {"name": "tiny", "model": str(tiny_llama_dir), "profile": "cpu-quick", "sparsities": [0.25],
              "slice": {"mode": "uniform", "round_to": 16,
                        "calibration": {"source": str(tiny_text_file), "samples": 4, "seqlen": 32}},
              "eval": {"data": str(tiny_text_file), "seqlen": 32, "max_tokens": 256},
              "recover": {"method": "kd", "data": str(tiny_text_file), "tokens": 512, "seqlen": 32, "lr": 1e-3},
              "bench": {"backends": {"onnxruntime": ["fp32"]}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    statuses = {s.key: s.status for s in run_pipeline(path, tmp_path / "out", progress=False, log=False,
                                                       build_only=True)}
    assert statuses["slice-sliced-0.25"] == "ran" and statuses["export-sliced-0.25-float32"] == "ran"
    model = tmp_path / "out" / "slice-sliced-0.25" / "model"
    assert json.loads((model / "config.json").read_text())["slice2deploy"]["recovery"]["tokens"] == 512
    assert not (tmp_path / "out" / "slice-sliced-0.25" / "sliced").exists()


@pytest.mark.parametrize("mode", MODES)
def test_layer_output_loss_trains_through_learned_maps(slices, tiny_llama_dir, tiny_text_file, tmp_path, mode):
    """``hidden_weight``: every layer's output matched through a least-squares-initialised map (widths differ)."""
    out = recover(slices[mode], _config(data=str(tiny_text_file), hidden_weight=1.0), tmp_path / "out",
                  progress=False)
    manifest = json.loads((out / "slice2deploy_manifest.json").read_text())["recovery"]
    assert manifest["loss"]["mean_last_10pct"] < manifest["loss"]["first"]
    teacher, windows = _load(tiny_llama_dir), _heldout_windows()
    assert heldout_kl(_load(out), teacher, windows) < heldout_kl(_load(slices[mode]), teacher, windows)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as handle:  # the maps were training aids: not saved
        assert not any("hidden_maps" in key or "lora" in key for key in handle.keys())
