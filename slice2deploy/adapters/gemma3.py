"""Gemma-3 text models (``gemma3_text``: Gemma-3-270M/1B, the text tower of the larger ones).

Source: transformers ``models/gemma3/modeling_gemma3.py``. What differs from Llama, and where it is handled:
- ``Gemma3RMSNorm`` scales by ``(1 + w)``, not ``w``: :meth:`norm_scale_and_bias` says so; folding is generic.
- ``Gemma3TextScaledWordEmbedding`` multiplies looked-up rows by the scalar ``√d`` (a buffer): a scalar commutes
  with the rotation ``E ← E Q``, so the embedding is rotated like any other; the tied head reads the unscaled rows.
- Sliding-window and full-attention layers get different masks and rotary bases from the model loop: the slicing
  driver records each layer's keyword arguments, and the sliced layers keep the source layer's attributes.
- *Post*-norms on each branch output before the residual add (``post_attention_layernorm``,
  ``post_feedforward_layernorm``): declared as ``Stage.post_norm``. The norm's RMS is over the branch output's full
  width, so the residual rotation cannot be pushed into ``o_proj``/``down_proj``; folding turns ``γ ⊙ n(y)`` into
  ``mix(n(y))`` with ``mix = diag(1 + w)``, and the mix (not the writer) is what the rotation engine rotates and
  slices. See ``SliceConfig.post_norm_width`` for the exact (full-width branch) and approximate (sliced branch) forms.
- Per-head ``q_norm``/``k_norm`` inside attention act on the head dimension: untouched. ``final_logit_softcapping``
  acts on logits: untouched.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .base import Adapter, register_adapter
from .llama import LlamaAdapter


@register_adapter
class Gemma3TextAdapter(Adapter):
    model_types = ("gemma3_text",)
    embeddings = ("model.embed_tokens",)
    layers = "model.layers"
    final_norm = "model.norm"
    stages = (  # Llama's stages with a post-norm on each branch output (and Gemma's name for the MLP's pre-norm)
        replace(LlamaAdapter.stages[0], post_norm="post_attention_layernorm"),
        replace(LlamaAdapter.stages[1], norm="pre_feedforward_layernorm", post_norm="post_feedforward_layernorm"),
    )
    tiny_config = {
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,  # with sliding_window_pattern-like layer_types below: both attention kinds
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "query_pre_attn_scalar": 8,
        "max_position_embeddings": 128,
        "sliding_window": 8,  # shorter than the test sequences, so the sliding mask matters
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rms_norm_eps": 1e-6,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": True,
    }

    def norm_scale_and_bias(self, norm: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Gemma's RMSNorm multiplies by ``1 + w`` (weights are stored as offsets from one)."""
        return 1.0 + norm.weight.detach().to(torch.float64), None
