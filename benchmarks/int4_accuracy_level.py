"""A/B of ONNX Runtime MatMulNBits accuracy_level (default vs 4) on the INT4 builds of benchmarks.onnx_runtime.

Run after `python -m benchmarks.onnx_runtime --build-only` (same work directory); one process, same machine,
nothing else running (results: benchmarks/results/int4_accuracy_level_cpu.md):

    python -m benchmarks.int4_accuracy_level
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from exporters.ort import OrtCausalLM
from exporters.quantize import QuantConfig, quantize_onnx
from slice2deploy.data import load_text, token_stream

WORK = Path("out/bench-onnx")
SOURCES = (("dense", "dense-fp32"), ("sliced-0.25", "sliced-0.25-fp32"))


def _median_s(fn: Callable[[], object], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _variants() -> list[tuple[str, Path]]:
    """Each INT4 build of the benchmark next to the same policy re-quantized with accuracy_level=4."""
    variants = []
    for name, fp32 in SOURCES:
        acc4 = Path(f"out/exp/{name}-int4-acc4")
        if not (acc4 / "model.onnx").exists():
            quantize_onnx(WORK / fp32, acc4, QuantConfig(mode="int4", weight_int8=("down_proj",),
                                                          embedding_dtype="float16", accuracy_level=4), overwrite=True)
        variants += [(f"{name}/int4", WORK / f"{name}-int4"), (f"{name}/int4-acc4", acc4)]
    return variants


def measure(runner: OrtCausalLM, evaluation) -> dict:
    prompt = evaluation[:32].numpy()[None].astype(np.int64)
    runner.generate(prompt, max_new_tokens=8, eos_token_id=None)  # warm-up
    total = _median_s(lambda: runner.generate(prompt, max_new_tokens=64, eos_token_id=None))
    first = _median_s(lambda: runner.forward(prompt))
    long_prompt = evaluation[:512].numpy()[None].astype(np.int64)
    runner.forward(long_prompt)
    prefill = _median_s(lambda: runner.forward(long_prompt))
    ppl = runner.perplexity(evaluation, seqlen=512, batch_size=1, max_tokens=8192, progress=False).perplexity
    return {"decode_tok_s": round(63 / (total - first), 2), "prefill_512_ms": round(1000 * prefill, 1),
            "perplexity": round(ppl, 3)}


def main() -> None:
    evaluation = None
    for label, directory in _variants():
        runner = OrtCausalLM(directory)
        if evaluation is None:
            evaluation = token_stream(runner.tokenizer(), load_text("builtin", "evaluation"))
        print(json.dumps({"variant": label, **measure(runner, evaluation)}), flush=True)


if __name__ == "__main__":
    main()
