"""Layer-wise least-squares refit of a uniform-mode sliced model against its dense teacher (no gradients).

Slicing drops the low-variance directions of the residual stream and the error compounds layer after layer.
Refit walks the layers in order on the calibration tokens, the dense model as teacher, and re-solves every
linear that touches the stream by ridge regression, stage by stage:

- readers (q/k/v, gate/up): ``W' = argmin ‖x̃ W'ᵀ − x_t W_tᵀ‖²``: the sliced normed stream x̃ (k wide) should give
  what the teacher's normed stream x_t gave (teacher forced: x_t comes from the dense trajectory);
- writers (o/down): ``W' = argmin ‖a W'ᵀ − (h_t Q − h̃)‖²``: the branch writes what puts the sliced residual h̃ back
  onto the teacher's residual in the kept basis, so each writer also corrects what earlier layers got wrong;
- the head: the teacher's logits from the sliced final normed stream.

Every regression is a ridge regression shrunk towards the weight slicing left (not towards zero): with an
orthogonal basis of full width each has an exact solution, the rotated weights themselves, so refit changes
nothing there for any ridge and any amount of calibration (tested), and directions the calibration tokens do
not cover keep their sliced weights. At k < d it changes the function: it is an option, and its gain is
measured on held-out text (``benchmarks/slicing_modes.py``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter, get_adapter
from .capture import StopForward, capture_layer_inputs

CHECK_TOLERANCE = 1e-3  # relative: a layer must be x + Σ writers(...) for the stage-wise residual bookkeeping


@dataclass
class _Normal:
    """Normal equations of one ridge regression, accumulated in float64: ``gram = Σ xᵀx``, ``cross = Σ xᵀy``."""

    gram: torch.Tensor
    cross: torch.Tensor

    @classmethod
    def zeros(cls, inputs: int, targets: int) -> _Normal:
        return cls(torch.zeros(inputs, inputs, dtype=torch.float64), torch.zeros(inputs, targets, dtype=torch.float64))

    def add(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        keep = mask.reshape(-1).to(torch.bool)
        x = x.reshape(-1, x.shape[-1])[keep].double()
        y = y.reshape(-1, y.shape[-1])[keep].double()
        self.gram += x.T @ x
        self.cross += x.T @ y

    def solve(self, ridge: float, prior: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
        """``argmin ‖x W − y [right]‖² + λ‖W − prior‖²`` = ``(gram + λI)⁻¹ (cross [right] + λ prior)``.

        ``λ = ridge · mean(diag gram)``; ``prior`` (inputs × outputs) is the weight before refit (the rotated,
        sliced one). Shrinking towards it rather than towards zero keeps every direction the calibration tokens
        do not cover as slicing left it, and leaves an exact solution (full width) unchanged for any ridge.
        """
        damping = ridge * torch.diagonal(self.gram).mean().clamp_min(1e-30)
        system = self.gram + damping * torch.eye(self.gram.shape[0], dtype=torch.float64)
        cross = self.cross if right is None else self.cross @ right
        return torch.linalg.solve(system, cross + damping * prior.double())


def _call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    output = layer(hidden, **kwargs)
    return output[0] if isinstance(output, tuple) else output


def _prior(linear: nn.Linear) -> torch.Tensor:
    """The weight before refit as a regression coefficient (inputs × outputs)."""
    return linear.weight.detach().double().T


def _set_weight(linear: nn.Linear, solution: torch.Tensor) -> None:
    linear.weight.data = solution.T.to(linear.weight.dtype).contiguous()


def _teacher_layer(layer: nn.Module, adapter: Adapter, batches, hidden: list[torch.Tensor]):
    """Run one dense layer; per stage and batch the norm's output and the residual after the stage."""
    stages = adapter.stages
    normed: list[list[torch.Tensor]] = [[] for _ in stages]
    residual: list[list[torch.Tensor]] = [[] for _ in stages]
    written: dict[int, torch.Tensor] = {}
    handles = []
    for s, stage in enumerate(stages):
        handles.append(layer.get_submodule(stage.norm).register_forward_hook(
            lambda module, args, out, s=s: normed[s].append(out.detach())))
        handles.append(layer.get_submodule(stage.writers[0]).register_forward_hook(
            lambda module, args, out, s=s: written.__setitem__(s, out.detach())))
    outputs = []
    try:
        for batch, h in zip(batches, hidden):
            out = _call_layer(layer, h, batch.kwargs)
            running = h
            for s in range(len(stages)):
                running = running + written[s]
                residual[s].append(running)
            _check_residual(out, running, "dense")
            outputs.append(out.detach())
    finally:
        for handle in handles:
            handle.remove()
    return normed, residual, outputs


def _check_residual(layer_output: torch.Tensor, bookkept: torch.Tensor, which: str) -> None:
    error = float((layer_output - bookkept).norm() / layer_output.norm().clamp_min(1e-30))
    if error > CHECK_TOLERANCE:
        raise RuntimeError(f"refit: the {which} layer is not `x + Σ writers(norm(x))` (relative mismatch {error:.2e}); "
                           "this architecture is not supported by --refit")


def _writer_inputs(layer: nn.Module, writer: nn.Linear, batches, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
    """The inputs of ``writer`` when the layer runs on ``hidden`` (the forward stops at the writer)."""
    captured: list[torch.Tensor] = []

    def hook(module, args):
        captured.append(args[0].detach())
        raise StopForward

    handle = writer.register_forward_pre_hook(hook)
    try:
        for batch, h in zip(batches, hidden):
            try:
                _call_layer(layer, h, batch.kwargs)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _refit_stage(teacher_layer: nn.Module, student_layer: nn.Module, stage, batches, layer_input: list[torch.Tensor],
                 residual: list[torch.Tensor], teacher_normed: list[torch.Tensor],
                 teacher_residual: list[torch.Tensor], basis: torch.Tensor, ridge: float) -> list[torch.Tensor]:
    """Refit one stage's readers then its writer; return the student's residual after the stage."""
    norm = student_layer.get_submodule(stage.norm)
    normal = _Normal.zeros(basis.shape[1], basis.shape[0])
    for batch, h, x_teacher in zip(batches, residual, teacher_normed):
        normal.add(norm(h), x_teacher, batch.mask)
    for path in stage.readers:
        teacher_weight = teacher_layer.get_submodule(path).weight.detach().double()  # (out, d)
        reader = student_layer.get_submodule(path)
        _set_weight(reader, normal.solve(ridge, _prior(reader), teacher_weight.T))
    writer = student_layer.get_submodule(stage.writers[0])
    inputs = _writer_inputs(student_layer, writer, batches, layer_input)
    normal = _Normal.zeros(writer.in_features, basis.shape[1])
    bias = writer.bias.detach() if writer.bias is not None else 0.0
    for batch, a, h, h_teacher in zip(batches, inputs, residual, teacher_residual):
        normal.add(a, (h_teacher.double() @ basis - h.double()) - bias, batch.mask)
    _set_weight(writer, normal.solve(ridge, _prior(writer)))
    with torch.no_grad():
        return [h + writer(a) for h, a in zip(residual, inputs)]


def _refit_head(teacher: nn.Module, student: nn.Module, adapter: Adapter, batches, teacher_hidden, student_hidden,
                ridge: float) -> None:
    teacher_norm, student_norm = teacher.get_submodule(adapter.final_norm), student.get_submodule(adapter.final_norm)
    normal = _Normal.zeros(student_norm.weight.shape[0], teacher_norm.weight.shape[0])
    for batch, h_teacher, h in zip(batches, teacher_hidden, student_hidden):
        normal.add(student_norm(h), teacher_norm(h_teacher), batch.mask)
    head = student.get_submodule(adapter.head)
    teacher_weight = teacher.get_submodule(adapter.head).weight.detach().double()  # (vocab, d)
    _set_weight(head, normal.solve(ridge, _prior(head), teacher_weight.T))


def _warn_if_underdetermined(student: nn.Module, adapter: Adapter, tokens: int) -> None:
    """Warn when there are fewer calibration tokens than a regression has unknowns per output.

    Each regression solves for one coefficient per input (up to the MLP width for down/fc2); with fewer tokens
    than inputs its Gram matrix is singular and only the ridge prior decides the uncovered directions.
    """
    first = adapter.get_layers(student)[0]
    widest = max(first.get_submodule(stage.writers[0]).in_features for stage in adapter.stages)
    widest = max(widest, student.get_submodule(adapter.final_norm).weight.shape[0])
    if tokens < 2 * widest:
        warnings.warn(f"refit: {tokens} calibration tokens for regressions with up to {widest} inputs; below "
                      f"{2 * widest} tokens the fit is underdetermined and directions the tokens do not cover keep "
                      "their sliced weights: calibrate on more tokens (--calib-samples x --calib-seqlen)", stacklevel=3)


def refit_uniform(teacher: nn.Module, student: nn.Module, basis: torch.Tensor, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None, ridge: float, batch_size: int = 8,
                  progress: bool = True) -> dict:
    """Refit ``student`` (a uniform-mode slice of ``teacher`` with basis ``basis``, d × k) in place.

    Returns what was done, including the relative error of the final residual against the teacher's
    (projected into the kept basis) on the calibration tokens.
    """
    adapter = get_adapter(teacher.config)
    if any(len(stage.writers) != 1 for stage in adapter.stages):
        raise RuntimeError("refit needs exactly one writer per stage")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    _warn_if_underdetermined(student, adapter, int(attention_mask.sum()))
    started = time.perf_counter()
    device = next(student.parameters()).device
    basis = basis.to(device=device, dtype=torch.float64)
    teacher.eval()
    student.eval()
    with torch.no_grad():
        batches = capture_layer_inputs(teacher, adapter, input_ids, attention_mask, batch_size, device)
        teacher_hidden = [b.hidden for b in batches]
        student_hidden = [(h.double() @ basis).to(h.dtype) for h in teacher_hidden]
        teacher_layers, student_layers = adapter.get_layers(teacher), adapter.get_layers(student)
        for index in tqdm(range(len(teacher_layers)), desc="refit layers", disable=not progress):
            for batch in batches:  # this layer's masks and rotary embeddings (sliding/full layers differ)
                batch.use_layer(index)
            normed, teacher_residual, teacher_out = _teacher_layer(teacher_layers[index], adapter, batches,
                                                                   teacher_hidden)
            residual = student_hidden
            for s, stage in enumerate(adapter.stages):
                residual = _refit_stage(teacher_layers[index], student_layers[index], stage, batches, student_hidden,
                                        residual, normed[s], teacher_residual[s], basis, ridge)
            _check_residual(_call_layer(student_layers[index], student_hidden[0], batches[0].kwargs), residual[0],
                            "sliced")
            teacher_hidden, student_hidden = teacher_out, residual
        _refit_head(teacher, student, adapter, batches, teacher_hidden, student_hidden, ridge)
        projected = [t.double() @ basis for t in teacher_hidden]
        error = sum(float((h.double() - t).norm() ** 2) for h, t in zip(student_hidden, projected))
        total = sum(float(t.norm() ** 2) for t in projected)
    return {"ridge": ridge, "final_residual_relative_error": round((error / max(total, 1e-30)) ** 0.5, 6),
            "seconds": round(time.perf_counter() - started, 3)}
