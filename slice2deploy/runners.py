"""One runner interface for every backend: a loaded model that runs forwards with the KV cache, has a tokenizer and
a context length, and measures perplexity.

PyTorch is registered here. Backends of the layers above (ONNX Runtime, TensorRT) register themselves with
:func:`register_backend`; the core finds them through the ``slice2deploy.backends`` entry points (declared in
pyproject.toml) without importing those layers by name. :func:`open_runner` picks the backend that claims an
artifact (an ONNX export directory, an engine bundle), else PyTorch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .utils import UserInputError

ENTRY_POINTS = "slice2deploy.backends"
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def context_length(config: Any) -> int | None:
    """The model's context in tokens, from an HF config object or a config.json mapping (a sliced model's
    ``base_config`` included); None when the config does not say."""
    read = config.get if isinstance(config, Mapping) else functools.partial(getattr, config)
    base = read("base_config", None) or {}
    for key in CONTEXT_KEYS:
        value = read(key, None)
        value = base.get(key) if value is None and isinstance(base, Mapping) else value
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(tokens: int, context: int | None, what: str, option: str | None = None) -> None:
    """The one rule for sequence lengths: ``tokens`` positions must fit the model's ``context`` (None: unknown).

    Every entry point asks it before any work (calibration windows, evaluation windows, prompt + new tokens,
    benchmark prompts); past the context, learned position tables (OPT) fail deep in the runtime and RoPE models
    silently run where they were never trained.

    Raises:
        UserInputError: naming ``what``, the lengths, and ``option`` (the flag to change) when given.
    """
    if context is not None and tokens > context:
        fix = f"; lower {option}" if option else ""
        raise UserInputError(f"{what} of {tokens} tokens exceeds the model's context of {context} tokens{fix}")


def position_ids_from_mask(attention_mask: np.ndarray, past_length: int = 0) -> np.ndarray:
    """Positions of the new tokens: the count of real tokens before each one (left padding gives 0s), shape
    (B, T_new) for a mask covering past + new tokens."""
    return np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)[:, past_length:].astype(np.int64)


@dataclass
class Runner:
    """A model loaded on one backend."""

    backend: str
    forward: Callable[[np.ndarray, Any], tuple[Any, Any]]  # (ids (B, T), past or None) -> (logits, past)
    tokenizer: Any
    context_length: int | None
    perplexity: Callable[..., Any]  # (token_ids, seqlen=, batch_size=, max_tokens=, progress=) -> PerplexityResult
    generate: Callable[[str, int], str]  # (prompt text, max new tokens) -> greedy continuation
    parameters: int | None
    dtype: str
    versions: dict = field(default_factory=dict)
    weight_bytes: int = 0  # bytes read per decode step (every stored weight once)
    size_bytes: int = 0  # artifact on disk


@dataclass(frozen=True)
class Backend:
    """How to open artifacts on one backend: ``claims(path)`` says whether an artifact is this backend's (None: only
    when asked by name); ``describe(path)`` is what ``slice2deploy info`` shows for such an artifact."""

    name: str
    open: Callable[..., Runner]  # (spec, dtype=, device=, trust_remote_code=) -> Runner
    claims: Callable[[Path], bool] | None = None
    describe: Callable[[Path, dict], dict] | None = None


_BACKENDS: dict[str, Backend] = {}
_discovered = False


def register_backend(backend: Backend) -> Backend:
    _BACKENDS[backend.name] = backend
    return backend


def _discover() -> None:
    global _discovered
    if not _discovered:
        _discovered = True
        for entry in metadata.entry_points(group=ENTRY_POINTS):
            entry.load()()


def backends() -> dict[str, Backend]:
    _discover()
    return dict(_BACKENDS)


def backend_for(spec: str | Path) -> Backend | None:
    """The registered backend that claims the artifact at ``spec`` (None: a model for PyTorch)."""
    path = Path(spec).expanduser()
    return next((b for b in backends().values() if b.claims is not None and b.claims(path)), None)


def open_runner(spec: str | Path, backend: str | None = None, **options) -> Runner:
    """Open ``spec`` on ``backend`` (None: the backend that claims it, else PyTorch)."""
    chosen = backends().get(backend) if backend else backend_for(spec) or _BACKENDS["pytorch"]
    if chosen is None:
        raise UserInputError(f"unknown backend {backend!r}; registered: {', '.join(backends())}")
    return chosen.open(spec, **options)


def _dir_bytes(path: Path, suffixes: tuple[str, ...]) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))


def _open_pytorch(spec: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> Runner:
    import torch

    from .checkpoint import versions
    from .evaluate import count_parameters, perplexity
    from .loading import load, parameter_dtype
    from .sources import converted_dir

    model, tokenizer, resolved = load(str(spec), dtype, device, trust_remote_code)
    model.eval()
    unique = {id(p): p for p in model.parameters()}.values()  # a tied head is stored (and read) once

    @torch.no_grad()
    def forward(ids: np.ndarray, past: Any) -> tuple[Any, Any]:
        out = model(input_ids=torch.as_tensor(ids, device=device), cache=past, use_cache=True)
        return out.logits, out.cache

    def generate(text: str, max_new_tokens: int) -> str:
        inputs = tokenizer(text, return_tensors="pt").to(device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    path = Path(resolved.path) / resolved.gguf_file if resolved.gguf_file else Path(resolved.path)
    if resolved.gguf_file and converted_dir(resolved).is_dir():  # the float32 HF directory the GGUF became
        path = converted_dir(resolved)
    size = _dir_bytes(path, (".safetensors", ".bin", ".gguf")) if path.exists() else 0
    return Runner("pytorch", forward, tokenizer, context_length(model.config), functools.partial(perplexity, model),
                  generate, count_parameters(model)["total"], parameter_dtype(model), versions(),
                  sum(p.numel() * p.element_size() for p in unique), size)


register_backend(Backend("pytorch", _open_pytorch))
