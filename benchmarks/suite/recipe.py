"""Pipeline recipes (YAML): loading and up-front validation, every error naming the recipe key at fault."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slice2deploy.utils import UserInputError

from .profiles import BACKEND_PRECISIONS, MAX_DECODE_BATCH, PROFILE_KEYS, BenchProfile, decode_batches, get_profile

if TYPE_CHECKING:
    from exporters.genai import GenAIExportConfig

SECTIONS: dict[str, dict[str, Any]] = {  # section -> its keys and defaults
    "slice": {"mode": "per-layer", "refit": None, "incoherence": False, "round_to": 8, "tie": "keep", "batch_size": 8,
              "calibration": None},
    "calibration": {"source": "builtin", "samples": 128, "seqlen": 512, "seed": 0},
    "eval": {"data": "builtin", "seqlen": 512, "batch_size": 4, "max_tokens": None},
    # opset None: 18 (fused: 23); attention_chunks None: 4 causal query blocks with fused attention, 1 with eager
    # decode_graph: decode.onnx (GroupQueryAttention over a shared KV cache) next to the export and its quantized
    # versions, for ONNX Runtime CPU decode steps; written only where the fused-attention pattern is found
    "export": {"opset": None, "exporter": "torchscript", "attention": "eager", "attention_chunks": None,
               "decode_graph": True},
    "quantize": {"block_size": 32, "method": "rtn", "keep_float": [], "weight_int8": [], "embedding_dtype": None,
                 "quantize_head": False,  # the head too (a tied one gets its own copy); weight_int8 [lm_head]: 8-bit
                 "accuracy_level": None, "shortcuts": "weight-int8", "calib_samples": 8, "snr_floor_db": None,
                 "gptq_samples": 32, "gptq_seqlen": 512, "static_format": "qdq",
                 "smooth_alpha": None,  # SmoothQuant strength for the INT8 modes (null: off; int4 ignores it)
                 "modes": {}},
    "engine": {"profile": None, "workspace_mib": None, "keep_float": []},
    # onnxruntime-genai builds (exporters.genai.GenAIExportConfig; null: the builder's defaults, block_size int4 only);
    # the quality gate: gate_samples windows of gate_seqlen tokens of calib text against PyTorch
    "genai": {"block_size": None, "accuracy_level": None, "calib": "builtin", "gate_samples": 4, "gate_seqlen": 128,
              "seed": 0, "snr_floor_db": None, "max_perplexity_ratio": None, "builder_extra": []},
}
QUANT_CHOICES = {  # quantize key -> (allowed values, how the error message names them)
    "accuracy_level": ((None, 0, 1, 2, 3, 4), "null or 0-4"),
    "embedding_dtype": ((None, "float16"), "null or float16"),
    "quantize_head": ((False, True), "true or false"),
    "static_format": (("qdq", "qoperator"), "qdq or qoperator"),
    "method": (("rtn", "hqq", "gptq"), "rtn, hqq or gptq"),
    "shortcuts": (("float", "weight-int8", "same"), "float, weight-int8 or same"),
}
TOP_KEYS = ("name", "model", "profile", "sparsities", "slice", "eval", "export", "quantize", "engine", "genai",
            "bench", "recover")
BENCH_KEYS = (*PROFILE_KEYS, "if_available", "threads")
PRECISION_HINT = {"int4": "INT4 runs on onnxruntime, tensorrt or onnxruntime-genai; INT8 on onnxruntime or tensorrt",
                  "int8": "tensorrt's int8 is W8A8 Q/DQ", "bf16": "bf16 runs on pytorch",
                  "fp16": "fp16 runs on pytorch, onnxruntime and tensorrt (onnxruntime-genai builds fp16 for GPUs; "
                          "the pipeline runs it on CPU)",
                  "fp32": "fp32 runs on pytorch, onnxruntime and onnxruntime-genai"}


@dataclass
class Recipe:
    """A validated recipe: what to slice, evaluate, export, quantize, build and benchmark."""

    name: str
    model: str
    profile: BenchProfile
    sparsities: list[float]
    slice: dict[str, Any]
    eval: dict[str, Any]
    export: dict[str, Any]
    quantize: dict[str, Any]
    engine: dict[str, Any]
    genai: dict[str, Any] = field(default_factory=lambda: dict(SECTIONS["genai"]))
    threads: int | None = None
    recover: dict[str, Any] | None = None  # recovery after slicing (slice2deploy.recover.RecoverConfig keys); None: off
    skipped: list[str] = field(default_factory=list)  # optional backends left out, with the reason
    path: str | None = None

    @property
    def device(self) -> str:
        return self.profile.device

    @property
    def backends(self) -> dict[str, list[str]]:
        return self.profile.backends


def _check_keys(section: Any, allowed: tuple[str, ...] | dict, where: str) -> dict:
    if not isinstance(section, dict):
        raise UserInputError(f"recipe key {where!r} must be a mapping, got {type(section).__name__}")
    for key in section:
        if key not in allowed:
            raise UserInputError(f"recipe key '{where + '.' if where else ''}{key}' is not known; known keys there: "
                                 f"{', '.join(allowed)}")
    return section


def _section(data: dict, name: str, where: str | None = None) -> dict:
    given = _check_keys(data.get(name) or {}, tuple(SECTIONS[name]), where or name)
    return {**SECTIONS[name], **given}


QUANT_MODES = ("int8-dynamic", "int8-static", "int4")


def _check_quant_modes(quantize: dict) -> dict:
    """``quantize.modes``: per-mode overrides of the other quantize keys, e.g. {int4: {weight_int8: [down_proj]}}."""
    modes = _check_keys(quantize.get("modes") or {}, QUANT_MODES, "quantize.modes")
    overridable = tuple(k for k in SECTIONS["quantize"] if k != "modes")
    for mode, overrides in modes.items():
        _check_keys(overrides or {}, overridable, f"quantize.modes.{mode}")
    for where, settings in [("quantize", quantize), *((f"quantize.modes.{m}", o or {}) for m, o in modes.items())]:
        for key, (allowed, described) in QUANT_CHOICES.items():
            if key in settings and settings[key] not in allowed:
                raise UserInputError(f"recipe key '{where}.{key}' must be {described}")
        alpha = settings.get("smooth_alpha")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1):
            raise UserInputError(f"recipe key '{where}.smooth_alpha' must be null or a number in (0, 1), "
                                 f"got {alpha!r}")
    return {**quantize, "modes": {mode: dict(overrides or {}) for mode, overrides in modes.items()}}


def quant_settings(quantize: dict, mode: str) -> dict:
    """The quantize keys that apply to ``mode`` (its overrides on top of the section's values)."""
    base = {k: v for k, v in quantize.items() if k != "modes"}
    return {**base, **quantize.get("modes", {}).get(mode, {})}


def _check_model(spec: Any) -> str:
    from slice2deploy.sources import BUILTIN_MODELS, is_hub_id

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise UserInputError("recipe key 'model' is required: a built-in alias (smollm2-135m), a local model "
                             "directory, a .gguf file or a Hugging Face hub id")
    if not isinstance(spec, str):
        raise UserInputError(f"recipe key 'model' must be a string, got {spec!r}")
    if spec in BUILTIN_MODELS or Path(spec).expanduser().exists():
        return spec
    if is_hub_id(spec) and not spec.startswith((".", "/", "~")):
        return spec
    raise UserInputError(f"recipe key 'model': no such model {spec!r} (not a built-in alias "
                         f"({', '.join(sorted(BUILTIN_MODELS))}), not an existing path, not a hub id)")


def _check_sparsities(values: Any) -> list[float]:
    values = [0.0, 0.25] if values is None else values
    if not isinstance(values, list) or not values:
        raise UserInputError("recipe key 'sparsities' must be a non-empty list, e.g. [0.0, 0.25] (0 = dense)")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
            raise UserInputError(f"recipe key 'sparsities': {value!r} is not a number in [0, 1)")
    if len(set(values)) != len(values):
        raise UserInputError(f"recipe key 'sparsities' repeats a value: {values}")
    return [float(v) for v in values]


def _check_positive_ints(values: Any, key: str, minimum: int = 1) -> None:
    if not isinstance(values, list) or not values or any(
            isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values):
        raise UserInputError(f"recipe key 'bench.{key}' must be a non-empty list of integers >= {minimum}, "
                             f"got {values!r}")


def _check_backends(backends: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(backends, dict) or not backends:
        raise UserInputError(f"recipe key {where!r} must map backends ({', '.join(BACKEND_PRECISIONS)}) to lists "
                             "of precisions, e.g. {onnxruntime: [fp32, int4]}")
    for backend, precisions in backends.items():
        if backend not in BACKEND_PRECISIONS:
            raise UserInputError(f"recipe key '{where}.{backend}': unknown backend; choose from "
                                 f"{', '.join(BACKEND_PRECISIONS)}")
        supported = BACKEND_PRECISIONS[backend]
        if not isinstance(precisions, list) or not precisions:
            raise UserInputError(f"recipe key '{where}.{backend}' must be a non-empty list of precisions "
                                 f"({', '.join(supported)})")
        for precision in precisions:
            if precision not in supported:
                hint = PRECISION_HINT.get(str(precision).split("-")[0], "")
                raise UserInputError(f"recipe key '{where}.{backend}': precision {precision!r} is not possible on "
                                     f"{backend} (supported: {', '.join(supported)}){'; ' + hint if hint else ''}")
    return {b: list(dict.fromkeys(p)) for b, p in backends.items()}


def _check_device(device: Any, where: str, profile: str) -> str:
    import torch

    if not isinstance(device, str) or not (device == "cpu" or device.split(":")[0] == "cuda"):
        raise UserInputError(f"recipe key {where!r}: unknown device {device!r}; use cpu or cuda[:N]")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserInputError(f"recipe key {where!r}: device {device} (profile {profile!r}) needs a CUDA GPU, but "
                             "PyTorch sees none on this machine; use profile cpu-quick (recipes/smollm2-cpu.yaml)")
    return device


def _tensorrt_ready(device: str) -> str | None:
    """None when TensorRT can run here, else why not."""
    from exporters.tensorrt import tensorrt_available

    if not device.startswith("cuda"):
        return "TensorRT needs a CUDA device (bench.device is cpu)"
    if not tensorrt_available():
        return "TensorRT not installed"
    return None


def _genai_ready(device: str) -> str | None:
    """None when ONNX Runtime GenAI can run here, else why not."""
    from exporters.genai_runtime import require_genai

    if device.startswith("cuda"):
        return ("the pipeline builds and runs ONNX Runtime GenAI on CPU only (bench.device is cuda; GenAI's CUDA "
                "builds need onnxruntime-genai-cuda)")
    try:
        require_genai()
    except UserInputError as error:
        return str(error)
    return None


READY = {"tensorrt": _tensorrt_ready, "onnxruntime-genai": _genai_ready}  # optional backends: why they cannot run


def _check_runtimes(backends: dict[str, list[str]], device: str) -> None:
    if "onnxruntime" in backends or "tensorrt" in backends:
        from exporters.ort import require_onnx

        try:
            require_onnx()
        except UserInputError as error:
            raise UserInputError(f"recipe key 'bench.backends.onnxruntime': {error}") from error
    if "onnxruntime" in backends and device.startswith("cuda"):
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise UserInputError("recipe key 'bench.backends.onnxruntime' on bench.device cuda needs onnxruntime-gpu "
                                 "(pip install 'slice2deploy[gpu]'); this onnxruntime has no CUDAExecutionProvider")
    for backend, ready in READY.items():
        if backend in backends and (why := ready(device)):
            raise UserInputError(f"recipe key 'bench.backends.{backend}': {why}; remove it or move it to "
                                 "bench.if_available (skipped where it cannot run)")


def _optional_backends(optional: Any, device: str) -> tuple[dict[str, list[str]], list[str]]:
    """``bench.if_available``: backends measured where they can run, otherwise listed as skipped (TensorRT, GenAI)."""
    if not optional:
        return {}, []
    optional = _check_backends(optional, "bench.if_available")
    usable, skipped = {}, []
    for backend, precisions in optional.items():
        why = READY[backend](device) if backend in READY else None
        if why:
            skipped.append(f"{backend} ({', '.join(precisions)}): skipped: {why}")
        else:
            usable[backend] = precisions
    return usable, skipped


def _decode_limits(backends: dict[str, list[str]], batches: list[int]) -> list[str]:
    """Notes for the report on decode batches a backend cannot step (``MAX_DECODE_BATCH``); refuses a backend left
    with none."""
    notes = []
    for backend, (limit, why) in MAX_DECODE_BATCH.items():
        left_out = [b for b in batches if b not in decode_batches(batches, backend)]
        if backend not in backends or not left_out:
            continue
        if len(left_out) == len(batches):
            raise UserInputError(f"recipe key 'bench.decode_batches': {backend} steps decode batches up to {limit} "
                                 f"only ({why}), and {batches} has none; add 1 to bench.decode_batches")
        notes.append(f"{backend} ({', '.join(backends[backend])}): decode at batch {', '.join(map(str, left_out))} "
                     f"not measured: its runner steps batches up to {limit} ({why})")
    return notes


def _bench_profile(data: dict) -> tuple[BenchProfile, list[str], int | None]:
    profile = get_profile(data.get("profile") or "cpu-quick")
    bench = dict(_check_keys(data.get("bench") or {}, BENCH_KEYS, "bench"))
    optional, threads = bench.pop("if_available", None), bench.pop("threads", None)
    profile = profile.overridden(bench)
    device = _check_device(profile.device, "bench.device", profile.name)
    backends = _check_backends(profile.backends, "bench.backends")
    _check_runtimes(backends, device)
    extra, skipped = _optional_backends(optional, device)
    for backend, precisions in extra.items():
        backends[backend] = list(dict.fromkeys([*backends.get(backend, []), *precisions]))
    for key in ("prompt_lengths", "decode_batches"):
        _check_positive_ints(getattr(profile, key), key)
    _check_positive_ints([profile.decode_prompt, profile.decode_tokens, profile.repeats], "decode_prompt/"
                         "decode_tokens/repeats")
    _check_positive_ints([profile.warmup], "warmup", minimum=0)
    skipped += _decode_limits(backends, profile.decode_batches)
    if profile.headline_prompt not in profile.prompt_lengths:
        raise UserInputError(f"recipe key 'bench.headline_prompt': {profile.headline_prompt} is not one of "
                             f"bench.prompt_lengths {profile.prompt_lengths}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise UserInputError(f"recipe key 'bench.threads' must be an integer >= 1, got {threads!r}")
    return profile.overridden({"backends": backends}), skipped, threads


def _check_combinations(recipe: Recipe) -> None:
    """Settings that each make sense alone but not together."""
    wants_int4 = "int4" in recipe.backends.get("onnxruntime", []) + recipe.backends.get("tensorrt", [])
    block = recipe.quantize["block_size"]
    if wants_int4 and any(s > 0 for s in recipe.sparsities) and recipe.slice["round_to"] % block:
        raise UserInputError(f"recipe key 'slice.round_to': {recipe.slice['round_to']} is not a multiple of "
                             f"quantize.block_size {block}, so INT4 cannot quantize the sliced widths; set "
                             f"slice.round_to: {block}")
    attention = recipe.export["attention"]
    if attention not in ("eager", "fused"):
        raise UserInputError(f"recipe key 'export.attention' must be eager or fused, got {attention!r}")
    if attention == "fused" and "tensorrt" in recipe.backends:
        raise UserInputError("recipe key 'export.attention': fused ONNX Attention is for ONNX Runtime; the TensorRT "
                             "backend builds from eager exports (set export.attention: eager)")
    chunks = recipe.export["attention_chunks"]
    if chunks is not None and (isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1
                               or (chunks > 1 and attention != "fused")):
        raise UserInputError(f"recipe key 'export.attention_chunks' must be null or an integer >= 1 (> 1 only with "
                             f"export.attention: fused), got {chunks!r}")
    if recipe.eval["max_tokens"] is not None and recipe.eval["max_tokens"] < 2:
        raise UserInputError(f"recipe key 'eval.max_tokens' must be >= 2 or null, got {recipe.eval['max_tokens']}")


def _check_slice_options(cfg: dict) -> None:
    """Validate the slicing options by building the SliceConfig they describe (its errors, with the recipe key)."""
    from slice2deploy.slicing import DEFAULT_REFIT_RIDGE, SliceConfig

    if cfg["refit"] is True:
        cfg["refit"] = DEFAULT_REFIT_RIDGE
    try:
        SliceConfig(mode=cfg["mode"], refit=cfg["refit"], incoherence=bool(cfg["incoherence"]),
                    round_to=cfg["round_to"], tie=cfg["tie"], batch_size=cfg["batch_size"])
    except (UserInputError, ValueError, TypeError) as error:
        raise UserInputError(f"recipe section 'slice': {error}") from error


def genai_config(genai: dict, precision: str) -> GenAIExportConfig:
    """The :class:`exporters.genai.GenAIExportConfig` of the ``genai`` section at ``precision`` (CPU; block size and
    accuracy level are MatMulNBits options, so other precisions ignore them)."""
    from exporters.genai import GenAIExportConfig

    settings = {**genai, "builder_extra": tuple(genai["builder_extra"] or ())}
    if precision != "int4":
        settings.update(block_size=None, accuracy_level=None)
    return GenAIExportConfig(precision=precision, provider="cpu", **settings)


def _check_genai(section: dict) -> dict:
    """Validate the ``genai`` section by building its config at every precision the pipeline runs on GenAI."""
    if not isinstance(section["builder_extra"], list | tuple):
        raise UserInputError(f"recipe key 'genai.builder_extra' must be a list of KEY=VALUE builder options, got "
                             f"{section['builder_extra']!r}")
    for precision in BACKEND_PRECISIONS["onnxruntime-genai"]:
        try:
            genai_config(section, precision)
        except (UserInputError, ValueError, TypeError) as error:
            raise UserInputError(f"recipe section 'genai': {error}") from error
    return {**section, "builder_extra": list(section["builder_extra"])}


def _check_recover(section: Any) -> dict[str, Any] | None:
    """``recover:`` (optional): RecoverConfig keys, validated by building the config (device comes from bench)."""
    from slice2deploy.recover import RecoverConfig

    if section is None:
        return None
    allowed = tuple(k for k in RecoverConfig.__dataclass_fields__ if k not in ("device", "version"))
    section = dict(_check_keys(section, allowed, "recover"))
    try:
        RecoverConfig(**section)
    except (UserInputError, ValueError, TypeError) as error:
        raise UserInputError(f"recipe section 'recover': {error}") from error
    return section


def validate_recipe(data: Any, path: str | None = None) -> Recipe:
    """A :class:`Recipe` from parsed YAML, or a :class:`UserInputError` naming the first bad key."""
    data = _check_keys(data, TOP_KEYS, "")
    profile, skipped, threads = _bench_profile(data)
    slice_cfg = _section(data, "slice")
    slice_cfg["calibration"] = {**SECTIONS["calibration"], **_check_keys(
        slice_cfg.get("calibration") or {}, tuple(SECTIONS["calibration"]), "slice.calibration")}
    _check_slice_options(slice_cfg)
    eval_cfg = _section(data, "eval")
    if eval_cfg["max_tokens"] is None:
        eval_cfg["max_tokens"] = profile.eval_max_tokens
    model = _check_model(data.get("model"))
    name = str(data.get("name") or Path(path or "recipe").stem)
    recipe = Recipe(name=name, model=model, profile=profile, sparsities=_check_sparsities(data.get("sparsities")),
                    slice=slice_cfg, eval=eval_cfg, export=_section(data, "export"),
                    quantize=_check_quant_modes(_section(data, "quantize")), engine=_section(data, "engine"),
                    genai=_check_genai(_section(data, "genai")),
                    threads=threads, skipped=skipped, path=path, recover=_check_recover(data.get("recover")))
    _check_combinations(recipe)
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserInputError(f"no recipe file at {file}; the shipped recipes are in the repository's recipes/ folder "
                             "(e.g. recipes/smollm2-cpu.yaml)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise UserInputError(f"{file} is not valid YAML: {error}") from error
    return validate_recipe(data, str(file))
