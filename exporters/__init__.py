"""Exporters from slice2deploy models to inference runtimes (ONNX, ONNX Runtime, TensorRT).

Heavy backends are imported lazily by each exporter module, never by ``import slice2deploy``.
"""
