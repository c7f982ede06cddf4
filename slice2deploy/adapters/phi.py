"""Phi-1/1.5/2: *parallel* blocks with one LayerNorm (with bias) feeding attention and MLP.

Source: transformers ``models/phi/modeling_phi.py``, ``PhiDecoderLayer.forward``:
``h = input_layernorm(x); x ← x + dense(attn(h)) + fc2(gelu(fc1(h)))``. Both stages read the same residual
position and write the same next one (``Topology.PARALLEL``): one basis per layer, one shortcut per layer.
LayerNorm bias and mean-subtraction are folded by the generic LayerNorm path (readers' biases, centred writers
``dense``/``fc2`` and the embedding). Partial rotary (``partial_rotary_factor``) and the optional per-head
``q_layernorm``/``k_layernorm`` act on the head dimension only, which rotations do not touch. The head has a bias,
which a reader keeps as it is.
"""

from __future__ import annotations

from .base import Adapter, Stage, StageKind, Topology, register_adapter


@register_adapter
class PhiAdapter(Adapter):
    model_types = ("phi",)
    embeddings = ("model.embed_tokens",)
    layers = "model.layers"
    final_norm = "model.final_layernorm"
    norm_kind = "layer"
    topology = Topology.PARALLEL
    stages = (
        Stage(
            name="attn",
            kind=StageKind.ATTENTION,
            norm="input_layernorm",
            readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            writers=("self_attn.dense",),
            call=("self_attn",),
        ),
        Stage(
            name="mlp",
            kind=StageKind.MLP,
            norm="input_layernorm",  # shared: the parallel block normalises its input once
            readers=("mlp.fc1",),
            writers=("mlp.fc2",),
            call=("mlp",),
        ),
    )
    tiny_config = {
        "vocab_size": 96,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128,
        "partial_rotary_factor": 0.5,  # Phi-2's value: rotary on half of each head
        "layer_norm_eps": 1e-5,
        "pad_token_id": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }
