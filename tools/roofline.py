"""Roofline estimates of LLM prefill and decode on one or more GPUs.

Each phase takes max(bytes moved / memory bandwidth, FLOPs / tensor-core peak), with both
peaks scaled by an achievable-fraction factor. Units are bytes, FLOPs and seconds unless a
name says otherwise (``_gb`` is 1e9 bytes, ``_ms`` milliseconds).

The result is an estimate, and `ASSUMPTIONS` lists its simplifications for reports. A batch
is prefilled together and then decoded together, and the decode step is evaluated at the
mean context length. Activations are not counted in memory, and tensor parallelism over
``gpu_count`` GPUs is ideal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

from tools.catalog import GpuSpec, ModelSpec, WeightFormat

BYTES_PER_GB: Final = 1e9

# Achievable fractions of the datasheet peaks. These are estimates, in the range that
# well-tuned inference kernels typically reach, not measurements.
MEMORY_BANDWIDTH_EFFICIENCY: Final = 0.8
COMPUTE_EFFICIENCY: Final = 0.6

# Fraction of GPU memory available for weights and KV cache. 0.9 is vLLM's default
# gpu_memory_utilization; the rest covers the CUDA context and activations.
USABLE_MEMORY_FRACTION: Final = 0.9

# The KV cache stays in BF16 for every weight format, which is the engines' default unless
# an FP8 KV cache is requested explicitly.
KV_CACHE_BYTES_PER_ELEMENT: Final = 2

# Embeddings, the LM head, norms and biases stay at 16 bits in every weight format.
_UNQUANTIZED_BYTES_PER_PARAMETER: Final = 2

ASSUMPTIONS: Final[dict[str, Any]] = {
    "memory_bandwidth_efficiency": MEMORY_BANDWIDTH_EFFICIENCY,
    "compute_efficiency": COMPUTE_EFFICIENCY,
    "usable_memory_fraction": USABLE_MEMORY_FRACTION,
    "kv_cache_bytes_per_element": KV_CACHE_BYTES_PER_ELEMENT,
    "unquantized_parameters": "embeddings, LM head, norms and biases stay at 16 bits",
    "phase_time": "max(bytes / (bandwidth * efficiency), FLOPs / (peak * efficiency))",
    "compute_peak": "FP8 peak for all FLOPs of fp8 (W8A8), attention included; BF16 peak for every other format",
    "batching": "static: the whole batch is prefilled, then decoded for output_tokens steps",
    "decode_context": "each decode step is evaluated at prompt_tokens + output_tokens / 2",
    "memory_needed": "weights + KV cache for batch_size * (prompt_tokens + output_tokens) tokens",
    "tensor_parallelism": "ideal: bandwidth, FLOPs and memory scale with gpu_count, no all-reduce cost",
    "gb": "1e9 bytes",
}


@dataclass(frozen=True)
class ParameterSplit:
    """A model's parameters by whether quantization stores them narrower."""

    # q, k, v, o and MLP projection weights of every layer.
    linear: int
    # Token embeddings, LM head (when not tied to the embeddings), norms and biases.
    unquantized: int
    # Token embedding table, which decode reads only one row of per sequence.
    embedding: int


@dataclass(frozen=True)
class Estimate:
    """Roofline numbers for one configuration, where throughput counts output tokens only."""

    weight_gb: float
    kv_cache_gb: float
    memory_needed_gb: float
    memory_usable_gb: float
    fits: bool
    time_to_first_token_ms: float
    time_per_output_token_ms: float
    decode_bound: str
    throughput_tokens_per_s: float
    throughput_tokens_per_s_per_gpu: float
    gpu_hours_per_million_tokens: float

    def to_dict(self) -> dict[str, Any]:
        """Return the fields, floats rounded to 6 significant digits for reports."""
        values = asdict(self)
        return {key: round_significant(value) if isinstance(value, float) else value for key, value in values.items()}


def round_significant(value: float, digits: int = 6) -> float:
    """Round `value` to `digits` significant digits, which keeps small and large numbers readable."""
    return float(f"{value:.{digits}g}")


def parameter_split(model: ModelSpec) -> ParameterSplit:
    """Count parameters from the config's shapes; the total equals `ModelSpec.parameter_count`."""
    hidden = model.hidden_size
    q_dim = model.num_attention_heads * model.head_dim
    kv_dim = model.num_key_value_heads * model.head_dim

    attention = hidden * q_dim + 2 * hidden * kv_dim + q_dim * hidden
    mlp = 3 * hidden * model.intermediate_size
    linear = model.num_hidden_layers * (attention + mlp)

    biases = model.num_hidden_layers * (q_dim + 2 * kv_dim) if model.attention_bias else 0
    norms = model.num_hidden_layers * 2 * hidden + hidden
    embedding = model.vocab_size * hidden
    lm_head = 0 if model.tie_word_embeddings else embedding
    return ParameterSplit(linear=linear, unquantized=embedding + lm_head + norms + biases, embedding=embedding)


def weight_bytes(model: ModelSpec, weight_format: WeightFormat) -> float:
    """Return the bytes that all weights take in `weight_format`."""
    split = parameter_split(model)
    return split.linear * weight_format.bits_per_weight / 8 + split.unquantized * _UNQUANTIZED_BYTES_PER_PARAMETER


def kv_cache_bytes_per_token(model: ModelSpec) -> int:
    """Return 2 (K and V) * layers * kv_heads * head_dim * bytes per element."""
    return 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim * KV_CACHE_BYTES_PER_ELEMENT


def memory_needed_bytes(
    model: ModelSpec, weight_format: WeightFormat, batch_size: int, tokens_per_sequence: int
) -> float:
    """Return weight bytes plus the KV cache of `batch_size` sequences at full length."""
    return weight_bytes(model, weight_format) + batch_size * tokens_per_sequence * kv_cache_bytes_per_token(model)


def usable_memory_bytes(gpu: GpuSpec, gpu_count: int) -> float:
    """Return the memory that `gpu_count` GPUs leave for weights and KV cache."""
    return gpu.memory_gb * BYTES_PER_GB * gpu_count * USABLE_MEMORY_FRACTION


def _phase_seconds(
    bytes_moved: float, flops: float, gpu: GpuSpec, gpu_count: int, weight_format: WeightFormat
) -> tuple[float, str]:
    # Without FP8 tensor cores, FP8 weights run as weight-only W8A16 at the BF16 peak. The
    # tools reject that combination in validation, but the estimate stays defined.
    peak_tflops = gpu.bf16_tflops
    if weight_format.uses_fp8_tensor_cores and gpu.fp8_tflops is not None:
        peak_tflops = gpu.fp8_tflops
    memory_seconds = bytes_moved / (gpu.memory_bandwidth_tb_s * 1e12 * gpu_count * MEMORY_BANDWIDTH_EFFICIENCY)
    compute_seconds = flops / (peak_tflops * 1e12 * gpu_count * COMPUTE_EFFICIENCY)
    if memory_seconds >= compute_seconds:
        return memory_seconds, "memory-bandwidth"
    return compute_seconds, "compute"


def _streamed_weight_bytes(model: ModelSpec, weight_format: WeightFormat) -> float:
    # An untied embedding table is read one row per token, not in full, so a forward pass
    # streams every weight except it.
    split = parameter_split(model)
    skipped = 0 if model.tie_word_embeddings else split.embedding * _UNQUANTIZED_BYTES_PER_PARAMETER
    return weight_bytes(model, weight_format) - skipped


def _attention_flops_per_token(model: ModelSpec, context_tokens: float) -> float:
    # Q.K^T and scores.V: two multiply-adds per query element per cached token, in every layer.
    return 4 * model.num_hidden_layers * model.num_attention_heads * model.head_dim * context_tokens


def decode_step_seconds(
    model: ModelSpec, gpu: GpuSpec, gpu_count: int, weight_format: WeightFormat, batch_size: int, context_tokens: float
) -> tuple[float, str]:
    """Return the time of one decode step for `batch_size` sequences and what bounds it.

    The step reads the weights once and the KV cache of every sequence, and spends
    2 FLOPs per matmul weight (LM head included) plus attention per sequence.
    """
    split = parameter_split(model)
    matmul_parameters = split.linear + model.vocab_size * model.hidden_size
    kv_cache_bytes = batch_size * context_tokens * kv_cache_bytes_per_token(model)
    bytes_moved = _streamed_weight_bytes(model, weight_format) + kv_cache_bytes
    flops = batch_size * (2 * matmul_parameters + _attention_flops_per_token(model, context_tokens))
    return _phase_seconds(bytes_moved, flops, gpu, gpu_count, weight_format)


def prefill_seconds(
    model: ModelSpec, gpu: GpuSpec, gpu_count: int, weight_format: WeightFormat, batch_size: int, prompt_tokens: int
) -> float:
    """Return the time to prefill `batch_size` prompts together, which is the time to first token.

    Causal attention averages prompt_tokens / 2 keys per query, and logits are computed for
    the last prompt token only.
    """
    split = parameter_split(model)
    lm_head_flops = 2 * model.vocab_size * model.hidden_size
    per_sequence_flops = (
        prompt_tokens * (2 * split.linear + _attention_flops_per_token(model, prompt_tokens / 2)) + lm_head_flops
    )
    kv_cache_bytes = batch_size * prompt_tokens * kv_cache_bytes_per_token(model)
    bytes_moved = _streamed_weight_bytes(model, weight_format) + kv_cache_bytes
    seconds, _ = _phase_seconds(bytes_moved, batch_size * per_sequence_flops, gpu, gpu_count, weight_format)
    return seconds


def estimate(
    model: ModelSpec,
    gpu: GpuSpec,
    weight_format: WeightFormat,
    *,
    batch_size: int,
    prompt_tokens: int,
    output_tokens: int,
    gpu_count: int = 1,
) -> Estimate:
    """Estimate memory, latency and output throughput of one batch on `gpu_count` GPUs."""
    needed = memory_needed_bytes(model, weight_format, batch_size, prompt_tokens + output_tokens)
    usable = usable_memory_bytes(gpu, gpu_count)
    prefill = prefill_seconds(model, gpu, gpu_count, weight_format, batch_size, prompt_tokens)
    mean_context = prompt_tokens + output_tokens / 2
    step, bound = decode_step_seconds(model, gpu, gpu_count, weight_format, batch_size, mean_context)

    throughput = batch_size * output_tokens / (prefill + output_tokens * step)
    return Estimate(
        weight_gb=weight_bytes(model, weight_format) / BYTES_PER_GB,
        kv_cache_gb=(needed - weight_bytes(model, weight_format)) / BYTES_PER_GB,
        memory_needed_gb=needed / BYTES_PER_GB,
        memory_usable_gb=usable / BYTES_PER_GB,
        fits=needed <= usable,
        time_to_first_token_ms=prefill * 1e3,
        time_per_output_token_ms=step * 1e3,
        decode_bound=bound,
        throughput_tokens_per_s=throughput,
        throughput_tokens_per_s_per_gpu=throughput / gpu_count,
        gpu_hours_per_million_tokens=gpu_count * 1e6 / (throughput * 3600),
    )
