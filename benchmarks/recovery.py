"""Recovery after slicing on SmolLM2: held-out perplexity vs recovery tokens, per slicing mode and method.

Slices (made beforehand with ``slice2deploy slice``, passed by directory) are recovered with
:func:`slice2deploy.recover.recover` at each token budget and method, then evaluated on the first
``--eval-tokens`` tokens of the built-in evaluation split (512-token windows), the same text and windows as the
dense model's row. Budget 0 is the slice itself. Each (slice, method, budget) is an independent run with its own
learning-rate schedule. Records go to ``results/recovery_<device>_smollm2.jsonl`` (appended run by run, a rerun of
the same key replaces its record) and the table to the matching ``.md``.

The CPU run (2 cores shared with other jobs; the load average is recorded with every row):

    slice2deploy slice smollm2-135m --mode uniform --refit --sparsity 0.25 --round-to 16 -o out/uniform-s25
    slice2deploy slice smollm2-135m --sparsity 0.25 --round-to 32 --incoherence --calib-samples 32 -o out/perlayer-s25
    python -m benchmarks.recovery --slice uniform=out/uniform-s25 --slice per-layer=out/perlayer-s25 \\
        --methods kd --tokens 0,50000,200000
    python -m benchmarks.recovery --report          # re-draw the table from the JSONL

A GPU (bf16, 10x the tokens): ``benchmarks/recovery_gpu.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def machine(device: str) -> dict:
    """CPU/GPU names, cores, threads and library versions."""
    import torch
    import transformers

    from slice2deploy import __version__

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "slice2deploy": __version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        info.update({"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda})
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    return info


def _perplexity(model_dir: str, tokens, args) -> tuple[float, float]:
    """(perplexity, seconds) of a checkpoint on the evaluation tokens, on the benchmark's device."""
    from slice2deploy.api import load
    from slice2deploy.evaluate import perplexity

    model, _, _ = load(model_dir, "float32", args.device)
    result = perplexity(model, tokens, seqlen=512, batch_size=4, max_tokens=args.eval_tokens, progress=False)
    return result.perplexity, result.seconds


def _key(record: dict) -> tuple:
    return (record["slice"], record["method"], record["tokens_budget"], record["device"], record.get("lr"))


def _save(path: Path, record: dict) -> None:
    from slice2deploy.utils import atomic_write_text

    records = [r for r in _read(path) if _key(r) != _key(record)] + [record]
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _recover_one(args, name: str, directory: str, method: str, budget: int, out: Path) -> dict:
    from slice2deploy.checkpoint import read_manifest
    from slice2deploy.recover import RecoverConfig, recover

    config = RecoverConfig(method=method, teacher=args.teacher, tokens=budget, seqlen=args.seqlen,
                           batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, device=args.device,
                           dtype=args.dtype, seed=args.seed, hidden_weight=args.hidden_weight)
    started = time.perf_counter()
    recover(directory, config, out, overwrite=True, progress=args.progress)
    seconds = time.perf_counter() - started
    info = read_manifest(out)["recovery"]
    return {"recovery_seconds": round(seconds, 1), "tokens_trained": info["tokens"], "steps": info["steps"],
            "lr": config.lr, "loss_first": info["loss"]["first"], "loss_last_10pct": info["loss"]["mean_last_10pct"],
            "trainable_parameters": info["trainable_parameters"], "compute_dtype": info["compute_dtype"],
            "recovered_dir": str(out)}


def _dense_perplexity(results: Path, args, teacher, evaluation):
    """The teacher's perplexity: reused from an earlier record of the same teacher, tokens and device unless
    ``--fresh-dense`` (it is deterministic, and on shared CPU cores each evaluation costs minutes)."""
    from types import SimpleNamespace

    from slice2deploy.evaluate import perplexity

    earlier = [r for r in _read(results) if (r["teacher"], r["device"]) == (args.teacher, args.device)
               and r["eval_tokens"] == min(args.eval_tokens, evaluation.numel())]
    if earlier and not args.fresh_dense:
        return SimpleNamespace(perplexity=earlier[-1]["dense_perplexity"], tokens=earlier[-1]["eval_tokens"])
    return perplexity(teacher, evaluation, seqlen=512, batch_size=4, max_tokens=args.eval_tokens, progress=False)


def run(args: argparse.Namespace) -> None:
    from slice2deploy.api import load
    from slice2deploy.data import load_text, token_stream

    results = RESULTS / f"recovery_{args.device.split(':')[0]}_smollm2.jsonl"
    teacher, tokenizer, _ = load(args.teacher, "float32", args.device)
    evaluation = token_stream(tokenizer, load_text("builtin", "evaluation"))
    dense = _dense_perplexity(results, args, teacher, evaluation)
    del teacher
    meta = {"teacher": args.teacher, "dense_perplexity": dense.perplexity, "eval_tokens": dense.tokens,
            "device": args.device, "dtype": args.dtype, "seqlen": args.seqlen, "batch_size": args.batch_size,
            "grad_accum": args.grad_accum, "hidden_weight": args.hidden_weight, "machine": machine(args.device),
            "command": "python -m benchmarks.recovery " + " ".join(sys.argv[1:])}
    print(f"dense perplexity {dense.perplexity:.2f} on {dense.tokens} tokens", file=sys.stderr, flush=True)
    for spec in args.slice:
        name, _, directory = spec.partition("=")
        for budget in args.tokens:
            for method in (["-"] if budget == 0 else args.methods):
                load_before = os.getloadavg()
                record = {**meta, "slice": name, "slice_dir": directory, "method": method, "tokens_budget": budget,
                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
                evaluated = directory
                if budget:
                    out = Path(args.work) / f"{name}-{method}-{budget}"
                    record.update(_recover_one(args, name, directory, method, budget, out))
                    evaluated = str(out)
                ppl, eval_seconds = _perplexity(evaluated, evaluation, args)
                record.update({"perplexity": ppl, "vs_dense": ppl / dense.perplexity, "eval_seconds": eval_seconds,
                               "load_average": [round(v, 2) for v in (*load_before, *os.getloadavg())]})
                _save(results, record)
                print(json.dumps({k: record.get(k) for k in ("slice", "method", "tokens_budget", "perplexity",
                                                            "vs_dense", "recovery_seconds")}), file=sys.stderr,
                      flush=True)
    report(results)


def report(results: Path) -> str:
    """The Markdown table of ``results`` (written next to it)."""
    from slice2deploy.utils import atomic_write_text

    records = _read(results)
    if not records:
        raise SystemExit(f"no records in {results}")
    first = records[0]
    gpu = f", {first['machine'].get('gpu')}" if first["machine"].get("gpu") else ""
    lines = [f"# SmolLM2-135M: recovery after slicing at sparsity 0.25 ({first['device']}{gpu})", "",
             f"Teacher: the dense model ({first['teacher']}), perplexity {first['dense_perplexity']:.2f} on the first "
             f"{first['eval_tokens']:,} tokens of the built-in evaluation split (512-token windows); training text: "
             "the built-in calibration split only (packed, seeded order). Machine: "
             f"{first['machine']['cpu']}, {first['machine']['cores']} cores, torch {first['machine']['torch']}. "
             "Load average (1/5/15 min, before and after each row) shows how much the cores were shared.", "",
             "| slice | method | tokens | steps | lr | perplexity | vs dense | recovery s | eval s | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in sorted(records, key=lambda r: (r["slice"], r["method"] != "-", r["method"], r["tokens_budget"])):
        lr = f"{r['lr']:g}" if r.get("lr") else ""
        load = "/".join(f"{v:.1f}" for v in r["load_average"][:3])
        lines.append(f"| {r['slice']} | {r['method']} | {r.get('tokens_trained', 0):,} | {r.get('steps', 0)} | {lr} | "
                     f"{r['perplexity']:.2f} | {r['vs_dense']:.2f}x | {r.get('recovery_seconds', 0):.0f} | "
                     f"{r['eval_seconds']:.0f} | {load} |")
    lines += ["", "Commands: " + "; ".join(sorted({f"`{r['command']}`" for r in records})), ""]
    text = "\n".join(lines)
    from benchmarks.suite.results import with_hand_notes

    atomic_write_text(results.with_suffix(".md"), with_hand_notes(results.with_suffix(".md"), text))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slice", action="append", default=[], metavar="NAME=DIR",
                        help="a sliced checkpoint to recover (repeatable), e.g. uniform=out/uniform-s25")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--methods", default="kd", help="comma-separated: kd, lora, kd+lora")
    parser.add_argument("--tokens", default="0,50000,200000", help="comma-separated budgets (0: the slice itself)")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--work", default="out/recovery", help="where recovered checkpoints are written")
    parser.add_argument("--progress", action="store_true", help="show the training progress bar")
    parser.add_argument("--fresh-dense", action="store_true", help="re-evaluate the dense model even if recorded")
    parser.add_argument("--report", action="store_true", help="only re-draw the Markdown table")
    args = parser.parse_args(argv)
    results = RESULTS / f"recovery_{args.device.split(':')[0]}_smollm2.jsonl"
    if args.report:
        print(report(results))
        return 0
    if not args.slice:
        parser.error("give at least one --slice NAME=DIR")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.tokens = [int(float(t)) for t in args.tokens.split(",")]
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
