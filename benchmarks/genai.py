"""ONNX Runtime GenAI vs our ONNX Runtime exports: dense SmolLM2 and its uniform 25 % slice x fp32 / int4, one run.

Every variant is opened through the runner registry (``slice2deploy.runners.open_runner``: GenAI directories by the
GenAI runner, our exports by the ONNX Runtime runner) and timed by the same functions: prefill = one forward of
``--prefill-tokens`` tokens at batch 1 and the greedy choice; decode = ``--decode-tokens`` greedy steps through the
runner's cache after a prefill of the same prompt, batch 1. Variants are alternated: each round opens, measures and
closes every variant in turn, so drift of the shared machine spreads over all of them; medians over rounds.
GenAI rows also get its own loop's numbers (``native``): prefill by ``append_tokens`` + ``get_logits`` (no copy of
the (1, T, V) logits) into a buffer of prompt + decode length, decode by ``generate_next_token``.
Perplexity on the first ``--max-eval-tokens`` tokens of the built-in evaluation split (512-token windows).
Memory: each variant once more in a fresh process (``--memory-of DIR``): its peak resident set size over opening the
runner, the prefill and the decode, minus the same process's size before opening (Python, torch, onnxruntime loaded).

    python -m benchmarks.genai --work out      # artifacts: see out/build_all.sh in the results notes
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.suite.measure import machine_record
from benchmarks.suite.results import write_results

# variant name -> directory under --work (built by the commands in the results notes)
VARIANTS = {
    "dense/genai/fp32": "dense-genai-fp32", "dense/onnxruntime/fp32": "dense-onnx",
    "dense/genai/int4": "dense-genai-int4", "dense/onnxruntime/int4": "dense-int4",
    "dense/genai/int4-kqm": "dense-genai-int4-kqm",
    "dense/onnxruntime/int4-head8": "dense-int4-head8", "dense/onnxruntime/int4-head4": "dense-int4-head4",
    "dense/onnxruntime/int4-all4-head8": "dense-int4-all4-head8",
    "uniform-0.25/genai/fp32": "u25-genai-fp32", "uniform-0.25/onnxruntime/fp32": "u25-onnx",
    "uniform-0.25/genai/int4": "u25-genai-int4", "uniform-0.25/onnxruntime/int4": "u25-int4",
    # with decode.onnx (exporters/decode_graph.py): the same commands after it became the default
    "dense/onnxruntime/fp32-decode": "dense-onnx-dg", "dense/onnxruntime/int4-decode": "dense-int4-dg",
    "uniform-0.25/onnxruntime/int4-decode": "u25-int4-dg",
}


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def prefill_ms(runner, ids: np.ndarray) -> float:
    """One forward of ``ids`` (1, T) with an empty cache and the greedy next token, in ms."""
    start = time.perf_counter()
    logits, _ = runner.forward(ids, None)
    int(np.asarray(logits[0, -1]).argmax())
    return _ms(start)


def decode_tok_s(runner, ids: np.ndarray, steps: int) -> float:
    """Greedy tokens/s over ``steps`` cached steps after an untimed prefill of ``ids`` (1, T)."""
    logits, past = runner.forward(ids, None)
    start = time.perf_counter()
    for _ in range(steps):
        token = np.asarray(logits[:, -1]).argmax(-1).astype(np.int64)[:, None]
        logits, past = runner.forward(token, past)
    np.asarray(logits[:, -1]).argmax(-1)
    return steps / (time.perf_counter() - start)


def genai_native(directory: Path, ids: np.ndarray, steps: int) -> dict:
    """GenAI's own loop: prefill (append_tokens + last-position logits) and greedy generate_next_token steps, with a
    buffer of exactly prompt + steps positions."""
    from exporters.genai_runtime import GenAICausalLM

    model = GenAICausalLM(directory)
    generator = model.generator(1, ids.shape[1] + steps + 1)
    start = time.perf_counter()
    generator.append_tokens(ids.astype(np.int32))
    int(generator.get_logits()[0, -1].argmax())
    prefill = _ms(start)
    start = time.perf_counter()
    for _ in range(steps):
        generator.generate_next_token()
    return {"prefill_ms": prefill, "decode_tok_s": steps / (time.perf_counter() - start)}


def measure_round(name: str, directory: Path, tokens: np.ndarray, args) -> dict:
    from slice2deploy.runners import open_runner

    runner = open_runner(directory)
    prompt = tokens[None, : args.prefill_tokens]
    runner.forward(prompt[:, :16], None)  # untimed: session arenas and thread pools come up on the first run
    result = {"prefill_ms": prefill_ms(runner, prompt),
              "decode_tok_s": decode_tok_s(runner, prompt, args.decode_tokens), "backend": runner.backend,
              "size_bytes": runner.size_bytes}
    del runner
    gc.collect()
    if "/genai/" in name:
        native = genai_native(directory, prompt, args.decode_tokens)
        result.update({f"native_{k}": v for k, v in native.items()})
    return result


def memory_of(directory: Path, prefill_tokens: int, decode_tokens: int) -> dict:
    """Peak RSS growth (MiB) of opening ``directory``'s runner, one prefill and the decode, in this process."""
    import onnxruntime  # noqa: F401 (loaded before the baseline, like torch)
    import torch  # noqa: F401

    from slice2deploy.runners import open_runner
    from slice2deploy.utils import peak_rss_mb

    before = peak_rss_mb()
    runner = open_runner(directory)
    opened = peak_rss_mb()
    prompt = np.arange(prefill_tokens, dtype=np.int64)[None] % 1000 + 100
    decode_tok_s(runner, prompt, decode_tokens)
    return {"rss_before_mb": round(before, 1), "rss_open_growth_mb": round(opened - before, 1),
            "rss_peak_growth_mb": round(peak_rss_mb() - before, 1)}


def memory_in_fresh_process(directory: Path, args) -> dict:
    import json
    import subprocess

    command = [sys.executable, "-m", "benchmarks.genai", "--memory-of", str(directory), "--prefill-tokens",
               str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def graph_summary(directory: Path) -> dict:
    """Op counts of the graph and the MatMulNBits settings (bits, block size, accuracy level -> count): what each
    runtime actually executes."""
    from collections import Counter

    import onnx

    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    nbits = Counter()
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            nbits[f"bits={attrs.get('bits')} block={attrs.get('block_size')} "
                  f"accuracy_level={attrs.get('accuracy_level', 0)}"] += 1
    decode = directory / "decode.onnx"
    decode_nodes = len(onnx.load(str(decode), load_external_data=False).graph.node) if decode.is_file() else None
    return {"ops": dict(ops.most_common()), "nodes": len(graph.node), "matmulnbits": dict(nbits),
            "decode_graph_nodes": decode_nodes}


def _stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2)}


def perplexity(directory: Path, tokens, max_tokens: int) -> float:
    from slice2deploy.runners import open_runner

    runner = open_runner(directory)
    return round(runner.perplexity(tokens, seqlen=512, batch_size=1, max_tokens=max_tokens, progress=False).perplexity,
                 3)


def markdown(records: list[dict], header: str) -> str:
    lines = [header, "", "| variant | size MB | perplexity | prefill 512 ms | decode tok/s (b=1) "
             "| GenAI native prefill ms | GenAI native decode tok/s | peak RSS growth MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        prefill, decode = r["prefill_ms"], r["decode_tok_s"]
        native = ("", "") if "native_prefill_ms" not in r else (
            f"{r['native_prefill_ms']['median']:,.0f}", f"{r['native_decode_tok_s']['median']:.1f}")
        lines.append(f"| {r['variant']} | {r['size_mb']:.1f} | {r['perplexity']:.2f} | "
                     f"{prefill['median']:,.0f} ({prefill['min']:,.0f}-{prefill['max']:,.0f}) | "
                     f"{decode['median']:.1f} ({decode['min']:.1f}-{decode['max']:.1f}) | {native[0]} | {native[1]} | "
                     f"{r.get('memory', {}).get('rss_peak_growth_mb', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("out"))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="subset of the variant names")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=63)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup-rounds", type=int, default=1, help="whole untimed rounds first (page cache)")
    parser.add_argument("--max-eval-tokens", type=int, default=4096)
    parser.add_argument("--name", default="genai_cpu_smollm2")
    parser.add_argument("--note", default="", help="appended to the report's header (how the artifacts were made)")
    parser.add_argument("--memory-of", type=Path, default=None, help=argparse.SUPPRESS)  # the fresh-process probe
    args = parser.parse_args(argv)
    if args.memory_of is not None:
        import json

        print(json.dumps(memory_of(args.memory_of, args.prefill_tokens, args.decode_tokens)))
        return 0
    from transformers import AutoTokenizer

    from exporters.genai_runtime import versions
    from slice2deploy.data import load_text, token_stream

    variants = {name: args.work / VARIANTS[name] for name in args.variants}
    missing = [str(path) for path in variants.values() if not path.is_dir()]
    if missing:
        raise SystemExit(f"missing artifacts: {', '.join(missing)}")
    tokenizer = AutoTokenizer.from_pretrained(next(iter(variants.values())))
    tokens = token_stream(tokenizer, load_text("builtin", "evaluation"))
    prompt_tokens = tokens.numpy().astype(np.int64)
    rounds: dict[str, list[dict]] = {name: [] for name in variants}
    load_before = os.getloadavg()
    for index in range(1 - args.warmup_rounds, args.rounds + 1):  # rounds <= 0 are warm-up, not recorded
        for name, directory in variants.items():
            result = measure_round(name, directory, prompt_tokens, args)
            print(f"round {index} {name}: prefill {result['prefill_ms']:.0f} ms, decode {result['decode_tok_s']:.1f} "
                  f"tok/s", file=sys.stderr, flush=True)
            if index > 0:
                rounds[name].append(result)
    load = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]}
    meta = {"load_average_1_5_15": load,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_record(),
            "versions": {**versions(), **_ort_version()},
            "command": "python -m benchmarks.genai " + " ".join(argv if argv is not None else sys.argv[1:]),
            "settings": {"prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens,
                         "rounds": args.rounds, "max_eval_tokens": args.max_eval_tokens}}
    records = []
    for name, directory in variants.items():
        runs = rounds[name]
        record = {"variant": name, "model": name.split("/")[0], "runtime": name.split("/")[1],
                  "precision": name.split("/")[2], "backend": runs[0]["backend"], "artifact": str(directory),
                  "size_mb": round(runs[0]["size_bytes"] / 1e6, 1),
                  "perplexity": perplexity(directory, tokens, args.max_eval_tokens),
                  "graph": graph_summary(directory), "memory": memory_in_fresh_process(directory, args),
                  **{key: _stats([r[key] for r in runs]) for key in runs[0] if key.startswith(("prefill", "decode",
                                                                                               "native"))},
                  **meta}
        records.append(record)
    header = (f"# ONNX Runtime GenAI vs our ONNX Runtime exports, SmolLM2-135M (CPU)\n\nMeasured {meta['date']} on "
              f"{meta['machine']['cpu']} ({meta['machine']['cores']} cores; load average 1/5/15 min "
              f"{'/'.join(map(str, load['before']))} before, {'/'.join(map(str, load['after']))} after), onnxruntime "
              f"{meta['versions'].get('onnxruntime')}, onnxruntime-genai {meta['versions']['onnxruntime-genai']}. "
              f"One process, variants alternated, {args.rounds} rounds after {args.warmup_rounds} warm-up round(s), "
              f"each variant opened afresh per round with a 16-token untimed forward first; median (min-max). "
              f"Prefill = {args.prefill_tokens}-token prompt at batch 1 through the runner; decode = "
              f"{args.decode_tokens} greedy steps after it. Perplexity on the first {args.max_eval_tokens} built-in "
              f"evaluation tokens (512-token windows). {args.note}  \nCommand: `{meta['command']}`")
    write_results(args.name, records, markdown(records, header))
    return 0


def _ort_version() -> dict:
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__}


if __name__ == "__main__":
    sys.exit(main())
