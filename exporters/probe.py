"""Read intermediate activations of an exported ONNX model on calibration text (GPTQ's Gram matrices,
SmoothQuant's channel maxima)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

PROBE_FILE = ".activation_probe.onnx"


def probe_activations(model_path: Path, tensors: list[str], feeds: Iterable[dict], scratch: Path,
                      large: bool = False, progress: Callable[[Iterable], Iterable] = lambda x: x
                      ) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{tensor: value}`` for the named tensors, one dict per feed. The graph is re-saved in ``scratch``
    (with external data when ``large``) with the tensors as extra outputs; the copy is deleted afterwards, also
    when the caller stops early."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    model = onnx.load(str(model_path))
    present = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
                              for name in tensors if name not in present)
    probe = scratch / PROBE_FILE
    onnx.save_model(model, str(probe), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{probe.name}.data")
    del model
    try:
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        for feed in progress(list(feeds)):
            yield dict(zip(tensors, session.run(tensors, feed), strict=True))
    finally:
        for item in scratch.glob(probe.name + "*"):
            item.unlink()
