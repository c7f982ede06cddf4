"""OPT: pre-norm LayerNorm with bias, learned positional embeddings, ReLU fc1/fc2 MLP."""

from __future__ import annotations

from ..utils import UserInputError
from .base import Adapter, Stage, StageKind, register_adapter


@register_adapter
class OPTAdapter(Adapter):
    model_types = ("opt",)
    embeddings = ("model.decoder.embed_tokens", "model.decoder.embed_positions")
    layers = "model.decoder.layers"
    final_norm = "model.decoder.final_layer_norm"
    norm_kind = "layer"
    stages = (
        Stage(
            name="attn",
            kind=StageKind.ATTENTION,
            norm="self_attn_layer_norm",
            readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            writers=("self_attn.out_proj",),
            call=("self_attn",),
        ),
        Stage(
            name="mlp",
            kind=StageKind.MLP,
            norm="final_layer_norm",
            readers=("fc1",),
            writers=("fc2",),
            call=("fc1", "activation_fn", "fc2"),
        ),
    )
    tiny_config = {
        "vocab_size": 96,
        "hidden_size": 32,
        "word_embed_proj_dim": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 128,
        "tie_word_embeddings": True,
    }

    def norm_eps(self, config) -> float:
        return 1e-5  # nn.LayerNorm's default, which OPT uses

    def check_supported(self, config) -> None:
        if not getattr(config, "do_layer_norm_before", True):
            raise UserInputError("OPT variants with post-layer norm (do_layer_norm_before=False, e.g. opt-350m) "
                                 "are not supported: SliceGPT needs pre-norm blocks")
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise UserInputError("OPT variants whose embedding size differs from the hidden size (project_in/out, "
                                 "e.g. opt-350m) are not supported")
