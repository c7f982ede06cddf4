"""What bounds the sliced/dense prefill ratio on ONNX Runtime CPU: the parts of a prefill, timed one by one.

Slicing narrows the residual stream (hidden size d -> k) and nothing else, so the ratio is pulled above k/d by
every part that keeps its size. Each part is a small ONNX graph at SmolLM2's shapes, timed alternately for d and k
(median over rounds, 2 threads):

- ``layer GEMMs``: q, k, v, o, gate, up, down of one layer at 512 tokens (they scale with k);
- ``head GEMM``: the vocabulary projection, whose (tokens x vocab) float32 output is written whatever k is;
- ``attention``: one ONNX Attention node (9 query / 3 KV heads of 64), full and split into query chunks that skip
  the keys a causal mask hides (the same result; fused exports now write 4 such blocks, exporters/attention.py);
- ``rotary``: rotate-half RoPE as the eager export writes it vs the RotaryEmbedding op (opset 23; fused exports of
  Llama-rotary families now write it).

    python -m benchmarks.prefill_floor
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timezone

import numpy as np

from benchmarks.suite.measure import machine_record
from benchmarks.suite.results import write_results


def _session(nodes: list, inputs: list, outputs: list[str], initializers: list, opset: int = 23):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "part", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              initializers)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    # Many sessions run in turn here: spinning pool threads of the previous one would steal the two cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _input(name: str, shape: tuple):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def gemms(shapes: list[tuple[int, int]], tokens: int, rng) -> tuple:
    """One MatMul per (K, N) with a stored weight; feeds of (tokens, K)."""
    from onnx import helper, numpy_helper

    nodes, inputs, weights, feeds = [], [], [], {}
    for i, (k, n) in enumerate(shapes):
        inputs.append(_input(f"x{i}", (tokens, k)))
        weights.append(numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) * 0.02, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
        feeds[f"x{i}"] = rng.standard_normal((tokens, k), dtype=np.float32)
    return _session(nodes, inputs, [f"y{i}" for i in range(len(shapes))], weights, opset=18), feeds


def attention(heads: int, kv_heads: int, head_dim: int, tokens: int, chunks: int, rng) -> tuple:
    """Causal attention over ``tokens``: query chunk i attends only keys [0, end of chunk i)."""
    from onnx import TensorProto, helper

    shapes = {"Q": (1, heads, tokens, head_dim), "K": (1, kv_heads, tokens, head_dim),
              "V": (1, kv_heads, tokens, head_dim), "M": (1, 1, tokens, tokens)}
    feeds = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes.items()}
    feeds["M"] = np.triu(np.full((tokens, tokens), np.finfo(np.float32).min, np.float32), 1)[None, None]
    nodes, constants, outputs = [], [], []
    step = tokens // chunks
    for i in range(chunks):
        start, end = i * step, (i + 1) * step

        def ints(name: str, values: list[int]) -> str:
            constants.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
            return name

        nodes += [helper.make_node("Slice", ["Q", ints(f"a{i}", [start]), ints(f"b{i}", [end]), ints(f"x{i}", [2])],
                                   [f"q{i}"]),
                  helper.make_node("Slice", ["K", ints(f"z{i}", [0]), f"b{i}", f"x{i}"], [f"k{i}"]),
                  helper.make_node("Slice", ["V", f"z{i}", f"b{i}", f"x{i}"], [f"v{i}"]),
                  helper.make_node("Slice", ["M", ints(f"ma{i}", [start, 0]), ints(f"mb{i}", [end, end]),
                                             ints(f"mx{i}", [2, 3])], [f"m{i}"]),
                  helper.make_node("Attention", [f"q{i}", f"k{i}", f"v{i}", f"m{i}"], [f"y{i}"])]
        outputs.append(f"y{i}")
    nodes.append(helper.make_node("Concat", outputs, ["Y"], axis=2))
    inputs = [_input(name, shape) for name, shape in shapes.items()]
    return _session(nodes, inputs, ["Y"], constants), feeds


def rotary(heads: int, kv_heads: int, head_dim: int, tokens: int, fused: bool, rng) -> tuple:
    """RoPE on q and k: rotate-half with Slice/Neg/Concat/Mul/Add (the eager export), or RotaryEmbedding."""
    from onnx import TensorProto, helper

    half = head_dim // 2
    feeds = {"q": rng.standard_normal((1, heads, tokens, head_dim), dtype=np.float32),
             "k": rng.standard_normal((1, kv_heads, tokens, head_dim), dtype=np.float32)}
    angles = rng.standard_normal((1, tokens, half), dtype=np.float32)
    nodes, constants = [], []
    if fused:
        feeds.update(cos=np.cos(angles), sin=np.sin(angles))
        nodes = [helper.make_node("RotaryEmbedding", [x, "cos", "sin"], [f"{x}_out"]) for x in ("q", "k")]
    else:
        feeds.update(cos=np.concatenate([np.cos(angles)] * 2, -1)[:, None], sin=np.concatenate([np.sin(angles)] * 2,
                                                                                                -1)[:, None])
        constants = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in
                     (("zero", 0), ("half", half), ("end", head_dim), ("last", -1))]
        for x in ("q", "k"):
            nodes += [helper.make_node("Slice", [x, "zero", "half", "last"], [f"{x}1"]),
                      helper.make_node("Slice", [x, "half", "end", "last"], [f"{x}2"]),
                      helper.make_node("Neg", [f"{x}2"], [f"{x}n"]),
                      helper.make_node("Concat", [f"{x}n", f"{x}1"], [f"{x}r"], axis=-1),
                      helper.make_node("Mul", [x, "cos"], [f"{x}c"]), helper.make_node("Mul", [f"{x}r", "sin"],
                                                                                       [f"{x}s"]),
                      helper.make_node("Add", [f"{x}c", f"{x}s"], [f"{x}_out"])]
    inputs = [_input(name, value.shape) for name, value in feeds.items()]
    return _session(nodes, inputs, ["q_out", "k_out"], constants), feeds


def _layer(width: int, heads_width: int, kv_width: int, intermediate: int) -> list[tuple[int, int]]:
    return [(width, heads_width), (width, kv_width), (width, kv_width), (heads_width, width),
            (width, intermediate), (width, intermediate), (intermediate, width)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--kept", type=int, default=432, help="the sliced hidden size (25%% of 576 removed)")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--name", default="prefill_floor_cpu_smollm2")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    heads_width, kv_width = args.heads * args.head_dim, args.kv_heads * args.head_dim
    parts = {}
    for width in (args.hidden, args.kept):
        parts[f"layer GEMMs, d={width}"] = gemms(_layer(width, heads_width, kv_width, args.intermediate),
                                                 args.tokens, rng)
        parts[f"head GEMM, d={width}"] = gemms([(width, args.vocab)], args.tokens, rng)
    chunk_counts = (1, 2, 4)
    for chunks in chunk_counts:  # the same seed: every variant gets the same Q, K, V
        parts[f"attention, {chunks} query chunk(s)"] = attention(args.heads, args.kv_heads, args.head_dim,
                                                                 args.tokens, chunks, np.random.default_rng(1))
    full = parts["attention, 1 query chunk(s)"][0].run(None, parts["attention, 1 query chunk(s)"][1])[0]
    chunk_diffs = {chunks: float(np.abs(session.run(None, feeds)[0] - full).max())
                   for chunks in chunk_counts for session, feeds in [parts[f"attention, {chunks} query chunk(s)"]]}
    for fused in (False, True):
        parts[f"rotary, {'RotaryEmbedding' if fused else 'rotate-half ops'}"] = rotary(
            args.heads, args.kv_heads, args.head_dim, args.tokens, fused, rng)
    for session, feeds in parts.values():  # warm-up
        session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.rounds):
        for name, (session, feeds) in parts.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1000)
    from exporters.ort import runtime_versions

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine_record(),
            "versions": runtime_versions(), "tokens": args.tokens, "rounds": args.rounds,
            "command": "python -m benchmarks.prefill_floor " + " ".join(argv if argv is not None else sys.argv[1:])}
    records = [{"part": name, "ms_per_call": round(statistics.median(values), 3),
                "ms_per_prefill": round(statistics.median(values) * (1 if "head" in name else args.layers), 1),
                **meta} for name, values in times.items()]
    lines = [f"# Parts of a {args.tokens}-token prefill on ONNX Runtime CPU (d = {args.hidden} vs k = {args.kept})\n",
             f"Measured {meta['date']} on {meta['machine']['cpu']} ({meta['machine']['cores']} cores), onnxruntime "
             f"{meta['versions'].get('onnxruntime')}; each part a small graph at SmolLM2's shapes, all parts called "
             f"in turn for {args.rounds} rounds, median; per prefill = x {args.layers} layers (the head: once).  ",
             f"Command: `{meta['command']}`", "", "| part | ms per call | ms per prefill |", "|---|---:|---:|"]
    lines += [f"| {r['part']} | {r['ms_per_call']:.2f} | {r['ms_per_prefill']:.1f} |" for r in records]
    median = {r["part"]: r["ms_per_call"] for r in records}
    ratios = {"layer GEMMs": median[f"layer GEMMs, d={args.kept}"] / median[f"layer GEMMs, d={args.hidden}"],
              "head GEMM": median[f"head GEMM, d={args.kept}"] / median[f"head GEMM, d={args.hidden}"],
              "ideal (k/d)": args.kept / args.hidden}
    lines += ["", "k / d time ratios: " + ", ".join(f"{name} {value:.3f}" for name, value in ratios.items()),
              "", "Chunked attention vs one node, max |diff| of the output: "
              + ", ".join(f"{chunks} chunks {diff:g}" for chunks, diff in chunk_diffs.items())]
    for record in records:
        record["ratios"], record["chunked_attention_max_abs_diff"] = ratios, chunk_diffs
    write_results(args.name, records, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
