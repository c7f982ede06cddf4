"""Slicing benchmark: perplexity, parameters, slicing wall time and peak RSS of a model at several sparsities.

Each variant runs in its own process so that its peak RSS is its own. Results go to
``benchmarks/results/<name>.jsonl`` (one record per variant) and ``<name>.md`` (a table), written atomically.

    python -m benchmarks.slicing_quality                       # the committed run (128 x 512 calibration)
    python -m benchmarks.slicing_quality --calib-samples 64 --sparsities 0.25 --name slicing_64x512
    python -m benchmarks.slicing_quality --model gemma3-270m --post-norm-widths full,kept ...  # Gemma-3

At sparsity 0 the record also carries ``max_abs_logit_diff``: the sliced model against the dense one on the first
evaluation window (the exactness check on the real model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone

from benchmarks.suite.measure import machine_record
from benchmarks.suite.results import RESULTS, write_results


def run_one(args: argparse.Namespace) -> dict:
    """Load, (slice), evaluate one variant in this process and return its record."""
    from slice2deploy.api import SliceConfig, load, slice_model
    from slice2deploy.data import calibration_batch, load_text, token_stream
    from slice2deploy.evaluate import count_parameters, perplexity
    from slice2deploy.utils import peak_rss_mb

    started = time.perf_counter()
    model, tokenizer, resolved = load(args.model)
    load_seconds = time.perf_counter() - started
    record: dict = {"model": args.model, "model_sha256": resolved.sha256, "tie": args.tie}
    evaluation = token_stream(tokenizer, load_text(args.data, "evaluation"))
    if args.sparsity is None:
        record.update(variant="dense", sparsity=None, slicing_seconds=None)
    else:
        ids, mask = calibration_batch(tokenizer, load_text(args.calib, "calibration"), args.calib_samples,
                                      args.calib_seqlen, args.seed)
        window = evaluation[: args.seqlen][None, :]
        reference = _logits(model, window) if args.sparsity == 0 else None
        config = SliceConfig(sparsity=args.sparsity, tie=args.tie, mode=args.mode, post_norm_width=args.post_norm_width)
        sliced_at = time.perf_counter()
        model = slice_model(model, ids, mask, config, progress=False)
        suffix = "".join(f"-{v}" for v, default in ((args.mode, "per-layer"), (args.post_norm_width, "full"))
                         if v != default)
        if reference is not None:
            record["max_abs_logit_diff"] = float((_logits(model, window) - reference).abs().max())
            record["logit_scale"] = float(reference.abs().max())
        record.update(variant=f"sliced-{args.sparsity:g}{suffix}", sparsity=args.sparsity, mode=args.mode,
                      post_norm_width=args.post_norm_width,
                      slicing_seconds=round(time.perf_counter() - sliced_at, 2),
                      widths=sorted(set(model.config.widths)) if hasattr(model.config, "widths") else
                      [model.config.hidden_size],
                      calibration={"source": args.calib, "samples": args.calib_samples, "seqlen": args.calib_seqlen,
                                   "seed": args.seed})
    rss_after_slicing = peak_rss_mb()
    result = perplexity(model, evaluation, seqlen=args.seqlen, max_tokens=args.max_eval_tokens, progress=False)
    record.update(
        parameters=count_parameters(model), perplexity=result.perplexity, eval_tokens=result.tokens,
        eval_windows=result.windows, eval_seqlen=result.seqlen, eval_seconds=result.seconds, eval_data=args.data,
        load_seconds=round(load_seconds, 2), peak_rss_mb_slicing=rss_after_slicing, peak_rss_mb=peak_rss_mb(),
    )
    return record


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _child_command(args: argparse.Namespace, sparsity: float | None) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.slicing_quality", "--one", "--model", args.model, "--tie", args.tie,
               "--mode", args.mode, "--post-norm-width", args.post_norm_width,
               "--calib", args.calib, "--calib-samples", str(args.calib_samples), "--calib-seqlen",
               str(args.calib_seqlen), "--seed", str(args.seed), "--data", args.data, "--seqlen", str(args.seqlen)]
    if args.max_eval_tokens:
        command += ["--max-eval-tokens", str(args.max_eval_tokens)]
    if sparsity is not None:
        command += ["--sparsity", str(sparsity)]
    return command


def markdown(records: list[dict], header: str) -> str:
    dense = next((r for r in records if r["variant"] == "dense"), None)
    lines = [header, "",
             "| variant | tie | widths | parameters | vs dense | perplexity | vs dense | slicing s "
             "| peak RSS MB (load+slice / +eval) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        params = r["parameters"]["total"]
        p_ratio = f"{params / dense['parameters']['total']:.3f}x" if dense else ""
        q_ratio = f"{r['perplexity'] / dense['perplexity']:.2f}x" if dense else ""
        widths = ",".join(str(w) for w in r.get("widths", [])) or "dense"
        slicing = "" if r["slicing_seconds"] is None else f"{r['slicing_seconds']:.1f}"
        lines.append(f"| {r['variant']} | {r['tie'] if r['sparsity'] is not None else '-'} | {widths} | {params:,} | "
                     f"{p_ratio} | {r['perplexity']:.2f} | {q_ratio} | {slicing} | {r['peak_rss_mb_slicing']:.0f} / "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def report(name: str) -> str:
    """Rewrite ``<name>.md`` from ``<name>.jsonl`` (e.g. after changing the table's layout)."""
    from slice2deploy.utils import atomic_write_text

    records = [json.loads(line) for line in (RESULTS / f"{name}.jsonl").read_text().splitlines() if line]
    old = (RESULTS / f"{name}.md").read_text().split("\n\n| variant")[0]
    text = markdown(records, old.rstrip())
    atomic_write_text(RESULTS / f"{name}.md", text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0,0.1,0.2,0.25,0.3")
    parser.add_argument("--no-dense", action="store_true", help="skip the unsliced reference row")
    parser.add_argument("--tie", default="keep", choices=["keep", "untie"])
    parser.add_argument("--mode", default="per-layer", choices=["per-layer", "uniform"])
    parser.add_argument("--post-norm-width", default="full", choices=["full", "kept"], help=argparse.SUPPRESS)
    parser.add_argument("--post-norm-widths", default="full",
                        help="comma list for post-normed branches (Gemma-3): full (exact) and/or kept (approximate); "
                             "sparsity 0 runs with the first only")
    parser.add_argument("--calib", default="builtin")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="builtin")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--name", default="slicing_smollm2")
    parser.add_argument("--note", default="", help="a line added under the table's header (e.g. shared cores)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sparsity", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0

    widths = [w for w in args.post_norm_widths.split(",") if w]
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    variants = ([] if args.no_dense else [(None, widths[0])]) + [
        (s, w) for w in widths for s in sparsities if s > 0 or w == widths[0]]
    records = []
    for sparsity, post_norm_width in variants:
        print(f"running {'dense' if sparsity is None else f'sparsity {sparsity} {post_norm_width}'} ...",
              file=sys.stderr, flush=True)
        args.post_norm_width = post_norm_width
        output = subprocess.run(_child_command(args, sparsity), check=True, capture_output=True, text=True).stdout
        record = json.loads(output.strip().splitlines()[-1])
        records.append(record)
        print(json.dumps({k: record[k] for k in ("variant", "perplexity", "slicing_seconds", "peak_rss_mb")}),
              file=sys.stderr, flush=True)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_record(),
            "command": "python -m benchmarks.slicing_quality " + " ".join(argv if argv is not None else sys.argv[1:])}
    for record in records:
        record.update(meta)
    header = (f"# {args.model}: SliceGPT slicing ({args.calib} calibration {args.calib_samples} x {args.calib_seqlen}, "
              f"perplexity on the {args.data} evaluation split at {args.seqlen}-token windows)\n\n"
              f"Measured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), torch "
              f"{meta['machine']['torch']}, transformers {meta['machine']['transformers']}.  \n"
              f"Command: `{meta['command']}`" + (f"  \n{args.note}" if args.note else ""))
    write_results(args.name, records, markdown(records, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
