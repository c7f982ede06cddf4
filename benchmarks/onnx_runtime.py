"""ONNX Runtime benchmark: dense and sliced SmolLM2 x {fp32, int8-dynamic, int8-static, int4} in one run.

For every variant: perplexity on the built-in evaluation split, file size, prefill latency at 512 tokens and
decode tokens/s at batch 1 (median of repeats after warm-up), all on the same machine in the same process.
Artifacts are built under ``--work`` (reused when complete); results go to
``benchmarks/results/<name>.{jsonl,md}``.

    python -m benchmarks.onnx_runtime                      # the committed run
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

from benchmarks.slicing_quality import RESULTS, machine

QUANT_MODES = ("int8-dynamic", "int8-static", "int4")


def _artifacts(args: argparse.Namespace) -> dict[str, Path]:
    """Build (or reuse) the sliced checkpoint, the fp32 exports and their quantized versions."""
    from exporters.onnx import OnnxExportConfig, export_pretrained
    from exporters.quantize import QuantConfig, QuantQualityError, quantize_onnx
    from slice2deploy.api import CalibrationConfig, slice_pretrained
    from slice2deploy.slicing import SliceConfig

    work = Path(args.work)
    sliced = work / f"sliced-{args.sparsity:g}"
    if not (sliced / "config.json").exists():
        slice_pretrained(args.model, sliced, SliceConfig(sparsity=args.sparsity, round_to=args.block_size),
                         CalibrationConfig(samples=args.calib_samples, seqlen=512), overwrite=True, progress=False)
    variants: dict[str, Path] = {}
    for name, source in (("dense", args.model), (f"sliced-{args.sparsity:g}", str(sliced))):
        fp32 = work / f"{name}-fp32"
        if not (fp32 / "model.onnx").exists():
            export_pretrained(source, fp32, OnnxExportConfig(), overwrite=True)
        variants[f"{name}/fp32"] = fp32
        for mode in QUANT_MODES:
            target = work / f"{name}-{mode}"
            if not (target / "model.onnx").exists():
                try:
                    quantize_onnx(fp32, target, QuantConfig(mode=mode, block_size=args.block_size), overwrite=True)
                except QuantQualityError as error:  # outlier activations: retry with the MLP down projection float
                    print(f"{name} {mode}: {error} -> retrying with keep_float=down_proj", file=sys.stderr)
                    quantize_onnx(fp32, target, QuantConfig(mode=mode, block_size=args.block_size,
                                                            keep_float=("down_proj",)), overwrite=True)
            variants[f"{name}/{mode}"] = target
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
    return {
        "keep_float": (quant.get("config") or {}).get("keep_float"), "logits_snr_db": quant.get("logits_snr_db"),
        "prefill_tokens": args.prefill_tokens, "prefill_ms": round(prefill_ms, 2), "prefill_spread_ms": round(
            prefill_spread, 2), "decode_batch": 1, "decode_tok_s": round(decode_tok_s, 2),
        "decode_spread_ms": round(decode_spread, 2), "perplexity": result.perplexity, "eval_tokens": result.tokens,
        "size_mb": round(size / 2**20, 2), "parameters": runner.parameters,
    }


def markdown(records: list[dict], header: str) -> str:
    base = {r["model"]: r for r in records if r["precision"] == "fp32"}
    dense = next(r for r in records if r["variant"] == "dense/fp32")
    lines = [header, "",
             "| variant | size MB | vs own fp32 | perplexity | vs own fp32 | prefill 512 ms | vs dense fp32 "
             "| decode tok/s (b=1) | vs dense fp32 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        own = base[r["model"]]
        lines.append(
            f"| {r['variant']} | {r['size_mb']:.1f} | {r['size_mb'] / own['size_mb']:.2f}x | {r['perplexity']:.2f} | "
            f"{r['perplexity'] / own['perplexity'] - 1:+.1%} | {r['prefill_ms']:.0f} | "
            f"{r['prefill_ms'] / dense['prefill_ms']:.2f}x | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / dense['decode_tok_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--block-size", type=int, default=32, help="INT4 block size = slicing round-to")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--work", default="out/bench-onnx")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-prompt", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--name", default="onnx_runtime_cpu_smollm2")
    args = parser.parse_args(argv)
    from exporters.ort import runtime_versions
    from slice2deploy.data import load_text
    from slice2deploy.utils import atomic_write_text

    variants = _artifacts(args)
    from exporters.ort import OrtCausalLM

    tokenizer = OrtCausalLM(next(iter(variants.values()))).tokenizer()
    from slice2deploy.data import token_stream

    evaluation = token_stream(tokenizer, load_text("builtin", "evaluation"))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "versions": runtime_versions(), "backend": "onnxruntime", "provider": "CPUExecutionProvider",
            "command": "python -m benchmarks.onnx_runtime " + " ".join(argv if argv is not None else sys.argv[1:])}
    records = []
    for name, directory in variants.items():
        model, precision = name.split("/")
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        sparsity = 0.0 if model == "dense" else args.sparsity
        record = {"variant": name, "model": model, "precision": precision, "sparsity": sparsity,
                  **measure(directory, evaluation, args), **meta}
        records.append(record)
        print(json.dumps({k: record[k] for k in ("variant", "perplexity", "size_mb", "prefill_ms", "decode_tok_s")}),
              file=sys.stderr, flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{args.name}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    header = (f"# {args.model} on ONNX Runtime (CPU): dense vs sliced {args.sparsity:g} (round-to {args.block_size}) "
              f"x precision\n\nMeasured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
              f"onnxruntime {meta['versions'].get('onnxruntime')}, torch {meta['machine']['torch']}. Perplexity on "
              f"the built-in evaluation split (512-token windows); prefill = one forward of {args.prefill_tokens} "
              f"tokens; decode = {args.decode_tokens} greedy tokens after a {args.decode_prompt}-token prompt, "
              f"batch 1, KV cache.  \nCommand: `{meta['command']}`")
    atomic_write_text(RESULTS / f"{args.name}.md", markdown(records, header))
    print(markdown(records, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
