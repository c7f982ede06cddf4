"""Perplexity over non-overlapping windows, and honest parameter counts."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .modeling import SlicedDecoderLayer, TiedLMHead
from .utils import UserInputError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens of text evaluated
    predicted_tokens: int  # tokens scored (each window's first token has no context)
    windows: int
    seqlen: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def _windows(token_ids: torch.Tensor, seqlen: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows covering the whole text (the last one may be shorter)."""
    windows = list(token_ids.split(seqlen))
    if windows and windows[-1].numel() < 2:  # a single trailing token predicts nothing
        windows.pop()
    return windows


def windowed_perplexity(logits_fn: Callable[[torch.Tensor], torch.Tensor], token_ids: torch.Tensor,
                        seqlen: int = 512, batch_size: int = 4, max_tokens: int | None = None,
                        progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity over non-overlapping windows; ``logits_fn`` maps (B, T) ids to (B, T, V) logits (any backend)."""
    if seqlen < 2:
        raise UserInputError(f"seqlen must be >= 2, got {seqlen}")
    if token_ids.dim() != 1:
        raise UserInputError("token_ids must be a 1-D tensor")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    windows = _windows(token_ids, seqlen)
    if not windows:
        raise UserInputError("the evaluation text has fewer than 2 tokens")
    started = time.perf_counter()
    total_nll, predicted = 0.0, 0
    groups = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    with torch.no_grad():
        for group in tqdm(groups, desc=desc, disable=not progress):
            for batch in _same_length_batches(group):
                ids = torch.stack(batch)
                logits = logits_fn(ids)[:, :-1]
                targets = ids[:, 1:].to(logits.device)
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                      reduction="sum")
                total_nll += float(nll)
                predicted += targets.numel()
    mean_nll = total_nll / predicted
    return PerplexityResult(
        perplexity=math.exp(mean_nll), nll=mean_nll, tokens=int(sum(w.numel() for w in windows)),
        predicted_tokens=predicted, windows=len(windows), seqlen=seqlen,
        seconds=round(time.perf_counter() - started, 3),
    )


def perplexity(model: nn.Module, token_ids: torch.Tensor, seqlen: int = 512, batch_size: int = 4,
               max_tokens: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity of a PyTorch ``model`` on a 1-D token stream, window by window (no context carried over)."""
    device = next(model.parameters()).device

    def logits(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    return windowed_perplexity(logits, token_ids, seqlen, batch_size, max_tokens, progress)


def _same_length_batches(group: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    full = [w for w in group if w.numel() == group[0].numel()]
    rest = [[w] for w in group if w.numel() != group[0].numel()]
    return [full] + rest


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters, split into embeddings, head, residual shortcuts and everything else.

    A head tied to the embedding (shared tensor or ``TiedLMHead``) is counted once, under ``embeddings``.
    """
    seen: set[int] = set()
    counts = {"total": 0, "embeddings": 0, "head": 0, "shortcuts": 0, "layers": 0, "other": 0}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            counts["total"] += param.numel()
            counts[_category(module_name, module, name)] += param.numel()
    return counts


def _category(module_name: str, module: nn.Module, param_name: str) -> str:
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if isinstance(module, TiedLMHead) or module_name.endswith("lm_head"):
        return "head"
    if module_name.endswith("_shortcut"):
        return "shortcuts"
    if ".layers." in f".{module_name}." or isinstance(module, SlicedDecoderLayer):
        return "layers"
    return "other"
