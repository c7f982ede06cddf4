"""INT4 weight quantizers on ONNX Runtime: round-to-nearest vs GPTQ, with and without the attention-sink weight,
on the PCA and the incoherence-rotated slice, for SmolLM2 dense and sliced 25%.

Every row uses the INT4 policy of benchmarks/onnx_runtime.py (down_proj as 8-bit blocks, float16 embedding table,
accuracy_level 4; the uniform slice: blocks of 16, its untied head as 8-bit blocks) and differs only in the method
and the source export. Besides perplexity it reports where the loss lands: the mean extra negative log-likelihood
(nats per token, against the source's fp32 export) at window positions 1-8 and 9-511. Run after
``python -m benchmarks.onnx_runtime --build-only`` (same work directory; matching builds are reused):

    python -m benchmarks.int4_gptq
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from benchmarks.onnx_runtime import FAMILIES, _quantized
from benchmarks.suite.measure import machine_record
from benchmarks.suite.results import write_results

SOURCES = {  # name -> (fp32 export under the work directory, INT4 block size, family overrides)
    "dense": ("dense-fp32", 32, {}),
    "sliced-0.25": ("sliced-0.25-fp32", 32, {}),
    "sliced-0.25-rotated": ("sliced-0.25-rotated-fp32", 32, {}),
    "uniform-0.25": ("uniform-0.25-fp32", 16, FAMILIES["uniform"]["quant"]["int4"]),
    "uniform-0.25-rotated": ("uniform-0.25-rotated-fp32", 16, FAMILIES["uniform"]["quant"]["int4"]),
}
METHODS = {  # name -> QuantConfig overrides
    "rtn": {"method": "rtn"},
    "gptq-unweighted": {"method": "gptq", "gptq_first_token_weight": 1.0},
    "gptq": {"method": "gptq"},
}
DEFAULT_RUNS = ("dense:rtn", "dense:gptq-unweighted", "dense:gptq", "sliced-0.25:rtn", "sliced-0.25:gptq",
                "sliced-0.25-rotated:rtn", "sliced-0.25-rotated:gptq", "uniform-0.25:rtn", "uniform-0.25:gptq",
                "uniform-0.25-rotated:gptq")
WINDOW = 512
POSITION_BUCKETS = ((1, 9), (9, WINDOW))  # predicted positions (the first token of a window is not predicted)


def token_nll(runner, windows: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of every predicted token, (windows, WINDOW - 1), float64."""
    rows = []
    for window in windows:
        logits = runner.forward(window[None])[0][0, :-1].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits).sum(axis=-1))
        rows.append(log_norm - logits[np.arange(WINDOW - 1), window[1:]])
    return np.stack(rows)


def _artifact(work: Path, source: str, method: str) -> Path:
    """The INT4 build (reused when its configuration matches); GPTQ builds share onnx_runtime.py's directories."""
    fp32, block_size, family = SOURCES[source]
    stem = fp32.removesuffix("-fp32") + "-int4"
    target = work / (stem if method == "gptq" else f"{stem}-{method}")
    return _quantized(work / fp32, target, "int4", block_size, extra={**family, **METHODS[method]})


def main(argv: list[str] | None = None) -> int:
    from exporters.ort import OrtCausalLM, runtime_versions
    from slice2deploy.data import load_text, token_stream

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="out/bench-onnx")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS), help="SOURCE:METHOD pairs, comma-separated")
    parser.add_argument("--max-eval-tokens", type=int, default=8192)
    parser.add_argument("--name", default="int4_gptq_cpu")
    args = parser.parse_args(argv)
    work = Path(args.work)
    runs = [tuple(run.split(":")) for run in args.runs.split(",")]
    unknown = [run for run in runs if len(run) != 2 or run[0] not in SOURCES or run[1] not in METHODS]
    if unknown:
        parser.error(f"unknown runs {unknown}; sources {list(SOURCES)}, methods {list(METHODS)}")
    tokenizer = OrtCausalLM(work / "dense-fp32").tokenizer()
    stream = token_stream(tokenizer, load_text("builtin", "evaluation")).numpy().astype(np.int64)
    count = min(args.max_eval_tokens, stream.size) // WINDOW
    windows = stream[: count * WINDOW].reshape(count, WINDOW)
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_record(),
            "versions": runtime_versions(), "eval_window_tokens": int(windows.size),
            "command": "python -m benchmarks.int4_gptq " + " ".join(argv if argv is not None else sys.argv[1:])}
    reference: dict[str, np.ndarray] = {}
    records = []
    for source, method in runs:
        if source not in reference:
            reference[source] = token_nll(OrtCausalLM(work / SOURCES[source][0]), windows)
        directory = _artifact(work, source, method)
        nll = token_nll(OrtCausalLM(directory), windows)
        manifest = OrtCausalLM(directory)._json("slice2deploy_quant_manifest.json")
        extra = {f"dnll_pos_{lo}_{hi - 1}": round(float((nll - reference[source])[:, lo - 1:hi - 1].mean()), 4)
                 for lo, hi in POSITION_BUCKETS}
        record = {"source": source, "method": method, "perplexity": float(np.exp(nll.mean())),
                  "fp32_perplexity": float(np.exp(reference[source].mean())), "eval_tokens": int(nll.size),
                  "logits_snr_db": manifest["logits_snr_db"], "config": manifest["config"], **extra, **meta}
        records.append(record)
        print(f"{source} {method}: {record['perplexity']:.2f} (fp32 {record['fp32_perplexity']:.2f}) {extra}",
              file=sys.stderr, flush=True)
    write_results(args.name, records, markdown(records, meta))
    return 0


def markdown(records: list[dict], meta: dict) -> str:
    lines = ["# INT4 weight quantizers on ONNX Runtime (CPU): round-to-nearest vs GPTQ\n",
             f"Measured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), onnxruntime "
             f"{meta['versions'].get('onnxruntime')}. The INT4 policy of `benchmarks/onnx_runtime.py` (down_proj as "
             f"8-bit blocks, float16 embedding table, accuracy_level 4; uniform slice: blocks of 16, head as 8-bit "
             f"blocks); only the method and the source export differ. `rtn`: onnxruntime's symmetric round-to-nearest. "
             f"`gptq`: exporters/gptq.py (32 x 512 calibration tokens, the first token of each sequence weighted as "
             f"much as the other 511 together); `gptq-unweighted`: every token weighted 1. `-rotated`: the "
             f"incoherence-rotated slice (the same function as the PCA slice). Perplexity over the first "
             f"{meta['eval_window_tokens']} evaluation tokens in {WINDOW}-token windows; "
             f"extra NLL = mean nats per token above the source's fp32 export at those window positions.  ",
             f"Command: `{meta['command']}`", "",
             "| source | method | fp32 ppl | INT4 ppl | vs fp32 | extra NLL pos 1-8 | extra NLL pos 9-511 "
             "| logits SNR dB (gate) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['source']} | {r['method']} | {r['fp32_perplexity']:.2f} | {r['perplexity']:.2f} | "
                     f"{r['perplexity'] / r['fp32_perplexity'] - 1:+.1%} | {r['dnll_pos_1_8']:+.3f} | "
                     f"{r['dnll_pos_9_511']:+.3f} | {r['logits_snr_db']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
