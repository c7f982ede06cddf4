"""Public entry points: each CLI subcommand is a thin layer over one of these functions."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import MANIFEST_FILE, read_manifest, save_sliced
from .evaluate import count_parameters
from .loading import check_device, load
from .runners import backend_for, check_length, context_length, open_runner
from .slicing import BasisFn, SliceConfig, slice_per_layer
from .sources import model_config
from .spectrum import parameter_cost
from .uniform import slice_uniform_mode
from .utils import UserInputError, check_output_dir, peak_rss_mb, sha256_bytes
from .widths import budget_widths, check_budget_supported, per_layer_widths, uniform_width_for_target


@dataclass
class CalibrationConfig:
    """Which text calibrates the PCA, and how much of it."""

    source: str = "builtin"
    samples: int = 128
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UserInputError(f"calibration samples must be >= 1, got {self.samples}")
        if self.seqlen < 2:
            raise UserInputError(f"calibration seqlen must be >= 2, got {self.seqlen}")


@dataclass
class EvalConfig:
    """Which text a perplexity is measured on, and how: windows of ``seqlen`` tokens, the first ``max_tokens``."""

    data: str = "builtin"
    seqlen: int = 512
    batch_size: int = 4
    max_tokens: int | None = None


@dataclass
class WidthPlan:
    """How residual widths are chosen: ``uniform`` or ``spectrum`` (per-layer mode), under an optional budget.

    Without ``target_params`` the budget is the real parameter count of uniform widths at the configured
    sparsity, so ``spectrum`` redistributes the same parameters.
    """

    widths: str = "uniform"
    target_params: int | None = None

    def __post_init__(self) -> None:
        if self.widths not in ("uniform", "spectrum"):
            raise UserInputError(f"widths must be 'uniform' or 'spectrum', got {self.widths!r}")
        if self.target_params is not None and self.target_params < 1:
            raise UserInputError(f"target parameters must be positive, got {self.target_params}")


def resolve_widths(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: SliceConfig,
                   plan: WidthPlan) -> None:
    """Set ``config.widths`` from ``plan`` (unchanged for uniform widths at a sparsity) and record the plan."""
    if plan.widths == "uniform" and plan.target_params is None:
        return
    if config.mode == "uniform":
        if plan.widths == "spectrum":
            raise UserInputError("uniform mode has one width for the whole stream: --widths spectrum needs "
                                 "--mode per-layer")
        config.widths = [uniform_width_for_target(model.config, plan.target_params, config.round_to)]
    else:
        check_budget_supported(model)
        target = plan.target_params
        if target is None:  # the budget of uniform widths at the configured sparsity
            cost = parameter_cost(model, config.tie)
            target = cost.count(per_layer_widths(config, cost.hidden_size, cost.num_positions, cost.tied))
        config.widths = budget_widths(model, target, plan.widths, input_ids, attention_mask, config.tie,
                                      config.round_to, batch_size=config.batch_size, device=config.device)
    config.extra = {**config.extra, "width_plan": asdict(plan)}


def slice_model(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: SliceConfig,
                basis_fn: BasisFn | None = None, progress: bool = True):
    """Slice ``model`` (consumed: its modules are transformed in place) on the given calibration tokens.

    Per-layer mode returns a ``SlicedForCausalLM`` (:func:`slice2deploy.slicing.slice_per_layer`); uniform mode a
    model of the source class with a smaller ``hidden_size`` (:func:`slice2deploy.uniform.slice_uniform_mode`).
    ``basis_fn`` defaults to PCA; tests pass random orthogonal bases to check that rotation alone is exact.
    """
    slice_fn = slice_uniform_mode if config.mode == "uniform" else slice_per_layer
    return slice_fn(model, input_ids, attention_mask, config, basis_fn, progress)


def slicing_record(config) -> dict:
    """Where a sliced model's config records how it was made (per-layer: ``slicing``; uniform: ``slice2deploy``)."""
    record = getattr(config, "slicing", None)
    return record if isinstance(record, dict) else config.slice2deploy


def residual_widths(config) -> list[int]:
    """Width of every residual position: recorded by per-layer models, one hidden size for uniform ones."""
    widths = getattr(config, "widths", None)
    return list(widths) if widths else [int(config.hidden_size)]


def slice_pretrained(model_spec: str, output: str | Path, config: SliceConfig, calibration: CalibrationConfig,
                     dtype: str = "float32", overwrite: bool = False, progress: bool = True,
                     trust_remote_code: bool = False, plan: WidthPlan | None = None) -> dict:
    """Load ``model_spec``, slice it on calibration text and save an HF checkpoint at ``output``; return a summary."""
    from .data import calibration_batch, load_text

    check_output_dir(output, overwrite)  # fail before any expensive work
    check_device(config.device)
    check_length(calibration.seqlen, context_length(model_config(model_spec, trust_remote_code)),
                 "a calibration window", "--calib-seqlen")
    started = time.perf_counter()
    model, tokenizer, resolved = load(model_spec, dtype, config.device, trust_remote_code)
    text = load_text(calibration.source, "calibration")
    input_ids, attention_mask = calibration_batch(tokenizer, text, calibration.samples, calibration.seqlen,
                                                  calibration.seed)
    dense_parameters = count_parameters(model)
    loaded = time.perf_counter()
    resolve_widths(model, input_ids, attention_mask, config, plan or WidthPlan())
    config.extra = {**config.extra, "calibration": {
        **asdict(calibration), "text_sha256": text.sha256, "tokens_sha256": sha256_bytes(input_ids.numpy().tobytes()),
    }}
    sliced = slice_model(model, input_ids, attention_mask, config, progress=progress)
    slicing_seconds = time.perf_counter() - loaded
    slicing_record(sliced.config)["source"] = {"spec": model_spec, "kind": resolved.kind, "sha256": resolved.sha256}
    sliced_parameters = count_parameters(sliced)
    summary = {
        "output": str(Path(output).resolve()),
        "mode": config.mode,
        "widths": residual_widths(sliced.config),
        "parameters": {"dense": dense_parameters, "sliced": sliced_parameters},
        "seconds": {"load_and_calibration_data": round(loaded - started, 2), "slicing": round(slicing_seconds, 2)},
        "peak_rss_mb": peak_rss_mb(),
    }
    manifest = {
        "source_model": {"spec": model_spec, "kind": resolved.kind, "path": resolved.path,
                         "gguf_file": resolved.gguf_file, "sha256": resolved.sha256},
        "calibration": {**asdict(calibration), "split": "calibration", "text_name": text.name,
                        "text_sha256": text.sha256, "tokens_sha256": config.extra["calibration"]["tokens_sha256"]},
        "slice_config": config.to_dict(),
        "dtype": dtype,
        **summary,
    }
    save_sliced(sliced, tokenizer, output, manifest, overwrite=overwrite)
    return summary


def evaluate_pretrained(model_spec: str, data: str = EvalConfig.data, seqlen: int = EvalConfig.seqlen,
                        batch_size: int = EvalConfig.batch_size, max_tokens: int | None = EvalConfig.max_tokens,
                        dtype: str = "float32", device: str = "cpu",
                        progress: bool = True, trust_remote_code: bool = False) -> dict:
    """Perplexity of a model (or of an ONNX export, in ONNX Runtime) on the evaluation split of ``data``, with its
    parameter count."""
    from .data import load_text, token_stream

    pytorch = backend_for(model_spec) is None
    if pytorch:  # refuse before loading the weights: the context comes from the config alone
        check_device(device)
        check_length(seqlen, context_length(model_config(model_spec, trust_remote_code)), "an evaluation window",
                     "--seqlen")
    runner = open_runner(model_spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if not pytorch:  # an exported artifact states its context in the directory the runner opened
        check_length(seqlen, runner.context_length, "an evaluation window", "--seqlen")
    text = load_text(data, "evaluation")
    result = runner.perplexity(token_stream(runner.tokenizer, text), seqlen=seqlen, batch_size=batch_size,
                               max_tokens=max_tokens, progress=progress)
    return {
        "model": model_spec,
        "data": text.name,
        "data_sha256": text.sha256,
        **result.to_dict(),
        "parameters": runner.parameters,
        "dtype": runner.dtype,
        "device": device,
        "backend": runner.backend,
        "versions": runner.versions,
    }


def generate_text(model_spec: str, prompt: str, max_new_tokens: int = 32, chat: bool = False,
                  dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False) -> str:
    """Greedy continuation of ``prompt`` (with the KV cache); ONNX export directories run in ONNX Runtime."""
    if max_new_tokens < 1:
        raise UserInputError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
    runner = open_runner(model_spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if chat:
        text = runner.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True)
    else:
        text = prompt
    prompt_tokens = len(runner.tokenizer(text)["input_ids"])
    check_length(prompt_tokens + max_new_tokens, runner.context_length,
                 f"the prompt ({prompt_tokens} tokens) plus --max-new-tokens {max_new_tokens}: a sequence",
                 "--max-new-tokens or shorten the prompt")
    return runner.generate(text, max_new_tokens)


def describe_checkpoint(directory: str | Path) -> dict:
    """Widths, parameter counts (read from the safetensors headers) and manifest of a model directory."""
    from safetensors import safe_open

    path = Path(directory)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserInputError(f"{path} is not a model directory (no config.json)")
    config = json.loads(config_file.read_text())
    backend = backend_for(path)
    if backend is not None and backend.describe is not None:  # an exported artifact (ONNX export directory)
        return backend.describe(path, config)
    weight_files = sorted(path.glob("*.safetensors"))
    parameters = 0
    for weight_file in weight_files:
        with safe_open(weight_file, "pt") as handle:
            for key in handle.keys():
                parameters += int(torch.Size(handle.get_slice(key).get_shape()).numel())
    info = {
        "directory": str(path.resolve()),
        "model_type": config.get("model_type"),
        "parameters": parameters if weight_files else None,
        "size_bytes": sum(f.stat().st_size for f in weight_files),
    }
    if isinstance(config.get("slice2deploy"), dict):  # uniform mode: a standard checkpoint of the source family
        record = config["slice2deploy"]
        info.update({"source_model_type": config.get("model_type"),
                     "original_hidden_size": record.get("original_hidden_size"),
                     "widths": [config["hidden_size"]], "width_range": [config["hidden_size"]] * 2,
                     "tie_head": bool(config.get("tie_word_embeddings")), "slicing": record})
    if "widths" in config:
        widths = config["widths"]
        info.update({
            "source_model_type": config["base_config"]["model_type"],
            "original_hidden_size": config["original_hidden_size"],
            "widths": widths,
            "width_range": [min(widths), max(widths)],
            "tie_head": config.get("tie_head"),
            "slicing": config.get("slicing"),
        })
    manifest = read_manifest(path)
    if manifest is not None:
        info["manifest"] = {k: manifest.get(k) for k in ("created", "command", "versions", "source_model",
                                                           "calibration", "parameters", "seconds")}
        info["manifest_file"] = MANIFEST_FILE
    return info
