"""ONNX Runtime benchmark: dense and sliced SmolLM2 x {fp32, int8-dynamic, int8-static, int4} in one run.

Two sliced families: ``sliced`` (per-layer bases, the paper) and ``uniform`` (one basis, refit; a standard
checkpoint).

For every variant: perplexity on the built-in evaluation split, file size, prefill latency at 512 tokens and
decode tokens/s at batch 1 (median of repeats after warm-up), all on the same machine in the same process.
Artifacts are built under ``--work`` (reused when complete); results go to
``benchmarks/results/<name>.{jsonl,md}``.

    python -m benchmarks.onnx_runtime                      # the committed run (--build-only first: no timing)
    python -m benchmarks.onnx_runtime --max-eval-tokens 8192 --name onnx_quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.suite.measure import machine_record
from benchmarks.suite.results import write_results

# Every fp32 export writes attention as one ONNX Attention node per layer (exporters/attention.py): on ONNX Runtime
# CPU the eager graph's ~20 small attention ops per layer cost as much as the slicing saves in prefill
# (benchmarks/prefill_ab.py measures both). Exports made under other settings are rebuilt, and so is everything
# quantized from them.
EXPORT = {"attention": "fused"}
QUANT_MODES = ("int8-dynamic", "int8-static", "int8-static-qop", "int4")  # precisions; -qop: QOperator graph

# One quantization policy per mode, the same for dense and sliced models (recorded in every row):
# SmolLM2's MLP down-projection inputs carry massive outlier activations that per-tensor INT8 activation
# quantization cannot represent (logits SNR 15 dB -> 30 dB on the sliced model when they stay float); INT4 keeps
# them as weight-only 8-bit blocks (mixed precision, as llama.cpp's Q4_K_M does) and stores the token-embedding
# table as float16 (and runs MatMulNBits' int8-compute kernels). Sliced models' residual shortcuts are
# weight-only 8-bit blocks in every mode (the default).
# The INT8 modes also smooth (SmoothQuant, alpha 0.8): the dense model's norm outputs carry outlier channels
# (max over median channel up to ~20x) that go into q/k/v and gate/up. Dense SmolLM2 INT8-dynamic, 8192 tokens:
# +5.1% unsmoothed; alpha 0.3/0.5/0.7/0.8/0.9: +2.7/+1.3/+0.7/+0.6/+0.6%. 0.8 has the best logits SNR on the
# calibration text (27.1 dB; 0.9: 25.9). A slice's norms are weight-free, so it has nothing to smooth there.
# down_proj's inputs (the MLP product, smoothable through up_proj's columns) stay float: quantized too, dense
# logits SNR is 7.7 dB unsmoothed and 18.0 dB smoothed (alpha 0.8), but perplexity is still +10.5%.
SMOOTH = {"smooth_alpha": 0.8}
POLICY = {
    "int8-dynamic": {"keep_float": ("down_proj",), **SMOOTH},
    "int8-static": {"keep_float": ("down_proj",), **SMOOTH},
    "int8-static-qop": {"mode": "int8-static", "keep_float": ("down_proj",), "static_format": "qoperator", **SMOOTH},
    "int4": {"method": "gptq", "weight_int8": ("down_proj",), "embedding_dtype": "float16", "accuracy_level": 4},
}
# accuracy_level 4: MatMulNBits' int8-compute CPU kernels. Measured A/B (benchmarks/int4_accuracy_level.py):
# decode 2.2-2.5x faster at batch 1, perplexity +0.1% dense / +1.7% sliced.
# Which sliced checkpoint feeds each precision: per-tensor INT8 activations need the incoherence rotation
# (random rotation inside each kept subspace: the same function, no outlier coordinates). INT4 is GPTQ on the
# rotated slice too: on the PCA basis the attention sink's activations sit on the first input coordinate, whose
# rounding error GPTQ cannot move anywhere; rotated, it spreads over every coordinate and GPTQ compensates it
# (measured in benchmarks/int4_gptq.py: per-layer slice +45% PCA vs +7.5% rotated; round-to-nearest was +41%).
SLICED_SOURCE = {"fp32": "pca", "int8-dynamic": "rotated", "int8-static": "rotated", "int8-static-qop": "rotated",
                 "int4": "rotated"}
# The sliced families: the paper's per-layer slice (shortcut matrices, custom architecture) and the uniform-basis
# slice refit against the dense model (a standard LlamaForCausalLM with hidden size k, head untied).
# The uniform slice's hidden size must be a multiple of SmolLM2's 9 heads (transformers' LlamaConfig refuses to
# save anything else), so INT4 blocks of 32 would leave only k = 288: it slices with round-to 16 and quantizes with
# blocks of 16 (k = 432 = 27 x 16). Its head is untied: INT4 stores it as weight-only 8-bit blocks, like down_proj.
FAMILIES = {
    "sliced": {"slice": {"mode": "per-layer"}, "block_size": None, "quant": {}},
    "uniform": {"slice": {"mode": "uniform", "refit": 1e-3}, "block_size": 16,
                "quant": {"int4": {"quantize_head": True, "weight_int8": ("down_proj", "lm_head")}}},
}


def _recorded_slicing(directory: Path) -> dict | None:
    from types import SimpleNamespace

    from slice2deploy.api import slicing_record

    path = directory / "config.json"
    return slicing_record(SimpleNamespace(**json.loads(path.read_text()))) if path.is_file() else None


def _block_size(args: argparse.Namespace, family: str) -> int:
    return FAMILIES[family]["block_size"] or args.block_size


def _slice(args: argparse.Namespace, target: Path, incoherence: bool, family: str) -> bool:
    """Slice into ``target`` unless a slice with the same settings is there; True when (re)built."""
    from slice2deploy.api import CalibrationConfig, slice_pretrained
    from slice2deploy.slicing import SliceConfig

    settings = {**FAMILIES[family]["slice"], "round_to": _block_size(args, family)}
    config = SliceConfig(sparsity=args.sparsity, incoherence=incoherence, **settings)
    recorded = _recorded_slicing(target)
    if recorded is not None and all(recorded.get(key) == value for key, value in settings.items()):
        return False
    slice_pretrained(args.model, target, config, CalibrationConfig(samples=args.calib_samples, seqlen=512),
                     overwrite=True, progress=False)
    return True


def _fp32(source: str, target: Path, rebuild: bool = False, **options) -> Path:
    """The fp32 export of ``source`` at ``target`` with :data:`EXPORT` settings (and ``options``), (re)built when
    absent, made under other settings, or when ``rebuild``."""
    from exporters.onnx import MANIFEST_FILE, OnnxExportConfig, export_pretrained

    config = OnnxExportConfig(**{**EXPORT, **options})
    manifest = target / MANIFEST_FILE
    if rebuild or not manifest.is_file() or json.loads(manifest.read_text()).get("export_config") != config.to_dict():
        export_pretrained(source, target, config, overwrite=True)
    return target


def _quantized(fp32: Path, target: Path, precision: str, block_size: int, rebuild: bool = False,
               extra: dict | None = None) -> Path:
    """The quantized version of ``fp32``, (re)built when absent, made under another policy or from another graph."""
    from exporters.onnx import MANIFEST_FILE
    from exporters.quantize import QUANT_MANIFEST, QuantConfig, quantize_onnx

    config = QuantConfig(**{"mode": precision, "block_size": block_size, **POLICY[precision], **(extra or {})})
    manifest = target / QUANT_MANIFEST
    source_sha = json.loads((fp32 / MANIFEST_FILE).read_text())["files_sha256"]["model.onnx"]
    recorded = json.loads(manifest.read_text()) if manifest.is_file() else {}
    if (rebuild or recorded.get("config") != config.to_dict()
            or recorded.get("source", {}).get("model_sha256") != source_sha):
        quantize_onnx(fp32, target, config, overwrite=True)
    return target


def _artifacts(args: argparse.Namespace) -> dict[str, Path]:
    """Build (or reuse) the sliced checkpoints, the fp32 exports and their quantized versions."""
    work = Path(args.work)
    variants: dict[str, Path] = {"dense/fp32": _fp32(args.model, work / "dense-fp32")}
    for mode in QUANT_MODES:
        variants[f"dense/{mode}"] = _quantized(variants["dense/fp32"], work / f"dense-{mode}", mode, args.block_size)
    for family in args.families.split(","):
        variants.update(_family_artifacts(args, work, family))
    return variants


def _family_artifacts(args: argparse.Namespace, work: Path, family: str) -> dict[str, Path]:
    name = f"{family}-{args.sparsity:g}"
    sources = {"pca": work / name, "rotated": work / f"{name}-rotated"}
    rebuilt = {kind: _slice(args, path, incoherence=kind == "rotated", family=family) for kind, path in sources.items()}
    exports = {kind: _fp32(str(path), work / f"{path.name}-fp32", rebuilt[kind]) for kind, path in sources.items()}
    variants = {f"{name}/fp32": exports["pca"], f"{name}/fp32-rotated": exports["rotated"]}
    for mode in QUANT_MODES:
        kind = SLICED_SOURCE[mode]
        suffix = "" if kind == "pca" else "-rotated"
        variants[f"{name}/{mode}"] = _quantized(exports[kind], work / f"{name}{suffix}-{mode}", mode,
                                                _block_size(args, family), rebuilt[kind],
                                                FAMILIES[family]["quant"].get(mode))
    return variants


def _median_ms(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), (max(times) - min(times))


def measure(directory: Path, evaluation, args: argparse.Namespace) -> dict:
    from exporters.ort import OrtCausalLM

    runner = OrtCausalLM(directory)
    prompt = evaluation[: args.prefill_tokens].numpy()[None].astype(np.int64)
    prefill_ms, prefill_spread = _median_ms(lambda: runner.forward(prompt), args.repeats)
    short = prompt[:, : args.decode_prompt]

    def decode() -> None:
        runner.generate(short, max_new_tokens=args.decode_tokens, eos_token_id=None)

    total_ms, decode_spread = _median_ms(decode, max(1, args.repeats // 2))
    first_ms, _ = _median_ms(lambda: runner.forward(short), args.repeats)
    decode_tok_s = (args.decode_tokens - 1) / max((total_ms - first_ms) / 1000.0, 1e-9)
    result = runner.perplexity(evaluation, seqlen=512, batch_size=1, max_tokens=args.max_eval_tokens, progress=False)
    size = sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".onnx", ".data", ".onnx_data"))
    quant = runner._json("slice2deploy_quant_manifest.json")
    config = quant.get("config") or {}
    return {
        "keep_float": config.get("keep_float"), "weight_int8": config.get("weight_int8"),
        "shortcuts": config.get("shortcuts"), "embedding_float16": quant.get("embedding_float16"),
        "logits_snr_db": quant.get("logits_snr_db"), "smooth_alpha": config.get("smooth_alpha"),
        "smoothed_matmuls": (quant.get("smoothing") or {}).get("matmuls"),
        "prefill_tokens": args.prefill_tokens, "prefill_ms": round(prefill_ms, 2), "prefill_spread_ms": round(
            prefill_spread, 2), "decode_batch": 1, "decode_tok_s": round(decode_tok_s, 2),
        "decode_spread_ms": round(decode_spread, 2), "perplexity": result.perplexity, "eval_tokens": result.tokens,
        "size_mb": round(size / 2**20, 2), "parameters": runner.parameters,
    }


def _fp32_of(variant: str) -> str:
    """The fp32 export a variant was quantized from (its 'own fp32')."""
    model, precision = variant.split("/")
    if model == "dense":
        return "dense/fp32"
    if precision.startswith("fp32"):
        return variant
    return f"{model}/fp32" + ("-rotated" if SLICED_SOURCE[precision] == "rotated" else "")


def _policy(r: dict) -> str:
    parts = []
    if r.get("keep_float"):
        parts.append("float: " + ",".join(r["keep_float"]))
    if r.get("weight_int8"):
        parts.append("8-bit: " + ",".join(r["weight_int8"]))
    if r.get("embedding_float16"):
        parts.append("fp16 embedding")
    if r.get("smooth_alpha"):
        parts.append(f"SmoothQuant {r['smooth_alpha']:g}: {r['smoothed_matmuls']} MatMuls")
    return "; ".join(parts) or "-"


def markdown(records: list[dict], header: str) -> str:
    by_variant = {r["variant"]: r for r in records}
    dense = by_variant["dense/fp32"]
    lines = [header, "",
             "| variant | kept out of the mode | size MB | vs own fp32 | perplexity | vs own fp32 | logits SNR dB "
             "| prefill 512 ms | vs dense fp32 | decode tok/s (b=1) | vs dense fp32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        own = by_variant[r["own_fp32"]]
        snr = "" if r.get("logits_snr_db") is None else f"{r['logits_snr_db']:.1f}"
        lines.append(
            f"| {r['variant']} | {_policy(r)} | {r['size_mb']:.1f} | {r['size_mb'] / own['size_mb']:.2f}x | "
            f"{r['perplexity']:.2f} | {r['perplexity'] / own['perplexity'] - 1:+.1%} | {snr} | {r['prefill_ms']:.0f} | "
            f"{r['prefill_ms'] / dense['prefill_ms']:.2f}x | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / dense['decode_tok_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--block-size", type=int, default=32, help="INT4 block size = slicing round-to")
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--families", default="sliced,uniform",
                        help="sliced models to measure: sliced (per-layer, the paper), uniform (one basis + refit)")
    parser.add_argument("--work", default="out/bench-onnx")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-prompt", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    parser.add_argument("--name", default="onnx_runtime_cpu_smollm2")
    parser.add_argument("--build-only", action="store_true", help="build the artifacts and stop (no timing)")
    args = parser.parse_args(argv)
    from exporters.ort import runtime_versions
    from slice2deploy.data import load_text

    variants = _artifacts(args)
    if args.build_only:
        print("\n".join(f"{name}: {path}" for name, path in variants.items()))
        return 0
    from exporters.ort import OrtCausalLM

    tokenizer = OrtCausalLM(next(iter(variants.values()))).tokenizer()
    from slice2deploy.data import token_stream

    evaluation = token_stream(tokenizer, load_text("builtin", "evaluation"))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_record(),
            "versions": runtime_versions(), "backend": "onnxruntime", "provider": "CPUExecutionProvider",
            "command": "python -m benchmarks.onnx_runtime " + " ".join(argv if argv is not None else sys.argv[1:])}
    records = []
    for name, directory in variants.items():
        model, precision = name.split("/")
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        sparsity = 0.0 if model == "dense" else args.sparsity
        record = {"variant": name, "model": model, "precision": precision.removesuffix("-rotated"),
                  "sparsity": sparsity, "own_fp32": _fp32_of(name),
                  "family": model.rsplit("-", 1)[0],
                  "incoherence": precision.endswith("-rotated") or (model != "dense" and
                                                                     SLICED_SOURCE.get(precision) == "rotated"),
                  **measure(directory, evaluation, args), **meta}
        records.append(record)
        print(json.dumps({k: record[k] for k in ("variant", "perplexity", "size_mb", "prefill_ms", "decode_tok_s")}),
              file=sys.stderr, flush=True)
    header = (f"# {args.model} on ONNX Runtime (CPU): dense vs sliced {args.sparsity:g} (round-to {args.block_size}) "
              f"x precision\n\nMeasured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
              f"onnxruntime {meta['versions'].get('onnxruntime')}, torch {meta['machine']['torch']}. Perplexity on "
              f"the built-in evaluation split (512-token windows); prefill = one forward of {args.prefill_tokens} "
              f"tokens; decode = {args.decode_tokens} greedy tokens after a {args.decode_prompt}-token prompt, "
              f"batch 1, KV cache. `int8-static` is a QDQ graph, `int8-static-qop` the same calibration as a QOperator "
              f"graph (QLinearMatMul, uint8 activations). Sliced INT8 and INT4 rows are quantized from the "
              f"incoherence-rotated slice "
              f"(`fp32-rotated`: the same function); INT4 is GPTQ (every row, dense too); residual shortcuts are "
              f"weight-only 8-bit blocks in every quantized sliced row. `uniform-*` rows: the one-basis slice "
              f"(`--mode uniform --refit`: a standard LlamaForCausalLM of hidden size k, head untied, refit against "
              f"the dense model by least squares; no shortcut matrices; round-to and INT4 blocks of 16, since its "
              f"hidden size must be a multiple of the 9 heads; INT4 stores its untied head as 8-bit blocks). Logits "
              f"SNR: the "
              f"quantizer's gate on calibration text.  \nCommand: `{meta['command']}`")
    write_results(args.name, records, markdown(records, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
