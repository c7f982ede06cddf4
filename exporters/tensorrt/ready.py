"""The TensorRT-ready graph: precision written into the ONNX, checked in ONNX Runtime against the float32 source."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from slice2deploy.runners import check_length
from slice2deploy.utils import UserInputError, atomic_directory, atomic_write_text, sha256_file

from ..graph_io import calibration_samples, copy_side_files, count_roles, is_large, save_model
from ..ort import MODEL_FILE, OrtCausalLM, check_onnx_dir, graph_summary, require_onnx, runtime_versions
from ..quantize import logits_snr_db
from .bf16 import convert_bf16, write_float32_twin
from .config import (
    FLOAT32_OP_TYPES,
    QDQ_OPSET,
    QUANTIZED_OPS,
    TRT_ONNX_MANIFEST,
    Precision,
    TrtBuildConfig,
    TrtReadyQualityError,
    graph_inputs,
)
from .fp16 import _require_opset, convert_fp16
from .qdq import _check_quantized, _node_outputs, _plan_nodes, qdq_report, quantize_int4_qdq, quantize_int8_qdq
from .weight_only import quantize_embedding, quantize_weight_only


def _text_samples(runner: OrtCausalLM, config: TrtBuildConfig) -> list[np.ndarray]:
    return calibration_samples(runner, config.calib, config.calib_samples, config.calib_seqlen, config.seed)


def _write_graph(model_path: Path, target: Path, config: TrtBuildConfig, reference: OrtCausalLM,
                 samples: list[np.ndarray]) -> dict:
    """Write the precision's graph at ``target``; return what was quantized and what was left in float."""
    large = is_large(model_path)
    bits: dict[str, int] = {}
    if config.weight_only_path:
        model, choices, skipped = quantize_weight_only(model_path, config, reference, target.parent)
        chosen = [c.matmul for c in choices]
        bits = {str(b): sum(c.bits == b for c in choices) for b in sorted({c.bits for c in choices})}
    else:
        model, chosen, skipped = _quantize(model_path, target, config, reference, samples)
    embedding = quantize_embedding(model) if config.embedding_bits == 8 else {"bits": 16}
    if config.quant_mode:
        _require_opset(model, QDQ_OPSET)
        chosen, missed = _check_quantized(model, chosen, _node_outputs(model_path), config.precision)
        skipped += missed
    convert = convert_bf16 if config.precision is Precision.BF16 else convert_fp16
    save_model(convert(model, config.head_in_float32), target, large)
    report = {"quantized_matmuls": len(chosen), "quantized_by_role": count_roles(chosen), "unquantized": skipped,
              "unquantized_count": len(skipped), "embedding": embedding}
    return {**report, "weight_bits": bits} if bits else report


def _quantize(model_path: Path, target: Path, config: TrtBuildConfig, reference: OrtCausalLM,
              samples: list[np.ndarray]) -> tuple:
    """W8A8 INT8 (onnxruntime's static QDQ quantizer) or round-to-nearest INT4 (its blocked quantizer), or the
    float graph for fp16: (model, chosen, skipped)."""
    import onnx

    chosen, skipped = _plan_nodes(model_path, config) if config.quant_mode else ([], [])
    nodes = [mm.node for mm in chosen]
    if config.precision is Precision.INT8:
        scratch = target.with_name(".int8-qdq.onnx")
        quantize_int8_qdq(model_path, scratch, nodes, reference, samples)
        model = onnx.load(str(scratch))
        for path in scratch.parent.glob(scratch.name + "*"):
            path.unlink()
    else:
        model = onnx.load(str(model_path))
        if config.precision is Precision.INT4:
            model = quantize_int4_qdq(model, nodes, config.int4_block_size)
    return model, chosen, skipped


def _logits(runner: OrtCausalLM, ids: np.ndarray, mask: np.ndarray | None = None, past=None) -> tuple:
    logits, presents = runner.forward(ids, attention_mask=mask, past=past)
    return logits.astype(np.float64), presents


def _max_diffs(reference: OrtCausalLM, candidate: OrtCausalLM, samples: list[np.ndarray]) -> dict:
    """max |Δ| of the logits on three paths: prefill, a decode step through the cache, a left-padded batch
    (real positions only: padded rows differ by design, float32-min vs the clamped float16 mask)."""
    ids = samples[0]
    prefill = max(float(np.abs(_logits(reference, s)[0] - _logits(candidate, s)[0]).max()) for s in samples)
    _, ref_past = _logits(reference, ids[:, :-1])
    _, cand_past = _logits(candidate, ids[:, :-1])
    decode = float(np.abs(_logits(reference, ids[:, -1:], past=ref_past)[0]
                          - _logits(candidate, ids[:, -1:], past=cand_past)[0]).max())
    batch = np.concatenate([ids, samples[-1]], axis=0)
    mask = np.ones_like(batch)
    pad = ids.shape[1] // 2
    mask[0, :pad] = 0
    ref_pad, cand_pad = _logits(reference, batch, mask)[0], _logits(candidate, batch, mask)[0]
    if not np.isfinite(cand_pad).all():
        raise TrtReadyQualityError("the TensorRT-ready graph produces non-finite logits on a left-padded batch")
    padded = max(float(np.abs(ref_pad[0, pad:] - cand_pad[0, pad:]).max()),
                 float(np.abs(ref_pad[1] - cand_pad[1]).max()))
    scale = max(float(np.abs(_logits(reference, s)[0]).max()) for s in samples)
    return {"prefill": prefill, "decode": decode, "left_padding": padded, "logits_scale": scale}


def validate_against_source(reference: OrtCausalLM, candidate: OrtCausalLM, samples: list[np.ndarray],
                            config: TrtBuildConfig) -> dict:
    """Quality of the TensorRT-ready graph in ONNX Runtime against the float32 source; raises below the floors."""
    snr = logits_snr_db(reference, candidate, samples)
    diffs = _max_diffs(reference, candidate, samples)
    worst = max(diffs["prefill"], diffs["decode"], diffs["left_padding"])
    relative = worst / diffs["logits_scale"] if diffs["logits_scale"] else 0.0
    report = {"logits_snr_db": round(snr, 3), "snr_floor_db": config.snr_floor,
              "max_abs_diff": {k: float(f"{v:.6g}") for k, v in diffs.items()},
              "max_rel_diff": float(f"{relative:.6g}"),
              "samples": len(samples), "sample_tokens": int(samples[0].shape[1])}
    failures = []
    if not snr >= config.snr_floor:  # `not >=` also catches NaN
        failures.append(f"logits SNR {snr:.1f} dB is below the floor of {config.snr_floor:.1f} dB")
    if config.precision is Precision.FP16:
        report["max_rel_diff_limit"] = config.fp16_max_rel_diff
        if not relative <= config.fp16_max_rel_diff:
            failures.append(f"max |Δ| is {relative:.2%} of the logits' scale (limit {config.fp16_max_rel_diff:.0%})")
    if failures:
        hint = (". Per-tensor INT8 activations lose LLM activation outliers: keep the most sensitive MatMuls in "
                "float (keep_float / --keep-float down_proj) or use int4 (weight-only)"
                if config.precision is Precision.INT8 else "")
        raise TrtReadyQualityError(f"{config.precision.value} TensorRT-ready graph: {'; '.join(failures)} "
                                   f"(measured in ONNX Runtime against the float32 source); nothing was written{hint}")
    return report


def _validate(reference: OrtCausalLM, graph_dir: Path, samples: list[np.ndarray], config: TrtBuildConfig) -> dict:
    """validate_against_source on the written graph, or for bf16 on its float32 twin (ONNX Runtime's CPU provider
    has no bfloat16 MatMul; exporters.tensorrt.bf16 says what the twin reproduces and what it cannot)."""
    if config.precision is not Precision.BF16:
        return validate_against_source(reference, OrtCausalLM(graph_dir), samples, config)
    with tempfile.TemporaryDirectory(prefix=".bf16-twin-", dir=graph_dir.parent) as scratch:
        twin = OrtCausalLM(write_float32_twin(graph_dir, Path(scratch)))
        report = validate_against_source(reference, twin, samples, config)
        del twin  # the session holds the twin's files open until it goes
    return {**report, "measured_on": "float32 twin, every bfloat16 tensor rounded to bfloat16 (ONNX Runtime CPU "
                                     "has no bfloat16 MatMul)"}


def make_trt_ready(source_dir: str | Path, out_dir: str | Path, config: TrtBuildConfig | None = None,
                   overwrite: bool = False) -> dict:
    """Write the TensorRT-ready graph of a float32 ONNX export (graph, config, tokenizer, manifest) to ``out_dir``.

    The graph is checked with ``onnx.checker`` and TensorRT's Q/DQ rules, and compared with the source in ONNX
    Runtime (logits SNR, and for FP16 max |Δ| relative to the logits' scale); below a floor nothing is written.
    """
    import onnx

    require_onnx()
    config = config or TrtBuildConfig()
    source = Path(source_dir).expanduser()
    model_path = check_onnx_dir(source)
    if Path(out_dir).expanduser().resolve() == source.resolve():
        raise UserInputError("the output directory must differ from the input (inputs are never modified)")
    ops = set(graph_summary(model_path)["ops"])
    if "Attention" in ops:
        raise UserInputError(f"{source} writes attention as fused ONNX Attention nodes (export --attention fused), "
                             "which this TensorRT path does not take; export with --attention eager for TensorRT")
    quantized_ops = QUANTIZED_OPS & ops
    if quantized_ops:
        raise UserInputError(f"{source} is already quantized ({', '.join(sorted(quantized_ops))}); TensorRT-ready "
                             "graphs are made from the float32 export, which this step quantizes itself")
    reference = OrtCausalLM(source)
    if reference.dtype != "float32":
        raise UserInputError(f"{source} is a {reference.dtype} export; TensorRT-ready graphs are made from a float32 "
                             "export (slice2deploy export onnx MODEL --dtype float32)")
    check_length(config.calib_seqlen, reference.context_length, "a calibration window", "--calib-seqlen")
    if str(getattr(config.int4_method, "value", config.int4_method)) == "gptq":
        check_length(config.gptq_seqlen, reference.context_length, "a GPTQ calibration window", "--gptq-seqlen")
    samples = _text_samples(reference, config)
    started = time.perf_counter()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        copy_side_files(source, tmp)
        quantized = _write_graph(model_path, tmp / MODEL_FILE, config, reference, samples)
        onnx.checker.check_model(str(tmp / MODEL_FILE))  # by path: works with external data
        transformed = time.perf_counter()
        qdq = qdq_report(onnx.load(str(tmp / MODEL_FILE), load_external_data=config.quant_mode is not None))
        quality = _validate(reference, tmp, samples, config)
        manifest = _trt_onnx_manifest(source, model_path, tmp, config, quantized, qdq, quality,
                                      {"transform": round(transformed - started, 2),
                                       "validation": round(time.perf_counter() - transformed, 2)})
        atomic_write_text(tmp / TRT_ONNX_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return {**manifest, "output": str(Path(out_dir).expanduser().resolve())}


def _trt_onnx_manifest(source: Path, model_path: Path, out: Path, config: TrtBuildConfig, quantized: dict,
                       qdq: dict, quality: dict, seconds: dict) -> dict:
    inputs = graph_inputs(out / MODEL_FILE)
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "config": config.to_dict(),
        "precision": config.precision.value,
        "source": {"directory": str(source.resolve()), "model_sha256": sha256_file(model_path)},
        "model_sha256": sha256_file(out / MODEL_FILE),
        "inputs": {name: list(dims) for name, dims in inputs},
        "float32_ops": list(FLOAT32_OP_TYPES),
        "qdq": qdq,
        **quantized,
        "validation": quality,
        "calibration": {"source": config.calib, "samples": config.calib_samples, "seqlen": config.calib_seqlen,
                        "seed": config.seed},
        "seconds": seconds,
        "versions": runtime_versions(),
    }

