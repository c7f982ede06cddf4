"""Size/quality curves of the three slicing modes on SmolLM2 at equal real parameter budgets.

- per-layer / uniform widths and per-layer / spectrum widths: measured by ``benchmarks.spectrum_widths``
  (``results/widths_smollm2.jsonl``), whose budgets are the real parameter counts of uniform widths at five
  sparsities (tie kept, round-to 8);
- uniform basis (one basis, a standard LlamaForCausalLM, head untied): measured here at the *same* budgets —
  the largest hidden size whose real count fits — and at the sparsities themselves (its own width schedule).

Same calibration (64 x 512 built-in tokens, seed 0) and evaluation tokens as the per-layer runs. Writes
``results/modes_smollm2.jsonl`` (uniform-basis records) and, merged with the per-layer records,
``results/slicing_modes_smollm2.md`` and ``slicing_modes_smollm2.png``.

    python -m benchmarks.slicing_modes --max-eval-tokens 16384     # the committed run (records are merged:
    python -m benchmarks.slicing_modes --max-eval-tokens 16384 --pooling trace --sparsities 0.25   # + prototype,
    python -m benchmarks.slicing_modes --max-eval-tokens 16384 --sparsities 0.25 --own-width       # + k = 432,
    python -m benchmarks.slicing_modes --max-eval-tokens 16384 --refit 1e-3 [--own-width]          # + refit)
    python -m benchmarks.slicing_modes --report                     # re-draw table and plot from the JSONL files
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.suite.results import RESULTS

PER_LAYER = RESULTS / "widths_smollm2.jsonl"
OFFICIAL = {"parameters": 140.7e6, "ratio": 2.40,
            "label": "official SliceGPT 25% (head untied, not sliced; news text, from the issue)"}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _budgets(model, sparsities: list[float], round_to: int) -> dict[float, int]:
    """The per-layer benchmark's budgets: real counts of uniform widths (tie kept) at each sparsity."""
    from slice2deploy.spectrum import parameter_cost
    from slice2deploy.widths import uniform_widths

    cost = parameter_cost(model)
    budgets = {}
    for sparsity in sparsities:
        widths = uniform_widths(cost.hidden_size, cost.num_positions, sparsity, round_to)
        if cost.tied:
            widths[0] = cost.hidden_size
        budgets[sparsity] = cost.count(widths)
    return budgets


def _rule(args) -> str:
    refit = f", refit {args.refit:g}" if args.refit is not None else ""
    calibration = f", {args.calib_samples}x{args.calib_seqlen} calibration" if args.calib_samples != 64 else ""
    return f"uniform-basis ({args.pooling}{refit}{calibration}{', k from sparsity' if args.own_width else ''})"


def _measure(args, width: int, calibration, evaluation, meta: dict) -> dict:
    from slice2deploy.api import SliceConfig, load, slice_model
    from slice2deploy.evaluate import count_parameters, perplexity

    model, _, _ = load(args.model)
    started = time.perf_counter()
    config = SliceConfig(mode="uniform", widths=[width], pooling=args.pooling, refit=args.refit)
    sliced = slice_model(model, *calibration, config, progress=False)
    seconds = time.perf_counter() - started
    result = perplexity(sliced, evaluation, seqlen=args.seqlen, batch_size=4, max_tokens=args.max_eval_tokens,
                        progress=False)
    return {"mode": "uniform-basis", "rule": _rule(args), "width": width,
            "parameters": count_parameters(sliced)["total"], "perplexity": result.perplexity,
            "eval_tokens": result.tokens, "explained_variance": sliced.config.slice2deploy["explained_variance"],
            "slicing_seconds": round(seconds, 1), **meta}


def run(args: argparse.Namespace) -> None:
    from benchmarks.suite.measure import machine_record
    from slice2deploy.api import load
    from slice2deploy.data import calibration_batch, load_text, token_stream
    from slice2deploy.evaluate import count_parameters, perplexity
    from slice2deploy.widths import uniform_width_for_sparsity, uniform_width_for_target

    sparsities = [float(s) for s in args.sparsities.split(",")]
    model, tokenizer, _ = load(args.model)
    budgets = _budgets(model, sparsities, args.round_to)
    dense_parameters = count_parameters(model)["total"]
    evaluation = token_stream(tokenizer, load_text("builtin", "evaluation"))
    calibration = calibration_batch(tokenizer, load_text("builtin", "calibration"), args.calib_samples,
                                    args.calib_seqlen, args.seed)
    dense = args.dense_perplexity or perplexity(model, evaluation, seqlen=args.seqlen, batch_size=4,
                                                max_tokens=args.max_eval_tokens, progress=False).perplexity
    meta = {"model": args.model, "dense_parameters": dense_parameters, "dense_perplexity": dense,
            "calibration": f"{args.calib_samples}x{args.calib_seqlen} builtin seed {args.seed}",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_record(),
            "command": "python -m benchmarks.slicing_modes " + " ".join(sys.argv[1:])}
    previous = [r for r in _read(RESULTS / "modes_smollm2.jsonl")
                if not (r["rule"] == _rule(args) and r["sparsity"] in sparsities)]
    records = list(previous)
    for sparsity in sparsities:
        width = (uniform_width_for_sparsity(model.config, sparsity, args.uniform_round_to) if args.own_width
                 else uniform_width_for_target(model.config, budgets[sparsity], args.uniform_round_to))
        record = _measure(args, width, calibration, evaluation, meta)
        records.append({**record, "sparsity": sparsity, "budget": budgets[sparsity]})
        print(json.dumps({k: records[-1][k] for k in ("sparsity", "budget", "width", "parameters", "perplexity")}),
              file=sys.stderr, flush=True)
        _write(records)
    report()


def _write(records: list[dict]) -> None:
    from slice2deploy.utils import atomic_write_text

    atomic_write_text(RESULTS / "modes_smollm2.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def _curves(records: list[dict]) -> dict[str, list[dict]]:
    curves: dict[str, list[dict]] = {}
    for r in records:
        curves.setdefault(r["rule"], []).append(r)
    return {name: sorted(points, key=lambda r: r["parameters"]) for name, points in curves.items()}


def report() -> str:
    """Merge per-layer and uniform-basis records into the Markdown table and the plot."""
    per_layer = [{**r, "mode": "per-layer"} for r in _read(PER_LAYER)]
    uniform = _read(RESULTS / "modes_smollm2.jsonl")
    records = per_layer + uniform
    if not records:
        raise SystemExit("no records yet: run benchmarks.spectrum_widths and benchmarks.slicing_modes first")
    lines = ["# SmolLM2-135M: slicing modes at equal real parameter budgets", "",
             f"Per-layer records: `{PER_LAYER.name}` (python -m benchmarks.spectrum_widths); uniform-basis records: "
             "`modes_smollm2.jsonl` (python -m benchmarks.slicing_modes). Perplexity on the built-in evaluation "
             "split (512-token windows); parameters are real counts (embeddings, head and shortcut matrices "
             "included). Dense: "
             f"{records[0]['dense_parameters']:,} parameters, perplexity {records[0]['dense_perplexity']:.2f}.", "",
             "| budget (from uniform sparsity) | mode / widths | real parameters | vs dense | perplexity | vs dense |",
             "|---|---|---:|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: (r["sparsity"], r["mode"], r["rule"])):
        lines.append(f"| {r['sparsity']:g} ({r['budget'] / 1e6:.1f} M) | {r['mode']} / {r['rule']} | "
                     f"{r['parameters']:,} | {r['parameters'] / r['dense_parameters']:.3f}x | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / r['dense_perplexity']:.2f}x |")
    lines += ["", f"Reference: {OFFICIAL['label']}: {OFFICIAL['ratio']}x dense perplexity at "
              f"{OFFICIAL['parameters'] / 1e6:.1f} M parameters.", "",
              "`refit 0.001`: `slice --mode uniform --refit` (layer-wise least-squares refit against the dense model, "
              "ridge 1e-3, on the same calibration tokens). Uniform widths must be multiples of SmolLM2's 9 heads for "
              "transformers' LlamaConfig to save the checkpoint; rows whose width is not (488, 440, 416, 392, 344: "
              "measured before that rule was enforced) compute correctly in memory but could not be saved as a "
              "standard checkpoint.", "", "![curves](slicing_modes_smollm2.png)", ""]
    text = "\n".join(lines)
    from slice2deploy.utils import atomic_write_text

    atomic_write_text(RESULTS / "slicing_modes_smollm2.md", text)
    _plot(records)
    return text


def _plot(records: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, points in _curves(records).items():
        axis.plot([p["parameters"] / 1e6 for p in points], [p["perplexity"] / p["dense_perplexity"] for p in points],
                  marker="o", label=name if points[0]["mode"] != "per-layer" else f"per-layer / {name}")
    axis.scatter([OFFICIAL["parameters"] / 1e6], [OFFICIAL["ratio"]], marker="*", s=160, color="black",
                 label="official SliceGPT 25% (news text)", zorder=5)
    axis.axvline(records[0]["dense_parameters"] / 1e6, color="grey", linestyle=":", label="dense size")
    axis.set_xlabel("real parameters (M)")
    axis.set_ylabel("perplexity / dense perplexity")
    axis.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    for which in (axis.yaxis.set_major_formatter, axis.yaxis.set_minor_formatter):
        which(FuncFormatter(lambda value, _: f"{value:g}x"))
    axis.set_title("SmolLM2-135M sliced: quality vs real size (built-in Wikipedia eval)")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    tmp = RESULTS / ".slicing_modes_smollm2.png.partial"
    figure.savefig(tmp, format="png")
    tmp.replace(RESULTS / "slicing_modes_smollm2.png")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.spectrum_widths import add_quality_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sparsities", default="0.1,0.2,0.25,0.3,0.4")
    parser.add_argument("--pooling", default="token", choices=["token", "trace", "sum"])
    add_quality_args(parser)
    parser.add_argument("--own-width", action="store_true",
                        help="slice at the sparsity's own width (k = (1-s) d rounded), not at the per-layer budget")
    parser.add_argument("--uniform-round-to", type=int, default=1,
                        help="uniform widths: multiples of this that the config class accepts (LlamaConfig: of "
                             "the head count, 9 for SmolLM2); default 1")
    parser.add_argument("--refit", type=float, default=None, metavar="RIDGE",
                        help="refit the uniform slice against the dense model with this ridge (slice --refit)")
    parser.add_argument("--report", action="store_true", help="only re-draw the table and plot")
    args = parser.parse_args(argv)
    if args.report:
        print(report())
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
