"""The exporters' backends in the core's runner registry (:mod:`slice2deploy.runners`): ONNX Runtime for ONNX export
directories, TensorRT for engine bundles. Found by the core through the ``slice2deploy.backends`` entry points."""

from __future__ import annotations

import json
from pathlib import Path

from slice2deploy.runners import Backend, Runner, register_backend

from .genai_runtime import is_genai_dir

ONNX_FILES = ("model.onnx", "slice2deploy_onnx_manifest.json")


def is_onnx_dir(path: Path) -> bool:
    """An ONNX export directory (``slice2deploy export onnx``): it holds model.onnx, or at least the export manifest
    (then the ONNX runner explains what is missing), and is not a GenAI directory (which also holds a model.onnx)."""
    return path.is_dir() and any((path / name).is_file() for name in ONNX_FILES) and not is_genai_dir(path)


def _dir_bytes(path: Path, suffixes: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))


def open_onnxruntime(spec, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> Runner:
    """``dtype`` is the export's own (recorded in it); ``device`` names the execution provider."""
    from .ort import OrtCausalLM, runtime_versions

    model = OrtCausalLM(spec, provider=device)
    tokenizer = model.tokenizer()

    def generate(text: str, max_new_tokens: int) -> str:
        ids = tokenizer(text, return_tensors="np")["input_ids"]
        output = model.generate(ids, max_new_tokens, eos_token_id=model.eos_token_ids() or tokenizer.eos_token_id)
        return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)

    size = _dir_bytes(Path(spec), (".onnx", ".data", ".onnx_data"))
    return Runner("onnxruntime", lambda ids, past: model.forward(ids, past=past), tokenizer, model.context_length,
                  model.perplexity, generate, model.parameters, model.dtype, runtime_versions(), size, size)


def describe_onnx(path: Path, config: dict) -> dict:
    from .ort import graph_summary

    summary = graph_summary(path / "model.onnx")
    sizes = [p.stat().st_size for p in path.iterdir() if p.suffix in (".onnx", ".data", ".onnx_data")]
    manifests = {p.name: json.loads(p.read_text()) for p in path.glob("slice2deploy_*manifest.json")}
    return {"directory": str(path.resolve()), "model_type": f"onnx ({config.get('model_type')})",
            "parameters": summary["parameters"], "size_bytes": sum(sizes), "manifests": manifests}


def open_tensorrt(spec, dtype: str = "float16", device: str = "cuda", trust_remote_code: bool = False) -> Runner:
    """A TensorRT engine bundle (``OUT/trt`` of ``build-engine``: the engine next to the tokenizer)."""
    import torch
    from transformers import AutoTokenizer

    from exporters.tensorrt import ENGINE_FILE, TrtCausalLM  # retargeted when exporters.tensorrt becomes a package
    from slice2deploy.evaluate import windowed_perplexity

    engine = Path(spec) / ENGINE_FILE
    model = TrtCausalLM(engine, device_index=int(device.partition(":")[2] or 0))

    def perplexity(token_ids, seqlen: int = 512, batch_size: int = 1, max_tokens: int | None = None,
                   progress: bool = True):
        return windowed_perplexity(lambda ids: model.forward(ids.numpy())[0].float(), torch.as_tensor(token_ids),
                                   seqlen, batch_size, max_tokens, progress=progress)

    def generate(text: str, max_new_tokens: int) -> str:
        raise NotImplementedError("generation on TensorRT engines is not wired up")

    size = engine.stat().st_size
    return Runner("tensorrt", lambda ids, past: model.forward(ids, past=past), AutoTokenizer.from_pretrained(spec),
                  None, perplexity, generate, None, dtype, {}, size, size)


def open_genai(spec, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> Runner:
    """An ONNX Runtime GenAI directory (``slice2deploy export genai``); ``dtype`` is the build's own, ``device`` is
    the provider recorded in its genai_config."""
    from .genai_runtime import GenAICausalLM, versions, weight_bytes

    model = GenAICausalLM(spec)
    tokenizer = model.tokenizer()

    def generate(text: str, max_new_tokens: int) -> str:
        ids = tokenizer(text, return_tensors="np")["input_ids"]
        output = model.generate(ids, max_new_tokens)
        return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)

    size = weight_bytes(Path(spec))
    return Runner("onnxruntime-genai", model.forward, tokenizer, model.context_length, model.perplexity, generate,
                  None, model.precision, versions(), size, size)


def describe_genai(path: Path, config: dict) -> dict:
    from .genai_runtime import GENAI_CONFIG, GENAI_MANIFEST, weight_bytes

    manifest = path / GENAI_MANIFEST
    return {"directory": str(path.resolve()), "model_type": f"onnxruntime-genai ({config.get('model_type')})",
            "parameters": None, "size_bytes": weight_bytes(path),
            "genai_config": json.loads((path / GENAI_CONFIG).read_text()),
            "manifests": {manifest.name: json.loads(manifest.read_text())} if manifest.is_file() else {}}


def register() -> None:
    """Entry point of ``slice2deploy.backends``."""
    register_backend(Backend("onnxruntime", open_onnxruntime, claims=is_onnx_dir, describe=describe_onnx))
    register_backend(Backend("tensorrt", open_tensorrt))
    register_backend(Backend("onnxruntime-genai", open_genai, claims=is_genai_dir, describe=describe_genai))
