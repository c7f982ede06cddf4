"""Recovery after slicing: distillation from the dense model and/or LoRA fine-tuning, merged back.

Slicing removes the low-variance directions of the residual stream; the error compounds over the layers. A short
training run against the dense model recovers much of it:

- ``kd``: every weight of the slice is trained to match the dense teacher's next-token distribution, the KL
  divergence ``τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ))`` per position (Hinton et al., 2015, "Distilling the
  knowledge in a neural network"). Pruning-then-distillation work (Minitron: Muralidharan et al., 2024, "Compact
  language models via pruning and knowledge distillation") found logit distillation from the unpruned model far more
  token-efficient than next-token loss; optionally the layer outputs are matched too (``hidden_weight``), through
  a learned linear map per layer because the widths differ (as Minitron does), discarded after training.
- ``lora``: low-rank adapters (Hu et al., 2021, "LoRA", through ``peft``) on every linear of the decoder layers,
  trained on the next-token loss: the recovery fine-tuning of SliceGPT (Ashkboos et al., ICLR 2024).
- ``kd+lora``: the adapters trained on the distillation loss.

Adapters are merged into the weights at the end, so the output is the same kind of checkpoint as the input: a
uniform slice stays a plain ``LlamaForCausalLM`` (or its family), a per-layer slice stays a ``SlicedForCausalLM``
loadable with and without slice2deploy.

Memory: the full-vocabulary logits of a micro-batch are never materialised at once. The backbones run to their final
hidden states (B, T, d); the heads, the KL and the cross-entropy then run over chunks of ``kl_chunk`` positions, each
chunk's backward done immediately into the detached hidden state, whose gradient finally flows through the backbone.
The teacher runs under ``no_grad`` per micro-batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .recover_data import PackedText, load_training_text, window_order
from .recover_state import load_state, save_state, state_dir_for
from .utils import UserInputError, check_output_dir

LOSS_CURVE_POINTS = 200


class Method(str, Enum):
    """What is trained, on which loss."""

    KD = "kd"  # all weights, distillation loss
    LORA = "lora"  # LoRA adapters, next-token loss (the SliceGPT paper's recovery)
    KD_LORA = "kd+lora"  # LoRA adapters, distillation loss


@dataclass
class RecoverConfig:
    """Everything that decides the result of :func:`recover` (recorded in the output's manifest).

    Units: ``tokens`` is the training budget in tokens (trained tokens = steps × batch_size × grad_accum × seqlen,
    the largest multiple of one step that fits); ``lr`` is the peak AdamW learning rate (None: 2e-5 for ``kd``,
    2e-4 with LoRA; 1e-4 full-weight diverged on SmolLM2 in its first steps), reached after ``warmup`` (a fraction
    of the steps) and decayed by a cosine to ``min_lr_ratio × lr``. ``kd_weight``/``ce_weight`` None: 1/0 for the
    distillation methods, 0/1 for ``lora``.
    """

    method: Method = Method.KD
    teacher: str | None = None  # None: the source model recorded in the slice
    data: str = "builtin"
    tokens: int = 200_000
    seqlen: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    warmup: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    kd_weight: float | None = None
    ce_weight: float | None = None
    hidden_weight: float = 0.0
    lora_rank: int = 32
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    kl_chunk: int = 128
    seed: int = 0
    device: str = "cpu"
    dtype: str = "auto"  # compute dtype: auto = bfloat16 on a CUDA GPU that supports it, float32 otherwise
    checkpoint_every: int = 50  # optimizer steps between resumable checkpoints (0: none)
    version: int = 1

    def __post_init__(self) -> None:
        self.method = Method(self.method)
        uses_kd = self.method != Method.LORA
        self.kd_weight = (1.0 if uses_kd else 0.0) if self.kd_weight is None else float(self.kd_weight)
        self.ce_weight = (0.0 if uses_kd else 1.0) if self.ce_weight is None else float(self.ce_weight)
        self.lr = (2e-5 if self.method == Method.KD else 2e-4) if self.lr is None else float(self.lr)
        self._check_positive()
        if not 0 <= self.warmup < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise UserInputError("warmup must be in [0, 1) and min_lr_ratio in [0, 1]")
        if min(self.kd_weight, self.ce_weight, self.hidden_weight, self.weight_decay, self.lora_dropout) < 0:
            raise UserInputError("loss weights, weight decay and LoRA dropout must be >= 0")
        if self.kd_weight + self.ce_weight + self.hidden_weight == 0:
            raise UserInputError("every loss weight is 0: nothing to train on")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserInputError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise UserInputError(f"unknown device {self.device!r}; use cpu or cuda[:N]")
        if self.checkpoint_every < 0:
            raise UserInputError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")

    def _check_positive(self) -> None:
        for name in ("tokens", "seqlen", "batch_size", "grad_accum", "lr", "temperature", "lora_rank", "lora_alpha",
                     "kl_chunk", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise UserInputError(f"recovery {name.replace('_', '-')} must be > 0, got {value!r}")
        if self.seqlen < 2:
            raise UserInputError(f"recovery seqlen must be >= 2, got {self.seqlen}")

    @property
    def uses_teacher(self) -> bool:
        return self.kd_weight > 0 or self.hidden_weight > 0

    @property
    def uses_lora(self) -> bool:
        return self.method != Method.KD

    @property
    def tokens_per_step(self) -> int:
        return self.seqlen * self.batch_size * self.grad_accum

    def steps(self) -> int:
        """Optimizer steps within the token budget; an error when the budget is below one step."""
        steps = self.tokens // self.tokens_per_step
        if steps < 1:
            raise UserInputError(f"a budget of {self.tokens} tokens is less than one optimizer step "
                                 f"({self.batch_size} x {self.grad_accum} x {self.seqlen} = {self.tokens_per_step} "
                                 "tokens); raise --tokens or lower --batch-size/--seqlen")
        return steps

    def to_dict(self) -> dict:
        data = asdict(self)
        data["method"] = self.method.value
        return data

    @classmethod
    def from_dict(cls, data: dict) -> RecoverConfig:
        return cls(**data)


# ------------------------------------------------------------------------------------------------ model structure


def _inner(model: nn.Module) -> nn.Module:
    """The source-architecture CausalLM: ``model.base`` for a per-layer slice, the model itself otherwise."""
    from .modeling import SlicedForCausalLM

    return model.base if isinstance(model, SlicedForCausalLM) else model


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, head): the backbone maps ids to final normed hidden states (B, T, k); the head maps those to logits.

    Works for plain Hugging Face CausalLMs and per-layer slices (whose head may be a ``TiedLMHead``).
    """
    from .adapters import get_adapter

    inner = _inner(model)
    return inner.base_model, inner.get_submodule(get_adapter(inner.config).head)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    from .adapters import get_adapter

    inner = _inner(model)
    return get_adapter(inner.config).get_layers(inner)


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of every ``nn.Linear`` inside the decoder layers (readers, writers, shortcut matrices)."""
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [f"{prefix}.{name}" for name, module in layers.named_modules() if isinstance(module, nn.Linear)]


def add_lora(model: nn.Module, config: RecoverConfig) -> nn.Module:
    """``model`` with LoRA adapters (peft) on :func:`lora_targets`; only the adapters are trainable."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_targets(model), bias="none")
    return get_peft_model(model, lora)


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights (W ← W + (α/r)·B A) and return the plain model, adapters removed."""
    return peft_model.merge_and_unload()


# ------------------------------------------------------------------------------------------------ losses


def chunk_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, labels: torch.Tensor | None,
               student_head: nn.Module, teacher_head: nn.Module | None, config: RecoverConfig) -> torch.Tensor:
    """Summed loss of one chunk of positions: ``kd_weight·τ²·KL(p_t‖p_s) + ce_weight·CE``.

    ``student_hidden``: (B, c, k); ``teacher_hidden``: (B, c, d) or None; ``labels``: (B, c) next-token ids, -100
    where there is none. The full-vocabulary logits exist only for these c positions, in float32.
    """
    logits = student_head(student_hidden).float()  # (B, c, V)
    loss = logits.new_zeros(())
    if config.kd_weight > 0:
        tau = config.temperature
        with torch.no_grad():
            teacher_logp = F.log_softmax(teacher_head(teacher_hidden).float() / tau, dim=-1)
        student_logp = F.log_softmax(logits / tau, dim=-1)
        kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
        loss = loss + config.kd_weight * tau * tau * kl
    if config.ce_weight > 0:
        loss = loss + config.ce_weight * F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                         reduction="sum")
    return loss


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """(B, T) labels: position t predicts ``ids[:, t+1]``; the last position has none (-100)."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels


def chunked_backward(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, ids: torch.Tensor,
                     student_head: nn.Module, teacher_head: nn.Module | None, config: RecoverConfig,
                     scale: float, extra_loss: torch.Tensor | None = None, context=nullcontext) -> float:
    """Backpropagate ``scale × Σ chunk_loss`` (+ ``extra_loss``) without holding more than one chunk's logits.

    Each chunk's loss is backpropagated at once into a detached copy of ``student_hidden`` (and the head's
    parameters); the accumulated gradient then flows through the backbone in one backward. ``context()`` wraps each
    chunk's forward (autocast under bf16). Returns the unscaled summed loss (a float).
    """
    hidden = student_hidden.detach().requires_grad_()
    labels = next_token_labels(ids) if config.ce_weight > 0 else None
    total = 0.0
    for start in range(0, ids.shape[1], config.kl_chunk):
        part = slice(start, start + config.kl_chunk)
        with context():
            loss = chunk_loss(hidden[:, part], None if teacher_hidden is None else teacher_hidden[:, part],
                              None if labels is None else labels[:, part], student_head, teacher_head, config)
        (loss * scale).backward()
        total += float(loss.detach())
    tensors, grads = [student_hidden], [hidden.grad]
    if extra_loss is not None:
        tensors.append(extra_loss * scale)
        grads.append(None)
    torch.autograd.backward(tensors, grads)
    return total


@torch.no_grad()
def heldout_kl(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, temperature: float = 1.0,
               batch_size: int = 4, chunk: int = 128) -> float:
    """Mean KL(p_teacher ‖ p_student) in nats per position over (N, T) held-out ``windows`` (chunked, no grad)."""
    config = RecoverConfig(kd_weight=1.0, ce_weight=0.0, temperature=temperature, kl_chunk=chunk)
    s_body, s_head = backbone_and_head(student)
    t_body, t_head = backbone_and_head(teacher)
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        s_hidden = s_body(input_ids=ids, use_cache=False).last_hidden_state
        t_hidden = t_body(input_ids=ids, use_cache=False).last_hidden_state
        for start in range(0, ids.shape[1], chunk):
            part = slice(start, start + chunk)
            total += float(chunk_loss(s_hidden[:, part], t_hidden[:, part], None, s_head, t_head, config))
        count += ids.numel()
    return total / count / temperature**2


# ------------------------------------------------------------------------------------------------ hidden states


class LayerOutputs:
    """Forward hooks that keep every decoder layer's output (B, T, width) of one forward; removed on ``close``."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor] = []
        self._handles = [layer.register_forward_hook(self._hook) for layer in decoder_layers(model)]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        outputs, self.outputs = self.outputs, []
        return outputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def fit_projections(student_outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor]) -> nn.ModuleList:
    """One linear map per layer from the student's width to the teacher's, initialised by least squares."""
    maps = nn.ModuleList()
    for s, t in zip(student_outputs, teacher_outputs, strict=True):
        x, y = s.detach().flatten(0, 1).double(), t.detach().flatten(0, 1).double()  # (N, k), (N, d)
        gram = x.T @ x + 1e-6 * torch.eye(x.shape[1], dtype=x.dtype, device=x.device) * x.pow(2).mean()
        weight = torch.linalg.solve(gram, x.T @ y).T  # (d, k)
        linear = nn.Linear(x.shape[1], y.shape[1], bias=False, device=s.device)
        linear.weight.data.copy_(weight.float())
        maps.append(linear)
    return maps


def hidden_loss(student_outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor],
                maps: nn.ModuleList) -> torch.Tensor:
    """Σ over layers and tokens of ‖P_l s − t‖² / ‖t‖² (per-token relative error; massive activations don't rule)."""
    total = student_outputs[0].new_zeros((), dtype=torch.float32)
    for s, t, linear in zip(student_outputs, teacher_outputs, maps, strict=True):
        t = t.float()
        error = (linear(s.float()) - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)
        total = total + error.sum()
    return total / len(maps)


# ------------------------------------------------------------------------------------------------ checks


def original_width(config) -> int | None:
    """The hidden size of the model a slice was cut from (uniform: ``slice2deploy`` record; per-layer: config)."""
    record = getattr(config, "slice2deploy", None)
    if isinstance(record, dict) and record.get("original_hidden_size"):
        return int(record["original_hidden_size"])
    value = getattr(config, "original_hidden_size", None)
    return int(value) if value else None


def recorded_source(config) -> str | None:
    """The model spec a slice records as its source (None for an unsliced model)."""
    from .api import slicing_record

    try:
        record = slicing_record(config)
    except AttributeError:
        return None
    source = record.get("source") if isinstance(record, dict) else None
    return source.get("spec") if isinstance(source, dict) else None


def check_teacher(student: nn.Module, student_tokenizer, teacher: nn.Module, teacher_tokenizer, spec: str) -> None:
    """Refuse a teacher whose tokenizer, vocabulary or hidden width differs from the slice's source."""
    if student_tokenizer is not None and teacher_tokenizer is not None:
        if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
            raise UserInputError(f"teacher {spec!r} has another tokenizer than the slice ({len(teacher_tokenizer)} vs "
                                 f"{len(student_tokenizer)} tokens, different vocabularies); distillation compares "
                                 "distributions over the same tokens: use the model the slice was cut from")
    s_vocab = student.get_input_embeddings().num_embeddings
    t_vocab = teacher.get_input_embeddings().num_embeddings
    if s_vocab != t_vocab:
        raise UserInputError(f"teacher {spec!r} has a vocabulary of {t_vocab} logits, the slice {s_vocab}")
    from .adapters import get_adapter

    width = original_width(student.config)
    teacher_width = get_adapter(teacher.config).hidden_size(teacher.config)
    if width is not None and width != teacher_width:
        raise UserInputError(f"teacher {spec!r} has hidden size {teacher_width}, but the slice was cut from a model "
                             f"of width {width}; use the model the slice was cut from as --teacher")


# ------------------------------------------------------------------------------------------------ schedule, state


def learning_rate(step: int, steps: int, config: RecoverConfig) -> float:
    """Linear warm-up over ``warmup × steps`` steps, then a cosine from ``lr`` down to ``min_lr_ratio × lr``."""
    warm = max(1, round(config.warmup * steps)) if config.warmup > 0 else 0
    if step < warm:
        return config.lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------ the run


def compute_dtype(config: RecoverConfig) -> torch.dtype:
    if config.dtype == "bfloat16" or (config.dtype == "auto" and config.device.startswith("cuda")
                                      and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def _autocast(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@dataclass
class _Run:
    """Everything a training step needs (built once by :func:`recover`)."""

    config: RecoverConfig
    student: nn.Module  # the Hugging Face model being trained (LoRA layers injected in place when used)
    peft: nn.Module | None  # the peft wrapper holding the adapters (None without LoRA)
    teacher: nn.Module | None
    data: PackedText
    order: torch.Tensor
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    maps: nn.ModuleList | None
    hooks: tuple[LayerOutputs, LayerOutputs] | None
    dtype: torch.dtype
    lora_targets: int = 0  # linears that carry adapters


def _micro_step(run: _Run, ids: torch.Tensor, scale: float) -> float:
    """Forward teacher (no grad) and student on one micro-batch (B, T) and backpropagate; returns the mean loss."""
    config = run.config
    s_body, s_head = backbone_and_head(run.student)
    t_hidden, t_head, t_outputs = None, None, None
    if run.teacher is not None:
        t_body, t_head = backbone_and_head(run.teacher)
        with torch.no_grad(), _autocast(config.device, run.dtype):
            t_hidden = t_body(input_ids=ids, use_cache=False).last_hidden_state
        t_outputs = run.hooks[1].take() if run.hooks else None
    with _autocast(config.device, run.dtype):
        s_hidden = s_body(input_ids=ids, use_cache=False).last_hidden_state
        extra = None
        if run.hooks:
            extra = config.hidden_weight * hidden_loss(run.hooks[0].take(), t_outputs, run.maps)
    total = chunked_backward(s_hidden, t_hidden, ids, s_head, t_head, config, scale, extra,
                             context=lambda: _autocast(config.device, run.dtype))
    if extra is not None:
        total += float(extra.detach())
    return total / ids.numel()


def _train(run: _Run, start: int, steps: int, state_dir: Path, fingerprint: str, progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    config, losses = run.config, []
    bar = tqdm(range(start, steps), desc=f"recover ({config.method.value})", unit="step", disable=not progress,
               initial=start, total=steps)
    for step in bar:
        for group in run.optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, config)
        loss = 0.0
        for micro in range(config.grad_accum):
            first = (step * config.grad_accum + micro) * config.batch_size
            ids = run.data.windows[run.order[first : first + config.batch_size]].to(config.device)
            loss += _micro_step(run, ids, 1.0 / (ids.numel() * config.grad_accum)) / config.grad_accum
        torch.nn.utils.clip_grad_norm_(list(run.params.values()), config.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < steps:
            save_state(state_dir, run.params, run.optimizer, {"fingerprint": fingerprint, "step": done,
                                                             "losses": losses})
    return losses


def _fingerprint(config: RecoverConfig, model_dir: Path, teacher: str | None, data: PackedText) -> str:
    from .sources import weights_sha256

    settings = {k: v for k, v in config.to_dict().items() if k not in ("device", "checkpoint_every")}
    blob = json.dumps({"config": settings, "model": weights_sha256(model_dir), "teacher": teacher,
                       "data": data.record["tokens_sha256"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _load_models(model_dir: Path, config: RecoverConfig) -> tuple[nn.Module, Any, nn.Module | None, dict | None]:
    """(student float32, its tokenizer, teacher or None, teacher record); every check on the teacher done."""
    from .api import check_device, load

    check_device(config.device)
    student, tokenizer, _ = load(str(model_dir), "float32", config.device)
    if not config.uses_teacher:
        return student, tokenizer, None, None
    spec = config.teacher or recorded_source(student.config)
    if spec is None:
        raise UserInputError(f"{model_dir} records no source model to distil from; pass --teacher MODEL")
    teacher_dtype = "bfloat16" if compute_dtype(config) == torch.bfloat16 else "float32"
    teacher, teacher_tokenizer, resolved = load(spec, teacher_dtype, config.device)
    check_teacher(student, tokenizer, teacher, teacher_tokenizer, spec)
    teacher.eval().requires_grad_(False)
    return student, tokenizer, teacher, {"spec": spec, "kind": resolved.kind, "sha256": resolved.sha256,
                                         "dtype": teacher_dtype}


def _prepare(student: nn.Module, teacher: nn.Module | None, data: PackedText, config: RecoverConfig,
             dtype: torch.dtype) -> _Run:
    torch.manual_seed(config.seed)
    student.eval()  # no dropout: recovery fits the deterministic function (LoRA dropout is its own option)
    targets = len(lora_targets(student)) if config.uses_lora else 0
    peft = add_lora(student, config) if config.uses_lora else None
    model = peft.get_base_model() if peft is not None else student
    maps, hooks = None, None
    if config.hidden_weight > 0:
        hooks = (LayerOutputs(student), LayerOutputs(teacher))
        with torch.no_grad(), _autocast(config.device, dtype):
            ids = data.windows[: config.batch_size].to(config.device)
            backbone_and_head(model)[0](input_ids=ids, use_cache=False)
            backbone_and_head(teacher)[0](input_ids=ids, use_cache=False)
        maps = fit_projections(hooks[0].take(), hooks[1].take())
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # LoRA: only the adapters
    if maps is not None:
        params.update({f"hidden_maps.{n}": p for n, p in maps.named_parameters()})
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay)
    order = window_order(data.windows.shape[0], config.steps() * config.batch_size * config.grad_accum, config.seed)
    return _Run(config, model, peft, teacher, data, order, params, optimizer, maps, hooks, dtype, targets)


def _finish(run: _Run) -> nn.Module:
    if run.hooks:
        for hook in run.hooks:
            hook.close()
    model = merge_lora(run.peft) if run.peft is not None else run.student
    return model.requires_grad_(False).eval()


def _manifest(model_dir: Path, config: RecoverConfig, run: _Run, teacher: dict | None, losses: list[float],
              resumed: int, seconds: float) -> dict:
    from .checkpoint import read_manifest

    steps = len(losses)
    stride = max(1, steps // LOSS_CURVE_POINTS)
    return {"recovery": {
        "config": config.to_dict(),
        "input": {"directory": str(model_dir.resolve()), "manifest": read_manifest(model_dir)},
        "teacher": teacher,
        "data": run.data.record,
        "steps": steps,
        "tokens": steps * config.tokens_per_step,
        "epochs": round(steps * config.tokens_per_step / (run.data.windows.numel()), 4),
        "trainable_parameters": sum(p.numel() for p in run.params.values()),
        "lora": {"rank": config.lora_rank, "alpha": config.lora_alpha, "merged": True,
                 "targets": run.lora_targets} if config.uses_lora else None,
        "compute_dtype": str(run.dtype).removeprefix("torch."),
        "resumed_from_step": resumed,
        "loss": {"first": losses[0], "last": losses[-1], "mean_last_10pct": sum(losses[-max(1, steps // 10):])
                 / max(1, steps // 10), "curve": [[i, losses[i]] for i in range(0, steps, stride)]},
        "seconds": round(seconds, 1),
    }}


def recover(model_dir: str | Path, config: RecoverConfig, output: str | Path, overwrite: bool = False,
            progress: bool = True) -> Path:
    """Recover a sliced checkpoint by distillation and/or LoRA and save it (same kind of checkpoint) at ``output``.

    Checkpoints every ``config.checkpoint_every`` steps into a hidden sibling of ``output`` and resumes from it when
    rerun with the same settings; the output directory is written atomically at the end. Raises
    :class:`UserInputError` (nothing written) for a non-empty output, a bad teacher, empty data or a budget below
    one step. Returns the output path.
    """
    from .api import slicing_record
    from .checkpoint import save_sliced

    model_dir, out = Path(model_dir).expanduser(), check_output_dir(output, overwrite)
    if not (model_dir / "config.json").is_file():
        raise UserInputError(f"{model_dir} is not a model directory (no config.json); give a sliced checkpoint")
    steps = config.steps()
    student, tokenizer, teacher, teacher_record = _load_models(model_dir, config)
    data = load_training_text(config.data, tokenizer, config.seqlen)
    dtype = compute_dtype(config)
    run = _prepare(student, teacher, data, config, dtype)
    fingerprint = _fingerprint(config, model_dir, teacher_record and teacher_record["spec"], data)
    state_dir = state_dir_for(out)
    started = time.perf_counter()
    state = load_state(state_dir, run.params, run.optimizer, fingerprint)
    resumed = state["step"] if state else 0
    losses = (state["losses"] if state else []) + _train(run, resumed, steps, state_dir, fingerprint, progress)
    model = _finish(run)
    manifest = _manifest(model_dir, config, run, teacher_record, losses, resumed, time.perf_counter() - started)
    try:
        record = slicing_record(model.config)
        record["recovery"] = {k: manifest["recovery"][k] for k in ("steps", "tokens", "seconds")} | {
            "method": config.method.value, "teacher": teacher_record and teacher_record["spec"],
            "data": data.record["name"]}
    except AttributeError:
        pass  # not a slice (a plain model given with --teacher): nothing to annotate
    save_sliced(model, tokenizer, out, manifest, overwrite=overwrite)
    if state_dir.exists():
        import shutil

        shutil.rmtree(state_dir, ignore_errors=True)
    return out
