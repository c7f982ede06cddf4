"""Benchmark suite: profiles, per-variant measurement in a fresh process, the record schema, report and plots.

Heavy imports (onnxruntime, matplotlib, TensorRT) happen inside the functions that need them.
"""
