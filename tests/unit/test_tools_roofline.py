"""Roofline sanity checks against numbers that can be worked out by hand."""

import pytest

from tools import roofline
from tools.catalog import GPUS, MODELS, WEIGHT_FORMATS

LLAMA_8B = MODELS["meta-llama/Llama-3.1-8B-Instruct"]
LLAMA_70B = MODELS["meta-llama/Llama-3.1-70B-Instruct"]
H100 = GPUS["H100-SXM"]
L4 = GPUS["L4"]
BF16 = WEIGHT_FORMATS["bf16"]
FP8 = WEIGHT_FORMATS["fp8"]
INT4 = WEIGHT_FORMATS["int4-awq"]


def _estimate(model=LLAMA_8B, gpu=H100, weight_format=BF16, batch_size=1, gpu_count=1, prompt=512, output=256):
    return roofline.estimate(
        model,
        gpu,
        weight_format,
        batch_size=batch_size,
        prompt_tokens=prompt,
        output_tokens=output,
        gpu_count=gpu_count,
    )


def test_weight_bytes_llama_8b_bf16() -> None:
    # 8,030,261,248 parameters at 2 bytes each.
    assert roofline.weight_bytes(LLAMA_8B, BF16) == 2 * 8_030_261_248


def test_weight_bytes_fp8_halves_linear_weights() -> None:
    unquantized_bytes = roofline.parameter_split(LLAMA_8B).unquantized * 2

    bf16_linear = roofline.weight_bytes(LLAMA_8B, BF16) - unquantized_bytes
    fp8_linear = roofline.weight_bytes(LLAMA_8B, FP8) - unquantized_bytes

    assert fp8_linear == bf16_linear / 2


def test_weight_bytes_fp8_total_ratio() -> None:
    # Embeddings and LM head stay at 16 bits, so the whole model shrinks by a bit less than half.
    ratio = roofline.weight_bytes(LLAMA_8B, FP8) / roofline.weight_bytes(LLAMA_8B, BF16)

    assert 0.5 < ratio < 0.6


def test_weight_bytes_order_by_format() -> None:
    int4, fp8, bf16 = (roofline.weight_bytes(LLAMA_8B, weight_format) for weight_format in (INT4, FP8, BF16))

    assert int4 < fp8 < bf16


def test_kv_cache_bytes_per_token_llama_8b() -> None:
    # 2 (K and V) * 32 layers * 8 KV heads * 128 head_dim * 2 bytes.
    assert roofline.kv_cache_bytes_per_token(LLAMA_8B) == 131_072


def test_memory_needed_adds_kv_cache() -> None:
    needed = roofline.memory_needed_bytes(LLAMA_8B, BF16, batch_size=4, tokens_per_sequence=1000)

    assert needed == roofline.weight_bytes(LLAMA_8B, BF16) + 4 * 1000 * 131_072


def test_70b_bf16_fit_by_gpu_count() -> None:
    assert _estimate(model=LLAMA_70B, gpu_count=1).fits is False
    assert _estimate(model=LLAMA_70B, gpu_count=2).fits is True
    assert _estimate(model=LLAMA_70B, gpu_count=4).fits is True


def test_70b_bf16_weights_about_141_gb() -> None:
    assert _estimate(model=LLAMA_70B).weight_gb == pytest.approx(141.1, abs=0.1)


def test_throughput_rises_with_batch_until_memory() -> None:
    # 8B in BF16 on one L4: 21.6 GB usable, 16.06 GB of weights, 0.1 GB of KV cache per sequence.
    estimates = [_estimate(gpu=L4, batch_size=batch_size) for batch_size in (1, 8, 32, 64, 128)]
    throughputs = [estimate.throughput_tokens_per_s for estimate in estimates]

    assert throughputs == sorted(throughputs)
    assert len(set(throughputs)) == len(throughputs)
    assert [estimate.fits for estimate in estimates] == [True, True, True, False, False]


def test_decode_memory_bound_at_batch_1() -> None:
    estimate = _estimate(batch_size=1)

    assert estimate.decode_bound == "memory-bandwidth"


def test_decode_compute_bound_at_large_batch() -> None:
    estimate = _estimate(batch_size=1024, prompt=16, output=16)

    assert estimate.decode_bound == "compute"


def test_decode_step_batch_1_by_hand() -> None:
    # Batch 1 reads every weight but the untied embedding table, plus the KV cache at the mean context.
    streamed = roofline.weight_bytes(LLAMA_8B, BF16) - roofline.parameter_split(LLAMA_8B).embedding * 2
    kv = 640 * 131_072
    expected_ms = (streamed + kv) / (3.35e12 * roofline.MEMORY_BANDWIDTH_EFFICIENCY) * 1e3

    assert _estimate().time_per_output_token_ms == pytest.approx(expected_ms, rel=1e-5)


def test_two_gpus_halve_decode_step() -> None:
    one_gpu, _ = roofline.decode_step_seconds(LLAMA_8B, H100, 1, BF16, 8, 640)
    two_gpus, _ = roofline.decode_step_seconds(LLAMA_8B, H100, 2, BF16, 8, 640)

    assert two_gpus == pytest.approx(one_gpu / 2)


def test_fp8_prefill_faster_on_hopper() -> None:
    bf16 = roofline.prefill_seconds(LLAMA_8B, H100, 1, BF16, 8, 2048)
    fp8 = roofline.prefill_seconds(LLAMA_8B, H100, 1, FP8, 8, 2048)

    assert fp8 == pytest.approx(bf16 / 2, rel=0.01)


def test_usable_memory_fraction() -> None:
    assert roofline.usable_memory_bytes(H100, 2) == 2 * 80e9 * 0.9


def test_estimate_to_dict_rounds_floats() -> None:
    values = _estimate().to_dict()

    assert values["fits"] is True
    assert values["decode_bound"] == "memory-bandwidth"
    assert values["weight_gb"] == 16.0605


def test_round_significant() -> None:
    assert roofline.round_significant(0.0340401234) == 0.0340401
    assert roofline.round_significant(8159.150812) == 8159.15
