"""Published model configurations, GPU datasheet specs, weight formats and known engines.

The tools look up a target's model and GPU here. Model and GPU numbers come from the
published sources named above their tables, and nothing here is measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a dense decoder-only transformer, with field names as in its config.json."""

    model_id: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Qwen2 has biases on the q, k and v projections, Llama and Mistral have none.
    attention_bias: bool
    # Total parameters of the published safetensors checkpoint.
    parameter_count: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class GpuSpec:
    """One GPU's memory and dense tensor-core peaks, per GPU."""

    name: str
    architecture: str
    # Decimal gigabytes (1e9 bytes), as the datasheet states capacity.
    memory_gb: float
    memory_bandwidth_tb_s: float
    bf16_tflops: float
    # None on GPUs without FP8 tensor cores (Ampere and older).
    fp8_tflops: float | None

    @property
    def supports_fp8(self) -> bool:
        return self.fp8_tflops is not None


@dataclass(frozen=True)
class WeightFormat:
    """Storage width of a weight format and the tensor-core peak its matmuls run at."""

    name: str
    # Storage per weight, including per-group scales and zero points.
    bits_per_weight: float
    # True for W8A8 FP8, whose matmuls need FP8 tensor cores. Weight-only formats
    # dequantize to 16 bits inside the kernel and run at the BF16 peak.
    uses_fp8_tensor_cores: bool
    description: str


def _model(
    model_id: str,
    layers: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    max_positions: int,
    tied: bool,
    bias: bool,
    parameters: int,
) -> ModelSpec:
    return ModelSpec(
        model_id, layers, hidden, heads, kv_heads, intermediate, vocab, max_positions, tied, bias, parameters
    )


# Source: each model's config.json on the Hugging Face Hub (num_hidden_layers, hidden_size,
# num_attention_heads, num_key_value_heads, intermediate_size, vocab_size,
# max_position_embeddings, tie_word_embeddings), and the parameter count of its safetensors
# checkpoint. The counts equal the sum of the tensor shapes these configs imply, which a unit
# test checks.
# Columns: layers, hidden, heads, kv_heads, intermediate, vocab, max_positions, tied, bias, parameters.
MODELS: Final[dict[str, ModelSpec]] = {
    spec.model_id: spec
    for spec in (
        _model("meta-llama/Llama-3.2-1B-Instruct", 16, 2048, 32, 8, 8192, 128256, 131072, True, False, 1_235_814_400),
        _model("meta-llama/Llama-3.2-3B-Instruct", 28, 3072, 24, 8, 8192, 128256, 131072, True, False, 3_212_749_824),
        _model("meta-llama/Llama-3.1-8B-Instruct", 32, 4096, 32, 8, 14336, 128256, 131072, False, False, 8_030_261_248),
        _model(
            "meta-llama/Llama-3.1-70B-Instruct", 80, 8192, 64, 8, 28672, 128256, 131072, False, False, 70_553_706_496
        ),
        _model(
            "meta-llama/Llama-3.3-70B-Instruct", 80, 8192, 64, 8, 28672, 128256, 131072, False, False, 70_553_706_496
        ),
        _model("mistralai/Mistral-7B-Instruct-v0.3", 32, 4096, 32, 8, 14336, 32768, 32768, False, False, 7_248_023_552),
        _model("Qwen/Qwen2.5-0.5B-Instruct", 24, 896, 14, 2, 4864, 151936, 32768, True, True, 494_032_768),
        _model("Qwen/Qwen2.5-1.5B-Instruct", 28, 1536, 12, 2, 8960, 151936, 32768, True, True, 1_543_714_304),
        _model("Qwen/Qwen2.5-3B-Instruct", 36, 2048, 16, 2, 11008, 151936, 32768, True, True, 3_085_938_688),
        _model("Qwen/Qwen2.5-7B-Instruct", 28, 3584, 28, 4, 18944, 152064, 32768, False, True, 7_615_616_512),
        _model("Qwen/Qwen2.5-14B-Instruct", 48, 5120, 40, 8, 13824, 152064, 32768, False, True, 14_770_033_664),
        _model("Qwen/Qwen2.5-32B-Instruct", 64, 5120, 40, 8, 27648, 152064, 32768, False, True, 32_763_876_352),
        _model("Qwen/Qwen2.5-72B-Instruct", 80, 8192, 64, 8, 29568, 152064, 32768, False, True, 72_706_203_648),
    )
}


# Source: NVIDIA datasheets, dense tensor-core peaks (without sparsity): H100 Tensor Core GPU
# (SXM5 and PCIe columns), H200 Tensor Core GPU (SXM), A100 Tensor Core GPU (80GB SXM, 40GB
# SXM), L40S, L4 and A10. FP16 and BF16 peaks are equal on all of these GPUs.
GPUS: Final[dict[str, GpuSpec]] = {
    spec.name: spec
    for spec in (
        GpuSpec("H100-SXM", "Hopper", 80.0, 3.35, 989.0, 1979.0),
        GpuSpec("H100-PCIe", "Hopper", 80.0, 2.0, 756.0, 1513.0),
        GpuSpec("H200", "Hopper", 141.0, 4.8, 989.0, 1979.0),
        GpuSpec("A100-80GB", "Ampere", 80.0, 2.039, 312.0, None),
        GpuSpec("A100-40GB", "Ampere", 40.0, 1.555, 312.0, None),
        GpuSpec("L40S", "Ada Lovelace", 48.0, 0.864, 362.05, 733.0),
        GpuSpec("L4", "Ada Lovelace", 24.0, 0.3, 121.0, 242.5),
        GpuSpec("A10", "Ampere", 24.0, 0.6, 125.0, None),
    )
}


# Bits per weight for the group-quantized formats assume AWQ's default group size of 128,
# with one FP16 scale and one zero point (of the weight's own width) per group.
WEIGHT_FORMATS: Final[dict[str, WeightFormat]] = {
    spec.name: spec
    for spec in (
        WeightFormat("bf16", 16.0, False, "16-bit bfloat16 weights, the unquantized baseline"),
        WeightFormat("fp16", 16.0, False, "16-bit IEEE half-precision weights"),
        WeightFormat("fp8", 8.0, True, "FP8 E4M3 weights and activations (W8A8) with per-tensor scales"),
        WeightFormat("int8-awq", 8.0 + 24 / 128, False, "8-bit weight-only (W8A16), groups of 128"),
        WeightFormat("int4-awq", 4.0 + 20 / 128, False, "4-bit weight-only AWQ (W4A16), groups of 128"),
    )
}

ENGINES: Final[tuple[str, ...]] = ("vllm", "tensorrt-llm", "sglang")
