"""Phi-3 (and Phi-4-mini, which ships as ``phi3``): Llama-like pre-norm RMSNorm blocks with fused readers.

Source: transformers ``models/phi3/modeling_phi3.py``: ``Phi3Attention.qkv_proj`` (one linear producing q, k and v
side by side) and ``Phi3MLP.gate_up_proj`` (gate and up side by side, split after the matmul). A fused reader is
still a linear of the normed residual stream, ``W ← W Q`` rotates all of its output rows at once, so fusing needs
no machinery: only the names differ from Llama. Partial rotary (Phi-4-mini) acts on the head dimension only.
"""

from __future__ import annotations

from dataclasses import replace

from .base import Adapter, register_adapter
from .llama import LlamaAdapter


@register_adapter
class Phi3Adapter(Adapter):
    model_types = ("phi3",)
    embeddings = ("model.embed_tokens",)
    layers = "model.layers"
    final_norm = "model.norm"
    stages = (  # Llama's stages with the fused readers
        replace(LlamaAdapter.stages[0], readers=("self_attn.qkv_proj",)),
        replace(LlamaAdapter.stages[1], readers=("mlp.gate_up_proj",)),
    )
    tiny_config = {
        **LlamaAdapter.tiny_config,
        "original_max_position_embeddings": 128,
        "pad_token_id": 0,  # the default (32000) is outside a tiny vocabulary
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
