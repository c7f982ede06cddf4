"""``slice2deploy`` command line: each subcommand builds a config and calls one function of ``slice2deploy.api``."""

from __future__ import annotations

import argparse
import json
import sys

from .utils import Slice2DeployError

DEFAULT_REFIT_RIDGE = 1e-3  # measured on SmolLM2 (benchmarks/results/slicing_modes_smollm2.md)
MODEL_HELP = "built-in alias (smollm2-135m), Hugging Face hub id, local model directory or .gguf file"
DATA_HELP = (
    "builtin (bundled Wikipedia text), a local .txt/.jsonl file, or a datasets name (wikitext2, c4, ptb, alpaca)"
)


def _add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    group.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
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
    parser.add_argument("--mode", default="per-layer", choices=["per-layer", "uniform"],
                        help="per-layer: the paper's basis per residual position (custom architecture with shortcut "
                             "matrices); uniform: one basis, a standard checkpoint of the source family with a "
                             "smaller hidden size (default per-layer)")
    parser.add_argument("--widths", default="uniform", choices=["uniform", "spectrum"],
                        help="per-layer mode: the same width everywhere, or widths from each position's eigenvalue "
                             "spectrum under the same parameter budget (default uniform)")
    parser.add_argument("--pooling", default="token", choices=["token", "trace", "sum"],
                        help="uniform mode: how the positions' covariances are pooled into one basis (default token)")
    parser.add_argument("--refit", nargs="?", type=float, const=DEFAULT_REFIT_RIDGE, default=None, metavar="RIDGE",
                        help="uniform mode: after slicing, re-solve every linear against the dense model by ridge "
                             "regression on the calibration tokens, layer by layer (changes the function; "
                             f"default ridge {DEFAULT_REFIT_RIDGE:g})")
    parser.add_argument("--incoherence", action="store_true",
                        help="random rotation inside each kept subspace (same function; "
                             "activations without outlier coordinates for INT8 quantization)")
    parser.add_argument("--round-to", type=int, default=8, help="round widths down to a multiple of this (default 8)")
    parser.add_argument("--tie", default="keep", choices=["keep", "untie"],
                        help="tied embeddings: keep the tie (fewer parameters) or untie the head (default keep)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calib", default="builtin", help=DATA_HELP + " (calibration split)")
    calib.add_argument("--calib-samples", type=int, default=128, help="number of calibration sequences (default 128)")
    calib.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration sequence (default 512)")
    calib.add_argument("--seed", type=int, default=0, help="seed for drawing calibration windows (default 0)")
    calib.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward (default 8)")
    _add_runtime_args(parser)
    parser.set_defaults(handler=_run_slice)


def _eval_parser(sub) -> None:
    parser = sub.add_parser("eval", help="perplexity of a model or sliced checkpoint",
                            description="Perplexity over consecutive non-overlapping windows of --seqlen tokens "
                                        "covering the whole evaluation text.")
    parser.add_argument("model", help=MODEL_HELP + ", a sliced checkpoint or an ONNX export directory")
    parser.add_argument("--data", default="builtin", help=DATA_HELP + " (evaluation split)")
    parser.add_argument("--seqlen", type=int, default=512, help="window length in tokens (default 512)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    _add_runtime_args(parser)
    parser.set_defaults(handler=_run_eval)


def _generate_parser(sub) -> None:
    parser = sub.add_parser("generate", help="greedy text generation (KV cache)")
    parser.add_argument("model", help=MODEL_HELP + ", a sliced checkpoint or an ONNX export directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_runtime_args(parser)
    parser.set_defaults(handler=_run_generate)


def _export_parser(sub) -> None:
    parser = sub.add_parser("export", help="export a model for deployment (onnx)",
                            description="Export any model slice2deploy loads (dense, sliced, GGUF) for a runtime.")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser("onnx", help="ONNX graph with the KV cache, checked against PyTorch in ONNX Runtime",
                              description="Export to ONNX (inputs input_ids, attention_mask, position_ids, "
                                          "past_key_values.*; outputs logits, present.*; dynamic batch, sequence and "
                                          "past axes). The export is kept only if ONNX Runtime matches PyTorch.")
    onnx.add_argument("model", help=MODEL_HELP + ", or a sliced checkpoint")
    onnx.add_argument("-o", "--output", required=True, help="output directory (must be empty or absent)")
    onnx.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    onnx.add_argument("--opset", type=int, default=None,
                      help="ONNX opset, >= 17 (default 18; 23 with --attention fused)")
    onnx.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"],
                      help="torch.onnx exporter (default torchscript: fast and checked; dynamo needs onnxscript)")
    onnx.add_argument("--attention", default="eager", choices=["eager", "fused"],
                      help="eager: attention as the model's own ops (any opset, every runtime); fused: one ONNX "
                           "Attention node per layer (opset 23, ONNX Runtime >= 1.23; faster prefill on CPU)")
    onnx.add_argument("--attention-chunks", type=int, default=None,
                      help="fused attention: split each Attention node into N causal query blocks that skip the "
                           "keys the mask hides, for inputs of >= 16*N tokens (same result; default 4; 1: no split)")
    onnx.add_argument("--external-data", default="auto", choices=["auto", "always", "never"],
                      help="weights in model.onnx.data: auto = above 1.5 GB (default auto)")
    onnx.add_argument("--last-logits", action="store_true",
                      help="generation graph: logits of the last position only (faster prefill; no perplexity)")
    onnx.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    onnx.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    onnx.set_defaults(handler=_run_export_onnx)


def _quantize_parser(sub) -> None:
    parser = sub.add_parser("quantize", help="INT8 / INT4 quantization of an ONNX export (ONNX Runtime)",
                            description="Quantize the weight MatMuls of an exported model. The result is kept only "
                                        "if its logits stay above a signal-to-noise floor on calibration text; "
                                        "layers left in float are counted in the manifest.")
    parser.add_argument("onnx_dir", help="a directory written by `slice2deploy export onnx`")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--mode", required=True, choices=["int8-dynamic", "int8-static", "int4"])
    parser.add_argument("--block-size", type=int, default=32,
                        help="INT4 block size along K (default 32); slice with --round-to equal to it")
    parser.add_argument("--method", default="rtn", choices=["rtn", "hqq", "gptq"],
                        help="INT4 weight quantizer (default rtn); gptq measures input Gram matrices on --calib text")
    parser.add_argument("--static-format", default="qdq", choices=["qdq", "qoperator"],
                        help="int8-static graph: QDQ pairs (default) or QLinearMatMul nodes (uint8 activations)")
    parser.add_argument("--smooth-alpha", type=float, default=None, metavar="A",
                        help="INT8 modes: SmoothQuant, moving outlier channels of norm outputs and MLP products "
                             "into the weights that read them (strength A in (0, 1), 0.8 measured best on SmolLM2; "
                             "max |activation| per channel from --calib text); default off")
    parser.add_argument("--gptq-samples", type=int, default=32, help="GPTQ calibration sequences (default 32)")
    parser.add_argument("--gptq-seqlen", type=int, default=512, help="GPTQ calibration tokens per sequence")
    parser.add_argument("--quantize-head", action="store_true", help="also quantize an untied lm_head")
    parser.add_argument("--shortcuts", default="weight-int8", choices=["float", "weight-int8", "same"],
                        help="residual shortcut matrices of sliced models: weight-only 8-bit blocks (default), "
                             "float, or quantized like the rest (their error compounds over every layer)")
    parser.add_argument("--keep-float", action="append", default=[], metavar="NAME",
                        help="leave MatMuls whose node name contains NAME in float (repeatable), e.g. down_proj")
    parser.add_argument("--weight-int8", action="append", default=[], metavar="NAME",
                        help="store MatMuls whose node name contains NAME as weight-only 8-bit blocks instead "
                             "(repeatable; mixed precision, e.g. down_proj under int4)")
    parser.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                        help="MatMulNBits compute type (4 = int8: the CPU kernels' fast path; default: "
                             "onnxruntime's float32 dequantize + GEMM)")
    parser.add_argument("--embedding-dtype", default="float32", choices=["float32", "float16"],
                        help="store the token-embedding table as float16 (cast to float32 at load: half the bytes "
                             "on disk, the same arithmetic)")
    parser.add_argument("--calib", default="builtin", help=DATA_HELP + " (int8-static ranges and the quality gate)")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--snr-floor", type=float, default=None, help="reject below this logits SNR in dB")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(handler=_run_quantize)


def _info_parser(sub) -> None:
    parser = sub.add_parser("info", help="widths, parameter count and manifest of a model directory")
    parser.add_argument("directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_run_info)


def _build_engine_parser(sub) -> None:
    from exporters.tensorrt_cli import add_build_engine_parser

    add_build_engine_parser(sub)


def _pipeline_parser(sub) -> None:
    parser = sub.add_parser("pipeline", help="run a YAML recipe: slice, eval, export, quantize, bench, report",
                            description="Chain slice -> eval -> export -> quantize -> (engine) -> bench -> report "
                                        "as one YAML recipe says (see recipes/smollm2-cpu.yaml). Each step writes "
                                        "OUT/<step>/ atomically with a manifest of its config and input hashes; a "
                                        "rerun skips the steps that are finished and still match.")
    parser.add_argument("recipe", help="recipe file, e.g. recipes/smollm2-cpu.yaml")
    parser.add_argument("-o", "--output", required=True, help="output directory (created; reused on reruns)")
    parser.add_argument("--force", action="store_true", help="rerun every step even if it is finished")
    parser.add_argument("--build-only", action="store_true",
                        help="stop before the timing steps (build now, time later on a quiet machine)")
    parser.set_defaults(handler=_run_pipeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slice2deploy", description="Slice LLMs (SliceGPT) and deploy them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_slice_parser, _eval_parser, _generate_parser, _export_parser, _quantize_parser,
                _build_engine_parser, _info_parser, _pipeline_parser):
        add(sub)
    from .recover import add_recover_command  # recovery (issue 18) registers its own subcommand

    add_recover_command(sub)
    return parser


def _run_slice(args: argparse.Namespace) -> int:
    from .api import CalibrationConfig, WidthPlan, slice_pretrained
    from .slicing import SliceConfig

    target = None if args.target_params is None else int(args.target_params)
    config = SliceConfig(sparsity=args.sparsity or 0.0, round_to=args.round_to, tie=args.tie, device=args.device,
                         batch_size=args.batch_size, mode=args.mode, pooling=args.pooling,
                         incoherence=args.incoherence, refit=args.refit)
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
    from .api import evaluate_pretrained

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
    from .api import generate_text

    text = generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens, chat=args.chat,
                         dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    print(text if args.chat else args.prompt + text)
    return 0


def _run_export_onnx(args: argparse.Namespace) -> int:
    from exporters.onnx import OnnxExportConfig, export_pretrained

    external = {"auto": None, "always": True, "never": False}[args.external_data]
    options = {"opset": args.opset} if args.opset is not None else {}
    config = OnnxExportConfig(dtype=args.dtype, exporter=args.exporter, external_data=external,
                              attention=args.attention, last_logits=args.last_logits,
                              attention_chunks=args.attention_chunks, **options)
    manifest = export_pretrained(args.model, args.output, config, overwrite=args.overwrite,
                                 trust_remote_code=args.trust_remote_code)
    parity = manifest["parity"]
    print(f"saved {manifest['output']} ({manifest['dtype']}, opset {manifest['opset']}, {manifest['exporter']} "
          f"exporter, {manifest['export_config']['attention']} attention, external data: "
          f"{manifest['external_data']}) in {manifest['seconds']['export']:.1f} s")
    print(f"parity vs PyTorch: max |Δ| {parity['max_abs_diff']:.3g} over {', '.join(parity['cases'])} "
          f"(atol {parity['tolerance']['atol']:g}, rtol {parity['tolerance']['rtol']:g})")
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    from exporters.quantize import QuantConfig, quantize_onnx

    config = QuantConfig(mode=args.mode, block_size=args.block_size, method=args.method,
                         quantize_head=args.quantize_head, shortcuts=args.shortcuts,
                         keep_float=tuple(args.keep_float), weight_int8=tuple(args.weight_int8),
                         accuracy_level=args.accuracy_level,
                         embedding_dtype=None if args.embedding_dtype == "float32" else args.embedding_dtype,
                         calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                         gptq_samples=args.gptq_samples, gptq_seqlen=args.gptq_seqlen, snr_floor_db=args.snr_floor,
                         static_format=args.static_format, smooth_alpha=args.smooth_alpha)
    manifest = quantize_onnx(args.onnx_dir, args.output, config, overwrite=args.overwrite)
    size = manifest["size_bytes"]
    print(f"saved {args.output}: {manifest['quantized_matmuls']} MatMuls quantized ({args.mode}), "
          f"{manifest['unquantized_count']} left in float; {size['source'] / 2**20:.1f} -> "
          f"{size['quantized'] / 2**20:.1f} MiB; logits SNR {manifest['logits_snr_db']:.1f} dB "
          f"(floor {manifest['snr_floor_db']:.1f})")
    if manifest["smoothing"] is not None:
        print(f"SmoothQuant (alpha {args.smooth_alpha:g}): {manifest['smoothing']['matmuls']} MatMuls in "
              f"{manifest['smoothing']['groups']} groups smoothed")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from .api import describe_checkpoint

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


def _run_pipeline(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .pipeline import run_pipeline

    statuses = run_pipeline(args.recipe, args.output, force=args.force, build_only=args.build_only)
    ran = [s for s in statuses if s.status == "ran"]
    print(f"{len(ran)} step(s) ran, {len(statuses) - len(ran)} skipped as finished; report: "
          f"{Path(args.output) / 'report' / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except Slice2DeployError as error:
        print(f"slice2deploy {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
