"""TensorRT-RTX engines built ahead of time on this CPU-only machine: SmolLM2 dense / per-layer / uniform slices at
fp16, INT8 weight-only and INT4 weight-only (and bf16 on request: ``--precision bf16``).

For every (model, precision): the TensorRT-ready graph (made and validated against its float32 source in ONNX
Runtime), the engine built by TensorRT-RTX for the default RTX targets (build seconds on this machine's shared CPU
cores, engine MB on disk), the network report's summary, and the perplexity of the TensorRT-ready graph in ONNX
Runtime on the built-in evaluation text against its float32 source (for bf16: of its float32 twin, which rounds
every bfloat16 tensor; ONNX Runtime's CPU provider cannot run bfloat16 MatMuls). The engines are not run: that needs
an RTX GPU.

    python -m benchmarks.tensorrt_rtx --model dense=DIR --model per-layer-25=DIR --model uniform-25=DIR \\
        --work /tmp/trtx-bench --max-eval-tokens 4096

Each DIR is a float32 eager-attention ONNX export (``slice2deploy export onnx``). Records are appended to
``results/tensorrt_rtx_cpu_smollm2.jsonl`` as they finish, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.suite.measure import machine_record
from benchmarks.suite.results import RESULTS, with_hand_notes

NAME = "tensorrt_rtx_cpu_smollm2"
# The weight-only recipes: the ONNX Runtime INT4 path's quality tools (GPTQ 4-bit, 8-bit down_proj and residual
# shortcuts) plus an 8-bit head untied from the tied embedding; the table the Gather reads is INT8 with per-row scales
# (TrtBuildConfig.embedding_bits, 8 by default for weight-only; records made before it existed had a float16 table).
PRECISIONS = {
    "fp16": {"precision": "fp16"},
    "bf16": {"precision": "bf16"},  # perplexity measured on its float32 twin (exporters.tensorrt.bf16)
    "int8-wo": {"precision": "int8-wo", "shortcuts": "weight-int8", "head_bits": 8},
    "int4-wo": {"precision": "int4", "int4_method": "gptq", "weight_int8": ["down_proj"], "shortcuts": "weight-int8",
                "head_bits": 8},
    # the same with a 4-bit (GPTQ) head: the smallest engine, for the size target
    "int4-wo-head4": {"precision": "int4", "int4_method": "gptq", "weight_int8": ["down_proj"],
                      "shortcuts": "weight-int8", "head_bits": 4},
}


def perplexity(directory: Path, tokens, max_tokens: int) -> float:
    from exporters.ort import OrtCausalLM

    return OrtCausalLM(directory).perplexity(tokens, seqlen=512, batch_size=1, max_tokens=max_tokens).perplexity


def run_one(model: str, source: Path, precision: str, args: argparse.Namespace, tokens, float_ppl: float) -> dict:
    from exporters.tensorrt import TrtBuildConfig, make_trt_ready
    from exporters.tensorrt.rtx import build_rtx_engine

    config = TrtBuildConfig(runtime="tensorrt-rtx", gptq_samples=args.gptq_samples, gptq_seqlen=512,
                            **PRECISIONS[precision])
    ready = args.work / f"{model}-{precision}"
    started = time.perf_counter()
    manifest = make_trt_ready(source, ready, config, overwrite=True)
    graph_seconds = time.perf_counter() - started
    engine = args.work / "engines" / f"{model}-{precision}" / "model.engine"
    engine.parent.mkdir(parents=True, exist_ok=True)
    sidecar = build_rtx_engine(ready, engine, config)
    if config.precision.value == "bf16":  # ONNX Runtime's CPU provider cannot run the bfloat16 graph itself
        from exporters.tensorrt.bf16 import write_float32_twin

        twin = write_float32_twin(ready, args.work / f"{model}-{precision}-twin")
        ppl = perplexity(twin, tokens, args.max_eval_tokens)
        shutil.rmtree(twin)
    else:
        ppl = perplexity(ready, tokens, args.max_eval_tokens)
    return {
        "model": model, "precision": precision, "config": config.to_dict(),
        "graph_seconds": round(graph_seconds, 1), "build_seconds": sidecar["build_seconds"],
        "engine_mb": round(sidecar["engine_bytes"] / 1e6, 1), "targets": sidecar["targets"]["compute_capabilities"],
        "network": sidecar["network_report"]["summary"], "logits_snr_db": manifest["validation"]["logits_snr_db"],
        "quantized_matmuls": manifest["quantized_matmuls"], "weight_bits": manifest.get("weight_bits", {}),
        "unquantized": manifest["unquantized_count"], "perplexity": ppl, "float_perplexity": float_ppl,
        "ppl_vs_float": ppl / float_ppl - 1, "eval_tokens": args.max_eval_tokens,
        "tensorrt_rtx": sidecar["tensorrt"]["version"], "machine": machine_record(),
    }


def report(records: list[dict]) -> str:
    fp16 = {r["model"]: r["engine_mb"] for r in records if r["precision"] == "fp16"}
    first = {}
    for r in records:
        first.setdefault(r["model"], len(first))
    records = sorted(records, key=lambda r: first[r["model"]])  # grouped by model, in the order they were run
    rows = ["| model | precision | embedding bits | build s | engine MB | vs fp16 engine | MatMul weights "
            "(INT4/INT8/float) | weight MB by type | logits SNR dB | perplexity | float32 source | vs source |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        kinds = r["network"]["matmuls_by_weight"]
        floats = sum(kinds.get(k, 0) for k in ("HALF", "BF16", "FLOAT"))
        mm = f"{kinds.get('INT4', 0)}/{kinds.get('INT8', 0)}/{floats}"
        weights = ", ".join(f"{k} {v:.0f}" for k, v in r["network"]["weight_mb_by_type"].items() if v >= 1)
        ratio = f"{r['engine_mb'] / fp16[r['model']]:.2f}x" if r["model"] in fp16 else "-"
        embedding = r["config"].get("embedding_bits") or 16  # records older than the option: float16
        rows.append(f"| {r['model']} | {r['precision']} | {embedding} | {r['build_seconds']:.1f} | "
                    f"{r['engine_mb']:.1f} | {ratio} | {mm} | {weights} | {r['logits_snr_db']:.1f} | "
                    f"{r['perplexity']:.2f} | {r['float_perplexity']:.2f} | {r['ppl_vs_float']:+.1%} |")
    m = records[0]["machine"] if records else {}
    return (f"# TensorRT-RTX engines built without a GPU: SmolLM2-135M\n\nTensorRT-RTX "
            f"{records[0]['tensorrt_rtx'] if records else '?'}, ahead-of-time build for compute capabilities "
            f"{', '.join(records[0]['targets']) if records else '?'} on {m.get('cpu')} ({m.get('cores')} cores "
            "shared with other jobs: build seconds are wall time under load, not a clean figure). Engines were "
            "built, not run (running needs an RTX GPU). Perplexity: the TensorRT-ready graph in ONNX Runtime (CPU) "
            f"on the built-in evaluation text ({records[0]['eval_tokens'] if records else '?'} tokens, windows of "
            "512) against its float32 source.\n\n" + "\n".join(rows) + "\n\n"
            "Command: `python -m benchmarks.tensorrt_rtx --model dense=... --model per-layer-25=... "
            "--model uniform-25=...` (see the module docstring).\n")


def main() -> None:
    from exporters.ort import OrtCausalLM
    from slice2deploy.data import load_text, token_stream

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR")
    parser.add_argument("--precision", action="append", choices=list(PRECISIONS), default=None)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--max-eval-tokens", type=int, default=4096)
    parser.add_argument("--gptq-samples", type=int, default=32)
    parser.add_argument("--fresh", action="store_true", help="start the results file anew")
    args = parser.parse_args()
    jsonl = RESULTS / f"{NAME}.jsonl"
    if args.fresh and jsonl.exists():
        jsonl.unlink()
    for spec in args.model:
        model, source = spec.split("=", 1)
        source = Path(source)
        tokens = token_stream(OrtCausalLM(source).tokenizer(), load_text("builtin", "evaluation"))
        float_ppl = perplexity(source, tokens, args.max_eval_tokens)
        for precision in args.precision or ["fp16", "int8-wo", "int4-wo"]:
            record = run_one(model, source, precision, args, tokens, float_ppl)
            with jsonl.open("a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
            print(json.dumps({k: record[k] for k in ("model", "precision", "build_seconds", "engine_mb",
                                                    "perplexity", "ppl_vs_float")}), flush=True)
            shutil.rmtree(args.work / "engines" / f"{model}-{precision}", ignore_errors=True)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    from slice2deploy.utils import atomic_write_text

    atomic_write_text(RESULTS / f"{NAME}.md", with_hand_notes(RESULTS / f"{NAME}.md", report(records)))


if __name__ == "__main__":
    main()
