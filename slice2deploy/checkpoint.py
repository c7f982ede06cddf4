"""Sliced checkpoints: Hugging Face model directories that load with or without slice2deploy."""

from __future__ import annotations

import json
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from . import modeling
from .modeling import SlicedForCausalLM
from .utils import atomic_directory, sha256_file

REMOTE_CODE_FILE = "modeling_slice2deploy.py"
MANIFEST_FILE = "slice2deploy_manifest.json"


def versions() -> dict[str, str]:
    from . import __version__

    return {
        "slice2deploy": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def save_sliced(model, tokenizer, out_dir: str | Path, manifest: dict, overwrite: bool = False) -> Path:
    """Write ``model`` (safetensors + config), the tokenizer and a manifest, atomically.

    A per-layer ``SlicedForCausalLM`` also gets its remote code; a uniform-mode model is a standard
    checkpoint of its source family and needs none.
    """
    custom = isinstance(model, SlicedForCausalLM)
    if custom:
        model.config.auto_map = {
            "AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.SlicedConfig",
            "AutoModelForCausalLM": f"{REMOTE_CODE_FILE[:-3]}.SlicedForCausalLM",
        }
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if custom:
            shutil.copyfile(modeling.__file__, tmp / REMOTE_CODE_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        record = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv,
            "versions": versions(),
            **manifest,
            "files_sha256": files,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return Path(out_dir)


def read_manifest(directory: str | Path) -> dict | None:
    path = Path(directory) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None
