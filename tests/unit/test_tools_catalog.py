"""Catalog data: model shapes against published parameter counts, GPU specs, registered tools."""

import pytest

from iiq.experiments import registry
from tools import l0_hardware_profiling, l2_quantization, l5_batching  # noqa: F401  (registers the tools)
from tools.catalog import ENGINES, GPUS, MODELS, WEIGHT_FORMATS
from tools.roofline import parameter_split

TOOL_IDS = ("L0", "L2", "L5")


@pytest.mark.parametrize("model_id", sorted(MODELS))
def test_model_shapes_match_parameter_count(model_id: str) -> None:
    model = MODELS[model_id]
    split = parameter_split(model)

    assert split.linear + split.unquantized == model.parameter_count


def test_model_head_dim_is_128_for_llama_8b() -> None:
    assert MODELS["meta-llama/Llama-3.1-8B-Instruct"].head_dim == 128


def test_gpu_fp8_support_by_architecture() -> None:
    for gpu in GPUS.values():
        expected = gpu.architecture in ("Hopper", "Ada Lovelace")
        assert gpu.supports_fp8 is expected, gpu.name


def test_gpu_datasheet_numbers() -> None:
    h100 = GPUS["H100-SXM"]
    h100_numbers = (h100.memory_gb, h100.memory_bandwidth_tb_s, h100.bf16_tflops, h100.fp8_tflops)
    assert h100_numbers == (80.0, 3.35, 989.0, 1979.0)

    h200 = GPUS["H200"]
    assert (h200.memory_gb, h200.memory_bandwidth_tb_s) == (141.0, 4.8)

    a100 = GPUS["A100-80GB"]
    assert (a100.bf16_tflops, a100.fp8_tflops) == (312.0, None)

    l4 = GPUS["L4"]
    assert (l4.memory_gb, l4.memory_bandwidth_tb_s, l4.bf16_tflops, l4.fp8_tflops) == (24.0, 0.3, 121.0, 242.5)


def test_weight_formats_and_engines() -> None:
    assert set(WEIGHT_FORMATS) >= {"bf16", "fp8", "int8-awq", "int4-awq"}
    assert ENGINES == ("vllm", "tensorrt-llm", "sglang")


@pytest.mark.parametrize("tool_id", TOOL_IDS)
def test_registered_example_is_valid(tool_id: str) -> None:
    handler = registry.get_handler(tool_id)
    assert handler is not None

    errors = handler.validate({**handler.example_input_config, "target": dict(handler.example_target)})

    assert errors == []


def test_registered_names_and_gpu_use() -> None:
    handlers = {tool_id: registry.get_handler(tool_id) for tool_id in TOOL_IDS}
    assert None not in handlers.values()

    names = {tool_id: handler.name for tool_id, handler in handlers.items() if handler}
    uses_gpu = {tool_id: handler.uses_gpu for tool_id, handler in handlers.items() if handler}

    assert names == {"L0": "L0 Hardware Profiling", "L2": "L2 Quantization", "L5": "L5 Batching"}
    assert uses_gpu == {"L0": False, "L2": True, "L5": True}
