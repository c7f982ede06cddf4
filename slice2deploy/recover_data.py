"""Training text for recovery: packed token windows of a calibration split, in a seeded order, under a budget.

The text comes from :func:`slice2deploy.data.load_text` with the ``calibration`` split, so the built-in corpus never
gives its held-out evaluation articles to training (a local file is used as given, as everywhere else). Documents are
joined with the corpus separator and the token stream is cut into non-overlapping windows of ``seqlen`` tokens
(sequence packing: no padding, every token is trained on). Windows are visited in a seeded random order; a budget
larger than the text starts another epoch with a fresh permutation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .utils import UserInputError, sha256_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class PackedText:
    """Packed training windows and a record of where they came from.

    ``windows``: (N, T) int64 token ids, T = seqlen; ``record``: JSON-ready provenance (source, split, hashes).
    """

    windows: torch.Tensor
    record: dict[str, Any]

    @property
    def seqlen(self) -> int:
        return int(self.windows.shape[1])


def pack_stream(stream: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Non-overlapping ``seqlen``-token windows of a 1-D stream: (len // seqlen, seqlen); the tail is dropped."""
    if seqlen < 2:
        raise UserInputError(f"recovery seqlen must be >= 2, got {seqlen}")
    count = stream.numel() // seqlen
    return stream[: count * seqlen].reshape(count, seqlen)


def _summary_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """The source's metadata without long lists (article titles are summarised by their count)."""
    return {k: (len(v) if isinstance(v, list) else v) for k, v in meta.items()}


def load_training_text(spec: str, tokenizer: PreTrainedTokenizerBase, seqlen: int) -> PackedText:
    """Packed windows of the calibration split of ``spec`` (builtin, .txt/.jsonl file or a datasets name).

    Raises :class:`UserInputError` when the text is empty or shorter than one window.
    """
    from .data import load_text, token_stream

    text = load_text(spec, "calibration")
    stream = token_stream(tokenizer, text)
    windows = pack_stream(stream, seqlen)
    if windows.shape[0] == 0:
        raise UserInputError(f"training text {spec!r} has {stream.numel()} tokens, fewer than one window of "
                             f"{seqlen}; give more text or a smaller --seqlen")
    record = {"spec": spec, "name": text.name, "split": text.split, "text_sha256": text.sha256,
              "stream_tokens": int(stream.numel()), "windows_available": int(windows.shape[0]), "seqlen": seqlen,
              "tokens_sha256": sha256_bytes(windows.numpy().tobytes()), "meta": _summary_meta(text.meta)}
    return PackedText(windows=windows, record=record)


def window_order(available: int, count: int, seed: int) -> torch.Tensor:
    """Indices of ``count`` windows out of ``available``: one seeded permutation per epoch, concatenated.

    Epoch e uses ``torch.randperm(available, generator=Generator().manual_seed(seed + e))``, so the order depends
    only on (available, seed) and a resumed run sees the same windows as an uninterrupted one.
    """
    if available < 1 or count < 0:
        raise UserInputError(f"cannot draw {count} windows from {available}")
    epochs = -(-count // available)
    parts = [torch.randperm(available, generator=torch.Generator().manual_seed(seed + e)) for e in range(epochs)]
    return torch.cat(parts)[:count] if parts else torch.zeros(0, dtype=torch.long)
