"""Measuring one variant: machine description, memory bandwidth, prefill latency, decode throughput, peak memory.

:func:`measure_variant` runs in a fresh process (``python -m benchmarks.suite.measure SPEC.json OUT.json``,
started by :func:`measure_in_subprocess`) so that its peak RSS belongs to that variant alone.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from slice2deploy.runners import Runner, open_runner
from slice2deploy.utils import Slice2DeployError, UserInputError, atomic_write_text, peak_rss_mb

TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# -- machine ---------------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_name(device: str) -> str | None:
    import torch

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(torch.device(device))


def machine(device: str = "cpu") -> dict[str, Any]:
    """CPU model, usable cores, host memory, GPU model (when ``device`` is CUDA) and a one-line device name."""
    import torch

    gpu = gpu_name(device)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"cpu": cpu_name(), "cores": usable_cores(), "torch_threads": torch.get_num_threads(),
            "memory_gib": None if memory is None else round(memory, 1), "gpu": gpu, "platform": platform.platform(),
            "device_name": gpu or f"{cpu_name()} ({usable_cores()} cores)"}


def machine_record(device: str = "cpu") -> dict[str, Any]:
    """The machine record of the one-off benchmark scripts: :func:`machine` plus :func:`library_versions`."""
    return {**machine(device), **library_versions()}


def library_versions() -> dict[str, str]:
    """slice2deploy, torch, transformers, python, and onnx / onnxruntime(-genai) / tensorrt where installed."""
    from importlib import metadata

    from slice2deploy.checkpoint import versions

    found = versions()
    for name in ("onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "tensorrt", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def memory_bandwidth(device: str = "cpu", mib: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Measured copy bandwidth: read + write bytes per second of a ``mib`` MiB tensor copy (torch, all threads).

    The reference for "fraction of memory bandwidth" of decoding; measured on this machine, never assumed.
    """
    import torch

    target = torch.device(device)
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=target)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):  # the first copy faults the pages in: warm-up
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    moved = 2 * src.numel() * 4
    rates = [moved / t / 1e9 for t in times[1:]]
    return {"gb_s": round(statistics.median(rates), 2), "best_gb_s": round(max(rates), 2), "method":
            f"torch copy_ of {mib} MiB float32 on {device}, read+write bytes, median of {repeats}", "device": device}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


# -- timing ----------------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any], warmup: int, repeats: int, device: str) -> list[float]:
    """Wall times in ms of ``repeats`` calls after ``warmup`` untimed ones (device synchronized around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def summary(times_ms: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(times_ms), 3), "min_ms": round(min(times_ms), 3),
            "max_ms": round(max(times_ms), 3), "repeats": len(times_ms)}


# -- backends --------------------------------------------------------------------------------------------------------
def make_runner(backend: str, artifact: str, precision: str, device: str) -> Runner:
    """``artifact`` on ``backend`` through the core's runner registry (PyTorch at ``precision``'s dtype)."""
    return open_runner(artifact, backend=backend, dtype=TORCH_DTYPES.get(precision, "float32"), device=device)


def _next_tokens(logits: Any) -> np.ndarray:
    last = logits[:, -1]
    if hasattr(last, "detach"):  # torch
        last = last.float().argmax(-1).cpu().numpy()
    else:
        last = np.asarray(last).argmax(-1)
    return last.astype(np.int64)[:, None]  # (B, 1)


def prompt_tokens(tokenizer: Any, data: str, length: int) -> np.ndarray:
    """The first ``length`` ids of the evaluation text (repeated if the text is shorter): real prose, not noise."""
    from slice2deploy.data import load_text, token_stream

    ids = token_stream(tokenizer, load_text(data, "evaluation")).numpy()
    if ids.size == 0:
        raise UserInputError(f"the evaluation text of {data!r} has no tokens")
    return np.resize(ids, length).astype(np.int64)


def measure_prefill(runner: Runner, tokens: np.ndarray, length: int, settings: dict, device: str) -> dict:
    """Time to first token at batch 1: one forward over ``length`` prompt tokens and the greedy choice."""
    ids = tokens[None, :length]
    times = timed(lambda: _next_tokens(runner.forward(ids, None)[0]), settings["warmup"], settings["repeats"], device)
    return {"batch": 1, "prompt_tokens": length, **summary(times)}


def measure_decode(runner: Runner, tokens: np.ndarray, batch: int, settings: dict, device: str) -> dict:
    """Greedy decode tokens/s at ``batch``: ``decode_tokens`` steps with the cache after an (untimed) prefill."""
    prompt = np.stack([np.roll(tokens[: settings["decode_prompt"]], row) for row in range(batch)])
    steps = settings["decode_tokens"]
    times = []
    for run in range(settings["warmup"] + settings["repeats"]):
        logits, past = runner.forward(prompt, None)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            logits, past = runner.forward(_next_tokens(logits), past)
        _next_tokens(logits)
        sync(device)
        if run >= settings["warmup"]:
            times.append((time.perf_counter() - start) * 1000.0)
    stats = summary([t / steps for t in times])  # per decode step
    return {"batch": batch, "prompt_tokens": settings["decode_prompt"], "new_tokens": steps, **stats,
            "tok_s": round(batch * 1000.0 / stats["median_ms"], 3)}


def gpu_peak_mb(backend: str, device: str) -> float | None:
    """torch's peak allocation for PyTorch; this process's NVML memory (ORT/TensorRT arenas keep their peak)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if backend == "pytorch":
        return round(torch.cuda.max_memory_allocated(torch.device(device)) / 2**20, 1)
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(int(device.partition(":")[2] or 0))
    used = [p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid == os.getpid()]
    return round(used[0] / 2**20, 1) if used and used[0] else None


def measure_variant(spec: dict) -> dict:
    """Every timing and memory figure of one variant (``spec``: backend, artifact, precision, device, data,
    settings); runs in its own process."""
    import torch

    settings, device = spec["settings"], spec["device"]
    if settings.get("threads"):
        torch.set_num_threads(int(settings["threads"]))
    runner = make_runner(spec["backend"], spec["artifact"], spec["precision"], device)
    needed = max([*settings["prompt_lengths"], settings["decode_prompt"]])
    tokens = prompt_tokens(runner.tokenizer, spec["data"], needed)
    prefill = [measure_prefill(runner, tokens, n, settings, device) for n in settings["prompt_lengths"]]
    decode = [measure_decode(runner, tokens, b, settings, device) for b in settings["decode_batches"]]
    return {"prefill": prefill, "decode": decode, "weight_bytes": runner.weight_bytes,
            "size_bytes": runner.size_bytes, "parameters": runner.parameters,
            "peak_rss_mb": peak_rss_mb(),
            "gpu_peak_mb": gpu_peak_mb(spec["backend"], device)}


def measure_in_subprocess(spec: dict, work: Path, timeout: float | None = None) -> dict:
    """:func:`measure_variant` in a fresh Python process; its stderr is shown on failure."""
    spec_file, out_file = work / "measure_spec.json", work / "measure_result.json"
    atomic_write_text(spec_file, json.dumps(spec, indent=1))
    command = [sys.executable, "-m", "benchmarks.suite.measure", str(spec_file), str(out_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise Slice2DeployError(f"measuring {spec['variant']} failed (exit {done.returncode}):\n"
                                f"{done.stderr[-4000:]}")
    result = json.loads(out_file.read_text())
    spec_file.unlink()
    out_file.unlink()
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m benchmarks.suite.measure SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    atomic_write_text(args[1], json.dumps(measure_variant(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
