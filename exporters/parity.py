"""Parity gate: an exported graph must give PyTorch's outputs on the shapes that deployment uses.

Three cases cover the code paths that differ inside the graph: a prefill with an empty cache (past length 0),
a one-token decode step that reads the prefill's cache, and a batch with left padding (zeros in the attention
mask, positions counted from the first real token). Every output (logits and each present key/value) is
compared on every case; all of them are recorded, and any above its limit raises :class:`ParityError`.

Outputs are compared at every position a consumer reads: a padded position (attention mask 0) is excluded, in
the logits (its query row) and in the presents (its key/value column). What attention computes for a query that
sees only masked keys is a convention, not a result: transformers' eager attention averages every key uniformly,
ONNX ``Attention`` returns zeros; later steps mask those keys, so no output that is read depends on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from slice2deploy.runners import position_ids_from_mask
from slice2deploy.utils import Slice2DeployError

# (inputs by graph input name) -> (outputs by graph output name); one for PyTorch, one for the runtime.
Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

BATCH, PREFILL, LEFT_PADDING = 2, 8, 3


class ParityError(Slice2DeployError):
    """The exported model's outputs differ from PyTorch's beyond the tolerance."""

    def __init__(self, failures: list[dict], report: dict):
        self.failures = failures
        self.report = report
        lines = [f"{f['case']}/{f['output']}: max |Δ| {f['max_abs_diff']:.3g} > limit {f['limit']:.3g}"
                 for f in failures]
        super().__init__(f"ONNX Runtime disagrees with PyTorch on {len(failures)} output(s): " + "; ".join(lines)
                         + ". Loosen atol/rtol only if these are rounding differences (compare a float32 export).")


@dataclass(frozen=True)
class Tolerance:
    """An output passes when ``max |Δ| <= atol + rtol * max |reference|``."""

    atol: float
    rtol: float = 0.0

    def limit(self, reference: np.ndarray) -> float:
        scale = float(np.abs(reference.astype(np.float32)).max()) if reference.size else 0.0
        return self.atol + self.rtol * scale


position_ids = position_ids_from_mask  # positions of the new tokens: real tokens counted from 0, padding at 0


def _inputs(ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    past_length = mask.shape[1] - ids.shape[1]
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask, past_length), **past}


def _as_past(presents: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A run's ``present.*`` outputs renamed as the next run's ``past_key_values.*`` inputs."""
    return {name.replace("present.", "past_key_values.", 1): value
            for name, value in presents.items() if name.startswith("present.")}


def parity_cases(vocab_size: int, empty_past: Callable[[int], dict[str, np.ndarray]],
                 reference: Runner, seed: int = 0, long_step: int = 0) -> list[tuple[str, dict[str, np.ndarray]]]:
    """The three named input sets; the decode case's past is the reference prefill's presents. With ``long_step``,
    a fourth: that many new tokens after the left-padded case (what a chunked-attention graph splits into blocks)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (BATCH, PREFILL), dtype=np.int64)
    ones = np.ones((BATCH, PREFILL), dtype=np.int64)
    prefill = _inputs(ids, ones, empty_past(BATCH))
    past = _as_past(reference(prefill))
    step = rng.integers(0, vocab_size, (BATCH, 1), dtype=np.int64)
    decode = _inputs(step, np.ones((BATCH, PREFILL + 1), dtype=np.int64), past)
    padded_mask = ones.copy()
    padded_mask[0, :LEFT_PADDING] = 0  # row 0 is left-padded, row 1 is full
    padded = _inputs(ids, padded_mask, empty_past(BATCH))
    cases = [("prefill", prefill), ("decode", decode), ("left_padding", padded)]
    if long_step:  # the left-padded batch goes on: its own presents as the past, its mask extended
        long_mask = np.concatenate([padded_mask, np.ones((BATCH, long_step), dtype=np.int64)], axis=1)
        cases.append(("long_step", _inputs(rng.integers(0, vocab_size, (BATCH, long_step), dtype=np.int64),
                                           long_mask, _as_past(reference(padded)))))
    return cases


def _describe(inputs: dict[str, np.ndarray]) -> dict:
    if "input_ids" not in inputs or "attention_mask" not in inputs:
        return {name: list(value.shape) for name, value in inputs.items()}
    batch, sequence = inputs["input_ids"].shape
    return {"batch": batch, "sequence": sequence, "past_sequence": inputs["attention_mask"].shape[1] - sequence,
            "padded_tokens": int((inputs["attention_mask"] == 0).sum())}


SEQUENCE_AXIS = {"logits": 1}  # outputs not listed (the presents) have their sequence on axis 2


def _read_positions(name: str, output: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """``output`` with only its non-padded positions, sequence axis first: (positions, ...)."""
    axis = SEQUENCE_AXIS.get(name.split(".")[0], 2)
    length = output.shape[axis]
    read = attention_mask[:, attention_mask.shape[1] - length:] != 0  # the output's positions are the mask's last
    return np.moveaxis(output, axis, 1)[read]


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            attention_mask: np.ndarray | None = None) -> dict[str, float]:
    """Max |Δ| of every reference output (float32 arithmetic, so float16 outputs do not overflow), at the
    positions ``attention_mask`` marks as real when it is given."""
    diffs = {}
    for name, expected in reference.items():
        actual = candidate[name]
        if actual.shape != expected.shape:
            diffs[name] = float("inf")
            continue
        if attention_mask is not None and expected.ndim >= 3:
            expected, actual = (_read_positions(name, x, attention_mask) for x in (expected, actual))
        if expected.size == 0:
            diffs[name] = 0.0
        else:
            diffs[name] = float(np.abs(actual.astype(np.float32) - expected.astype(np.float32)).max())
    return diffs


def check_parity(reference: Runner, candidate: Runner, cases: list[tuple[str, dict[str, np.ndarray]]],
                 tolerance: Tolerance) -> dict:
    """Run both on every case; return the report, or raise :class:`ParityError` listing every failing output."""
    report: dict = {"tolerance": {"atol": tolerance.atol, "rtol": tolerance.rtol}, "cases": {}}
    failures = []
    for case, inputs in cases:
        expected, actual = reference(inputs), candidate(inputs)
        diffs = compare(expected, actual, inputs.get("attention_mask"))
        limits = {name: tolerance.limit(value) for name, value in expected.items()}
        report["cases"][case] = {"inputs": _describe(inputs), "max_abs_diff": diffs, "limit": limits}
        failures += [{"case": case, "output": name, "max_abs_diff": diff, "limit": limits[name]}
                     for name, diff in diffs.items() if not diff <= limits[name]]  # `not <=` also catches NaN
    report["max_abs_diff"] = max((d for c in report["cases"].values() for d in c["max_abs_diff"].values()),
                                 default=0.0)
    report["passed"] = not failures
    if failures:
        raise ParityError(failures, report)
    return report
