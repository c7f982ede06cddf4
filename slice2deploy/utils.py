"""Small shared helpers: cache location, hashing, atomic outputs, errors."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


class Slice2DeployError(Exception):
    """Base class of every error slice2deploy raises on purpose (the CLI prints these without a traceback)."""


class UserInputError(Slice2DeployError, ValueError):
    """The request cannot be carried out as asked (bad path, bad option, unsupported model)."""


class IntegrityError(Slice2DeployError):
    """A file's content does not match its recorded hash."""


# Optional modules and the extra of pyproject.toml that installs each (top-level import name -> extra).
OPTIONAL_EXTRAS: dict[str, str] = {
    "onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx", "onnx_ir": "onnx",
    "onnxruntime_genai": "genai",
    "matplotlib": "plot",
    "datasets": "eval", "lm_eval": "eval",
    "pynvml": "gpu",
    "peft": "recover",
    "tensorrt_rtx": "tensorrt-rtx",
    "psutil": "dev", "pytest": "dev",
}


def missing_dependency_message(module: str) -> str | None:
    """One line naming the extra that installs ``module`` (a top-level import name), or None if it is not ours."""
    top = module.split(".", 1)[0]
    extra = OPTIONAL_EXTRAS.get(top)
    if extra is None:
        return None
    return f"the Python package '{top}' is not installed; install it with: pip install -e \".[{extra}]\" " \
           f"(or pip install 'slice2deploy[{extra}]')"


def cache_dir() -> Path:
    """Root of slice2deploy's download/conversion cache (``$SLICE2DEPLOY_CACHE`` or ``~/.cache/slice2deploy``)."""
    root = os.environ.get("SLICE2DEPLOY_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slice2deploy"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a non-empty output directory unless ``overwrite``; return the resolved path."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserInputError(f"output directory {out} is not empty; choose another path or pass --overwrite")
    return out


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _ordinary_modes(root: Path) -> None:
    """Give every file the mode of an ordinary new file (0666 & ~umask; 0777 & ~umask if it was executable).

    Libraries that write through ``mkstemp`` (0600) would otherwise leave some outputs private and others not.
    """
    umask = _umask()
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o111
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path``, on error it is removed.

    An interrupted run therefore never leaves a directory at ``path`` that looks complete.
    """
    final = check_output_dir(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary directory
    try:
        yield tmp
        _ordinary_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def peak_rss_mb() -> float:
    """This process's peak resident set size. Linux: VmHWM, which starts afresh at exec (ru_maxrss would carry the
    parent's peak across fork + exec, so every variant would report the pipeline's own peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
