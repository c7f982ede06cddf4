"""Benchmark profiles: what a recipe's ``profile`` key selects (the recipe may override any field)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from slice2deploy.utils import UserInputError

BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "pytorch": ("fp32", "fp16", "bf16"),
    "onnxruntime": ("fp32", "fp16", "int8-dynamic", "int8-static", "int4"),
    "tensorrt": ("fp16", "int8", "int4"),  # exporters.tensorrt.Precision
    # exporters.genai.GenAIPrecision on CPU: the builder's fp16 graphs are for GPUs (GenAIExportConfig refuses them)
    "onnxruntime-genai": ("fp32", "int4"),
}
QUANT_MODES = ("int8-dynamic", "int8-static", "int4")  # ONNX Runtime precisions made by exporters.quantize
# The largest decode batch a backend steps with our own greedy choice, and why (absent: any batch).
MAX_DECODE_BATCH: dict[str, tuple[int, str]] = {
    # onnxruntime-genai 0.18: Generator.append_tokens takes a batch of more than one sequence only once (the prompt);
    # later tokens of such a batch come only from GenAI's own generate_next_token loop, not from our greedy choice
    "onnxruntime-genai": (1, "GenAI appends tokens to a batch of more than one sequence only once"),
}


def decode_batches(batches: list[int], backend: str) -> list[int]:
    """The decode batches of ``batches`` that ``backend`` can step."""
    limit = MAX_DECODE_BATCH.get(backend, (None, ""))[0]
    return [b for b in batches if limit is None or b <= limit]


@dataclass(frozen=True)
class BenchProfile:
    """Timing settings of one benchmark profile.

    ``prompt_lengths``: prefill (time to first token) is timed at each, batch 1; ``prefill_ms`` in the results is
    the one at ``headline_prompt``. ``decode_batches``: decode tokens/s after a ``decode_prompt``-token prompt, for
    ``decode_tokens`` greedy steps. Every point: ``warmup`` untimed runs, then ``repeats`` timed ones (median,
    min, max). ``eval_max_tokens``: perplexity on the first N evaluation tokens (None: the whole split).
    """

    name: str
    device: str
    backends: dict[str, list[str]]
    prompt_lengths: list[int]
    headline_prompt: int
    decode_batches: list[int]
    decode_prompt: int = 32
    decode_tokens: int = 32
    warmup: int = 1
    repeats: int = 3
    eval_max_tokens: int | None = None
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def overridden(self, overrides: dict) -> BenchProfile:
        """This profile with recipe ``bench`` keys replacing its fields (keys already validated)."""
        return replace(self, **overrides)


def cpu_quick() -> BenchProfile:
    # Two CPU cores, <= 15 minutes including slicing, export and quantization of SmolLM2-135M: short prompts, few
    # repeats, perplexity on the first 4096 evaluation tokens.
    return BenchProfile("cpu-quick", device="cpu",
                        backends={"pytorch": ["fp32"], "onnxruntime": ["fp32", "int8-dynamic", "int4"]},
                        prompt_lengths=[128, 512], headline_prompt=512, decode_batches=[1, 4], decode_prompt=32,
                        decode_tokens=32, warmup=1, repeats=3, eval_max_tokens=4096,
                        notes="2 CPU cores, <= 15 minutes end to end")


def rtx() -> BenchProfile:
    # A consumer RTX card (8-32 GB, one user): fp16, batch 1-4, long prompts up to 4096 tokens.
    return BenchProfile("rtx", device="cuda",
                        backends={"pytorch": ["fp16"], "onnxruntime": ["fp16"], "tensorrt": ["fp16"]},
                        prompt_lengths=[512, 2048, 4096], headline_prompt=2048, decode_batches=[1, 2, 4],
                        decode_prompt=128, decode_tokens=64, warmup=2, repeats=10,
                        notes="consumer RTX GPU: fp16, batch 1-4, long prompts")


def datacenter() -> BenchProfile:
    # A100/H100-class GPU, batched serving: fp16 and bf16, decode batches up to 64.
    return BenchProfile("datacenter", device="cuda",
                        backends={"pytorch": ["fp16", "bf16"], "onnxruntime": ["fp16"], "tensorrt": ["fp16"]},
                        prompt_lengths=[512, 2048, 8192], headline_prompt=2048, decode_batches=[1, 8, 32, 64],
                        decode_prompt=128, decode_tokens=64, warmup=2, repeats=10,
                        notes="datacenter GPU: fp16/bf16, batch up to 64")


PROFILES = {"cpu-quick": cpu_quick, "rtx": rtx, "datacenter": datacenter}
PROFILE_KEYS = tuple(f.name for f in fields(BenchProfile) if f.name not in ("name", "notes", "extra"))


def get_profile(name: str) -> BenchProfile:
    if name not in PROFILES:
        raise UserInputError(f"recipe key 'profile': unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]()
