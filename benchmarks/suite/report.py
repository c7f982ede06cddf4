"""Benchmark records from the pipeline's step manifests, and the report: ``results.jsonl``, ``report.md``, plots."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slice2deploy.utils import atomic_write_text

from .schema import SCHEMA_VERSION, check_records

PLOTS = {"latency": "latency_vs_sparsity.png", "pareto": "perplexity_vs_latency.png", "memory": "memory_size.png"}


def _result(manifest: dict) -> dict:
    return manifest.get("result") or {}


def _headline(points: list[dict], field: str, value: int) -> dict | None:
    chosen = [p for p in points if p[field] == value] or points[:1]
    return chosen[0] if chosen else None


def _bandwidth_view(bench: dict, bandwidth_gb_s: float | None) -> dict[str, float | None]:
    """Weights streamed per decode step at the smallest batch: every stored weight is read once per step."""
    decode = sorted(bench.get("decode", []), key=lambda p: p["batch"])
    weight_bytes = bench.get("weight_bytes")
    if not decode or not weight_bytes:
        return {"decode_weight_gb_s": None, "bandwidth_fraction": None}
    achieved = weight_bytes * 1000.0 / decode[0]["median_ms"] / 1e9
    fraction = achieved / bandwidth_gb_s if bandwidth_gb_s else None
    return {"decode_weight_gb_s": round(achieved, 3), "bandwidth_fraction": None if fraction is None else
            round(fraction, 4)}


def build_record(variant: Any, evaluation: dict, bench: dict, machine: dict, meta: dict) -> dict:
    """One schema record for ``variant`` from its eval and bench step results and the machine step."""
    rejected = evaluation.get("status") == "rejected" or bench.get("status") == "rejected"
    prefill = bench.get("prefill", [])
    headline = _headline(prefill, "prompt_tokens", meta["headline_prompt"])
    first_decode = _headline(sorted(bench.get("decode", []), key=lambda p: p["batch"]), "batch", 1)
    bandwidth = machine["bandwidth"]["gb_s"]
    size = bench.get("size_bytes")
    record = {
        "schema_version": SCHEMA_VERSION, "run_id": meta["run_id"], "date": meta["date"], "recipe": meta["recipe"],
        "profile": meta["profile"], "variant": variant.name, "model": variant.model, "backend": variant.backend,
        "device": variant.device, "precision": variant.precision, "sparsity": variant.sparsity,
        "status": "rejected" if rejected else "ok",
        "reason": evaluation.get("reason") or bench.get("reason"),
        "prefill_ms": headline["median_ms"] if headline else None,
        "prefill_tokens": headline["prompt_tokens"] if headline else None, "prefill": prefill,
        "decode_tok_s": first_decode["tok_s"] if first_decode else None, "decode": bench.get("decode", []),
        "peak_rss_mb": bench.get("peak_rss_mb"), "gpu_peak_mb": bench.get("gpu_peak_mb"),
        "size_mb": None if size is None else round(size / 2**20, 2), "parameters": bench.get("parameters"),
        "perplexity": evaluation.get("perplexity"), "eval_tokens": evaluation.get("tokens"),
        "weight_bytes": bench.get("weight_bytes"), "memory_bandwidth_gb_s": bandwidth,
        **_bandwidth_view(bench, bandwidth), "machine": machine["machine"], "versions": machine["versions"],
    }
    return record


def collect_records(recipe: Any, variants: list, upstream: dict[str, dict]) -> list[dict]:
    """Records of every variant, validated against the schema."""
    machine = _result(upstream["machine"])
    meta = {"run_id": f"{recipe.name}-{upstream['machine']['finished']}", "recipe": recipe.name,
            "profile": recipe.profile.name, "headline_prompt": recipe.profile.headline_prompt,
            "date": max(upstream[f"bench-{v.key}"]["finished"] for v in variants)}
    records = [build_record(v, _result(upstream[f"eval-{v.key}"]), _result(upstream[f"bench-{v.key}"]), machine,
                            meta) for v in variants]
    check_records(records)
    return records


# -- markdown --------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if value is None or not base else f"{value / base:.2f}x"


def _baseline(records: list[dict]) -> dict | None:
    return next((r for r in records if r["status"] == "ok"), None)


def summary_table(records: list[dict]) -> str:
    """The main table: quality, size, latency, throughput, memory; ratios against this run's first variant."""
    base = _baseline(records) or {}
    dense = {(r["backend"], r["precision"]): r for r in records if r["sparsity"] == 0 and r["status"] == "ok"}
    prompt = base.get("prefill_tokens")
    lines = [f"| variant | size MB | perplexity | vs dense | prefill {prompt} ms | vs base | decode tok/s (b=1) | "
             "vs base | peak RSS MB | weights GB/s (b=1) | of bandwidth |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | rejected: {r['reason'][:90]} |" + " |" * 9)
            continue
        own = dense.get((r["backend"], r["precision"]), {})
        lines.append(
            f"| {r['variant']} | {_fmt(r['size_mb'])} | {_fmt(r['perplexity'], 2)} | "
            f"{_ratio(r['perplexity'], own.get('perplexity'))} | {_fmt(r['prefill_ms'], 0)} | "
            f"{_ratio(r['prefill_ms'], base.get('prefill_ms'))} | {_fmt(r['decode_tok_s'])} | "
            f"{_ratio(r['decode_tok_s'], base.get('decode_tok_s'))} | {_fmt(r['peak_rss_mb'], 0)} | "
            f"{_fmt(r['decode_weight_gb_s'], 2)} | {_percent(r['bandwidth_fraction'])} |")
    return "\n".join(lines)


def _spread(point: dict) -> str:
    return f"{point['median_ms']:.1f} ({point['min_ms']:.1f}-{point['max_ms']:.1f})"


def detail_tables(records: list[dict]) -> str:
    """Prefill latency at every prompt length and decode throughput at every batch, with min-max spread."""
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return ""
    lengths = sorted({p["prompt_tokens"] for r in ok for p in r["prefill"]})
    batches = sorted({p["batch"] for r in ok for p in r["decode"]})
    lines = ["Prefill (time to first token, batch 1), ms: median (min-max)", "",
             "| variant | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for r in ok:
        cells = {p["prompt_tokens"]: _spread(p) for p in r["prefill"]}
        lines.append(f"| {r['variant']} | " + " | ".join(cells.get(n, "-") for n in lengths) + " |")
    lines += ["", "Decode, tokens/s (ms per step: median (min-max))", "",
              "| variant | " + " | ".join(f"batch {b}" for b in batches) + " |", "|---|" + "---:|" * len(batches)]
    for r in ok:
        cells = {p["batch"]: f"{p['tok_s']:.1f} [{_spread(p)}]" for p in r["decode"]}
        lines.append(f"| {r['variant']} | " + " | ".join(cells.get(b, "-") for b in batches) + " |")
    return "\n".join(lines)


def markdown(recipe: Any, records: list[dict], machine: dict, plots: list[str]) -> str:
    """The whole report.md."""
    info, bandwidth, versions = machine["machine"], machine["bandwidth"], machine["versions"]
    profile = recipe.profile
    library = ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    limit = recipe.eval["max_tokens"]
    scope = "the whole split" if limit is None else f"the first {limit} tokens"
    header = [
        f"# Benchmark report: {recipe.name} (profile {profile.name})", "",
        f"Measured {records[0]['date'] if records else '-'} on {info['device_name']}; CPU {info['cpu']}, "
        f"{info['cores']} usable cores, {info['memory_gib']} GiB RAM{', GPU ' + info['gpu'] if info['gpu'] else ''}. "
        f"Measured memory bandwidth: {bandwidth['gb_s']} GB/s ({bandwidth['method']}).  ",
        f"Libraries: {library}.  ",
        f"Model `{recipe.model}`; evaluation text `{recipe.eval['data']}` (perplexity on {scope}, "
        f"{recipe.eval['seqlen']}-token windows). Prefill = one forward over the prompt at batch 1 plus the greedy "
        f"pick; decode = {profile.decode_tokens} greedy steps with the KV cache after a {profile.decode_prompt}-token "
        f"prompt. {profile.warmup} warm-up run(s), {profile.repeats} timed repeats per point. Each variant is timed "
        "in a fresh process, so its peak RSS is its own. Ratios compare variants of this run only: `vs base` "
        "against the first row, `vs dense` against the dense model on the same backend and precision. Weights "
        "GB/s = stored weight bytes x decode steps/s at batch 1 (every weight is read once per step; the KV cache "
        "and activations are not counted).", ""]
    body = [summary_table(records), "", detail_tables(records), ""]
    notes = [f"- {line}" for line in recipe.skipped]
    if notes:
        body += ["Not measured:", "", *notes, ""]
    body += [f"![{name}]({name})" for name in plots]
    return "\n".join(header + body) + "\n"


# -- plots -----------------------------------------------------------------------------------------------------------
def _series_label(record: dict) -> str:
    return f"{record['backend']} {record['precision']}"


def plot_latency(records: list[dict], path: Path) -> None:
    """Prefill latency and decode time per token against sparsity, one line per backend/precision."""
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(_series_label(r) for r in ok):
        rows = sorted((r for r in ok if _series_label(r) == label), key=lambda r: r["sparsity"])
        xs = [r["sparsity"] for r in rows]
        axes[0].plot(xs, [r["prefill_ms"] for r in rows], marker="o", label=label)
        axes[1].plot(xs, [1000.0 / r["decode_tok_s"] for r in rows], marker="o", label=label)
    prompt = ok[0]["prefill_tokens"] if ok else "?"
    axes[0].set(title=f"Prefill, {prompt}-token prompt (batch 1)", xlabel="sparsity (fraction of hidden size cut)",
                ylabel="time to first token, ms")
    axes[1].set(title="Decode, batch 1", xlabel="sparsity (fraction of hidden size cut)", ylabel="ms per token")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.set_xticks(sorted({r["sparsity"] for r in ok}))
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle("Latency vs sparsity (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower x and lower y are better), sorted by x."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(records: list[dict], path: Path) -> None:
    """Perplexity against decode time per token; the Pareto front joins the variants nothing beats."""
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in records if r["status"] == "ok" and r["perplexity"] and r["decode_tok_s"]]
    fig, ax = plt.subplots(figsize=(8, 5.2))
    markers = dict(zip(dict.fromkeys(r["model"] for r in ok), "osD^v<>", strict=False))
    for label in dict.fromkeys(_series_label(r) for r in ok):
        for r in (r for r in ok if _series_label(r) == label):
            ax.scatter(1000.0 / r["decode_tok_s"], r["perplexity"], marker=markers[r["model"]], s=60,
                       color=f"C{list(dict.fromkeys(_series_label(q) for q in ok)).index(label)}",
                       label=f"{r['model']} {label}")
    front = pareto_front([(1000.0 / r["decode_tok_s"], r["perplexity"]) for r in ok])
    if front:
        ax.plot(*zip(*front, strict=True), color="gray", linestyle="--", linewidth=1, label="Pareto front")
    values = [r["perplexity"] for r in ok]
    wide = bool(values) and max(values) / min(values) > 3  # a log axis only where it helps
    if wide:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set(xlabel="decode ms per token (batch 1)", ylabel="perplexity" + (" (log scale)" if wide else ""),
           title="Quality vs speed (lower-left is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, names: list[str], values: list[float], title: str, color: str) -> None:
    ys = list(range(len(names)))
    ax.barh(ys, values, height=0.6, color=color)
    for y, value in zip(ys, values, strict=True):
        ax.text(value, y, f" {value:,.0f}" if value >= 10 else f" {value:.2f}", va="center", fontsize=8)
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlim(0, max([*values, 1]) * 1.2)
    ax.set(title=title, xlabel="MB (2^20 bytes)")
    ax.grid(alpha=0.3, axis="x")


def plot_memory(records: list[dict], path: Path) -> None:
    """Artifact size on disk and peak RSS of the measuring process, per variant (each on its own scale)."""
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    names = [r["variant"] for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.6 + 0.42 * len(ok)), sharey=True)
    _bars(axes[0], names, [r["size_mb"] or 0 for r in ok], "Artifact size on disk", "C0")
    _bars(axes[1], names, [r["peak_rss_mb"] or 0 for r in ok], "Peak RSS of the timing process", "C1")
    axes[0].invert_yaxis()  # shared y: first variant on top
    fig.suptitle("Size and memory per variant (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(records: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    plot_latency(records, out / PLOTS["latency"])
    plot_pareto(records, out / PLOTS["pareto"])
    plot_memory(records, out / PLOTS["memory"])
    return list(PLOTS.values())


def write_report(recipe: Any, variants: list, upstream: dict[str, dict], out: Path) -> dict:
    """``results.jsonl``, ``report.md`` and the plots of one pipeline run into ``out``; returns a summary."""
    records = collect_records(recipe, variants, upstream)
    atomic_write_text(out / "results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    from .schema import RECORD_SCHEMA

    atomic_write_text(out / "schema.json", json.dumps(RECORD_SCHEMA, indent=1))
    plots = write_plots(records, out)
    atomic_write_text(out / "report.md", markdown(recipe, records, _result(upstream["machine"]), plots))
    return {"records": len(records), "rejected": sum(r["status"] != "ok" for r in records), "plots": plots,
            "written": datetime.now(timezone.utc).isoformat(timespec="seconds")}
