"""Llama family: pre-norm RMSNorm, RoPE, GQA attention, gated SiLU MLP. Mistral and Qwen2 share the layout."""

from __future__ import annotations

from .base import Adapter, Stage, StageKind, register_adapter

_TINY = {
    "vocab_size": 96,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
}


@register_adapter
class LlamaAdapter(Adapter):
    model_types = ("llama",)
    embeddings = ("model.embed_tokens",)
    layers = "model.layers"
    final_norm = "model.norm"
    stages = (
        Stage(
            name="attn",
            kind=StageKind.ATTENTION,
            norm="input_layernorm",
            readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            writers=("self_attn.o_proj",),
            call=("self_attn",),
        ),
        Stage(
            name="mlp",
            kind=StageKind.MLP,
            norm="post_attention_layernorm",
            readers=("mlp.gate_proj", "mlp.up_proj"),
            writers=("mlp.down_proj",),
            call=("mlp",),
        ),
    )
    tiny_config = {**_TINY, "tie_word_embeddings": True}


@register_adapter
class MistralAdapter(LlamaAdapter):
    model_types = ("mistral",)
    tiny_config = {**_TINY, "tie_word_embeddings": False, "sliding_window": None}


@register_adapter
class Qwen2Adapter(LlamaAdapter):
    """Qwen2 adds biases to q/k/v: a reader's bias is unaffected by rotating its input."""

    model_types = ("qwen2",)
    tiny_config = {**_TINY, "tie_word_embeddings": True}
