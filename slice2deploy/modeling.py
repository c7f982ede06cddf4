"""Sliced causal language models as Hugging Face models.

This file is self-contained (it imports only torch and transformers): slice2deploy copies it next to every
sliced checkpoint as ``modeling_slice2deploy.py`` so that ``trust_remote_code=True`` loads the model without
slice2deploy installed. With ``import slice2deploy`` the classes are registered with the Auto classes and no
flag is needed.

A sliced model is the source architecture (built by transformers from the recorded source config) with:
- every norm replaced by a weight-free RMSNorm that normalises by the *original* hidden size d;
- the residual stream kept at a width ``widths[p]`` <= d at every position p (embedding output, then the
  input of every stage of every layer), the linears that read or write it cut to those widths;
- a shortcut matrix on each residual connection whose two ends live in different bases (Q_inᵀ Q_out);
- optionally, the head tied to the token embedding through a small matrix after the final norm;
- parallel blocks (Phi-2): the stages of a layer read one position and write the next, with one shortcut;
- post-norms (Gemma-3): a branch output is normalised over its own width (``branch_widths``), then a mix matrix
  (the norm's scale and the output basis) writes it into the stream.
The attention internals (head dim, RoPE, GQA groups, KV cache) are those of the source model.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn import functional as F
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"sliced models need transformers >= 5 (found {transformers.__version__})")

MODEL_TYPE = "slice2deploy_sliced"
_BASE_KEYS_NOT_COPIED = {
    "model_type", "architectures", "auto_map", "transformers_version", "tie_word_embeddings", "dtype",
    "torch_dtype", "_name_or_path", "name_or_path",
}


def stage_groups(stages: list, topology: str = "sequential") -> list[list]:
    """Stages grouped by the residual position they read: all in one group (parallel) or one each (sequential)."""
    if topology == "parallel":
        return [list(stages)]
    if topology != "sequential":
        raise ValueError(f"unknown block topology {topology!r} (sequential or parallel)")
    return [[stage] for stage in stages]


def group_name(group: list[dict]) -> str:
    return "_".join(stage["name"] for stage in group)


class SlicedConfig(PreTrainedConfig):
    """Config of a sliced model: the source model's config plus every residual-stream width."""

    model_type = MODEL_TYPE

    base_config: dict | None = None  # the source model's config (to_dict())
    original_hidden_size: int = 0
    widths: list | None = None  # width of each residual position: [embedding, layer0.stage0 out, ...]
    layout: dict | None = None  # module paths and stages, written by the adapter at slicing time
    shortcuts: list | None = None  # shortcuts[layer][group]: a shortcut matrix sits on that residual
    branch_widths: list | None = None  # branch_widths[layer][stage]: width of a post-normed branch output (or None)
    norm_eps: float = 1e-6
    tie_head: bool = False  # the head reuses the token-embedding matrix
    head_bias: bool = False
    final_mix: bool = False  # the final norm ends with a (widths[-1] -> widths[0] + head_extra) matrix
    head_extra: int = 0  # 1 when a LayerNorm model keeps its tie: one rank-one logit column
    slicing: dict | None = None  # provenance: mode, sparsity, calibration, source

    def __post_init__(self, **kwargs):
        for key, value in (self.base_config or {}).items():
            if key not in _BASE_KEYS_NOT_COPIED and not hasattr(self, key):
                setattr(self, key, value)  # num_hidden_layers, vocab_size, head_dim, ... for generation utils
        super().__post_init__(**kwargs)

    @property
    def num_stages(self) -> int:
        return len(self.layout["stages"])

    @property
    def groups(self) -> list[list[dict]]:
        return stage_groups(self.layout["stages"], self.layout.get("topology", "sequential"))

    @property
    def positions_per_layer(self) -> int:
        return len(self.groups)

    @property
    def head_width(self) -> int:
        return self.widths[0] if self.final_mix else self.widths[-1]

    def layer_widths(self, layer: int) -> list[int]:
        """Widths of the residual positions a layer reads and writes (group inputs, then its output)."""
        start = layer * self.positions_per_layer
        return list(self.widths[start : start + self.positions_per_layer + 1])

    def layer_branch_widths(self, layer: int) -> list:
        return list(self.branch_widths[layer]) if self.branch_widths else [None] * self.num_stages


class SlicedRMSNorm(nn.Module):
    """Weight-free RMSNorm over a residual stream that keeps ``width`` of its ``original_dim`` coordinates.

    Dividing the sum of squares by the original d (not by the kept width) keeps the sliced model's scale equal
    to the dense one's. ``mix`` (final norm only) maps the normalised stream into the head's basis.
    """

    def __init__(self, original_dim: int, eps: float, width: int | None = None, mix_width: int | None = None):
        super().__init__()
        self.original_dim = original_dim
        self.eps = eps
        self.mix = nn.Linear(width or original_dim, mix_width, bias=False) if mix_width is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean_square = xf.pow(2).sum(-1, keepdim=True) / self.original_dim
        y = (xf * torch.rsqrt(mean_square + self.eps)).to(x.dtype)
        return self.mix(y) if self.mix is not None else y

    def extra_repr(self) -> str:
        return f"original_dim={self.original_dim}, eps={self.eps}"


class TiedLMHead(nn.Module):
    """``logits = x[..., :k] Eᵀ + x[..., k:] * extra + bias`` with E the (sliced) token embedding, not a copy."""

    def __init__(self, embedding: nn.Embedding, bias: bool, extra: int):
        super().__init__()
        self._embedding = (embedding,)  # a tuple: referenced, not registered (no duplicate in the state dict)
        vocab = embedding.weight.shape[0]
        like = {"device": embedding.weight.device, "dtype": embedding.weight.dtype}
        self.bias = nn.Parameter(torch.zeros(vocab, **like)) if bias else None
        self.extra = nn.Parameter(torch.zeros(vocab, extra, **like)) if extra else None

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = self.weight.shape[1]
        logits = F.linear(x[..., :width], self.weight, self.bias)
        if self.extra is not None:
            logits = logits + F.linear(x[..., width:], self.extra)
        return logits


class SlicedDecoderLayer(nn.Module):
    """A source decoder layer whose stage groups run as ``x ← shortcut(x) + Σ branch(norm(x))``.

    It adopts the source layer's sub-modules under their own names, so parameter names stay those of the
    source architecture; only the norms are replaced and ``<group>_shortcut`` matrices are added (one per group:
    a stage in sequential blocks, all stages in parallel ones). ``branch_widths[s]`` (post-normed stages only) is
    the width of stage s's output before its post-norm, whose mix maps it into the stream.
    """

    def __init__(self, layer: nn.Module, stages: list[dict], widths: list[int], shortcuts: list[bool],
                 original_dim: int, eps: float, topology: str = "sequential", branch_widths: list | None = None):
        super().__init__()
        self.stages = [dict(stage) for stage in stages]
        self.groups = stage_groups(self.stages, topology)
        for key, value in vars(layer).items():  # plain attributes the model loop may read (attention_type, ...)
            if not key.startswith("_") and key != "training" and not isinstance(value, nn.Module):
                setattr(self, key, value)
        for name, child in layer.named_children():
            self.add_module(name, child)
        weight = next(layer.parameters())
        branch_widths = branch_widths or [None] * len(self.stages)
        for position, group in enumerate(self.groups):
            for stage in group:
                if not isinstance(getattr(self, stage["norm"]), SlicedRMSNorm):
                    setattr(self, stage["norm"], SlicedRMSNorm(original_dim, eps))
                post_norm = stage.get("post_norm")
                if post_norm and not isinstance(getattr(self, post_norm), SlicedRMSNorm):
                    width = branch_widths[self.stages.index(stage)] or original_dim
                    norm = SlicedRMSNorm(original_dim, eps, width, widths[position + 1])
                    setattr(self, post_norm, norm.to(device=weight.device, dtype=weight.dtype))
            if shortcuts[position]:
                shortcut = nn.Linear(widths[position], widths[position + 1], bias=False,
                                     device=weight.device, dtype=weight.dtype)
                self.add_module(f"{group_name(group)}_shortcut", shortcut)

    def shortcut(self, group: list[dict] | dict) -> nn.Module | None:
        """The shortcut of a group (a stage dict stands for its own group in sequential blocks)."""
        return getattr(self, f"{group_name([group] if isinstance(group, dict) else group)}_shortcut", None)

    def branch(self, stage: dict, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The stage's branch on its (already normalised) input, post-norm included."""
        if stage["kind"] == "attention":
            hidden_states = getattr(self, stage["call"][0])(hidden_states=hidden_states, **kwargs)[0]
        else:
            for name in stage["call"]:
                hidden_states = getattr(self, name)(hidden_states)
        if stage.get("post_norm"):
            hidden_states = getattr(self, stage["post_norm"])(hidden_states)
        return hidden_states

    def group_branches(self, group: list[dict], hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Σ of the group's branches on one input (a norm shared by parallel stages is applied once)."""
        normed: dict[str, torch.Tensor] = {}
        total = None
        for stage in group:
            if stage["norm"] not in normed:
                normed[stage["norm"]] = getattr(self, stage["norm"])(hidden_states)
            out = self.branch(stage, normed[stage["norm"]], kwargs)
            total = out if total is None else total + out
        return total

    def run_group(self, group: list[dict], hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        out = self.group_branches(group, hidden_states, kwargs)
        shortcut = self.shortcut(group)
        return (shortcut(hidden_states) if shortcut is not None else hidden_states) + out

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        for group in self.groups:
            hidden_states = self.run_group(group, hidden_states, kwargs)
        return hidden_states


def _resize_linear(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None,
                   bias: bool | None = None) -> None:
    """Give ``linear`` the requested shape; parameters whose shape changes are replaced by empty ones."""
    in_features = in_features or linear.in_features
    out_features = out_features or linear.out_features
    like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
    if tuple(linear.weight.shape) != (out_features, in_features):
        linear.weight = nn.Parameter(torch.empty(out_features, in_features, **like))
    want_bias = linear.bias is not None if bias is None else bias
    if want_bias and (linear.bias is None or linear.bias.shape[0] != out_features):
        linear.bias = nn.Parameter(torch.zeros(out_features, **like))
    elif not want_bias:
        linear.bias = None
    linear.in_features, linear.out_features = in_features, out_features


def _resize_embedding(embedding: nn.Embedding, width: int) -> None:
    if embedding.weight.shape[1] != width:
        like = {"device": embedding.weight.device, "dtype": embedding.weight.dtype}
        embedding.weight = nn.Parameter(torch.empty(embedding.weight.shape[0], width, **like))
    embedding.embedding_dim = width


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def apply_sliced_layout(base: nn.Module, config: SlicedConfig) -> None:
    """Turn a source-architecture CausalLM into the sliced layout that ``config`` records (in place).

    Modules that already have the recorded shapes (a model just sliced) are kept as they are; others get
    empty parameters of the right shape (a model about to be loaded from a checkpoint).
    """
    layout, widths = config.layout, config.widths
    d, eps = config.original_hidden_size, config.norm_eps
    for path in layout["embeddings"]:
        _resize_embedding(base.get_submodule(path), widths[0])
    layers = base.get_submodule(layout["layers"])
    topology = layout.get("topology", "sequential")
    for index, layer in enumerate(layers):
        if isinstance(layer, SlicedDecoderLayer):
            continue
        layer_widths, branch_widths = config.layer_widths(index), config.layer_branch_widths(index)
        for position, group in enumerate(config.groups):
            for stage in group:
                branch_width = branch_widths[layout["stages"].index(stage)] or d
                for path in layout["readers"][stage["name"]]:
                    _resize_linear(layer.get_submodule(path), in_features=layer_widths[position])
                for path in layout["writers"][stage["name"]]:
                    out = branch_width if stage.get("post_norm") else layer_widths[position + 1]
                    _resize_linear(layer.get_submodule(path), out_features=out)
        layers[index] = SlicedDecoderLayer(layer, layout["stages"], layer_widths, config.shortcuts[index], d, eps,
                                           topology, branch_widths)
    final_norm = base.get_submodule(layout["final_norm"])
    if not isinstance(final_norm, SlicedRMSNorm):
        mix_width = config.widths[0] + config.head_extra if config.final_mix else None
        _set_submodule(base, layout["final_norm"], SlicedRMSNorm(d, eps, widths[-1], mix_width))
    head = base.get_submodule(layout["head"])
    if config.tie_head and not isinstance(head, TiedLMHead):
        embedding = base.get_submodule(layout["embeddings"][0])
        _set_submodule(base, layout["head"], TiedLMHead(embedding, config.head_bias, config.head_extra))
    elif not config.tie_head:
        _resize_linear(head, in_features=config.head_width, bias=config.head_bias)


class SlicedPreTrainedModel(PreTrainedModel):
    config_class = SlicedConfig
    base_model_prefix = "base"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class SlicedForCausalLM(SlicedPreTrainedModel, GenerationMixin):
    """A sliced causal LM; ``base`` is the source architecture in the sliced layout."""

    def __init__(self, config: SlicedConfig, base: nn.Module | None = None):
        super().__init__(config)
        given_base = base is not None
        if base is None:
            skip = ("model_type", "auto_map", "dtype", "torch_dtype")
            base_kwargs = {k: v for k, v in config.base_config.items() if k not in skip}
            base_config = AutoConfig.for_model(config.base_config["model_type"], **base_kwargs)
            base_config.tie_word_embeddings = False  # a tie is kept by TiedLMHead, not by transformers
            attn = getattr(config, "_attn_implementation", None)
            # from_pretrained(dtype=...) builds the model under that default dtype; the source config's recorded
            # dtype must not override it, or the weights would be cast back to the dtype the slice was saved in
            base = AutoModelForCausalLM.from_config(base_config, dtype=torch.get_default_dtype(),
                                                    **({"attn_implementation": attn} if attn else {}))
        else:  # an already sliced model: its weights are final, and any tie is TiedLMHead's business
            base.config.tie_word_embeddings = False
            base.all_tied_weights_keys = {}
        self.base = base
        apply_sliced_layout(self.base, config)
        if given_base:
            for module in self.base.modules():
                module._is_hf_initialized = True  # post_init must not re-initialise real weights
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return None  # the head may be tied through TiedLMHead; resizing is not supported

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        return self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=cache, inputs_embeds=inputs_embeds, labels=labels,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)


def register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load sliced checkpoints without remote code."""
    try:
        AutoConfig.register(MODEL_TYPE, SlicedConfig)
        AutoModelForCausalLM.register(SlicedConfig, SlicedForCausalLM)
    except ValueError:  # already registered (module imported twice, e.g. as remote code too)
        pass
