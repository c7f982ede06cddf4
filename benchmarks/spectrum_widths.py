"""Uniform vs spectrum-driven widths (per-layer mode) at equal real parameter counts, on SmolLM2.

For each sparsity s the budget is the real parameter count of the uniform plan at s (round-to 8, tie kept: the
embedding position at full width); the same model is then sliced with spectrum-driven widths under that budget,
for each allocation rule, and every variant's perplexity is measured on the built-in evaluation split.
Records are appended to ``benchmarks/results/<name>.jsonl`` as they finish; ``<name>.md`` is rewritten each time.

    python -m benchmarks.spectrum_widths                              # the committed run
    python -m benchmarks.spectrum_widths --widths-only                # print the plans, slice nothing
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.suite.results import RESULTS


def _plans(cost, spectra, sparsity: float, rules: list[str], round_to: int, min_width: int | None) -> dict:
    from slice2deploy.widths import spectrum_widths, uniform_widths

    uniform = uniform_widths(cost.hidden_size, cost.num_positions, sparsity, round_to)
    if cost.tied:
        uniform[0] = cost.hidden_size
    budget = cost.count(uniform)
    plans = {"uniform": uniform}
    for rule in rules:  # "<objective>" or "<objective>@<f>": a floor of f x the uniform width
        objective, _, fraction = rule.partition("@")
        floor = min_width
        if fraction:
            floor = int(float(fraction) * uniform[-1]) // round_to * round_to
        plans[f"spectrum-{rule}"] = spectrum_widths(spectra, cost, budget, round_to, floor, objective=objective)
    return {"budget": budget, "plans": plans}


def markdown(records: list[dict], header: str) -> str:
    lines = [header, "",
             "| budget (uniform sparsity) | widths rule | real parameters | vs dense | perplexity | vs dense "
             "| widths min / mean / max |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in sorted(records, key=lambda r: (r.get("sparsity") or 0, r["rule"] != "uniform", r["rule"])):
        w = r["widths"]
        lines.append(f"| {r['sparsity']:g} ({r['budget']:,}) | {r['rule']} | {r['parameters']:,} | "
                     f"{r['parameters'] / r['dense_parameters']:.3f}x | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / r['dense_perplexity']:.2f}x | {min(w)} / {sum(w) / len(w):.0f} / {max(w)} |")
    return "\n".join(lines) + "\n"


def _write(records: list[dict], name: str, header: str) -> None:
    from slice2deploy.utils import atomic_write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{name}.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    atomic_write_text(RESULTS / f"{name}.md", markdown(records, header))


def add_quality_args(parser: argparse.ArgumentParser) -> None:
    """Calibration and evaluation settings shared by the SmolLM2 slicing-quality comparisons."""
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--dense-perplexity", type=float, default=None, help="reuse a measured dense perplexity")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.25,0.4,0.1,0.2,0.3")
    parser.add_argument("--rules", default="bulk-variance,variance",
                        help="spectrum objectives, comma-separated; '<objective>@f' floors widths at f x uniform")
    parser.add_argument("--spectra-cache", default=None, help="torch file to reuse/store the calibration spectra")
    parser.add_argument("--min-width", type=int, default=None)
    add_quality_args(parser)
    parser.add_argument("--widths-only", action="store_true", help="print the width plans and stop")
    parser.add_argument("--name", default="widths_smollm2")
    parser.add_argument("--append", action="store_true",
                        help="keep the records already in <name>.jsonl (other budgets/rules) and add these")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.suite.measure import machine_record
    from slice2deploy.api import SliceConfig, load, slice_model
    from slice2deploy.data import calibration_batch, load_text, token_stream
    from slice2deploy.evaluate import count_parameters, perplexity
    from slice2deploy.spectrum import collect_spectra, parameter_cost

    torch.manual_seed(args.seed)
    model, tokenizer, _ = load(args.model)
    ids, mask = calibration_batch(tokenizer, load_text("builtin", "calibration"), args.calib_samples,
                                  args.calib_seqlen, args.seed)
    cost = parameter_cost(model, "keep")
    started = time.perf_counter()
    cache = Path(args.spectra_cache) if args.spectra_cache else None
    if cache is not None and cache.is_file():
        spectra, spectra_seconds = torch.load(cache)
    else:
        spectra = collect_spectra(model, ids, mask, batch_size=8)
        spectra_seconds = round(time.perf_counter() - started, 2)
        if cache is not None:
            torch.save((spectra, spectra_seconds), cache)
    rules = [r for r in args.rules.split(",") if r]
    sparsities = [float(s) for s in args.sparsities.split(",") if s]
    all_plans = {s: _plans(cost, spectra, s, rules, args.round_to, args.min_width) for s in sparsities}
    print(json.dumps({"spectra_seconds": spectra_seconds, "dense": cost.dense}), file=sys.stderr, flush=True)
    for s, entry in all_plans.items():
        for rule, widths in entry["plans"].items():
            print(f"{s} {rule} budget={entry['budget']:,} count={cost.count(widths):,} widths={widths}",
                  file=sys.stderr, flush=True)
    if args.widths_only:
        return 0

    evaluation = token_stream(tokenizer, load_text("builtin", "evaluation"))

    def evaluate(m) -> float:
        return perplexity(m, evaluation, seqlen=args.seqlen, max_tokens=args.max_eval_tokens, progress=False).perplexity

    dense_ppl = args.dense_perplexity if args.dense_perplexity is not None else evaluate(model)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_record(),
            "command": "python -m benchmarks.spectrum_widths " + " ".join(argv if argv is not None else sys.argv[1:])}
    header = (f"# {args.model}: uniform vs spectrum-driven widths (per-layer mode, tie kept, round-to "
              f"{args.round_to}) at equal real parameters\n\n"
              f"Calibration: builtin, {args.calib_samples} x {args.calib_seqlen}, seed {args.seed}; perplexity on the "
              f"builtin evaluation split at {args.seqlen}-token windows. Dense: {cost.dense:,} parameters, perplexity "
              f"{dense_ppl:.2f}{' (given)' if args.dense_perplexity is not None else ''}.  \n"
              f"Measured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), torch "
              f"{meta['machine']['torch']}, transformers {meta['machine']['transformers']}.  \n"
              f"Command: `{meta['command']}`")
    records: list[dict] = []
    existing = RESULTS / f"{args.name}.jsonl"
    if args.append and existing.is_file():
        records = [json.loads(line) for line in existing.read_text().splitlines() if line]
    for s, entry in all_plans.items():
        for rule, widths in entry["plans"].items():
            started = time.perf_counter()
            config = SliceConfig(widths=widths, tie="keep", round_to=args.round_to)
            sliced = slice_model(copy.deepcopy(model), ids, mask, config, progress=False)
            slicing_seconds = time.perf_counter() - started
            record = {"model": args.model, "sparsity": s, "budget": entry["budget"], "rule": rule,
                      "widths": sliced.config.widths, "parameters": count_parameters(sliced)["total"],
                      "predicted_parameters": cost.count(widths), "perplexity": evaluate(sliced),
                      "dense_parameters": cost.dense, "dense_perplexity": dense_ppl,
                      "slicing_seconds": round(slicing_seconds, 1), "spectra_seconds": spectra_seconds,
                      "min_width": args.min_width, "round_to": args.round_to,
                      "calibration": {"source": "builtin", "samples": args.calib_samples,
                                      "seqlen": args.calib_seqlen, "seed": args.seed}, **meta}
            del sliced
            records.append(record)
            print(json.dumps({k: record[k] for k in ("sparsity", "rule", "parameters", "perplexity")}),
                  file=sys.stderr, flush=True)
            _write(records, args.name, header)
    print(markdown(records, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
