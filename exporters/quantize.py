"""INT8 / INT4 quantization of exported ONNX models, stacked on slicing, with a measured quality gate.

Only MatMul/Gemm nodes whose weight is a stored initializer are quantized: the attention-score MatMuls (two
activations) and the mask arithmetic stay in float, because an unrestricted INT8 pass over a Llama graph
quantizes the attention-mask path and wrecks the output. Every weight MatMul left in float is listed with
the reason. The lm_head and the residual shortcut matrices are explicit choices (``quantize_head``,
``shortcuts``). INT4 is weight-only ``MatMulNBits`` with blocks along K, so every quantized K (for a
sliced model: the residual widths) must be a multiple of the block size — slice with ``--round-to`` equal to
the block size.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from slice2deploy.runners import check_length
from slice2deploy.utils import Slice2DeployError, UserInputError, atomic_directory, sha256_file

from .decode_graph import write_decode_graph
from .graph_io import (
    PrefillReader,
    calibration_samples,
    copy_side_files,
    count_roles,
    embedding_table,
    is_large,
    prefill_feeds,
    save_model,
    untie_head,
)
from .ort import OrtCausalLM, check_onnx_dir, runtime_versions
from .outliers import mixed_precision_hint
from .quant_plan import (  # noqa: F401  (re-exported: the public names of quantization)
    AUTO_BLOCK_SIZES,
    GPTQ_SEQLEN,
    MATMUL_NBITS_BLOCK_SIZES,
    MODEL_FILE,
    QUANT_MANIFEST,
    SNR_FLOOR_DB,
    Int4Method,
    QuantConfig,
    QuantMode,
    QuantPlan,
    QuantQualityError,
    ShortcutPolicy,
    WeightMatMul,
    plan,
    quant_plan,
    weight_matmuls,
    with_block_size,
    with_gptq_seqlen,
)
from .smooth import SmoothGroup, smoothable_groups


def _calibration_inputs(runner: OrtCausalLM, config: QuantConfig, samples: int | None = None,
                        seqlen: int | None = None) -> list[np.ndarray]:
    return calibration_samples(runner, config.calib, samples or config.calib_samples, seqlen or config.calib_seqlen,
                               config.seed)


QDQ_OUTPUT_DTYPE_OPSET = 21  # QuantizeLinear gains its output_dtype attribute


def _default_opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _quantize_int8(source: Path, target: Path, nodes: list[str], config: QuantConfig,
                   runner: OrtCausalLM, samples: list[np.ndarray], opset: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    common = {"per_channel": True, "weight_type": QuantType.QInt8, "nodes_to_quantize": nodes,
              "op_types_to_quantize": ["MatMul", "Gemm"], "use_external_data_format": is_large(source)}
    if config.mode == QuantMode.INT8_DYNAMIC:
        quantize_dynamic(source, target, **common)
        return
    qdq = config.static_format == "qdq"  # QLinearMatMul kernels take uint8 (asymmetric) activations
    static = {"quant_format": QuantFormat.QDQ if qdq else QuantFormat.QOperator,
              "activation_type": QuantType.QInt8 if qdq else QuantType.QUInt8,
              "calibrate_method": CalibrationMethod.MinMax,
              "extra_options": {"ActivationSymmetric": qdq, "WeightSymmetric": True,
                                # ORT's QDQ propagation stamps output_dtype=int8 on the Q nodes it moves, then its
                                # S8->U8 pass makes their zero points uint8: opset >= 21 graphs then fail to load
                                # (onnxruntime#25526). com.microsoft Q/DQ (same kernels) have no output_dtype.
                                "UseQDQContribOps": qdq and opset >= QDQ_OUTPUT_DTYPE_OPSET}}
    quantize_static(source, target, PrefillReader(runner, samples), **static, **common)


def _quantize_nbits(source: Path, target: Path, nodes: list[str], config: QuantConfig, bits: int) -> None:
    """Weight-only ``MatMulNBits`` (``bits`` = 4 or 8, blocks along K) on exactly ``nodes``; others untouched."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if config.method == Int4Method.HQQ and bits == 4:
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=bits)
    else:
        algo = DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=True, bits=bits,
                                            accuracy_level=config.accuracy_level)
    model = onnx.load(str(source))
    before = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    # onnxruntime treats nodes_to_include as a union with "every MatMul", not as a restriction: exclude the rest.
    chosen = set(nodes)
    exclude = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in chosen]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=config.block_size, is_symmetric=True,
                                     accuracy_level=config.accuracy_level,
                                     nodes_to_include=nodes, nodes_to_exclude=exclude, algo_config=algo)
    quantizer.process()
    if config.accuracy_level is not None:  # HQQ's config has no such field: stamp every MatMulNBits node
        from onnx import helper

        for node in quantizer.model.model.graph.node:
            if node.op_type == "MatMulNBits":
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*kept, helper.make_attribute("accuracy_level", config.accuracy_level)])
    done = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node) - before
    if done != len(chosen):
        raise Slice2DeployError(f"{bits}-bit: asked to quantize {len(chosen)} MatMuls, onnxruntime produced {done} "
                                "MatMulNBits nodes; refusing to report a plan that was not carried out")
    quantizer.model.save_model_to_file(str(target), use_external_data_format=is_large(source))


def _quantize_gptq(source: Path, target: Path, chosen: list[WeightMatMul], config: QuantConfig,
                   runner: OrtCausalLM) -> None:
    """INT4 ``MatMulNBits`` for ``chosen`` by GPTQ against Gram matrices of their float inputs (gptq.py)."""
    import onnx
    from onnx import numpy_helper
    from tqdm.auto import tqdm

    from .gptq import gptq_quantize, probe_grams, replace_with_nbits

    model = onnx.load(str(source))
    weights = {init.name: init for init in model.graph.initializer}
    not_float32 = sorted({mm.node for mm in chosen if weights[mm.weight].data_type != onnx.TensorProto.FLOAT})
    if not_float32:
        raise UserInputError(f"GPTQ writes float32 scales and needs a float32 export; {not_float32[0]} (and "
                             f"{len(not_float32) - 1} more) is not float32: export with --dtype float32")
    readers = {node.name: node.input[0] for node in model.graph.node if node.input}
    inputs = {mm.node: readers[mm.node] for mm in chosen}
    samples = _calibration_inputs(runner, config, config.gptq_samples, config.gptq_seqlen)
    feeds = (prefill_feeds(runner, ids) for ids in samples)
    sink = config.gptq_first_token_weight or float(config.gptq_seqlen)
    grams = probe_grams(source, sorted(set(inputs.values())), feeds, target.parent, large=is_large(source),
                        first_token_weight=sink,
                        progress=lambda items: tqdm(items, desc="GPTQ calibration"))
    for mm in tqdm(chosen, desc="GPTQ layers"):
        weight = numpy_helper.to_array(weights[mm.weight])
        codes, scales, zeros = gptq_quantize(weight, grams[inputs[mm.node]], config.block_size, damp=config.gptq_damp)
        replace_with_nbits(model, mm.node, codes, scales, zeros, config.block_size, config.accuracy_level)
    onnx.save_model(model, str(target), save_as_external_data=is_large(source), all_tensors_to_one_file=True,
                    location=f"{target.name}.data")


def _smooth(source: Path, target: Path, groups: list[SmoothGroup], config: QuantConfig, runner: OrtCausalLM,
            samples: list[np.ndarray], summary: dict) -> None:
    """SmoothQuant: fold per-channel scales measured on the calibration text into the groups' weights."""
    import onnx
    from tqdm.auto import tqdm

    from .smooth import channel_maxima, smooth_initializers

    feeds = (prefill_feeds(runner, ids) for ids in samples)
    maxima = channel_maxima(source, [g.activation for g in groups], feeds, target.parent, large=is_large(source),
                            progress=lambda items: tqdm(items, desc="SmoothQuant calibration"))
    model = onnx.load(str(source))
    summary.update(smooth_initializers(model, groups, maxima, config.smooth_alpha))
    onnx.save_model(model, str(target), save_as_external_data=is_large(source), all_tensors_to_one_file=True,
                    location=f"{target.name}.data")


def logits_snr_db(reference: OrtCausalLM, candidate: OrtCausalLM, samples: list[np.ndarray]) -> float:
    """Signal-to-noise ratio (dB) of the candidate's logits against the reference's over the samples."""
    signal = noise = 0.0
    for ids in samples:
        ref = reference.forward(ids)[0].astype(np.float64)
        out = candidate.forward(ids)[0].astype(np.float64)
        signal += float(np.square(ref).sum())
        noise += float(np.square(ref - out).sum())
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.suffix in (".onnx", ".data", ".onnx_data"))


@dataclass
class _Attempt:
    config: QuantConfig
    full: QuantPlan
    snr: float
    groups: list
    smoothing: dict
    embedding: str | None


def _attempt(model_path: Path, source: Path, tmp: Path, graph, matmuls: list[WeightMatMul], config: QuantConfig,
             reference: OrtCausalLM, samples: list[np.ndarray]) -> _Attempt:
    """Quantize into ``tmp`` (emptied first) and measure the logits SNR against ``reference``."""
    for item in tmp.iterdir():
        shutil.rmtree(item) if item.is_dir() else item.unlink()
    full = quant_plan(matmuls, config)
    groups = [] if config.smooth_alpha is None else smoothable_groups(graph, {mm.node for mm in full.chosen})
    smoothing: dict = {}
    copy_side_files(source, tmp)
    _run_passes(model_path, tmp, full, config, reference, samples, _default_opset(graph), groups, smoothing)
    embedding = None if not config.embedding_dtype else _embedding_name(tmp / MODEL_FILE)
    return _Attempt(config, full, logits_snr_db(reference, OrtCausalLM(tmp), samples), groups, smoothing, embedding)


def quantize_onnx(source_dir: str | Path, out_dir: str | Path, config: QuantConfig, overwrite: bool = False) -> dict:
    """Quantize an exported ONNX directory into ``out_dir`` (atomically) and return its manifest.

    Raises:
        UserInputError: a bad directory, a block size that does not divide the widths, nothing to quantize.
        QuantQualityError: the logits SNR on calibration text stays below the floor (nothing is written).
    """
    source = Path(source_dir).expanduser()
    model_path = check_onnx_dir(source)
    if Path(out_dir).expanduser().resolve() == source.resolve():
        raise UserInputError("the output directory must differ from the input (inputs are never modified)")
    reference = OrtCausalLM(source)
    config = with_gptq_seqlen(config, reference.context_length)
    check_length(config.calib_seqlen, reference.context_length, "a calibration window", "--calib-seqlen")
    if config.method == Int4Method.GPTQ:
        check_length(config.gptq_seqlen, reference.context_length, "a GPTQ calibration window", "--gptq-seqlen")
    with tempfile.TemporaryDirectory(prefix="slice2deploy-untied-") as scratch:
        untied = _untied_head_source(model_path, Path(scratch)) if config.quantize_head else None
        return _quantize(source, model_path, untied or model_path, out_dir, config, reference, overwrite,
                         head_untied=untied is not None)


def _untied_head_source(model_path: Path, scratch: Path) -> Path | None:
    """A copy of the graph whose tied head reads its own (hidden, vocab) initializer (graph_io.untie_head), saved
    in ``scratch``; None when the head is not tied."""
    import onnx

    model = onnx.load(str(model_path))
    if not untie_head(model):
        return None
    target = scratch / MODEL_FILE
    save_model(model, target, large=is_large(model_path))
    return target


def _quantize(source: Path, source_model: Path, model_path: Path, out_dir: str | Path, config: QuantConfig,
              reference: OrtCausalLM, overwrite: bool, head_untied: bool) -> dict:
    """quantize_onnx after its checks: ``model_path`` is the graph the passes read (``source_model`` or a copy
    with the head untied)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False)
    matmuls = weight_matmuls(graph)
    chosen_block = config.block_size is None
    config = with_block_size(config, matmuls)
    quant_plan(matmuls, config)  # refuse a bad plan before any calibration
    samples = _calibration_inputs(reference, config)
    auto = None
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        attempt = _attempt(model_path, source, tmp, graph, matmuls, config, reference, samples)
        if attempt.snr < config.floor and config.auto_mixed_precision and not (config.keep_float or config.weight_int8):
            kind, ratio = _measured_ratios(model_path, graph, attempt.full, reference, samples, tmp)[0]
            option = {"weight_int8": (kind,)} if config.mode == QuantMode.INT4 else {"keep_float": (kind,)}
            first = attempt
            attempt = _attempt(model_path, source, tmp, graph, matmuls, replace(config, **option), reference, samples)
            auto = {"reason": f"logits SNR {first.snr:.1f} dB below the floor of {config.floor:.1f} dB",
                    "measured_peak_to_typical": round(ratio, 1), **{k: list(v) for k, v in option.items()},
                    "snr_db_before": round(first.snr, 3), "snr_db_after": round(attempt.snr, 3)}
        if attempt.snr < config.floor:
            hint = mixed_precision_hint(_measured_ratios(model_path, graph, attempt.full, reference, samples, tmp),
                                        int8=config.mode != QuantMode.INT4,
                                        already=(*attempt.config.keep_float, *attempt.config.weight_int8))
            tried = "" if auto is None else (
                f" (also with {', '.join(auto.get('keep_float', auto.get('weight_int8', [])))} "
                f"{'float' if 'keep_float' in auto else '8-bit'}: {auto['snr_db_after']} dB)")
            raise QuantQualityError(f"{config.mode.value}: logits SNR {attempt.snr:.1f} dB is below the floor of "
                                    f"{config.floor:.1f} dB{tried}; nothing was written.{hint}")
        decode = write_decode_graph(tmp) if config.decode_graph else {"written": False, "reason": "turned off"}
        manifest = _manifest(source, source_model, tmp, attempt.config, attempt.full, attempt.snr)
        manifest["decode_graph"] = decode
        manifest["head_untied"] = head_untied
        manifest["block_size_chosen_from_widths"] = chosen_block
        manifest["auto_mixed_precision"] = auto
        manifest["embedding_float16"] = attempt.embedding
        manifest["smoothing"] = None if config.smooth_alpha is None else {
            "alpha": config.smooth_alpha, "groups": len(attempt.groups),
            "matmuls": sum(len(g.matmuls) for g in attempt.groups), "by_activation": attempt.smoothing}
        (tmp / QUANT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def _measured_ratios(model_path: Path, graph, full: QuantPlan, reference: OrtCausalLM, samples: list[np.ndarray],
                     scratch: Path) -> list[tuple[str, float]]:
    """Per quantized MatMul kind, how outlier-heavy its inputs are on the calibration text (worst first)."""
    from .outliers import outlier_ratios

    quantized = {mm.node for mm in full.chosen}
    inputs = {node.name: node.input[0] for node in graph.graph.node if node.name in quantized}
    feeds = [prefill_feeds(reference, ids) for ids in samples]
    return outlier_ratios(model_path, inputs, feeds, scratch, large=is_large(model_path))


def _run_passes(model_path: Path, out: Path, full: QuantPlan, config: QuantConfig, reference: OrtCausalLM,
                samples: list[np.ndarray], opset: int, groups: list[SmoothGroup], smoothing: dict) -> None:
    """SmoothQuant (when there are groups), the mode's quantizer, then 8-bit weight-only blocks, then the float16
    embedding: each pass reads the previous graph and writes a new one in ``out``; the last becomes
    ``model.onnx``, intermediates are deleted."""
    passes = []
    if groups:
        passes.append(lambda src, dst: _smooth(src, dst, groups, config, reference, samples, smoothing))
    if full.chosen:
        nodes = [mm.node for mm in full.chosen]
        if config.mode == QuantMode.INT4 and config.method == Int4Method.GPTQ:
            passes.append(lambda src, dst: _quantize_gptq(src, dst, full.chosen, config, reference))
        elif config.mode == QuantMode.INT4:
            passes.append(lambda src, dst: _quantize_nbits(src, dst, nodes, config, bits=4))
        else:
            passes.append(lambda src, dst: _quantize_int8(src, dst, nodes, config, reference, samples, opset))
    if full.weight_int8:
        nodes8 = [mm.node for mm in full.weight_int8]
        passes.append(lambda src, dst: _quantize_nbits(src, dst, nodes8, config, bits=8))
    if config.embedding_dtype:
        passes.append(_embedding_to_float16)
    stage = model_path
    for index, run_pass in enumerate(passes):
        target = out / (MODEL_FILE if index == len(passes) - 1 else f".stage{index}.onnx")
        run_pass(stage, target)
        _remove_model(stage, keep=model_path)
        stage = target


def _embedding_name(model_path: Path) -> str:
    import onnx

    casts = [n for n in onnx.load(str(model_path), load_external_data=False).graph.node
             if n.op_type == "Cast" and n.name.endswith("/cast_to_float32")]
    return casts[0].output[0]


def _embedding_to_float16(source: Path, target: Path) -> None:
    """Store the token-embedding table (the float initializer a Gather reads rows of) as float16 + a Cast node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    name = embedding_table(model)
    if name is None:
        raise UserInputError("embedding_dtype: no float token-embedding table (Gather of an initializer) found")
    table = next(t for t in model.graph.initializer if t.name == name)
    half = numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), name=f"{name}.float16")
    model.graph.initializer.remove(table)
    model.graph.initializer.append(half)
    model.graph.node.insert(0, helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT,
                                                name=f"{name}/cast_to_float32"))
    onnx.save_model(model, str(target), save_as_external_data=is_large(source), all_tensors_to_one_file=True,
                    location=f"{target.name}.data")


def _remove_model(path: Path, keep: Path) -> None:
    """Delete an intermediate graph (and its external data) unless it is the untouched source."""
    if path == keep:
        return
    for item in path.parent.glob(path.name + "*"):
        item.unlink()


def _manifest(source: Path, model_path: Path, out: Path, config: QuantConfig, full: QuantPlan, snr: float) -> dict:
    return {
        "command": sys.argv,
        "config": config.to_dict(),
        "source": {"directory": str(source.resolve()), "model_sha256": sha256_file(model_path)},
        "quantized_matmuls": len(full.chosen),
        "quantized_by_role": count_roles(full.chosen),
        "weight_int8_matmuls": len(full.weight_int8),
        "weight_int8_by_role": count_roles(full.weight_int8),
        "unquantized": full.skipped,
        "unquantized_count": len(full.skipped),
        "size_bytes": {"source": _directory_bytes(source), "quantized": _directory_bytes(out)},
        "logits_snr_db": round(snr, 3),
        "snr_floor_db": config.floor,
        "calibration": {"source": config.calib, "samples": config.calib_samples, "seqlen": config.calib_seqlen,
                        "seed": config.seed},
        "versions": runtime_versions(),
    }
