"""Qwen3: the Llama layout plus per-head RMSNorms on queries and keys (``q_norm`` / ``k_norm``).

Source: transformers ``models/qwen3/modeling_qwen3.py`` (``Qwen3Attention`` applies ``q_norm``/``k_norm`` over
``head_dim`` after ``q_proj``/``k_proj``). Those norms act inside attention, on the head dimension, which residual
rotations never touch (q = W_q Q (Qᵀ x) is the same vector), so they are neither folded nor declared: Qwen3 is a
declaration-only sibling of Llama. Qwen3 has no q/k/v biases (unlike Qwen2).
"""

from __future__ import annotations

from .base import register_adapter
from .llama import LlamaAdapter

_TINY = {**LlamaAdapter.tiny_config, "head_dim": 8,  # Qwen3's default head_dim is 128, independent of hidden_size
         "tie_word_embeddings": True}


@register_adapter
class Qwen3Adapter(LlamaAdapter):
    model_types = ("qwen3",)
    tiny_config = _TINY
