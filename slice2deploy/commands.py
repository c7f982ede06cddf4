"""The core's subcommands (``slice``, ``eval``, ``generate``, ``info``): each builds a config and calls one function
of :mod:`slice2deploy.api`. Defaults are read from those configs and functions, never restated.

:func:`add_commands` registers them on the ``slice2deploy`` parser that :mod:`slice2deploy.cli` composes.
"""

from __future__ import annotations

import argparse
import inspect
import json

from .api import (
    CalibrationConfig,
    EvalConfig,
    WidthPlan,
    describe_checkpoint,
    evaluate_pretrained,
    generate_text,
    slice_pretrained,
)
from .loading import DTYPES, load
from .slicing import DEFAULT_REFIT_RIDGE, SliceConfig
from .sources import BUILTIN_MODELS

MODEL_HELP = (f"built-in alias ({', '.join(BUILTIN_MODELS)}), Hugging Face hub id, local model directory or "
              ".gguf file")
DATA_HELP = (
    "builtin (bundled Wikipedia text), a local .txt/.jsonl file, or a datasets name (wikitext2, c4, ptb, alpaca)"
)
SLICE, CALIBRATION, EVAL = SliceConfig, CalibrationConfig, EvalConfig  # their declared defaults


def default_of(function, name: str):
    """The default of parameter ``name`` of ``function`` (the API states it once)."""
    return inspect.signature(function).parameters[name].default


def add_commands(subparsers) -> None:
    """Register ``slice``, ``eval``, ``generate``, ``info`` and ``recover``."""
    from .recover_cli import add_recover_command

    for add in (_slice_parser, _eval_parser, _generate_parser, _info_parser, add_recover_command):
        add(subparsers)


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    device = default_of(load, "device")
    group.add_argument("--device", default=device, help=f"cpu or cuda[:N] (default: {device})")
    dtype = default_of(load, "dtype")
    group.add_argument("--dtype", default=dtype, choices=list(DTYPES),
                       help=f"dtype the model is loaded and run in (default: {dtype})")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")


def _slice_parser(sub) -> None:
    parser = sub.add_parser("slice", help="slice a model with SliceGPT and save a Hugging Face checkpoint",
                            description="Fold norms, rotate every residual position into its PCA basis and delete "
                                        "the low-variance directions. Writes an HF model directory.")
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("-o", "--output", required=True, help="output directory (must be empty or absent)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--sparsity", type=float, help="fraction of the hidden size to delete, in [0, 1)")
    size.add_argument("--target-params", type=float, metavar="N",
                      help="largest model (real parameters, embeddings/head/shortcuts included) to produce, e.g. 1.2e8")
    parser.add_argument("--mode", default=SLICE.mode, choices=["per-layer", "uniform"],
                        help="per-layer: the paper's basis per residual position (custom architecture with shortcut "
                             "matrices); uniform: one basis, a standard checkpoint of the source family with a "
                             f"smaller hidden size (default {SLICE.mode})")
    parser.add_argument("--widths", default=WidthPlan.widths, choices=["uniform", "spectrum"],
                        help="per-layer mode: the same width everywhere, or widths from each position's eigenvalue "
                             f"spectrum under the same parameter budget (default {WidthPlan.widths})")
    parser.add_argument("--pooling", default=SLICE.pooling, choices=["token", "trace", "sum"],
                        help=f"uniform mode: how the positions' covariances are pooled into one basis (default "
                             f"{SLICE.pooling})")
    parser.add_argument("--refit", nargs="?", type=float, const=DEFAULT_REFIT_RIDGE, default=None, metavar="RIDGE",
                        help="uniform mode: after slicing, re-solve every linear against the dense model by ridge "
                             "regression on the calibration tokens, layer by layer (changes the function; "
                             f"default ridge {DEFAULT_REFIT_RIDGE:g})")
    parser.add_argument("--incoherence", action="store_true",
                        help="random rotation inside each kept subspace (same function; "
                             "activations without outlier coordinates for INT8 quantization)")
    parser.add_argument("--post-norm-width", default=SLICE.post_norm_width, choices=["full", "kept"],
                        help="post-normed branches (Gemma-3): full keeps each branch output at the full hidden size "
                             "before its norm (exact); kept slices it to the position's width (smaller, approximate) "
                             f"(default {SLICE.post_norm_width})")
    parser.add_argument("--round-to", type=int, default=SLICE.round_to,
                        help=f"round widths down to a multiple of this (default {SLICE.round_to})")
    parser.add_argument("--tie", default=SLICE.tie.value, choices=["keep", "untie"],
                        help=f"tied embeddings: keep the tie (fewer parameters) or untie the head (default "
                             f"{SLICE.tie.value})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calib", default=CALIBRATION.source, help=DATA_HELP + " (calibration split)")
    calib.add_argument("--calib-samples", type=int, default=CALIBRATION.samples,
                       help=f"number of calibration sequences (default {CALIBRATION.samples})")
    calib.add_argument("--calib-seqlen", type=int, default=CALIBRATION.seqlen,
                       help=f"tokens per calibration sequence (default {CALIBRATION.seqlen})")
    calib.add_argument("--seed", type=int, default=CALIBRATION.seed,
                       help=f"seed for drawing calibration windows (default {CALIBRATION.seed})")
    calib.add_argument("--batch-size", type=int, default=SLICE.batch_size,
                       help=f"calibration sequences per forward (default {SLICE.batch_size})")
    _add_runtime_args(parser)
    parser.set_defaults(handler=_run_slice)


def _eval_parser(sub) -> None:
    parser = sub.add_parser("eval", help="perplexity of a model or sliced checkpoint",
                            description="Perplexity over consecutive non-overlapping windows of --seqlen tokens "
                                        "covering the whole evaluation text.")
    parser.add_argument("model", help=MODEL_HELP + ", a sliced checkpoint or an ONNX export directory")
    parser.add_argument("--data", default=EVAL.data, help=DATA_HELP + " (evaluation split)")
    parser.add_argument("--seqlen", type=int, default=EVAL.seqlen,
                        help=f"window length in tokens (default {EVAL.seqlen})")
    parser.add_argument("--batch-size", type=int, default=EVAL.batch_size,
                        help=f"windows per forward (default {EVAL.batch_size})")
    parser.add_argument("--max-tokens", type=int, default=EVAL.max_tokens, help="evaluate only the first N tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    _add_runtime_args(parser)
    parser.set_defaults(handler=_run_eval)


def _generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="greedy text generation (KV cache)")
    parser.add_argument("model", help=MODEL_HELP + ", a sliced checkpoint or an ONNX export directory")
    parser.add_argument("--prompt", required=True, help="text to continue")
    new_tokens = default_of(generate_text, "max_new_tokens")
    parser.add_argument("--max-new-tokens", type=int, default=new_tokens,
                        help=f"tokens to generate after the prompt (default {new_tokens}); prompt + these must fit the "
                             "model's context")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_runtime_args(parser)
    parser.set_defaults(handler=_run_generate)


def _info_parser(sub) -> None:
    parser = sub.add_parser("info", help="widths, parameter count and manifest of a model directory")
    parser.add_argument("directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_info)


def _run_slice(args: argparse.Namespace) -> int:
    target = None if args.target_params is None else int(args.target_params)
    config = SliceConfig(sparsity=args.sparsity or 0.0, round_to=args.round_to, tie=args.tie, device=args.device,
                         batch_size=args.batch_size, mode=args.mode, pooling=args.pooling,
                         incoherence=args.incoherence, refit=args.refit, post_norm_width=args.post_norm_width)
    calibration = CalibrationConfig(source=args.calib, samples=args.calib_samples, seqlen=args.calib_seqlen,
                                    seed=args.seed)
    summary = slice_pretrained(args.model, args.output, config, calibration, dtype=args.dtype,
                               overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
                               plan=WidthPlan(widths=args.widths, target_params=target))
    dense, sliced = summary["parameters"]["dense"]["total"], summary["parameters"]["sliced"]["total"]
    widths = summary["widths"]
    print(f"saved {summary['output']} ({summary['mode']} mode)")
    budget = "" if target is None else f" (target {target:,})"
    print(f"widths {min(widths)}..{max(widths)} of {len(widths)} positions; parameters {dense:,} -> {sliced:,}"
          f"{budget} ({sliced / dense:.1%}); slicing {summary['seconds']['slicing']:.1f} s; peak RSS "
          f"{summary['peak_rss_mb']:.0f} MB")
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    result = evaluate_pretrained(args.model, data=args.data, seqlen=args.seqlen, batch_size=args.batch_size,
                                 max_tokens=args.max_tokens, dtype=args.dtype, device=args.device,
                                 trust_remote_code=args.trust_remote_code, progress=not args.json)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(f"perplexity {result['perplexity']:.3f} on {result['data']} ({result['predicted_tokens']:,} predicted "
              f"tokens, {result['windows']} windows of {result['seqlen']}); parameters {result['parameters']:,}")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    text = generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                         dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    print(text if args.chat else args.prompt + text)
    return 0


def _run_info(args: argparse.Namespace) -> int:
    info = describe_checkpoint(args.directory)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    parameters = "unknown" if info["parameters"] is None else f"{info['parameters']:,}"
    print(f"{info['directory']}: {info['model_type']}, {parameters} parameters, "
          f"{info['size_bytes'] / 2**20:.1f} MiB of weights")
    if "widths" in info:
        print(f"source {info['source_model_type']}, hidden size {info['original_hidden_size']}, widths "
              f"{info['width_range'][0]}..{info['width_range'][1]} over {len(info['widths'])} positions, "
              f"tied head: {info['tie_head']}")
        print("widths: " + " ".join(str(w) for w in info["widths"]))
    if "manifest" in info:
        print("manifest: " + json.dumps(info["manifest"], sort_keys=True, default=str))
    return 0
