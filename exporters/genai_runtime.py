"""ONNX Runtime GenAI models (directories written by ``slice2deploy export genai``) behind our runner contract.

GenAI runs its own generation loop over a graph whose KV cache it owns (GroupQueryAttention with one past/present
buffer of ``max_length`` positions), so "the past" we hand back from :meth:`GenAICausalLM.forward` is the
``og.Generator`` itself: feeding it the next token appends to its buffer.

Full-sequence logits: ``Generator.append_tokens`` runs the whole window in one forward and ``get_output("logits")``
returns its (B, T, V) logits (the builder's graph keeps every position unless ``prune_lm_head`` was set), so
perplexity is computed from one prefill per window, exactly as for the other backends. The price is a copy of the
logits out of GenAI (100 MB for a 512-token SmolLM2 window); :meth:`last_logits` avoids it where only the next
token is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slice2deploy.utils import UserInputError

GENAI_CONFIG = "genai_config.json"
GENAI_MANIFEST = "slice2deploy_genai_manifest.json"
WEIGHT_SUFFIXES = (".onnx", ".data", ".onnx_data", ".onnx.data")


def require_genai():
    """The ``onnxruntime_genai`` module; a one-line install hint (extra ``genai``) if it is missing.

    Raises:
        UserInputError: onnxruntime-genai is not installed.
    """
    try:
        import onnxruntime_genai
    except ImportError:
        raise UserInputError("ONNX Runtime GenAI is not installed; install it with: pip install -e \".[genai]\" "
                             "(or pip install 'slice2deploy[genai]')") from None
    return onnxruntime_genai


def is_genai_dir(path: Path) -> bool:
    """A GenAI model directory: it holds ``genai_config.json``."""
    return path.is_dir() and (path / GENAI_CONFIG).is_file()


def weight_bytes(directory: Path) -> int:
    """Bytes of the ONNX graph and its external data (what a decode step streams)."""
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def genai_version() -> str:
    from importlib import metadata

    return metadata.version("onnxruntime-genai")


class GenAICausalLM:
    """A GenAI model directory loaded for forwards, perplexity and greedy generation (CPU unless the directory's
    genai_config names another provider).

    Args:
        directory: a directory holding ``genai_config.json`` and the graph it names.
        max_length: KV buffer length of generators opened by :meth:`forward` (None: genai_config's
            ``search.max_length``, which is what GenAI itself allocates by default).
    """

    def __init__(self, directory: str | Path, max_length: int | None = None):
        og = require_genai()
        self.directory = Path(directory).expanduser()
        if not is_genai_dir(self.directory):
            raise UserInputError(f"{self.directory} has no {GENAI_CONFIG}; give a directory written by "
                                 "`slice2deploy export genai`")
        self.config = json.loads((self.directory / GENAI_CONFIG).read_text())
        self.og = og
        self.model = og.Model(str(self.directory))
        self.context_length = int(self.config["model"]["context_length"])
        self.vocab_size = int(self.config["model"]["vocab_size"])
        self.max_length = max_length or int(self.config["search"].get("max_length", self.context_length))
        manifest = self.directory / GENAI_MANIFEST
        self.manifest = json.loads(manifest.read_text()) if manifest.is_file() else {}

    @property
    def precision(self) -> str:
        return self.manifest.get("config", {}).get("precision", "unknown")

    def tokenizer(self):
        """The Hugging Face tokenizer the builder copied next to the graph (our data pipeline tokenizes with it)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.directory)

    def generator(self, batch: int, max_length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, batch_size=batch, do_sample=False)
        return self.og.Generator(self.model, params)

    def forward(self, ids: np.ndarray, past: Any = None) -> tuple[np.ndarray, Any]:
        """Logits (B, T, V) float32 of ``ids`` (B, T) and the generator holding the cache (the next call's past).

        A batch of more than one row can only be appended once (a GenAI rule), so decode steps need B = 1.

        Raises:
            UserInputError: a step after a prefill of batch > 1, or past + new tokens beyond ``max_length``.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        generator = past if past is not None else self.generator(ids.shape[0], self.max_length)
        if past is not None and ids.shape[0] > 1:
            raise UserInputError("GenAI appends tokens to a batch of more than one sequence only once; decode "
                                 "steps with our own token choice need batch 1")
        total = (generator.token_count() if past is not None else 0) + ids.shape[1]
        if total > self.max_length:
            raise UserInputError(f"{total} tokens exceed the GenAI buffer of {self.max_length} (max_length)")
        generator.append_tokens(ids)
        return generator.get_output("logits"), generator

    def last_logits(self, generator: Any) -> np.ndarray:
        """Logits of the last position only (B, 1, V): no copy of the whole (B, T, V) tensor."""
        return generator.get_logits()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Full-sequence logits (B, T, V) of ``ids`` (B, T) from one forward with an empty cache."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        generator = self.generator(ids.shape[0], ids.shape[1])
        generator.append_tokens(ids)
        return generator.get_output("logits")

    def perplexity(self, token_ids, seqlen: int = 512, batch_size: int = 1, max_tokens: int | None = None,
                   progress: bool = True):
        """Perplexity on the same non-overlapping windows as every other backend (slice2deploy.evaluate)."""
        import torch

        from slice2deploy.evaluate import windowed_perplexity

        return windowed_perplexity(lambda ids: torch.from_numpy(self.logits(ids.numpy())), torch.as_tensor(token_ids),
                                   seqlen, batch_size, max_tokens, progress=progress, desc="perplexity (genai)")

    def generate(self, ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy continuation of one prompt ``ids`` (1, T) by GenAI's own loop; returns (1, T + new), stopping at
        the end-of-sequence token of genai_config."""
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        if ids.shape[0] != 1:
            raise UserInputError("GenAI generation here takes one prompt at a time")
        generator = self.generator(1, min(self.context_length, ids.shape[1] + max_new_tokens))
        generator.append_tokens(ids)
        for _ in range(max_new_tokens):
            if generator.is_done():
                break
            generator.generate_next_token()
        return np.asarray(generator.get_sequence(0), dtype=np.int64)[None]


def versions() -> dict[str, str]:
    """slice2deploy's library versions plus onnxruntime-genai (and the onnxruntime it bundles)."""
    from slice2deploy.checkpoint import versions as core_versions

    return {**core_versions(), "onnxruntime-genai": genai_version()}
