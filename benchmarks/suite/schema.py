"""The benchmark record schema (JSON Schema, draft 2020-12 subset) and a dependency-free validator for it.

One record per measured variant (model x backend x device x precision). Numbers that could not be measured are
``null`` and ``status`` says why (``rejected``: a quality gate refused the artifact, or GenAI refused the model;
``reason`` says which).
"""

from __future__ import annotations

from typing import Any

SCHEMA_VERSION = 1
_NUM = {"type": ["number", "null"], "minimum": 0}
_INT = {"type": ["integer", "null"], "minimum": 0}
_POINT = {
    "type": "object",
    "required": ["batch", "prompt_tokens", "median_ms", "min_ms", "max_ms", "repeats"],
    "properties": {"batch": {"type": "integer", "minimum": 1}, "prompt_tokens": {"type": "integer", "minimum": 1},
                   "new_tokens": {"type": "integer", "minimum": 1}, "median_ms": _NUM, "min_ms": _NUM,
                   "max_ms": _NUM, "tok_s": _NUM, "repeats": {"type": "integer", "minimum": 1}},
    "additionalProperties": False,
}

RECORD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "slice2deploy benchmark record",
    "type": "object",
    "required": ["schema_version", "run_id", "date", "variant", "model", "backend", "device", "precision", "sparsity",
                 "status", "prefill_ms", "decode_tok_s", "peak_rss_mb", "size_mb", "perplexity", "machine",
                 "versions"],
    "properties": {
        "schema_version": {"type": "integer", "enum": [SCHEMA_VERSION]},
        "run_id": {"type": "string"},  # ratios are only taken between records of one run_id
        "date": {"type": "string"},
        "recipe": {"type": ["string", "null"]},
        "profile": {"type": ["string", "null"]},
        "variant": {"type": "string"},
        "model": {"type": "string"},
        "backend": {"type": "string", "enum": ["pytorch", "onnxruntime", "tensorrt", "onnxruntime-genai"]},
        "device": {"type": "string"},
        "precision": {"type": "string",
                      "enum": ["fp32", "fp16", "bf16", "int8", "int8-dynamic", "int8-static", "int4"]},
        "sparsity": {"type": "number", "minimum": 0, "maximum": 1},
        "status": {"type": "string", "enum": ["ok", "rejected"]},
        "reason": {"type": ["string", "null"]},
        "prefill_ms": _NUM,
        "prefill_tokens": _INT,
        "prefill": {"type": "array", "items": _POINT},
        "decode_tok_s": _NUM,
        "decode": {"type": "array", "items": _POINT},
        "peak_rss_mb": _NUM,
        "gpu_peak_mb": _NUM,
        "size_mb": _NUM,
        "parameters": _INT,
        "perplexity": _NUM,
        "eval_tokens": _INT,
        "weight_bytes": _INT,
        "decode_weight_gb_s": _NUM,
        "memory_bandwidth_gb_s": _NUM,
        "bandwidth_fraction": _NUM,
        "machine": {"type": "object", "required": ["cpu", "cores", "device_name"]},
        "versions": {"type": "object"},
    },
    "additionalProperties": False,
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _type_ok(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def _errors(value: Any, schema: dict, where: str) -> list[str]:
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if kinds and not any(_type_ok(value, k) for k in kinds):
        return [f"{where}: expected {' or '.join(kinds)}, got {type(value).__name__} {value!r}"]
    out: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if _type_ok(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            out.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            out.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        out += [f"{where}: missing required field {k!r}" for k in schema.get("required", []) if k not in value]
        props = schema.get("properties", {})
        for key, item in value.items():
            if key in props:
                out += _errors(item, props[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                out.append(f"{where}: unexpected field {key!r}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            out += _errors(item, schema["items"], f"{where}[{index}]")
    return out


def validate_record(record: dict, schema: dict | None = None) -> list[str]:
    """Every way ``record`` breaks the schema (empty when it is valid)."""
    return _errors(record, RECORD_SCHEMA if schema is None else schema, "record")


def check_records(records: list[dict]) -> None:
    """Raise ``ValueError`` listing the problems of every invalid record."""
    problems = [f"{r.get('variant', i)}: {e}" for i, r in enumerate(records) for e in validate_record(r)]
    if problems:
        raise ValueError("benchmark records do not match the schema:\n" + "\n".join(problems))
