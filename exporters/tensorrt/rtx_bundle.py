"""The deploy bundle for RTX targets: a TensorRT-RTX engine is portable across RTX GPUs, so it ships built.

After ``build-engine --runtime tensorrt-rtx`` the bundle written by :func:`exporters.tensorrt.bundle.write_bundle`
(``onnx/`` with the tokenizer and config, ``build.sh`` kept for TensorRT 10.x/11.x targets) also holds::

    OUT/model.engine            the TensorRT-RTX engine (ahead-of-time, for the sidecar's compute capabilities)
    OUT/model.engine.json       its sidecar (version, targets, profile, precision, source sha256, build seconds)
    OUT/network_report.json     what the parser built: layer types, Q/DQ, weight bytes by type, INT4/INT8 MatMuls
    OUT/run_engine.py           greedy generation with exporters.tensorrt.rtx_runner.RtxCausalLM
    OUT/README.md               gains a "TensorRT-RTX engine" section
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from slice2deploy.utils import atomic_write_text, sha256_file

from .bundle import BUNDLE_MANIFEST, ONNX_DIR, README_FILE
from .config import ENGINE_FILE, SIDECAR_SUFFIX
from .rtx import NETWORK_REPORT_FILE

RUN_SCRIPT = "run_engine.py"

RUN_SCRIPT_TEXT = '''#!/usr/bin/env python3
"""Greedy generation with this bundle's TensorRT-RTX engine (needs an RTX GPU, its driver, torch with CUDA,
tensorrt-rtx-cu12 of the version in model.engine.json, transformers and slice2deploy)."""

import argparse
from pathlib import Path

from transformers import AutoTokenizer

from exporters.tensorrt.rtx_runner import RtxCausalLM

HERE = Path(__file__).resolve().parent
parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("prompt", nargs="?", default="The capital of France is")
parser.add_argument("--max-new-tokens", type=int, default=32)
args = parser.parse_args()
tokenizer = AutoTokenizer.from_pretrained(HERE / "onnx")
model = RtxCausalLM(HERE / "model.engine", onnx_path=HERE / "onnx" / "model.onnx")  # refuses other GPUs/versions
ids = tokenizer(args.prompt, return_tensors="np")["input_ids"]
tokens = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
model.save_runtime_cache()  # kernels compiled for this GPU: the next load skips that step
print(tokenizer.decode(tokens[0], skip_special_tokens=True))
'''


def render_rtx_section(sidecar: dict) -> str:
    """The README section describing the built engine and how to run it."""
    summary = sidecar["network_report"]["summary"]
    weights = ", ".join(f"{k} {v:.1f} MB" for k, v in summary["weight_mb_by_type"].items())
    matmuls = ", ".join(f"{v} {k}" for k, v in summary["matmuls_by_weight"].items())
    targets = ", ".join(sidecar["targets"]["compute_capabilities"])
    stripped = ("\nThe engine is **weight-stripped**: it is refitted from `onnx/model.onnx` when it loads, so keep "
                "that file next to it.\n" if sidecar.get("weight_stripped") else "")
    return f"""
## TensorRT-RTX engine (built ahead of time, ships in this bundle)
`{ENGINE_FILE}` ({sidecar['engine_bytes'] / 1e6:.1f} MB) was built by TensorRT-RTX {sidecar['tensorrt']['version']}
without a GPU, in {sidecar['build_seconds']} s, for compute capabilities **{targets}** (TensorRT-RTX's default
set covers Ampere 8.0/8.6, Ada 8.9 and Blackwell 12.0). It runs on a GPU of one of those compute capabilities with
the same TensorRT-RTX version; anything else is refused when it loads (`{ENGINE_FILE}{SIDECAR_SUFFIX}` records
what it was built for).
{stripped}
```bash
pip install tensorrt-rtx-cu12=={sidecar['tensorrt']['version']} torch transformers   # plus slice2deploy
python {RUN_SCRIPT} "Once upon a time" --max-new-tokens 32
```
The first load compiles kernels for the GPU (TensorRT-RTX's just-in-time step); `{RUN_SCRIPT}` saves them to
`runtime.cache` so later loads are fast.

What the builder saw (`{NETWORK_REPORT_FILE}`): {summary['layers']} layers, {summary['dequantize_layers']}
DequantizeLinear / {summary['quantize_layers']} QuantizeLinear; MatMul weights: {matmuls}; constant weights:
{weights}. Running the engine was not tested where it was built (no GPU there).
"""


def finish_rtx_bundle(out: str | Path, sidecar: dict) -> dict:
    """Add the runner script and README section to a bundle whose engine TensorRT-RTX just built; rewrite the
    bundle manifest (engine_built, runtime, the files' sha256) atomically. Returns the manifest."""
    out = Path(out)
    script = out / RUN_SCRIPT
    atomic_write_text(script, RUN_SCRIPT_TEXT)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    readme = out / README_FILE
    text = readme.read_text().replace("The engine itself was not built or measured when this bundle was written.\n",
                                      "")
    atomic_write_text(readme, text + render_rtx_section(sidecar))
    manifest = json.loads((out / BUNDLE_MANIFEST).read_text())
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != BUNDLE_MANIFEST)
    manifest.update(engine_built=True, runtime=sidecar["runtime"], engine=sidecar["engine_file"],
                    targets=sidecar["targets"], files_sha256={os.path.relpath(p, out): sha256_file(p) for p in files},
                    onnx_dir=ONNX_DIR)
    atomic_write_text(out / BUNDLE_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


__all__ = ["RUN_SCRIPT", "finish_rtx_bundle", "render_rtx_section"]
