"""``slice2deploy export genai``: an ONNX Runtime GenAI model directory built by onnxruntime-genai's model builder.

The builder (``python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p PRECISION -e cpu``) reads a plain
Hugging Face checkpoint of a family it knows and writes its own graph (GroupQueryAttention with a shared past/present
buffer, SkipSimplifiedLayerNormalization, packed QKV and gate/up MatMul or MatMulNBits), ``genai_config.json`` and the
tokenizer. It takes the dense model and our *uniform* slices (``slice --mode uniform``: a standard checkpoint of the
source family with a narrower hidden size). A *per-layer* slice carries residual shortcut matrices the builder has
no place for; it is refused before anything runs.

The build runs in a subprocess (the builder's command line is its stable interface; its Python entry points change
between releases) into a temporary directory that is renamed into place only after the quality gate passed: the
GenAI model's logits against PyTorch's on calibration windows (signal-to-noise ratio in dB above a floor per
precision, and the perplexity of both), recorded with the source hash, versions and settings in our manifest.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import numpy as np

from slice2deploy.runners import check_length, context_length
from slice2deploy.utils import Slice2DeployError, UserInputError, atomic_directory, check_output_dir, sha256_file

from .genai_runtime import GENAI_CONFIG, GENAI_MANIFEST, GenAICausalLM, require_genai, versions, weight_bytes

BUILDER_MODULE = "onnxruntime_genai.models.builder"
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits block sizes the builder accepts
GQA_HEAD_DIM_MULTIPLE = 16  # GroupQueryAttention's CPU kernel: "head_size shall be a multiple of 16" (0.18)
SLICED_MODEL_TYPE = "slice2deploy_sliced"  # slice2deploy.modeling.MODEL_TYPE, read here without importing torch code


class GenAIPrecision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT4 = "int4"


class Provider(str, Enum):
    CPU = "cpu"
    CUDA = "cuda"


# Logits signal-to-noise floors (dB) of the quality gate. fp32: the builder's graph is the same function in another
# summation order (tiny models measure > 100 dB; anything wrong in wiring is ~0 dB). fp16: ~3 decimal digits.
# int4: the floor of our own INT4 quantizer (exporters/quantize.py), so both INT4 paths answer to the same bar.
SNR_FLOOR_DB = {GenAIPrecision.FP32: 40.0, GenAIPrecision.FP16: 20.0, GenAIPrecision.INT4: 8.0}
# Perplexity ratio limits (GenAI / PyTorch on the gate windows). An SNR floor alone let the builder's default INT4 of a
# uniform 25 % SmolLM2 slice through at 11.8 dB with 3.1x the perplexity (benchmarks/results/genai_cpu_smollm2.md);
# its dense INT4 measured 1.20x, our GPTQ INT4 1.05x on the same windows.
MAX_PERPLEXITY_RATIO = {GenAIPrecision.FP32: 1.01, GenAIPrecision.FP16: 1.05, GenAIPrecision.INT4: 1.25}
# --extra_options keys that have their own flags (set through those, recorded in the config)
OWN_FLAGS = {"block_size": "--block-size", "accuracy_level": "--accuracy-level", "int4_block_size": "--block-size",
             "int4_accuracy_level": "--accuracy-level"}


class GenAIBuildError(Slice2DeployError):
    """onnxruntime-genai's model builder failed (its last output lines are in the message)."""


class GenAIQualityError(Slice2DeployError):
    """The built model's logits fell below the signal-to-noise floor against PyTorch."""


@dataclass
class GenAIExportConfig:
    """How to build: precision (fp32 | fp16 | int4), execution provider (fp16 needs cuda: the builder's fp16 graphs
    are for GPUs), INT4 block size along K and MatMulNBits accuracy level (None: the builder's defaults, 32 and 4 on
    CPU), and the quality gate: ``gate_samples`` windows of ``gate_seqlen`` tokens of ``calib`` text (seed ``seed``)
    whose logits SNR must reach ``snr_floor_db`` (None: the precision's floor)."""

    precision: GenAIPrecision = GenAIPrecision.INT4
    provider: Provider = Provider.CPU
    block_size: int | None = None
    accuracy_level: int | None = None
    calib: str = "builtin"
    gate_samples: int = 4
    gate_seqlen: int = 128
    seed: int = 0
    snr_floor_db: float | None = None
    max_perplexity_ratio: float | None = None
    builder_extra: tuple[str, ...] = ()  # more KEY=VALUE --extra_options of the builder, e.g. algo_config=k_quant
    version: int = 1

    def __post_init__(self) -> None:
        self.precision = _enum(GenAIPrecision, self.precision, "precision")
        self.provider = _enum(Provider, self.provider, "execution provider")
        if self.precision is GenAIPrecision.FP16 and self.provider is Provider.CPU:
            raise UserInputError("precision fp16 is built for GPUs by onnxruntime-genai (fp16 CUDA/DML); on CPU use "
                                 "fp32 or int4, or pass --execution-provider cuda")
        if self.block_size is not None:
            if self.precision is not GenAIPrecision.INT4:
                raise UserInputError(f"--block-size applies to int4 only, not {self.precision.value}")
            if self.block_size not in BLOCK_SIZES:
                raise UserInputError(f"block size {self.block_size} is not one the builder takes: "
                                     f"{', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level is not None and self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UserInputError(f"accuracy level must be 0..4, got {self.accuracy_level}")
        if self.gate_samples < 1 or self.gate_seqlen < 2:
            raise UserInputError("the quality gate needs at least 1 window of at least 2 tokens")
        if self.max_perplexity_ratio is not None and not self.max_perplexity_ratio >= 1.0:
            raise UserInputError(f"the perplexity ratio limit must be >= 1, got {self.max_perplexity_ratio}")
        self.builder_extra = tuple(self.builder_extra)
        for option in self.builder_extra:
            key, sep, value = option.partition("=")
            if not sep or not key or not value:
                raise UserInputError(f"builder option {option!r} is not KEY=VALUE")
            if key in OWN_FLAGS:
                raise UserInputError(f"builder option {key} has its own flag: use {OWN_FLAGS[key]}")

    @property
    def floor(self) -> float:
        return SNR_FLOOR_DB[self.precision] if self.snr_floor_db is None else self.snr_floor_db

    @property
    def ratio_limit(self) -> float:
        return MAX_PERPLEXITY_RATIO[self.precision] if self.max_perplexity_ratio is None else self.max_perplexity_ratio

    def builder_options(self) -> list[str]:
        """``--extra_options KEY=VALUE`` pairs of the builder."""
        options = {"block_size": self.block_size, "accuracy_level": self.accuracy_level}
        return [f"{key}={value}" for key, value in options.items() if value is not None] + list(self.builder_extra)

    def to_dict(self) -> dict:
        return {**asdict(self), "precision": self.precision.value, "provider": self.provider.value,
                "builder_extra": list(self.builder_extra)}


def _enum(kind: type[Enum], value, name: str):
    try:
        return kind(value)
    except ValueError:
        raise UserInputError(f"unknown {name} {value!r}; choose one of {', '.join(m.value for m in kind)}") from None


# -- source -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """The HF directory (or hub id) the builder reads, and what the manifest records about it."""

    spec: str
    kind: str
    hf_path: str  # a local HF directory, or a hub id when kind == "hub"
    sha256: str | None


def resolve_source(spec: str) -> Source:
    """A plain HF checkpoint for the builder: a local directory, a hub id, or a GGUF / built-in alias converted once
    to a float32 HF directory (slice2deploy.sources)."""
    from slice2deploy.sources import ensure_converted, resolve_model

    resolved = resolve_model(spec)
    if resolved.kind in ("builtin", "gguf"):
        return Source(spec, resolved.kind, str(ensure_converted(resolved)), resolved.sha256)
    return Source(spec, resolved.kind, resolved.path, resolved.sha256)


def check_supported(config: dict, spec: str) -> None:
    """Refuse, before any work, what GenAI cannot run: per-layer slices and heads GQA's CPU kernel does not take.

    Raises:
        UserInputError: naming the reason and what to do instead.
    """
    if config.get("model_type") == SLICED_MODEL_TYPE:
        raise UserInputError(f"{spec} is a per-layer slice: its residual shortcut matrices have no place in "
                             "onnxruntime-genai's graphs; slice with `slice2deploy slice --mode uniform` (a plain "
                             "checkpoint of the source family) or use `slice2deploy export onnx`")
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    if head_dim and head_dim % GQA_HEAD_DIM_MULTIPLE:
        raise UserInputError(f"head dimension {head_dim} is not a multiple of {GQA_HEAD_DIM_MULTIPLE}, which "
                             "onnxruntime-genai's GroupQueryAttention needs on CPU; use `slice2deploy export onnx`")


def _config_dict(spec: str) -> dict:
    from slice2deploy.sources import model_config

    return model_config(spec).to_dict()


# -- build ------------------------------------------------------------------------------------------------------------
def builder_command(source: Source, out: Path, cache: Path, config: GenAIExportConfig) -> list[str]:
    where = ["-m", source.hf_path] if source.kind == "hub" else ["-i", source.hf_path]
    command = [sys.executable, "-m", BUILDER_MODULE, *where, "-o", str(out), "-p", config.precision.value,
               "-e", config.provider.value, "-c", str(cache)]
    options = config.builder_options()
    return command + (["--extra_options", *options] if options else [])


def run_builder(source: Source, out: Path, config: GenAIExportConfig) -> dict:
    """Run the builder into ``out``; return the command and its seconds.

    Raises:
        GenAIBuildError: the builder exited non-zero (e.g. an architecture it does not support).
    """
    with tempfile.TemporaryDirectory(prefix="genai-builder-cache-") as cache:
        command = builder_command(source, out, Path(cache), config)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()][-3:]
        raise GenAIBuildError(f"onnxruntime-genai's model builder failed (exit {done.returncode}): "
                              + " | ".join(tail))
    if not (out / GENAI_CONFIG).is_file():
        raise GenAIBuildError(f"the model builder wrote no {GENAI_CONFIG}")
    placeholders = {str(out): "OUT", cache: "CACHE"}  # temporary paths, meaningless after the rename
    return {"command": [placeholders.get(arg, arg) for arg in command[1:]],
            "seconds": round(time.perf_counter() - started, 2)}


def _copy_source_configs(source: Source, out: Path) -> None:
    """The source's config.json (and generation_config.json) next to the graph: what ``info`` and our loaders read
    for the architecture and the context; GenAI itself reads only genai_config.json."""
    if source.kind == "hub":
        return
    for name in ("config.json", "generation_config.json"):
        if (Path(source.hf_path) / name).is_file():
            shutil.copyfile(Path(source.hf_path) / name, out / name)


# -- quality gate -----------------------------------------------------------------------------------------------------
def _nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of ``ids`` (B, T) under ``logits`` (B, T, V), and the count."""
    logits = logits[:, :-1].astype(np.float64)
    targets = ids[:, 1:]
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)
    return float(-picked.sum()), targets.size


def quality_gate(reference, candidate: GenAICausalLM, windows: np.ndarray, floor_db: float,
                 max_ratio: float = float("inf")) -> dict:
    """Logits of ``candidate`` (GenAI) against ``reference`` (a PyTorch causal LM) on ``windows`` (N, T).

    Returns logits SNR in dB, max |Δlogits|, and both perplexities on these windows and their ratio.

    Raises:
        GenAIQualityError: SNR below ``floor_db``, or perplexity above ``max_ratio`` x PyTorch's.
    """
    import torch

    signal = noise = max_diff = 0.0
    nll = {"pytorch": 0.0, "genai": 0.0}
    count = 0
    for row in windows:
        ids = row[None]
        with torch.no_grad():
            ref = reference(input_ids=torch.as_tensor(ids)).logits.float().numpy().astype(np.float64)
        out = candidate.logits(ids).astype(np.float64)
        signal += float(np.square(ref).sum())
        noise += float(np.square(ref - out).sum())
        max_diff = max(max_diff, float(np.abs(ref - out).max()))
        for name, logits in (("pytorch", ref), ("genai", out)):
            total, n = _nll(logits, ids)
            nll[name] += total
        count += n
    snr = float("inf") if noise == 0 else 10.0 * float(np.log10(signal / noise))
    report = {"logits_snr_db": round(snr, 3), "snr_floor_db": floor_db, "max_abs_diff": max_diff,
              "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
              "perplexity": {name: round(float(np.exp(total / count)), 4) for name, total in nll.items()}}
    report["perplexity_ratio"] = round(report["perplexity"]["genai"] / report["perplexity"]["pytorch"], 4)
    if not snr >= floor_db:  # `not >=` also catches NaN
        raise GenAIQualityError(f"GenAI logits SNR {snr:.1f} dB against PyTorch is below the floor of {floor_db:.1f} "
                                f"dB (perplexity {report['perplexity']['genai']} vs {report['perplexity']['pytorch']} "
                                "on the gate windows); try fp32, a smaller --block-size or --accuracy-level 0")
    report["max_perplexity_ratio"] = max_ratio
    if not report["perplexity_ratio"] <= max_ratio:
        ratio = report["perplexity_ratio"]
        raise GenAIQualityError(f"GenAI perplexity {report['perplexity']['genai']} is {ratio:.2f}x "
                                f"PyTorch's {report['perplexity']['pytorch']} on the gate windows, above the limit of "
                                f"{max_ratio:g}x (logits SNR {snr:.1f} dB); try fp32, --block-size 16, or "
                                "--builder-option algo_config=k_quant_mixed")
    return report


def _gate_windows(tokenizer, text, config: GenAIExportConfig) -> np.ndarray:
    from slice2deploy.data import calibration_batch

    ids, _ = calibration_batch(tokenizer, text, config.gate_samples, config.gate_seqlen, config.seed)
    return ids.numpy()  # (N, T)


# -- export -----------------------------------------------------------------------------------------------------------
def _manifest(out: Path, source: Source, config: GenAIExportConfig, build: dict, gate: dict, seconds: dict) -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "versions": versions(),
        "source": asdict(source),
        "config": config.to_dict(),
        "builder": build,
        "quality_gate": gate,
        "size_bytes": weight_bytes(out),
        "seconds": seconds,
        "files_sha256": {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()},
    }


def export_genai(spec: str, out_dir: str | Path, config: GenAIExportConfig | None = None,
                 overwrite: bool = False) -> dict:
    """Build ``spec`` (alias, HF directory, hub id, GGUF file, uniform slice) into a GenAI model directory at
    ``out_dir``, gated on its logits against PyTorch; return our manifest (also saved as
    slice2deploy_genai_manifest.json next to genai_config.json).

    Raises:
        UserInputError: onnxruntime-genai missing, a per-layer slice, unsupported heads, windows beyond the context.
        GenAIBuildError: the builder failed. GenAIQualityError: below the SNR floor or above the perplexity ratio
        limit. Nothing is written on error.
    """
    from slice2deploy.api import load
    from slice2deploy.data import load_text

    config = config or GenAIExportConfig()
    require_genai()
    check_output_dir(out_dir, overwrite)
    model_config = _config_dict(spec)
    check_supported(model_config, spec)
    check_length(config.gate_seqlen, context_length(model_config), "a quality-gate window", "--gate-seqlen")
    text = load_text(config.calib, "calibration")  # a bad --calib fails before the build
    source = resolve_source(spec)
    started = time.perf_counter()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        build = run_builder(source, tmp, config)
        _copy_source_configs(source, tmp)
        built = time.perf_counter()
        reference, tokenizer, _ = load(spec, "float32", "cpu")
        candidate = GenAICausalLM(tmp)
        gate = quality_gate(reference, candidate, _gate_windows(tokenizer, text, config), config.floor,
                            config.ratio_limit)
        del candidate  # release the session's file handles before the directory is renamed
        seconds = {"build": round(built - started, 2), "gate": round(time.perf_counter() - built, 2)}
        manifest = _manifest(tmp, source, config, build, gate, seconds)
        (tmp / GENAI_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return {**manifest, "output": str(Path(out_dir).expanduser().resolve())}
