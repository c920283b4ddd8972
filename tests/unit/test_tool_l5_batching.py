"""L5 Batching: validation messages and cost estimates."""

import copy

import pytest

from tools import l5_batching

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm", "gpu_count": 1}


def _config(**changes):
    cfg = {**copy.deepcopy(l5_batching.EXAMPLE_INPUT_CONFIG), "target": dict(TARGET)}
    cfg.update(changes)
    return cfg


def test_validate_example_is_valid() -> None:
    assert l5_batching.validate(_config()) == []


@pytest.mark.parametrize("field", ["batch_sizes", "prompt_tokens", "output_tokens", "weight_format"])
def test_validate_missing_field(field: str) -> None:
    cfg = _config()
    del cfg[field]

    errors = l5_batching.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith(f"{field} is missing")


def test_validate_missing_target() -> None:
    cfg = _config()
    del cfg["target"]

    errors = l5_batching.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith("target is missing")


@pytest.mark.parametrize("field", ["model_id", "hardware", "engine"])
def test_validate_missing_target_field(field: str) -> None:
    cfg = _config()
    del cfg["target"][field]

    errors = l5_batching.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith(f"target.{field} is missing: use one of")


def test_validate_gpu_count_defaults_to_one() -> None:
    cfg = _config()
    del cfg["target"]["gpu_count"]

    assert l5_batching.validate(cfg) == []


def test_validate_unknown_hardware_message() -> None:
    cfg = _config()
    cfg["target"]["hardware"] = "H999"

    errors = l5_batching.validate(cfg)

    expected = (
        "target.hardware 'H999' is not a known GPU: "
        "use one of A10, A100-40GB, A100-80GB, H100-PCIe, H100-SXM, H200, L4, L40S"
    )
    assert errors == [expected]


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("model_id", "meta-llama/Llama-9", "target.model_id 'meta-llama/Llama-9' is not a known model"),
        ("engine", "tgi", "target.engine 'tgi' is not a known engine: use one of sglang, tensorrt-llm, vllm"),
        ("gpu_count", 0, "target.gpu_count 0 is invalid: use an integer from 1 to 16"),
        ("gpu_count", 17, "target.gpu_count 17 is invalid"),
        ("gpu_count", "2", "target.gpu_count '2' is invalid"),
        ("gpu_count", True, "target.gpu_count True is invalid"),
    ],
)
def test_validate_bad_target_value(field: str, value: object, expected: str) -> None:
    cfg = _config()
    cfg["target"][field] = value

    errors = l5_batching.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([], "batch_sizes [] is invalid: use a non-empty list"),
        (8, "batch_sizes 8 is invalid: use a non-empty list"),
        ([1, 0], "batch_sizes[1] 0 is invalid: use an integer from 1 to 4096"),
        ([4097], "batch_sizes[0] 4097 is invalid"),
        ([1, 2.5], "batch_sizes[1] 2.5 is invalid"),
        ([True], "batch_sizes[0] True is invalid"),
        ([8, 8], "batch_sizes contains 8 more than once"),
    ],
)
def test_validate_bad_batch_sizes(value: object, expected: str) -> None:
    errors = l5_batching.validate(_config(batch_sizes=value))

    assert len(errors) == 1
    assert errors[0].startswith(expected)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"prompt_tokens": 0}, "prompt_tokens 0 is invalid: use an integer from 1 to 131071"),
        ({"output_tokens": "256"}, "output_tokens '256' is invalid"),
        ({"prompt_tokens": 131072}, "prompt_tokens 131072 is invalid"),
        (
            {"prompt_tokens": 130000, "output_tokens": 2000},
            "prompt_tokens + output_tokens = 132000 exceeds the 131072-token context of "
            "meta-llama/Llama-3.1-8B-Instruct",
        ),
        ({"weight_format": "int3"}, "weight_format 'int3' is not a known weight format: use one of bf16, fp16, fp8"),
        ({"batch_size": 32}, "unknown field 'batch_size': this tool reads batch_sizes, output_tokens"),
    ],
)
def test_validate_bad_values(changes: dict, expected: str) -> None:
    errors = l5_batching.validate(_config(**changes))

    assert len(errors) == 1
    assert errors[0].startswith(expected)


def test_validate_context_of_mistral() -> None:
    cfg = _config(prompt_tokens=30000, output_tokens=4000)
    cfg["target"]["model_id"] = "mistralai/Mistral-7B-Instruct-v0.3"

    errors = l5_batching.validate(cfg)

    expected = (
        "prompt_tokens + output_tokens = 34000 exceeds the 32768-token context of "
        "mistralai/Mistral-7B-Instruct-v0.3: lower either count"
    )
    assert errors == [expected]


def test_validate_fp8_on_ampere() -> None:
    cfg = _config(weight_format="fp8")
    cfg["target"]["hardware"] = "A100-80GB"

    errors = l5_batching.validate(cfg)

    assert len(errors) == 1
    assert "weight_format 'fp8' is not supported on A100-80GB" in errors[0]
    assert "no FP8 tensor cores" in errors[0]


def test_validate_fp8_on_ada() -> None:
    cfg = _config(weight_format="fp8")
    cfg["target"]["hardware"] = "L4"

    assert l5_batching.validate(cfg) == []


def test_validate_reports_every_problem() -> None:
    cfg = _config(batch_sizes=[0, 8, 8], prompt_tokens=-1, weight_format="fp4")
    cfg["target"] = {**TARGET, "hardware": "H999", "gpu_count": 99}

    errors = l5_batching.validate(cfg)

    assert any(error.startswith("target.hardware 'H999'") for error in errors)
    assert any(error.startswith("target.gpu_count 99") for error in errors)
    assert any(error.startswith("batch_sizes contains 8 more than once") for error in errors)
    assert any(error.startswith("batch_sizes[0] 0") for error in errors)
    assert any(error.startswith("prompt_tokens -1") for error in errors)
    assert any(error.startswith("weight_format 'fp4'") for error in errors)
    assert len(errors) == 6


def test_estimate_cost_example() -> None:
    assert l5_batching.estimate_cost(_config()) == 0.25


def test_estimate_cost_scales_with_gpu_count() -> None:
    cfg = _config(batch_sizes=[1, 2, 3])
    cfg["target"]["gpu_count"] = 4

    assert l5_batching.estimate_cost(cfg) == 0.6


@pytest.mark.parametrize(
    "cfg",
    [
        {},
        {"batch_sizes": "many", "target": "H100"},
        {"batch_sizes": [1, 2], "target": {"gpu_count": -3}},
    ],
)
def test_estimate_cost_invalid_config(cfg: dict) -> None:
    expected = 0.05 * len(cfg["batch_sizes"]) if isinstance(cfg.get("batch_sizes"), list) else 0.0

    assert l5_batching.estimate_cost(cfg) == expected
