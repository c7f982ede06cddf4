"""The exporters' subcommands (``export onnx``, ``quantize``, ``build-engine``) and their runners' registration.

:func:`add_commands` registers them on the ``slice2deploy`` parser that :mod:`slice2deploy.cli` composes; defaults
are read from :class:`~exporters.onnx.OnnxExportConfig` and :class:`~exporters.quantize.QuantConfig`.
``build-engine`` takes its defaults from the TensorRT config, so its parser is only built when it is the command
being run: ``slice2deploy --help`` loads no TensorRT (nor ONNX Runtime) code.
"""

from __future__ import annotations

import argparse

from slice2deploy.commands import DATA_HELP, MODEL_HELP

from .genai import BLOCK_SIZES as GENAI_BLOCK_SIZES
from .genai import MAX_PERPLEXITY_RATIO as GENAI_MAX_PPL_RATIO
from .genai import SNR_FLOOR_DB as GENAI_SNR_FLOOR_DB
from .genai import GenAIExportConfig, GenAIPrecision, Provider, export_genai
from .onnx import OnnxExportConfig, export_pretrained
from .quantize import AUTO_BLOCK_SIZES, MATMUL_NBITS_BLOCK_SIZES, SNR_FLOOR_DB, QuantConfig, quantize_onnx

BUILD_ENGINE = "build-engine"
BUILD_ENGINE_HELP = "TensorRT engine (or deploy bundle) from an ONNX export"
# their declared defaults (an instance resolves some, e.g. opset)
EXPORT, QUANT, GENAI = OnnxExportConfig, QuantConfig, GenAIExportConfig


DECODE_GRAPH_HELP = ("also write decode.onnx: one-token steps through GroupQueryAttention over a KV cache updated in "
                     "place (ONNX Runtime CPU; fused attention only), gated against model.onnx; costs a second "
                     "session's memory when loaded (default on)")


def decode_graph_line(record: dict) -> str:
    """One line on the manifest's decode-graph record (exporters.decode_graph.write_decode_graph)."""
    if record["written"]:
        return (f"decode graph: {record['file']} ({record['nodes']} nodes, GroupQueryAttention); over "
                f"{record['gate_steps']} steps its logits SNR against model.onnx's prefill is "
                f"{record['gate_snr_db']:.1f} dB (model.onnx's own one-token steps: "
                f"{record['gate_general_snr_db']:.1f})")
    return f"no decode graph: {record['reason']}"


def add_commands(subparsers, selected: str | None = None) -> None:
    """Register ``export``, ``quantize`` and ``build-engine`` (in full only when ``selected`` is build-engine)."""
    _export_parser(subparsers)
    _quantize_parser(subparsers)
    if selected == BUILD_ENGINE:
        from exporters.tensorrt import cli as tensorrt_cli

        tensorrt_cli.add_build_engine_parser(subparsers)
    else:  # listed by name and help; never run (selected would be build-engine)
        subparsers.add_parser(BUILD_ENGINE, help=BUILD_ENGINE_HELP)


def _export_parser(sub) -> None:
    parser = sub.add_parser("export", help="export a model for deployment (onnx, genai)",
                            description="Export any model slice2deploy loads (dense, sliced, GGUF) for a runtime.")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    onnx = formats.add_parser("onnx", help="ONNX graph with the KV cache, checked against PyTorch in ONNX Runtime",
                              description="Export to ONNX (inputs input_ids, attention_mask, position_ids, "
                                          "past_key_values.*; outputs logits, present.*; dynamic batch, sequence and "
                                          "past axes). The export is kept only if ONNX Runtime matches PyTorch.")
    onnx.add_argument("model", help=MODEL_HELP + ", or a sliced checkpoint")
    onnx.add_argument("-o", "--output", required=True, help="output directory (must be empty or absent)")
    onnx.add_argument("--dtype", default=EXPORT.dtype.value, choices=["float32", "float16"],
                      help=f"weights and activations of the graph (default {EXPORT.dtype.value})")
    onnx.add_argument("--opset", type=int, default=EXPORT.opset,
                      help="ONNX opset, >= 17 (default 18; 23 with --attention fused)")
    onnx.add_argument("--exporter", default=EXPORT.exporter.value, choices=["torchscript", "dynamo"],
                      help=f"torch.onnx exporter (default {EXPORT.exporter.value}: fast and checked; dynamo needs "
                           "onnxscript)")
    onnx.add_argument("--attention", default=EXPORT.attention.value, choices=["eager", "fused"],
                      help="eager: attention as the model's own ops (any opset, every runtime); fused: one ONNX "
                           "Attention node per layer (opset 23, ONNX Runtime >= 1.23; faster prefill on CPU)")
    onnx.add_argument("--attention-chunks", type=int, default=EXPORT.attention_chunks,
                      help="fused attention: split each Attention node into N causal query blocks that skip the "
                           "keys the mask hides, for inputs of >= 16*N tokens (same result; default 4; 1: no split)")
    onnx.add_argument("--external-data", default="auto", choices=["auto", "always", "never"],
                      help="weights in model.onnx.data: auto = above 1.5 GB (default auto)")
    onnx.add_argument("--last-logits", action="store_true",
                      help="generation graph: logits of the last position only (faster prefill; no perplexity)")
    onnx.add_argument("--decode-graph", action=argparse.BooleanOptionalAction, default=EXPORT.decode_graph,
                      help=DECODE_GRAPH_HELP)
    onnx.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    onnx.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model directory")
    onnx.set_defaults(handler=_run_export_onnx)
    _genai_parser(formats)


def _genai_parser(formats) -> None:
    genai = formats.add_parser("genai", help="ONNX Runtime GenAI model (onnxruntime-genai's builder), checked against "
                                             "PyTorch", description="Build an ONNX Runtime GenAI model directory "
                               "(graph + genai_config.json) with onnxruntime-genai's model builder, for dense models "
                               "and uniform slices (per-layer slices are refused). Kept only if its logits stay above "
                               "a signal-to-noise floor against PyTorch on calibration windows. Needs the genai extra.")
    genai.add_argument("model", help=MODEL_HELP + ", or a uniform slice (slice --mode uniform)")
    genai.add_argument("-o", "--output", required=True, help="output directory (must be empty or absent)")
    genai.add_argument("--precision", default=GENAI.precision.value, choices=[p.value for p in GenAIPrecision],
                       help=f"weights (default {GENAI.precision.value}; fp16 is for --execution-provider cuda)")
    genai.add_argument("--block-size", type=int, default=None,
                       help=f"int4 block size along K: {', '.join(map(str, GENAI_BLOCK_SIZES))} (default: the "
                            "builder's, 32)")
    genai.add_argument("--accuracy-level", type=int, default=None, choices=[0, 1, 2, 3, 4],
                       help="int4 MatMulNBits compute type (default: the builder's, 4 = int8 on CPU)")
    genai.add_argument("--execution-provider", default=GENAI.provider.value, choices=[p.value for p in Provider])
    genai.add_argument("--calib", default=GENAI.calib, help=DATA_HELP + " (the quality gate's windows)")
    genai.add_argument("--gate-samples", type=int, default=GENAI.gate_samples)
    genai.add_argument("--gate-seqlen", type=int, default=GENAI.gate_seqlen)
    genai.add_argument("--snr-floor", type=float, default=None,
                       help="reject below this logits SNR in dB (default: "
                            + ", ".join(f"{floor:g} {p.value}" for p, floor in GENAI_SNR_FLOOR_DB.items()) + ")")
    genai.add_argument("--max-ppl-ratio", type=float, default=None,
                       help="reject when the perplexity on the gate windows exceeds this multiple of PyTorch's "
                            "(default: " + ", ".join(f"{r:g} {p.value}" for p, r in GENAI_MAX_PPL_RATIO.items()) + ")")
    genai.add_argument("--builder-option", action="append", default=[], metavar="KEY=VALUE",
                       help="passed to the builder's --extra_options (repeatable), e.g. algo_config=k_quant_mixed "
                            "(k-quant INT4, 8-bit head and sensitive layers); recorded in the manifest")
    genai.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    genai.set_defaults(handler=_run_export_genai)


def _quantize_parser(sub) -> None:
    parser = sub.add_parser("quantize", help="INT8 / INT4 quantization of an ONNX export (ONNX Runtime)",
                            description="Quantize the weight MatMuls of an exported model. The result is kept only "
                                        "if its logits stay above a signal-to-noise floor on calibration text; "
                                        "layers left in float are counted in the manifest.")
    parser.add_argument("onnx_dir", help="a directory written by `slice2deploy export onnx`")
    parser.add_argument("-o", "--output", required=True, help="output directory (must be empty or absent)")
    parser.add_argument("--mode", required=True, choices=["int8-dynamic", "int8-static", "int4"],
                        help="int8-dynamic (activations quantized at run time), int8-static (calibrated Q/DQ) or "
                             "int4 (weight-only MatMulNBits blocks)")
    parser.add_argument("--block-size", type=int, default=QUANT.block_size,
                        help="block size along K of INT4 and of the 8-bit blocks (--weight-int8, shortcuts): "
                             f"{', '.join(map(str, MATMUL_NBITS_BLOCK_SIZES))}, the sizes ONNX Runtime's block "
                             "quantizer takes; every blocked input width K must be a multiple of it (slice with "
                             f"--round-to equal to it). Default: the largest of {AUTO_BLOCK_SIZES} that divides the "
                             "widths (recorded in the manifest)")
    parser.add_argument("--method", default=QUANT.method.value, choices=["rtn", "hqq", "gptq"],
                        help=f"INT4 weight quantizer (default {QUANT.method.value}); gptq measures input Gram matrices "
                             "on --calib text")
    parser.add_argument("--static-format", default=QUANT.static_format, choices=["qdq", "qoperator"],
                        help="int8-static graph: QDQ pairs (default) or QLinearMatMul nodes (uint8 activations)")
    parser.add_argument("--smooth-alpha", type=float, default=QUANT.smooth_alpha, metavar="A",
                        help="INT8 modes: SmoothQuant, moving outlier channels of norm outputs and MLP products "
                             "into the weights that read them (strength A in (0, 1), 0.8 measured best on SmolLM2; "
                             "max |activation| per channel from --calib text); default off")
    parser.add_argument("--gptq-samples", type=int, default=QUANT.gptq_samples,
                        help=f"GPTQ calibration sequences (default {QUANT.gptq_samples})")
    parser.add_argument("--gptq-seqlen", type=int, default=QUANT.gptq_seqlen,
                        help="GPTQ calibration tokens per sequence (default 512, or the model's context if shorter)")
    parser.add_argument("--quantize-head", action="store_true",
                        help="also quantize the lm_head (a tied head first gets its own copy of the table, so the "
                             "embedding Gather is unchanged); with --weight-int8 lm_head as 8-bit blocks")
    parser.add_argument("--shortcuts", default=QUANT.shortcuts.value, choices=["float", "weight-int8", "same"],
                        help="residual shortcut matrices of sliced models: weight-only 8-bit blocks (default), "
                             "float, or quantized like the rest (their error compounds over every layer)")
    parser.add_argument("--keep-float", action="append", default=[], metavar="NAME",
                        help="leave MatMuls whose node name contains NAME in float (repeatable), e.g. down_proj")
    parser.add_argument("--weight-int8", action="append", default=[], metavar="NAME",
                        help="store MatMuls whose node name contains NAME as weight-only 8-bit blocks instead "
                             "(repeatable; mixed precision, e.g. down_proj under int4)")
    parser.add_argument("--accuracy-level", type=int, default=QUANT.accuracy_level, choices=[0, 1, 2, 3, 4],
                        help="MatMulNBits compute type (4 = int8: the CPU kernels' fast path; default: "
                             "onnxruntime's float32 dequantize + GEMM)")
    parser.add_argument("--embedding-dtype", default=QUANT.embedding_dtype or "float32", choices=["float32", "float16"],
                        help="store the token-embedding table as float16 (cast to float32 at load: half the bytes "
                             "on disk, the same arithmetic)")
    parser.add_argument("--calib", default=QUANT.calib, help=DATA_HELP + " (int8-static ranges and the quality gate)")
    parser.add_argument("--calib-samples", type=int, default=QUANT.calib_samples,
                        help=f"calibration sequences (default {QUANT.calib_samples})")
    parser.add_argument("--calib-seqlen", type=int, default=QUANT.calib_seqlen,
                        help=f"tokens per calibration sequence (default {QUANT.calib_seqlen})")
    parser.add_argument("--snr-floor", type=float, default=QUANT.snr_floor_db,
                        help="reject below this logits SNR in dB (default: "
                             + ", ".join(f"{floor:g} {mode.value}" for mode, floor in SNR_FLOOR_DB.items()) + ")")
    parser.add_argument("--auto-mixed-precision", action=argparse.BooleanOptionalAction,
                        default=QUANT.auto_mixed_precision,
                        help="below the floor, with no --keep-float/--weight-int8 given, keep the MatMul kind with "
                             "the most outlier-heavy inputs (measured on --calib text) float (INT8) or 8-bit (INT4) "
                             "and try once more; recorded in the manifest (default on)")
    parser.add_argument("--decode-graph", action=argparse.BooleanOptionalAction, default=QUANT.decode_graph,
                        help=DECODE_GRAPH_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.set_defaults(handler=_run_quantize)


def _run_export_onnx(args: argparse.Namespace) -> int:
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    options = {"opset": args.opset} if args.opset is not None else {}
    config = OnnxExportConfig(dtype=args.dtype, exporter=args.exporter, external_data=external,
                              attention=args.attention, last_logits=args.last_logits,
                              attention_chunks=args.attention_chunks, decode_graph=args.decode_graph, **options)
    manifest = export_pretrained(args.model, args.output, config, overwrite=args.overwrite,
                                 trust_remote_code=args.trust_remote_code)
    parity = manifest["parity"]
    print(f"saved {manifest['output']} ({manifest['dtype']}, opset {manifest['opset']}, {manifest['exporter']} "
          f"exporter, {manifest['export_config']['attention']} attention, external data: "
          f"{manifest['external_data']}) in {manifest['seconds']['export']:.1f} s")
    print(f"parity vs PyTorch: max |Δ| {parity['max_abs_diff']:.3g} over {', '.join(parity['cases'])} "
          f"(atol {parity['tolerance']['atol']:g}, rtol {parity['tolerance']['rtol']:g})")
    print(decode_graph_line(manifest["decode_graph"]))
    return 0


def _run_export_genai(args: argparse.Namespace) -> int:
    config = GenAIExportConfig(precision=args.precision, provider=args.execution_provider, block_size=args.block_size,
                               accuracy_level=args.accuracy_level, calib=args.calib, gate_samples=args.gate_samples,
                               gate_seqlen=args.gate_seqlen, snr_floor_db=args.snr_floor,
                               max_perplexity_ratio=args.max_ppl_ratio, builder_extra=tuple(args.builder_option))
    manifest = export_genai(args.model, args.output, config, overwrite=args.overwrite)
    gate = manifest["quality_gate"]
    print(f"saved {manifest['output']} (GenAI {config.precision.value}, {config.provider.value}; "
          f"{manifest['size_bytes'] / 2**20:.1f} MiB) in {manifest['seconds']['build']:.1f} s")
    print(f"quality gate vs PyTorch: logits SNR {gate['logits_snr_db']:.1f} dB (floor {gate['snr_floor_db']:g}), "
          f"perplexity {gate['perplexity']['genai']:.3f} vs {gate['perplexity']['pytorch']:.3f} "
          f"({gate['perplexity_ratio']:.3f}x, limit {gate['max_perplexity_ratio']:g}x) on "
          f"{gate['windows']} x {gate['seqlen']} tokens of {config.calib}")
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    config = QuantConfig(mode=args.mode, block_size=args.block_size, method=args.method,
                         quantize_head=args.quantize_head, shortcuts=args.shortcuts,
                         keep_float=tuple(args.keep_float), weight_int8=tuple(args.weight_int8),
                         accuracy_level=args.accuracy_level,
                         embedding_dtype=None if args.embedding_dtype == "float32" else args.embedding_dtype,
                         calib=args.calib, calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen,
                         gptq_samples=args.gptq_samples, gptq_seqlen=args.gptq_seqlen, snr_floor_db=args.snr_floor,
                         static_format=args.static_format, smooth_alpha=args.smooth_alpha,
                         auto_mixed_precision=args.auto_mixed_precision, decode_graph=args.decode_graph)
    manifest = quantize_onnx(args.onnx_dir, args.output, config, overwrite=args.overwrite)
    size = manifest["size_bytes"]
    print(f"saved {args.output}: {manifest['quantized_matmuls']} MatMuls quantized ({args.mode}), "
          f"{manifest['unquantized_count']} left in float; {size['source'] / 2**20:.1f} -> "
          f"{size['quantized'] / 2**20:.1f} MiB; logits SNR {manifest['logits_snr_db']:.1f} dB "
          f"(floor {manifest['snr_floor_db']:.1f})")
    auto = manifest["auto_mixed_precision"]
    if auto is not None:
        kept = ", ".join(auto.get("keep_float", auto.get("weight_int8", [])))
        print(f"mixed precision chosen from measurements: {kept} {'float' if 'keep_float' in auto else '8-bit'} "
              f"({auto['reason']}; its inputs peak at {auto['measured_peak_to_typical']}x their typical channel)")
    if manifest["block_size_chosen_from_widths"] and (manifest["quantized_by_role"] or manifest["weight_int8_matmuls"]):
        print(f"block size {manifest['config']['block_size']} (chosen from the widths)")
    print(decode_graph_line(manifest["decode_graph"]))
    if manifest["smoothing"] is not None:
        print(f"SmoothQuant (alpha {args.smooth_alpha:g}): {manifest['smoothing']['matmuls']} MatMuls in "
              f"{manifest['smoothing']['groups']} groups smoothed")
    return 0
