"""ONNX Runtime runner for exported causal LMs: forward with the KV cache, generation, perplexity.

Providers are explicit: ``cpu``, or ``cuda[:N]`` only when ONNX Runtime really runs the session on the GPU.
ONNX Runtime silently falls back to the CPU when the CUDA provider cannot start; a benchmark would then time
the CPU under a GPU label, so that case is an error here.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from slice2deploy.evaluate import PerplexityResult, windowed_perplexity
from slice2deploy.runners import context_length, position_ids_from_mask
from slice2deploy.utils import UserInputError

from .decode_graph import DECODE_FILE, SharedKVCache, decode_step

MODEL_FILE = "model.onnx"  # the export directory layout, shared with exporters.onnx
DECODE_MIN_CAPACITY = 256  # rows of a decode cache made from a prefill's (doubled whenever it fills)
MANIFEST_FILE = "slice2deploy_onnx_manifest.json"
EXPORT_HINT = "create one with `slice2deploy export onnx MODEL -o DIR`"
INSTALL_HINT = "pip install 'slice2deploy[onnx]' (or 'slice2deploy[gpu]' for CUDA)"
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class GraphOptimization(str, Enum):
    DISABLE = "disable"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"


def _ort():
    try:
        import onnxruntime
    except ImportError as error:
        raise UserInputError(f"ONNX Runtime is not installed: {INSTALL_HINT}") from error
    return onnxruntime


def require_onnx() -> None:
    """Fail early, with an install hint, when the onnx extra is missing."""
    _ort()
    try:
        import onnx  # noqa: F401
    except ImportError as error:
        raise UserInputError(f"the onnx package is not installed: {INSTALL_HINT}") from error


def runtime_versions() -> dict[str, str]:
    """slice2deploy's library versions plus onnx and onnxruntime."""
    import onnx

    from slice2deploy.checkpoint import versions

    return {**versions(), "onnx": onnx.__version__, "onnxruntime": _ort().__version__}


def check_onnx_dir(directory: str | Path) -> Path:
    """The ``model.onnx`` of an export directory, after checking that it and its external data exist."""
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise UserInputError(f"{path} is not a directory; give an ONNX export directory ({EXPORT_HINT})")
    model = path / MODEL_FILE
    if not model.is_file():
        raise UserInputError(f"{path} holds no {MODEL_FILE}, so it is not an ONNX export; {EXPORT_HINT}")
    missing = [name for name in graph_summary(model)["external_data"] if not (path / name).is_file()]
    if missing:
        raise UserInputError(f"{model} keeps its weights in external data file(s) {', '.join(missing)}, missing from "
                             f"{path}; copy the whole export directory, or export again")
    return model


def all_nodes(graph) -> Iterator:
    """Every node of ``graph``, those of its subgraphs (If branches, loop bodies) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from all_nodes(subgraph)


def graph_summary(model_path: str | Path) -> dict:
    """Op-type counts (subgraphs included), initializer elements and external data files of a graph, without
    loading its weights."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as error:  # protobuf raises its own DecodeError; anything here means an unreadable file
        raise UserInputError(f"{model_path} is not a readable ONNX model: {error}") from error
    external = set()
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            external.update(e.value for e in tensor.external_data if e.key == "location")
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}"
                  for n in all_nodes(model.graph))
    return {
        "ops": dict(sorted(ops.items())),
        "nodes": sum(ops.values()),
        "parameters": sum(math.prod(t.dims) for t in model.graph.initializer),
        "external_data": sorted(external),
    }


def session_options(optimization: GraphOptimization | str = GraphOptimization.ALL,
                    optimized_model_filepath: str | Path | None = None, threads: int | None = None):
    """Session options; ``optimized_model_filepath`` saves the graph as optimized (to see what fused)."""
    ort = _ort()
    level = GraphOptimization(optimization)
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        GraphOptimization.DISABLE: ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        GraphOptimization.BASIC: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        GraphOptimization.EXTENDED: ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        GraphOptimization.ALL: ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    if optimized_model_filepath is not None:
        target = Path(optimized_model_filepath)
        options.optimized_model_filepath = str(target)
        # Big graphs cannot be saved as one protobuf: put the weights next to it.
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         target.name + ".data")
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def parse_provider(provider: str) -> tuple[str, int]:
    """``cpu`` / ``cuda`` / ``cuda:N`` -> (kind, device id)."""
    kind, _, index = provider.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise UserInputError(f"unknown ONNX Runtime device {provider!r}; use cpu or cuda[:N]")
    return kind, int(index or 0)


def create_session(model_path: str | Path, provider: str = "cpu", options=None):
    """An InferenceSession on exactly the asked provider; CUDA that is missing or fell back to CPU is an error."""
    ort = _ort()
    kind, device_id = parse_provider(provider)
    if kind == "cpu":
        return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise UserInputError(f"CUDA was asked for but this onnxruntime build has no CUDAExecutionProvider "
                             f"(available: {', '.join(available)}); install onnxruntime-gpu "
                             "(pip install 'slice2deploy[gpu]') or use the cpu device")
    # CPU stays in the list on purpose: ORT places the few ops CUDA lacks (shape arithmetic) there.
    providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(model_path), options, providers=providers)
    if session.get_providers()[0] != "CUDAExecutionProvider":
        raise UserInputError(f"CUDA was asked for but ONNX Runtime fell back to CPU (session providers: "
                             f"{', '.join(session.get_providers())}): no usable GPU, or the CUDA/cuDNN libraries "
                             "onnxruntime-gpu needs are missing; refusing to run on the CPU under a CUDA label")
    return session


class OrtCausalLM:
    """An exported causal LM in ONNX Runtime: ``forward`` with the KV cache, ``generate``, ``perplexity``."""

    def __init__(self, directory: str | Path, provider: str = "cpu",
                 optimization: GraphOptimization | str = GraphOptimization.ALL,
                 optimized_model_filepath: str | Path | None = None, threads: int | None = None,
                 decode_graph: bool = True):
        self.directory = Path(directory).expanduser()
        self.model_path = check_onnx_dir(self.directory)
        options = session_options(optimization, optimized_model_filepath, threads)
        self.session = create_session(self.model_path, provider, options)
        # decode.onnx (exporters.decode_graph): one-token steps with GroupQueryAttention over a shared cache. CPU only:
        # the CUDA kernel of the op wants float16/bfloat16 and its own cache layout checks.
        decode = self.directory / DECODE_FILE
        self.decode_session = None
        if decode_graph and provider == "cpu" and decode.is_file() and optimized_model_filepath is None:
            self.decode_session = create_session(decode, provider, session_options(optimization, None, threads))
        self.provider = provider
        self.device, self.device_id = parse_provider(provider)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past or "logits" not in self.output_names:
            raise UserInputError(f"{self.model_path} does not follow slice2deploy's causal-LM contract (inputs "
                                 f"input_ids/attention_mask/position_ids/past_key_values.*, outputs logits/present.*)")
        self.num_layers = len(past) // 2
        self.kv_heads, self.head_dim = int(past[0].shape[1]), int(past[0].shape[3])
        self.kv_dtype = ORT_DTYPES[past[0].type]
        # a generation graph (export with last_logits): logits (batch, 1, vocab) whatever the sequence length
        self.last_logits_only = self.session.get_outputs()[self.output_names.index("logits")].shape[1] == 1

    # -- metadata -------------------------------------------------------------------------------------------------
    def _json(self, name: str) -> dict:
        path = self.directory / name
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def config(self) -> dict:
        """The source model's config.json (a plain dict)."""
        return self._json("config.json")

    @property
    def manifest(self) -> dict:
        return self._json(MANIFEST_FILE)

    @property
    def dtype(self) -> str:
        return "float16" if self.kv_dtype == np.float16 else "float32"

    @property
    def parameters(self) -> int:
        """Initializer elements of the graph (weights stored once; shared transposes are nodes, not tensors)."""
        return graph_summary(self.model_path)["parameters"]

    @property
    def context_length(self) -> int | None:
        return context_length(self.config)

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.directory)
        except (OSError, ValueError) as error:
            raise UserInputError(f"{self.directory} has no usable tokenizer ({error}); export it from a model "
                                 "directory that has one") from error

    def eos_token_ids(self) -> list[int]:
        eos = self._json("generation_config.json").get("eos_token_id", self.config.get("eos_token_id"))
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    # -- running --------------------------------------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Past of length 0 (a prefill)."""
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [(np.zeros(shape, self.kv_dtype), np.zeros(shape, self.kv_dtype)) for _ in range(self.num_layers)]

    def _run(self, feeds: dict) -> list:
        """Numpy arrays on CPU; OrtValues left on the GPU under CUDA (IO binding: no host copies of the cache)."""
        ort = _ort()
        if self.device == "cpu":
            if not hasattr(ort.OrtValue, "__dlpack__"):  # older runtimes: outputs copied into new numpy arrays
                return self.session.run(self.output_names, feeds)
            # The outputs stay in the buffers ONNX Runtime wrote them to, seen as numpy arrays through DLPack (via
            # torch: numpy's own import is read-only). `session.run` copies them instead: for a 512-token SmolLM2
            # prefill that is a fresh 100 MB logits array, ~35 ms of an ~800 ms call.
            values = {name: value if isinstance(value, ort.OrtValue) else
                      ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value)) for name, value in feeds.items()}
            return [torch.from_dlpack(value).numpy()
                    for value in self.session.run_with_ort_values(self.output_names, values)]
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", self.device_id)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _feeds(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, position_ids: np.ndarray | None,
               past: Sequence[tuple] | None) -> dict:
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2:
            raise UserInputError(f"input_ids must be (batch, sequence), got shape {input_ids.shape}")
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        past_length = _shape(past[0][0])[2]
        if attention_mask is None:
            attention_mask = np.ones((input_ids.shape[0], past_length + input_ids.shape[1]), dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask, past_length)
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "position_ids": np.asarray(position_ids, dtype=np.int64)}
        for index, (key, value) in enumerate(past):
            feeds[f"past_key_values.{index}.key"], feeds[f"past_key_values.{index}.value"] = key, value
        return feeds

    @staticmethod
    def _split(outputs: list) -> tuple:
        return outputs[0], list(zip(outputs[1::2], outputs[2::2], strict=True))

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
                position_ids: np.ndarray | None = None, past: Sequence[tuple[np.ndarray, np.ndarray]] | None = None
                ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Logits (batch, sequence, vocab) and the updated cache [(key, value) per layer], as numpy arrays.

        ``attention_mask`` covers past + new tokens (default all ones); ``position_ids`` default to the count of
        real tokens before each one; ``past`` defaults to an empty cache. A one-token step with a cache and neither
        mask nor positions runs the decode graph when the directory has one: the cache it returns is then a
        :class:`~exporters.decode_graph.SharedKVCache`, which indexes like the list.
        """
        if (self.decode_session is not None and past is not None and attention_mask is None and position_ids is None
                and np.shape(input_ids)[1] == 1):
            if not isinstance(past, SharedKVCache):
                length = _shape(past[0][0])[2]
                past = SharedKVCache.from_past(past, max(DECODE_MIN_CAPACITY, 2 * length))
            return decode_step(self.decode_session, np.asarray(input_ids), past)
        outputs = self._run(self._feeds(input_ids, attention_mask, position_ids, past))
        if self.device != "cpu":
            outputs = [value.numpy() for value in outputs]
        return self._split(outputs)

    __call__ = forward

    def run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Feed graph inputs by name, get every graph output by name (the parity gate's interface)."""
        outputs = self._run(inputs)
        if self.device != "cpu":
            outputs = [value.numpy() for value in outputs]
        return dict(zip(self.output_names, outputs, strict=True))

    # -- generation -----------------------------------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int, attention_mask: np.ndarray | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
        """Prompt + continuation (batch, prompt + new), greedy or sampled, with the KV cache.

        Rows that produced an EOS token are padded with ``pad_token_id`` (default: the first EOS id) until every row
        has finished or ``max_new_tokens`` were generated. ``attention_mask`` allows a left-padded batch.
        """
        _check_sampling(max_new_tokens, do_sample, temperature, top_k)
        ids = np.asarray(input_ids, dtype=np.int64)
        ids = ids[None] if ids.ndim == 1 else ids
        mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        eos = np.asarray([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
        pad = pad_token_id if pad_token_id is not None else int(eos[0]) if eos.size else 0
        rng = np.random.default_rng(seed)
        finished = np.zeros(ids.shape[0], dtype=bool)
        positions = position_ids_from_mask(mask)
        # unpadded rows may take the decode graph (no mask; positions = cached lengths)
        decode = self.decode_session is not None and bool(mask.all())
        step, past, generated = ids, None, [ids]
        for _ in range(max_new_tokens):
            if decode and past is not None:
                logits, past = self.forward(step, past=past)
            else:
                logits, past = self._split(self._run(self._feeds(step, mask, positions, past)))
            last = (logits.numpy() if self.device != "cpu" else logits)[:, -1].astype(np.float32)
            chosen = _sample(last, rng, temperature, top_k) if do_sample else last.argmax(-1)
            chosen = np.where(finished, pad, chosen)
            finished |= np.isin(chosen, eos)
            generated.append(chosen[:, None])
            if finished.all():
                break
            step = chosen[:, None]
            mask = np.concatenate([mask, np.ones_like(step)], axis=1)
            positions = positions[:, -1:] + 1
        return np.concatenate(generated, axis=1)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def perplexity(self, token_ids, seqlen: int = 512, batch_size: int = 4, max_tokens: int | None = None,
                   progress: bool = False) -> PerplexityResult:
        """Perplexity over the same windows as :func:`slice2deploy.evaluate.perplexity` (same loss, float32)."""
        if self.last_logits_only:
            raise UserInputError(f"{self.directory} is a generation graph (exported with last_logits: logits of the "
                                 "last position only); perplexity needs every position: evaluate a full export")
        token_ids = torch.as_tensor(np.asarray(token_ids), dtype=torch.long)

        def logits(ids: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(self.forward(ids.numpy())[0])

        return windowed_perplexity(logits, token_ids, seqlen, batch_size, max_tokens, progress,
                                   desc="perplexity (onnxruntime)")


def _shape(value) -> tuple[int, ...]:
    """Shape of a numpy array or an OrtValue (whose ``shape`` is a method)."""
    return tuple(value.shape() if callable(value.shape) else value.shape)


def _check_sampling(max_new_tokens: int, do_sample: bool, temperature: float, top_k: int) -> None:
    if max_new_tokens < 1:
        raise UserInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and not temperature > 0:
        raise UserInputError(f"temperature must be > 0 when sampling, got {temperature}")
    if top_k < 0:
        raise UserInputError(f"top_k must be >= 0 (0: no top-k filter), got {top_k}")


def _sample(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int) -> np.ndarray:
    """One token per row from softmax(logits / temperature), restricted to the top_k largest when top_k > 0."""
    scores = logits.astype(np.float64) / temperature  # (B, V)
    if 0 < top_k < scores.shape[-1]:
        kth = np.partition(scores, -top_k, axis=-1)[:, -top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    draws = rng.random((scores.shape[0], 1))
    return np.minimum((probs.cumsum(-1) < draws).sum(-1), scores.shape[-1] - 1)


def fused_ops_report(path: str | Path, optimization: GraphOptimization | str = GraphOptimization.ALL,
                     provider: str = "cpu") -> dict:
    """Op-type counts of an exported graph before and after ONNX Runtime's session-level optimizations.

    ``path``: an export directory or a .onnx file. ``fused`` lists op types that only exist after optimization
    (e.g. SimplifiedLayerNormalization, FusedMatMul), ``removed`` the op counts that went away.
    """
    source = Path(path)
    model_path = check_onnx_dir(source) if source.is_dir() else source
    if not model_path.is_file():
        raise UserInputError(f"no ONNX model at {model_path}")
    before = graph_summary(model_path)
    with tempfile.TemporaryDirectory(prefix="slice2deploy-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        options = session_options(optimization, optimized)
        options.log_severity_level = 3  # ORT warns that an ALL-level graph is hardware specific: known, not news
        create_session(model_path, provider, options)
        after = graph_summary(optimized)
    return {
        "model": str(model_path),
        "optimization": GraphOptimization(optimization).value,
        "provider": provider,
        "nodes_before": before["nodes"],
        "nodes_after": after["nodes"],
        "before": before["ops"],
        "after": after["ops"],
        "fused": {op: n for op, n in after["ops"].items() if op not in before["ops"]},
        "removed": {op: n - after["ops"].get(op, 0) for op, n in before["ops"].items() if n > after["ops"].get(op, 0)},
    }
