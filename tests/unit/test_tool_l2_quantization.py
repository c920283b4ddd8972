"""L2 Quantization: validation messages and cost estimates."""

import copy

import pytest

from tools import l2_quantization

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm", "gpu_count": 1}


def _config(**changes):
    cfg = {**copy.deepcopy(l2_quantization.EXAMPLE_INPUT_CONFIG), "target": dict(TARGET)}
    cfg.update(changes)
    return cfg


def test_validate_example_is_valid() -> None:
    assert l2_quantization.validate(_config()) == []


@pytest.mark.parametrize("field", ["weight_formats", "batch_size", "prompt_tokens", "output_tokens"])
def test_validate_missing_field(field: str) -> None:
    cfg = _config()
    del cfg[field]

    errors = l2_quantization.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith(f"{field} is missing")


def test_validate_missing_target() -> None:
    cfg = _config()
    del cfg["target"]

    errors = l2_quantization.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith("target is missing")


@pytest.mark.parametrize("field", ["model_id", "hardware", "engine"])
def test_validate_missing_target_field(field: str) -> None:
    cfg = _config()
    del cfg["target"][field]

    errors = l2_quantization.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith(f"target.{field} is missing")


@pytest.mark.parametrize("hardware", ["A100-80GB", "A100-40GB", "A10"])
def test_validate_fp8_rejected_on_ampere(hardware: str) -> None:
    cfg = _config()
    cfg["target"]["hardware"] = hardware

    errors = l2_quantization.validate(cfg)

    expected = (
        f"weight_formats[1] 'fp8' is not supported on {hardware}: Ampere GPUs have no FP8 tensor cores, "
        "use one of bf16, fp16, int8-awq, int4-awq or a Hopper or Ada Lovelace GPU"
    )
    assert errors == [expected]


@pytest.mark.parametrize("hardware", ["H100-SXM", "H100-PCIe", "H200", "L4", "L40S"])
def test_validate_fp8_accepted_on_hopper_and_ada(hardware: str) -> None:
    cfg = _config()
    cfg["target"]["hardware"] = hardware

    assert l2_quantization.validate(cfg) == []


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"weight_formats": []}, "weight_formats [] is invalid: use a non-empty list"),
        ({"weight_formats": "bf16"}, "weight_formats 'bf16' is invalid: use a non-empty list"),
        ({"weight_formats": ["bf16", "int3"]}, "weight_formats[1] 'int3' is not a known weight format"),
        ({"weight_formats": ["bf16", None]}, "weight_formats[1] None is not a known weight format"),
        ({"weight_formats": ["fp8", "fp8"]}, "weight_formats contains 'fp8' more than once"),
        ({"batch_size": 0}, "batch_size 0 is invalid: use an integer from 1 to 4096"),
        ({"batch_size": 5000}, "batch_size 5000 is invalid"),
        ({"output_tokens": 0}, "output_tokens 0 is invalid"),
        ({"max_quality_drop_pct": -1}, "max_quality_drop_pct -1 is invalid: use a percentage from 0 to 100"),
        ({"max_quality_drop_pct": "1%"}, "max_quality_drop_pct '1%' is invalid"),
        ({"max_quality_drop_pct": True}, "max_quality_drop_pct True is invalid"),
        ({"formats": ["bf16"]}, "unknown field 'formats'"),
    ],
)
def test_validate_bad_values(changes: dict, expected: str) -> None:
    errors = l2_quantization.validate(_config(**changes))

    assert len(errors) == 1
    assert errors[0].startswith(expected)


@pytest.mark.parametrize("limit", [0, 1.5, 100, None])
def test_validate_quality_limit_accepted(limit: float | None) -> None:
    assert l2_quantization.validate(_config(max_quality_drop_pct=limit)) == []


def test_validate_reports_every_problem() -> None:
    cfg = _config(weight_formats=["fp8", "q2"], batch_size=-5, prompt_tokens=40000)
    cfg["target"] = {"model_id": "Qwen/Qwen2.5-7B-Instruct", "hardware": "A100-80GB", "engine": "ollama"}

    errors = l2_quantization.validate(cfg)

    assert any(error.startswith("target.engine 'ollama'") for error in errors)
    assert any(error.startswith("weight_formats[0] 'fp8' is not supported on A100-80GB") for error in errors)
    assert any(error.startswith("weight_formats[1] 'q2'") for error in errors)
    assert any(error.startswith("batch_size -5") for error in errors)
    assert any(error.startswith("prompt_tokens 40000 is invalid: use an integer from 1 to 32767") for error in errors)
    assert len(errors) == 5


def test_quality_table_covers_every_format() -> None:
    from tools.catalog import WEIGHT_FORMATS

    assert set(l2_quantization.QUALITY_DROP_PCT) == set(WEIGHT_FORMATS)
    assert l2_quantization.QUALITY_DROP_PCT["bf16"] == 0.0


def test_estimate_cost_example() -> None:
    assert l2_quantization.estimate_cost(_config()) == 0.4


def test_estimate_cost_scales_with_gpu_count() -> None:
    cfg = _config(weight_formats=["bf16", "fp8", "int4-awq"])
    cfg["target"]["gpu_count"] = 8

    assert l2_quantization.estimate_cost(cfg) == 2.4


def test_estimate_cost_invalid_config() -> None:
    assert l2_quantization.estimate_cost({}) == 0.0
    assert l2_quantization.estimate_cost({"weight_formats": {"bf16": 1}, "target": None}) == 0.0
    assert l2_quantization.estimate_cost({"weight_formats": ["bf16"], "target": {"gpu_count": "2"}}) == 0.1
