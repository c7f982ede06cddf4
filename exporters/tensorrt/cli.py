"""``slice2deploy build-engine``: TensorRT-ready ONNX + deploy bundle, and the engine itself where TensorRT exists.

Registered by ``slice2deploy.cli`` through :func:`add_commands` (or :func:`add_build_engine_parser`). Importing this
module loads no TensorRT and no onnxruntime: the handler imports the rest of the package when it runs. Without
TensorRT the bundle is still written (it is what a target machine needs) and the command exits with
:data:`EXIT_NO_TENSORRT` after one line naming TensorRT and how to get it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_NO_TENSORRT = 3  # bundle written, no engine: distinct from 2 (an error) so scripts can tell them apart

DESCRIPTION = (
    "Make the TensorRT-ready graph of a float32 ONNX export (FP16, BF16, INT8 Q/DQ or INT4 weight-only Q/DQ; checked "
    "against the source in ONNX Runtime), write a deploy bundle (graph, tokenizer, build.sh for trtexec on TensorRT "
    "10.x/11.x, README), and build the engine with TensorRT's Python API when it is installed here."
)
EPILOG = (
    f"exit status: 0 engine built (or --bundle-only), {EXIT_NO_TENSORRT} bundle written but TensorRT is not installed "
    "here (run OUT/build.sh on the target), 2 error"
)


def add_build_engine_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``build-engine`` to a ``slice2deploy`` subparsers object; its handler returns an exit status."""
    from .config import RTX_DEFAULT_TARGETS, RTX_TARGETS, Precision, Runtime, TrtBuildConfig

    defaults = TrtBuildConfig()
    parser = subparsers.add_parser("build-engine", help="TensorRT engine (or deploy bundle) from an ONNX export",
                                   description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("onnx_dir", help="a float32 ONNX export directory (slice2deploy export onnx MODEL -o DIR)")
    parser.add_argument("-o", "--output", required=True, help="bundle directory (must be empty or absent)")
    parser.add_argument("--precision", default="fp16", choices=[p.value for p in Precision],
                        help="fp16, bf16 (checked on CPU through a float32 twin), int8 (W8A8 Q/DQ), int8-wo "
                             "(weight-only, per channel) or int4 (weight-only, blocked) (default fp16)")
    parser.add_argument("--runtime", default=None, choices=[r.value for r in Runtime],
                        help="tensorrt (10.x/11.x, builds on the target GPU) or tensorrt-rtx (builds here, no GPU "
                             "needed, runs on RTX GPUs); default: whichever is installed, TensorRT first")
    parser.add_argument("--profile", default="rtx", choices=["rtx", "datacenter", "jetson"],
                        help="optimization-profile preset for batch/sequence/past ranges (default rtx)")
    parser.add_argument("--bundle-only", action="store_true",
                        help="write the bundle and stop (build the engine on the target with OUT/build.sh)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    quant = parser.add_argument_group("quantization and validation")
    quant.add_argument("--calib", default=defaults.calib,
                       help="text for INT8 ranges and the quality check: builtin, or a local .txt/.jsonl file")
    quant.add_argument("--calib-samples", type=int, default=defaults.calib_samples,
                       help=f"sequences (default {defaults.calib_samples})")
    quant.add_argument("--calib-seqlen", type=int, default=defaults.calib_seqlen,
                       help=f"tokens per sequence (default {defaults.calib_seqlen})")
    quant.add_argument("--keep-float", action="append", default=[], metavar="PATTERN",
                       help="keep weight MatMuls whose node name contains PATTERN in float (repeatable), e.g. "
                            "down_proj when INT8 activations lose too much")
    quant.add_argument("--int4-block-size", type=int, default=defaults.int4_block_size,
                       help=f"INT4 block along K; must divide every quantized width (default "
                            f"{defaults.int4_block_size})")
    quant.add_argument("--int4-method", default=defaults.int4_method, choices=["rtn", "gptq"],
                       help="int4 weights by round-to-nearest or GPTQ on calibration text (default rtn)")
    quant.add_argument("--weight-int8", action="append", default=[], metavar="PATTERN",
                       help="weight-only graphs: store MatMuls whose name contains PATTERN as 8-bit (repeatable), "
                            "e.g. down_proj")
    quant.add_argument("--shortcuts", default=defaults.shortcuts, choices=["float", "weight-int8", "same"],
                       help="residual shortcut matrices of sliced models (default float)")
    quant.add_argument("--head-bits", type=int, default=None, choices=[4, 8],
                       help="weight-only graphs: quantize the head (untied from a tied embedding) to 4 or 8 bits")
    quant.add_argument("--embedding-bits", type=int, default=None, choices=[8, 16],
                       help="weight-only graphs: the token-embedding table as INT8 with one scale per row (8, the "
                            "default for int8-wo and int4) or float16 (16, the only choice for fp16 and int8)")
    quant.add_argument("--gptq-samples", type=int, default=defaults.gptq_samples,
                       help=f"GPTQ calibration sequences (default {defaults.gptq_samples})")
    quant.add_argument("--gptq-seqlen", type=int, default=defaults.gptq_seqlen,
                       help=f"GPTQ tokens per sequence (default {defaults.gptq_seqlen})")
    build = parser.add_argument_group("engine build")
    build.add_argument("--workspace-mib", type=int, default=None, help="builder workspace limit (default: profile's)")
    build.add_argument("--timing-cache", default=None,
                       help="timing cache to reuse and update (default OUT/timing.cache)")
    build.add_argument("--device-index", type=int, default=0, help="CUDA device to build on (default 0)")
    build.add_argument("--target-cc", action="append", default=[], choices=list(RTX_TARGETS), metavar="CC",
                       help=f"TensorRT-RTX compute capability target (repeatable; default "
                            f"{' '.join(RTX_DEFAULT_TARGETS)}; 7.5 for Turing only on request)")
    build.add_argument("--strip-weights", action="store_true",
                       help="TensorRT-RTX: weight-stripped engine, refitted from onnx/model.onnx when loaded")
    parser.set_defaults(handler=run_build_engine)
    return parser


def add_commands(subparsers) -> None:
    """Add this package's subcommands (``build-engine``) to a ``slice2deploy`` subparsers object."""
    add_build_engine_parser(subparsers)


def run_build_engine(args: argparse.Namespace) -> int:
    """Bundle first (always useful), then the engine if TensorRT can be imported; returns the exit status."""
    from .bundle import ONNX_DIR, write_bundle
    from .config import ENGINE_FILE, TensorRTUnavailable, TrtBuildConfig
    from .engine import build_engine
    from .rtx_bundle import finish_rtx_bundle

    config = TrtBuildConfig(precision=args.precision, profile=args.profile, workspace_mib=args.workspace_mib,
                            int4_block_size=args.int4_block_size, keep_float=args.keep_float, calib=args.calib,
                            calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                            timing_cache=args.timing_cache, device_index=args.device_index,
                            int4_method=args.int4_method, weight_int8=args.weight_int8, shortcuts=args.shortcuts,
                            head_bits=args.head_bits, embedding_bits=args.embedding_bits,
                            gptq_samples=args.gptq_samples, gptq_seqlen=args.gptq_seqlen,
                            runtime=args.runtime, target_cc=args.target_cc, strip_weights=args.strip_weights)
    manifest = write_bundle(args.onnx_dir, args.output, config, overwrite=args.overwrite)
    out = Path(manifest["output"])
    quality = manifest["validation"]
    twin = " (measured on its float32 twin: ONNX Runtime's CPU provider runs no bfloat16)" if "measured_on" in quality \
        else ""
    print(f"wrote TensorRT bundle {out} ({config.precision.value}, profile {config.profile.value}); graph vs float32 "
          f"source: logits SNR {quality['logits_snr_db']:.1f} dB, max |Δ| {quality['max_rel_diff']:.2%} of scale{twin}")
    if args.bundle_only:
        print(f"build the engine on the target: {out / 'build.sh'}")
        return 0
    try:
        sidecar = build_engine(out / ONNX_DIR, out / ENGINE_FILE, config)
    except TensorRTUnavailable as error:
        print(f"slice2deploy build-engine: {error}. The bundle is complete: run {out / 'build.sh'} on a machine with "
              "TensorRT 10.x/11.x.", file=sys.stderr)
        return EXIT_NO_TENSORRT
    if sidecar.get("runtime") == "tensorrt-rtx":
        finish_rtx_bundle(out, sidecar)
        targets = ", ".join(sidecar["targets"]["compute_capabilities"])
        print(f"built {out / ENGINE_FILE} ({sidecar['engine_bytes'] / 1e6:.1f} MB) with TensorRT-RTX "
              f"{sidecar['tensorrt']['version']} ahead of time for compute capabilities {targets} in "
              f"{sidecar['build_seconds']:.1f} s; run it on an RTX GPU with {out / 'run_engine.py'}")
        return 0
    gpu = sidecar["gpu"]
    print(f"built {out / ENGINE_FILE} with TensorRT {sidecar['tensorrt']['version']} on {gpu['name']} "
          f"(compute capability {gpu['compute_capability']})")
    return 0


__all__ = ["EXIT_NO_TENSORRT", "add_build_engine_parser", "add_commands", "run_build_engine"]
