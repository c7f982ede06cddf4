"""Shared fixtures: tiny random-weight models of every registered adapter, a tiny tokenizer, a tiny corpus."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

import slice2deploy  # noqa: F401  (registers the sliced model with the Auto classes)
from slice2deploy.adapters import registered_adapters

TINY_TEXT = (
    "The river flows through the old town and the bridge crosses it near the market. "
    "People walk along the river in the morning and sell bread, fish and fruit at the market. "
    "In the evening the bridge is lit and the town is quiet. The old town has a church, a school and a small "
    "museum about the history of the river, the bridge and the people who built them. "
) * 20


def perturb_norms_and_biases(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give norms non-trivial scales/shifts and biases non-zero values, so folding has something to fold."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.5 * noise)
            elif name.endswith("bias"):
                param.add_(0.1 * noise)
    return model


def tiny_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    adapter = registered_adapters()[model_type]
    config = AutoConfig.for_model(model_type, **{**adapter.tiny_config, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return perturb_norms_and_biases(model, seed)


def tiny_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [w for w, _ in Counter(re.findall(r"\w+|[^\w\s]", TINY_TEXT)).most_common(vocab_size - 3)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tokenizer.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(params=sorted(registered_adapters()))
def model_type(request) -> str:
    return request.param


@pytest.fixture
def tiny(model_type) -> torch.nn.Module:
    return tiny_model(model_type)


@pytest.fixture
def tiny_copy():
    return copy.deepcopy


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(TINY_TEXT.replace(". ", ".\n\n"))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as an HF directory with a working tokenizer (CLI and loading tests)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
