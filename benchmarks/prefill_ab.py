"""Interleaved prefill A/B on ONNX Runtime (CPU): dense vs sliced fp32 exports, one process, alternating calls.

Timings on a shared 2-core VM drift by 10-20% between runs, which is as large as the effect being measured;
alternating the models call by call puts every model under the same drift, so their ratio is stable even when
the absolute times are not. Rows: the benchmark's exports (fused attention: one ONNX Attention node per layer)
and ``-eager`` rows, the same checkpoints exported with the model's own attention ops (built here). Run after
``python -m benchmarks.onnx_runtime --build-only`` (same work directory):

    python -m benchmarks.prefill_ab
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.suite.measure import machine_record
from benchmarks.suite.results import write_results

MODELS = {"dense": "dense-fp32", "sliced-0.25": "sliced-0.25-fp32", "uniform-0.25": "uniform-0.25-fp32"}
CHECKPOINTS = {"sliced-0.25": "sliced-0.25", "uniform-0.25": "uniform-0.25"}  # dense: --model
CONTROL_FLOW = ("If", "Loop", "Scan")


def _eager_exports(work: Path, model: str) -> dict[str, Path]:
    """The eager-attention export of every model (built once, rebuilt when made under other settings)."""
    from benchmarks.onnx_runtime import _fp32

    return {f"{name}-eager": _fp32(model if name == "dense" else str(work / CHECKPOINTS[name]),
                                   work / f"{directory}-eager", attention="eager")
            for name, directory in MODELS.items()}


def op_profile(directory: Path, feeds: dict, calls: int) -> dict[str, float]:
    """Mean milliseconds per prefill spent in each op type (ONNX Runtime's profiler, kernel time only)."""
    import onnxruntime as ort

    from exporters.ort import check_onnx_dir

    with tempfile.TemporaryDirectory(prefix="slice2deploy-profile-") as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "prefill")
        session = ort.InferenceSession(str(check_onnx_dir(directory)), options, providers=["CPUExecutionProvider"])
        for _ in range(calls + 1):  # the first call warms up; every call is profiled and counted
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    for event in events:  # an If's time holds its branch's nodes, which are profiled themselves: counted once
        if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                and event["args"]["op_name"] not in CONTROL_FLOW):
            per_op[event["args"]["op_name"]] += event["dur"]
    return {op: total / (calls + 1) / 1000 for op, total in per_op.most_common()}


def _profile_table(profiles: dict[str, dict[str, float]]) -> list[str]:
    names = list(profiles)
    ops = sorted(set().union(*profiles.values()), key=lambda op: -profiles[names[0]].get(op, 0.0))
    shown = ops[:8]
    lines = ["", "Kernel time per prefill by op type (ONNX Runtime profiler; mean over "
             "every profiled call, the first one included), ms:", "",
             "| op | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for op in shown:
        lines.append(f"| {op} | " + " | ".join(f"{profiles[n].get(op, 0.0):.1f}" for n in names) + " |")
    for label, selected in (("other ops", [op for op in ops if op not in shown]), ("all ops", ops)):
        lines.append(f"| {label} | " + " | ".join(f"{sum(profiles[n].get(op, 0.0) for op in selected):.1f}"
                                                    for n in names) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from exporters.ort import OrtCausalLM, runtime_versions
    from slice2deploy.data import load_text, token_stream

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="out/bench-onnx")
    parser.add_argument("--model", default="smollm2-135m", help="the dense model's spec (for its eager export)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile-calls", type=int, default=5,
                        help="profiled prefills per model for the op-type breakdown (0: none)")
    parser.add_argument("--name", default="prefill_ab_cpu_smollm2")
    args = parser.parse_args(argv)
    work = Path(args.work)
    directories = {**{name: work / directory for name, directory in MODELS.items()},
                   **_eager_exports(work, args.model)}
    runners = {name: OrtCausalLM(directory) for name, directory in directories.items()}
    stream = token_stream(runners["dense"].tokenizer(), load_text("builtin", "evaluation"))
    prompt = stream[: args.tokens].numpy()[None].astype(np.int64)
    for runner in runners.values():  # warm-up
        runner.forward(prompt)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.forward(prompt)
            times[name].append((time.perf_counter() - start) * 1000)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_record(),
            "versions": runtime_versions(), "prompt_tokens": args.tokens, "rounds": args.rounds,
            "command": "python -m benchmarks.prefill_ab " + " ".join(argv if argv is not None else sys.argv[1:])}
    records = []
    for name, values in times.items():
        dense = times["dense-eager" if name.endswith("-eager") else "dense"]
        ratios = [a / b for a, b in zip(values, dense, strict=True)]  # per round: the same moment on the machine
        records.append({"model": name, "median_ms": round(statistics.median(values), 1),
                        "min_ms": round(min(values), 1), "max_ms": round(max(values), 1),
                        "ratio_median": round(statistics.median(ratios), 3),
                        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3), **meta})
        print(records[-1]["model"], records[-1]["median_ms"], records[-1]["ratio_median"], file=sys.stderr)
    lines = [f"# Interleaved prefill ({args.tokens} tokens, batch 1) on ONNX Runtime CPU, fp32\n",
             f"Measured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), onnxruntime "
             f"{meta['versions'].get('onnxruntime')}; {args.rounds} rounds, each calling every model once in turn "
             "(after one warm-up call each). Ratio: each round's time over the dense model's time in the same "
             "round (`-eager` rows: over `dense-eager`); median (min-max) over rounds.  ",
             f"Command: `{meta['command']}`", "",
             "| model | prefill ms: median (min-max) | vs dense: median (min-max) |", "|---|---:|---:|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['median_ms']:.0f} ({r['min_ms']:.0f}-{r['max_ms']:.0f}) | "
                     f"{r['ratio_median']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    if args.profile_calls > 0:
        feeds = runners["dense"]._feeds(prompt, None, None, None)
        profiles = {name: op_profile(directories[name], feeds, args.profile_calls) for name in runners}
        for record in records:
            record["op_ms"] = profiles.get(record["model"])
        lines += _profile_table(profiles)
    write_results(args.name, records, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
