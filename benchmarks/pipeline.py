"""``slice2deploy pipeline RECIPE -o OUT``: slice -> eval -> export -> quantize -> (engine, genai) -> bench -> report.

Every step is resume-safe (:mod:`benchmarks.suite.steps`): ``OUT/<step>/step.json`` records its config and the
hashes of its inputs; a rerun skips finished steps whose manifest and input hashes still match.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slice2deploy.utils import UserInputError, atomic_write_text

from .suite.profiles import QUANT_MODES, decode_batches
from .suite.recipe import Recipe, load_recipe
from .suite.steps import Step, StepStatus, run_steps

TORCH_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
RESULT_FILE = "result.json"
EXPORT_BACKENDS = ("onnxruntime", "tensorrt")  # the backends that run (or build from) our ONNX export
STEP_OUTPUT = {"slice": "model", "export": "onnx", "quantize": "onnx", "engine": "trt", "genai": "genai"}


@dataclass(frozen=True)
class Variant:
    """One measured combination: a model (dense or sliced) on a backend and device, at a precision."""

    model: str  # "dense" or "sliced-0.25"
    sparsity: float
    backend: str
    precision: str
    device: str

    @property
    def name(self) -> str:
        return f"{self.model}/{self.backend}-{self.device}/{self.precision}"

    @property
    def key(self) -> str:
        return f"{self.model}-{self.backend}-{self.device.replace(':', '')}-{self.precision}"


def model_name(sparsity: float) -> str:
    return "dense" if sparsity == 0 else f"sliced-{sparsity:g}"


def variants(recipe: Recipe) -> list[Variant]:
    return [Variant(model_name(s), s, backend, precision, recipe.device) for s in recipe.sparsities
            for backend, precisions in recipe.backends.items() for precision in precisions]


# -- locating artifacts ----------------------------------------------------------------------------------------------
def _model_source(recipe: Recipe, model: str, finished: dict[str, dict]) -> str:
    """The loadable model for ``model``: the recipe's model for dense, the sliced checkpoint otherwise."""
    if model == "dense":
        return recipe.model
    return str(Path(finished[f"slice-{model}"]["directory"]) / "model")


def _export_dtype(variant: Variant) -> str:
    return "float16" if variant.precision == "fp16" else "float32"


def artifact_step(variant: Variant) -> str | None:
    """Key of the step whose output ``variant`` runs (None: the PyTorch model itself)."""
    if variant.backend == "pytorch":
        return None if variant.model == "dense" else f"slice-{variant.model}"
    if variant.backend == "tensorrt":
        return f"engine-{variant.model}-{variant.precision}"
    if variant.backend == "onnxruntime-genai":
        return f"genai-{variant.model}-{variant.precision}"
    if variant.precision in QUANT_MODES:
        return f"quantize-{variant.model}-{variant.precision}"
    return f"export-{variant.model}-{_export_dtype(variant)}"


def _artifact(recipe: Recipe, variant: Variant, upstream: dict[str, dict]) -> tuple[str | None, str | None]:
    """(path or spec to run, reason it cannot run) for ``variant`` given its upstream manifests."""
    key = artifact_step(variant)
    if key is None:
        return recipe.model, None
    manifest = upstream[key]
    if manifest["result"].get("status") == "rejected":
        return None, manifest["result"]["reason"]
    return str(Path(manifest["directory"]) / STEP_OUTPUT[manifest["kind"]]), None


def _write_result(tmp: Path, result: dict) -> dict:
    atomic_write_text(tmp / RESULT_FILE, json.dumps(result, indent=1, sort_keys=True, default=str))
    return result


# -- step bodies -----------------------------------------------------------------------------------------------------
def _slice_step(recipe: Recipe, sparsity: float, progress: bool) -> Step:
    from slice2deploy.api import CalibrationConfig, slice_pretrained
    from slice2deploy.slicing import SliceConfig

    cfg = recipe.slice
    device = recipe.device if recipe.device.startswith("cuda") else "cpu"

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        config = SliceConfig(sparsity=sparsity, round_to=cfg["round_to"], tie=cfg["tie"],
                             batch_size=cfg["batch_size"], device=device, mode=cfg["mode"], refit=cfg["refit"],
                             incoherence=bool(cfg["incoherence"]))
        target = tmp / ("sliced" if recipe.recover else "model")
        summary = slice_pretrained(recipe.model, target, config, CalibrationConfig(**cfg["calibration"]),
                                   overwrite=True, progress=progress)
        if recipe.recover:  # recovery after slicing (slice2deploy.recover): OUT/<step>/model is the recovered one
            from slice2deploy.recover import RecoverConfig, recover

            recover(target, RecoverConfig(**recipe.recover, device=device), tmp / "model", progress=progress)
            shutil.rmtree(target)
        return {"widths": sorted(set(summary["widths"])), "parameters": summary["parameters"]["sliced"]["total"],
                "dense_parameters": summary["parameters"]["dense"]["total"], "seconds": summary["seconds"]}

    recovery = {"recover": recipe.recover} if recipe.recover else {}
    return Step(f"slice-{model_name(sparsity)}", "slice", {"model": recipe.model, "sparsity": sparsity,
                                                              "device": device, **cfg, **recovery}, run,
                external={"model": source_hash(recipe.model)})


def _export_step(recipe: Recipe, model: str, dtype: str) -> Step:
    from exporters.onnx import OnnxExportConfig, export_pretrained

    inputs = [] if model == "dense" else [f"slice-{model}"]

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        config = OnnxExportConfig(dtype=dtype, opset=recipe.export["opset"], exporter=recipe.export["exporter"],
                                  attention=recipe.export["attention"],
                                  attention_chunks=recipe.export["attention_chunks"],
                                  decode_graph=recipe.export["decode_graph"])
        manifest = export_pretrained(_model_source(recipe, model, upstream), tmp / "onnx", config, overwrite=True)
        return {"parity_max_abs_diff": manifest["parity"]["max_abs_diff"], "seconds": manifest["seconds"]}

    external = {"model": source_hash(recipe.model)} if model == "dense" else {}
    return Step(f"export-{model}-{dtype}", "export", {"model": model, "dtype": dtype, **recipe.export}, run,
                inputs, external)


def _quantize_step(recipe: Recipe, model: str, mode: str) -> Step:
    from exporters.quantize import QuantConfig, QuantQualityError, quantize_onnx

    from .suite.recipe import quant_settings

    source = f"export-{model}-float32"
    cfg = quant_settings(recipe.quantize, mode)

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        method = cfg["method"] if mode == "int4" else "rtn"  # the method names an INT4 weight quantizer
        config = QuantConfig(mode=mode, block_size=cfg["block_size"], method=method,
                             keep_float=tuple(cfg["keep_float"]), weight_int8=tuple(cfg["weight_int8"]),
                             embedding_dtype=cfg["embedding_dtype"], quantize_head=cfg["quantize_head"],
                             shortcuts=cfg["shortcuts"],
                             accuracy_level=cfg["accuracy_level"],
                             calib_samples=cfg["calib_samples"], snr_floor_db=cfg["snr_floor_db"],
                             gptq_samples=cfg["gptq_samples"], gptq_seqlen=cfg["gptq_seqlen"],
                             static_format=cfg["static_format"],
                             smooth_alpha=None if mode == "int4" else cfg["smooth_alpha"],  # an INT8 option
                             decode_graph=recipe.export["decode_graph"])
        try:
            manifest = quantize_onnx(Path(upstream[source]["directory"]) / "onnx", tmp / "onnx", config,
                                     overwrite=True)
        except QuantQualityError as error:  # a measured outcome, reported as such: the artifact is refused
            return {"status": "rejected", "reason": f"quality gate: {error}"}
        return {"status": "ok", "logits_snr_db": manifest["logits_snr_db"],
                "quantized_matmuls": manifest["quantized_matmuls"], "unquantized": manifest["unquantized_count"]}

    return Step(f"quantize-{model}-{mode}", "quantize", {"model": model, "mode": mode, **cfg}, run, [source])


def _engine_step(recipe: Recipe, model: str, precision: str) -> Step:
    source = f"export-{model}-float32"
    cfg = recipe.engine

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        from exporters.tensorrt import ENGINE_FILE, TrtBuildConfig, TrtReadyQualityError, build_engine, make_trt_ready

        profile = cfg["profile"] or ("datacenter" if recipe.profile.name == "datacenter" else "rtx")
        config = TrtBuildConfig(precision=precision, profile=profile, workspace_mib=cfg["workspace_mib"],
                                keep_float=list(cfg["keep_float"]), int4_block_size=recipe.quantize["block_size"])
        try:
            make_trt_ready(Path(upstream[source]["directory"]) / "onnx", tmp / "trt", config, overwrite=True)
        except TrtReadyQualityError as error:
            return {"status": "rejected", "reason": f"quality gate: {error}"}
        sidecar = build_engine(tmp / "trt", tmp / "trt" / ENGINE_FILE, config)
        return {"status": "ok", "sidecar": sidecar}

    return Step(f"engine-{model}-{precision}", "engine", {"model": model, "precision": precision, **cfg},
                run, [source])


def _genai_refusal(model: str, source: str) -> str | None:
    """Why GenAI's builder cannot take ``source`` (a per-layer slice, heads GQA's CPU kernel refuses), else None; read
    from the config alone."""
    from exporters.genai import check_supported
    from slice2deploy.sources import model_config

    try:
        check_supported(model_config(source).to_dict(), f"the {model} model")
    except UserInputError as error:
        return str(error)
    return None


def _genai_step(recipe: Recipe, model: str, precision: str) -> Step:
    from .suite.recipe import genai_config

    inputs = [] if model == "dense" else [f"slice-{model}"]
    config = genai_config(recipe.genai, precision)

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        from exporters.genai import GenAIQualityError, export_genai

        source = _model_source(recipe, model, upstream)
        if (why := _genai_refusal(model, source)) is not None:  # a measured outcome: GenAI cannot take this model
            return {"status": "rejected", "reason": f"GenAI refused: {why}"}
        try:
            manifest = export_genai(source, tmp / "genai", config, overwrite=True)
        except GenAIQualityError as error:
            return {"status": "rejected", "reason": f"quality gate: {error}"}
        gate = manifest["quality_gate"]
        return {"status": "ok", "logits_snr_db": gate["logits_snr_db"], "perplexity_ratio": gate["perplexity_ratio"],
                "seconds": manifest["seconds"]}

    external = {"model": source_hash(recipe.model)} if model == "dense" else {}
    return Step(f"genai-{model}-{precision}", "genai", {"model": model, **config.to_dict()}, run, inputs, external)


def _trt_perplexity(artifact: str, recipe: Recipe) -> dict:
    """TensorRT engines are evaluated at batch 1 (their profiles' opt shape)."""
    from slice2deploy.data import load_text, token_stream
    from slice2deploy.runners import open_runner

    runner = open_runner(artifact, backend="tensorrt", device=recipe.device)
    tokens = token_stream(runner.tokenizer, load_text(recipe.eval["data"], "evaluation"))
    return runner.perplexity(tokens, seqlen=recipe.eval["seqlen"], batch_size=1, max_tokens=recipe.eval["max_tokens"],
                             progress=False).to_dict()


def _eval_step(recipe: Recipe, variant: Variant, progress: bool) -> Step:
    from slice2deploy.api import evaluate_pretrained

    source = artifact_step(variant)
    cfg = recipe.eval

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        artifact, reason = _artifact(recipe, variant, upstream)
        if reason is not None:
            return _write_result(tmp, {"status": "rejected", "reason": reason})
        if variant.backend == "tensorrt":
            return _write_result(tmp, {"status": "ok", **_trt_perplexity(artifact, recipe)})
        result = evaluate_pretrained(artifact, data=cfg["data"], seqlen=cfg["seqlen"], batch_size=cfg["batch_size"],
                                     max_tokens=cfg["max_tokens"], dtype=TORCH_DTYPE.get(variant.precision,
                                                                                         "float32"),
                                     device=variant.device, progress=progress)
        return _write_result(tmp, {"status": "ok", **result})

    external = {"model": source_hash(recipe.model)} if source is None else {}
    return Step(f"eval-{variant.key}", "eval", {"variant": variant.name, **cfg}, run,
                [] if source is None else [source], external)


def _machine_step(recipe: Recipe) -> Step:
    from .suite.measure import library_versions, machine, memory_bandwidth

    described = machine(recipe.device)

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        result = {"machine": described, "versions": library_versions(),
                  "bandwidth": memory_bandwidth(recipe.device)}
        return _write_result(tmp, result)

    return Step("machine", "machine", {"machine": described, "node": platform.node(), "device": recipe.device}, run)


def bench_settings(recipe: Recipe, backend: str) -> dict[str, Any]:
    """The timing settings of ``backend``'s variants (its decode batches: those it can step)."""
    profile = recipe.profile
    return {"prompt_lengths": profile.prompt_lengths, "decode_batches": decode_batches(profile.decode_batches, backend),
            "decode_prompt": profile.decode_prompt, "decode_tokens": profile.decode_tokens,
            "warmup": profile.warmup, "repeats": profile.repeats, "threads": recipe.threads}


def _bench_step(recipe: Recipe, variant: Variant) -> Step:
    from .suite.measure import measure_in_subprocess

    source = artifact_step(variant)
    settings = bench_settings(recipe, variant.backend)

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        artifact, reason = _artifact(recipe, variant, upstream)
        if reason is not None:
            return _write_result(tmp, {"status": "rejected", "reason": reason})
        spec = {"variant": variant.name, "backend": variant.backend, "artifact": artifact,
                "precision": variant.precision, "device": variant.device, "data": recipe.eval["data"],
                "settings": settings}
        return _write_result(tmp, {"status": "ok", **measure_in_subprocess(spec, tmp)})

    inputs = ["machine"] + ([] if source is None else [source])
    external = {"model": source_hash(recipe.model)} if source is None else {}
    return Step(f"bench-{variant.key}", "bench", {"variant": variant.name, "settings": settings,
                                                  "data": recipe.eval["data"]}, run, inputs, external)


def _report_step(recipe: Recipe, keys: list[str]) -> Step:
    from .suite.report import write_report

    def run(tmp: Path, upstream: dict[str, dict]) -> dict:
        return write_report(recipe, variants(recipe), upstream, tmp)

    return Step("report", "report", {"recipe": recipe.name, "profile": recipe.profile.to_dict(),
                                     "skipped": recipe.skipped}, run, keys)


# -- planning and running --------------------------------------------------------------------------------------------
_SOURCE_HASHES: dict[str, str] = {}


def source_hash(spec: str) -> str:
    """Content hash of the source model (built-in: its pinned sha256; local: its weights); the spec for hub ids."""
    if spec not in _SOURCE_HASHES:
        from slice2deploy.sources import resolve_model, weights_sha256

        resolved = resolve_model(spec)
        path = Path(resolved.path)
        value = resolved.sha256 or (weights_sha256(path) if path.is_dir() else None) or f"spec:{spec}"
        _SOURCE_HASHES[spec] = value
    return _SOURCE_HASHES[spec]


def recipe_lengths(recipe: Recipe, timing: bool = True) -> list[tuple[str, int]]:
    """Every sequence length the recipe asks the model to take, each with the recipe key that sets it (the timing
    steps' prompt lengths only when ``timing``)."""
    profile, calibration = recipe.profile, recipe.slice.get("calibration") or {}
    lengths = []
    if timing:
        lengths += [(f"profile {profile.name}: prompt_lengths", n) for n in profile.prompt_lengths]
        lengths.append((f"profile {profile.name}: decode_prompt + decode_tokens", profile.decode_prompt
                        + profile.decode_tokens))
    if recipe.recover and recipe.recover.get("seqlen"):
        lengths.append(("recover.seqlen", recipe.recover["seqlen"]))
    if any(s > 0 for s in recipe.sparsities) and calibration.get("seqlen"):
        lengths.append(("slice.calibration.seqlen", calibration["seqlen"]))
    lengths.append(("eval.seqlen", recipe.eval["seqlen"]))
    if any(p in QUANT_MODES for p in recipe.backends.get("onnxruntime", [])):
        if recipe.quantize.get("method") == "gptq" and recipe.quantize.get("gptq_seqlen"):
            lengths.append(("quantize.gptq_seqlen", recipe.quantize["gptq_seqlen"]))
    if "onnxruntime-genai" in recipe.backends:
        lengths.append(("genai.gate_seqlen", recipe.genai["gate_seqlen"]))
    return lengths


def check_lengths(recipe: Recipe, timing: bool = True) -> None:
    """Refuse the recipe up front if any length it sets exceeds the model's context (read from its config only).

    Raises:
        UserInputError: naming the recipe key, the length and the context.
    """
    from slice2deploy.runners import check_length, context_length
    from slice2deploy.sources import model_config

    context = context_length(model_config(recipe.model))
    for key, tokens in recipe_lengths(recipe, timing):
        check_length(tokens, context, f"{key}: a sequence", f"it in the recipe ({recipe.path or 'recipe'})")


def plan(recipe: Recipe, progress: bool = True) -> list[Step]:
    """The ordered steps of ``recipe``: slice, eval (PyTorch), export, quantize, engine, genai, eval, bench, report."""
    chosen = variants(recipe)
    steps = [_slice_step(recipe, s, progress) for s in recipe.sparsities if s > 0]
    torch_variants = [v for v in chosen if v.backend == "pytorch"]
    steps += [_eval_step(recipe, v, progress) for v in torch_variants]
    models = [model_name(s) for s in recipe.sparsities]
    exported = [v for v in chosen if v.backend in EXPORT_BACKENDS]
    dtypes = sorted({_export_dtype(v) for v in exported}  # TensorRT and the quantizer start from the fp32 export
                    | ({"float32"} if any(v.backend == "tensorrt" or v.precision in QUANT_MODES for v in exported)
                       else set()))
    steps += [_export_step(recipe, m, d) for m in models for d in dtypes]
    modes = [p for p in recipe.backends.get("onnxruntime", []) if p in QUANT_MODES]
    steps += [_quantize_step(recipe, m, mode) for m in models for mode in modes]
    steps += [_engine_step(recipe, m, p) for m in models for p in recipe.backends.get("tensorrt", [])]
    steps += [_genai_step(recipe, m, p) for m in models for p in recipe.backends.get("onnxruntime-genai", [])]
    steps += [_eval_step(recipe, v, progress) for v in chosen if v.backend != "pytorch"]
    steps.append(_machine_step(recipe))
    steps += [_bench_step(recipe, v) for v in chosen]
    steps.append(_report_step(recipe, [s.key for s in steps if s.kind in ("eval", "bench", "machine")]))
    return steps


TIMING_KINDS = ("machine", "bench", "report")


def run_pipeline(recipe_path: str | Path, out: str | Path, force: bool = False, progress: bool = True,
                 log: bool = True, build_only: bool = False) -> list[StepStatus]:
    """Validate the recipe, then run (or skip) every step into ``out``; returns each step's status.

    ``build_only``: stop before the timing steps (machine, bench, report), e.g. to build artifacts while the
    machine is busy and time them later on a quiet one; a later full run skips what was built.
    """
    recipe = load_recipe(recipe_path)
    check_lengths(recipe, timing=not build_only)  # before any step: past the context a window fails or misleads
    out_dir = Path(out).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"output path {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = plan(recipe, progress)
    if build_only:
        steps = [s for s in steps if s.kind not in TIMING_KINDS]
    _, statuses = run_steps(steps, out_dir, force=force, log=log)
    return statuses
