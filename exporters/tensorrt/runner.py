"""``TrtCausalLM``: a TensorRT engine of the causal-LM graph contract, run with torch CUDA buffers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from slice2deploy.utils import Slice2DeployError, UserInputError

from .config import EngineBuildError, EngineMismatchError
from .engine import _cuda_device
from .sidecar import check_engine_compatibility, current_device, read_sidecar, require_tensorrt


class TrtCausalLM:
    """A TensorRT engine of the causal-LM graph contract: ``forward`` with the KV cache on the GPU, greedy ``generate``.

    Loading checks the sidecar against this machine first (:func:`check_engine_compatibility`). Buffers are torch
    CUDA tensors; TensorRT reads and writes them through ``set_tensor_address`` and runs on a torch stream with
    ``execute_async_v3`` (the name-based API of TensorRT 10 and 11).
    """

    def __init__(self, engine_path: str | Path, device_index: int = 0, allow_other_gpu_model: bool = False):
        import torch

        trt = self._module()
        self.engine_path = Path(engine_path).expanduser()
        self.sidecar = read_sidecar(self.engine_path)
        self._check(device_index, allow_other_gpu_model)
        self.device = torch.device("cuda", device_index)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with _cuda_device(device_index):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if self.engine is None:
                raise EngineMismatchError(f"TensorRT could not deserialize {self.engine_path} (see its log above)")
            self.context = self._context(trt)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        past = [n for n in self.input_names if n.startswith("past_key_values.")]
        self.num_layers = len(past) // 2
        shape = self.sidecar["shapes"][past[0]]["min"]
        self.kv_heads, self.head_dim = shape[1], shape[3]
        self.stream = torch.cuda.Stream(self.device)
        self._scratch = torch.empty(1, dtype=torch.float32, device=self.device)  # address for zero-size tensors

    def _module(self):
        """The TensorRT Python module this runner drives (TensorRT-RTX's runner overrides it)."""
        return require_tensorrt()

    def _check(self, device_index: int, allow_other_gpu_model: bool) -> None:
        check_engine_compatibility(self.sidecar, current_device(device_index), allow_other_gpu_model)

    def _context(self, trt):
        return self.engine.create_execution_context()

    def empty_past(self, batch: int) -> list[tuple]:
        import torch

        dtype = self.dtypes["past_key_values.0.key"]
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [(torch.empty(shape, dtype=dtype, device=self.device),) * 2 for _ in range(self.num_layers)]

    def _check_shapes(self, feeds: dict) -> None:
        for name, tensor in feeds.items():
            limits = self.sidecar["shapes"].get(name)
            if limits and not all(lo <= d <= hi for d, lo, hi in zip(tensor.shape, limits["min"], limits["max"],
                                                                      strict=True)):
                raise UserInputError(f"{name} has shape {tuple(tensor.shape)}, outside the engine's profile "
                                     f"{limits['min']}..{limits['max']} ({self.sidecar['profile']['name']}); "
                                     "rebuild with a larger profile")

    def _feeds(self, input_ids, attention_mask, position_ids, past) -> dict:
        import torch

        ids = torch.as_tensor(input_ids, device=self.device).long()
        ids = ids[None] if ids.dim() == 1 else ids
        past = self.empty_past(ids.shape[0]) if past is None else past
        past_length = past[0][0].shape[2]
        if attention_mask is None:
            attention_mask = torch.ones((ids.shape[0], past_length + ids.shape[1]), dtype=torch.long,
                                        device=self.device)
        mask = torch.as_tensor(attention_mask, device=self.device).long()
        if position_ids is None:
            position_ids = (mask.cumsum(1) - 1).clamp(min=0)[:, past_length:]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": torch.as_tensor(position_ids).to(ids)}
        for index, (key, value) in enumerate(past):
            feeds[f"past_key_values.{index}.key"], feeds[f"past_key_values.{index}.value"] = key, value
        return {name: value.to(self.dtypes[name]).contiguous() for name, value in feeds.items()}

    def _address(self, tensor) -> int:
        return tensor.data_ptr() if tensor.numel() else self._scratch.data_ptr()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past=None) -> tuple:
        """Logits (batch, sequence, vocab) and the updated cache [(key, value) per layer], torch tensors on the GPU."""
        import torch

        feeds = self._feeds(input_ids, attention_mask, position_ids, past)
        self._check_shapes(feeds)
        for name, tensor in feeds.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name in self.output_names:  # shapes follow from the input shapes once all are set
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name],
                                        device=self.device)
            self.context.set_tensor_address(name, self._address(outputs[name]))
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs were written on the current stream
        with _cuda_device(self.device.index):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise Slice2DeployError("TensorRT failed to enqueue the engine (see its log above)")
        self.stream.synchronize()
        presents = [(outputs[f"present.{i}.key"], outputs[f"present.{i}.value"]) for i in range(self.num_layers)]
        return outputs["logits"], presents

    __call__ = forward

    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int | Sequence[int] | None = None) -> np.ndarray:
        """Greedy continuation: one prefill, then one decode step per token with the cache; returns prompt + new."""
        import torch

        if max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = torch.as_tensor(np.atleast_2d(np.asarray(input_ids, dtype=np.int64)), device=self.device)
        eos = torch.as_tensor(np.atleast_1d(np.asarray([] if eos_token_id is None else eos_token_id, dtype=np.int64)),
                              device=self.device)
        mask = torch.ones_like(ids)
        logits, past = self.forward(ids, mask)
        tokens, done = [ids], torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
        for step in range(max_new_tokens):
            next_token = logits[:, -1].float().argmax(-1, keepdim=True)  # (B, 1)
            if eos.numel():
                next_token = torch.where(done[:, None], eos[0], next_token)  # finished rows repeat the first EOS
                done |= torch.isin(next_token[:, 0], eos)
            tokens.append(next_token)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(next_token)], dim=1)
            logits, past = self.forward(next_token, mask, past=past)
        return torch.cat(tokens, dim=1).cpu().numpy()


def _torch_dtype(trt, dtype):
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    if hasattr(trt, "int64"):  # INT64 I/O exists from TensorRT 10.0
        table[trt.int64] = torch.int64
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise EngineBuildError(f"engine tensor type {dtype} has no torch equivalent here")
    return table[dtype]

