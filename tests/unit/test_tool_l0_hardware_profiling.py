"""L0 Hardware Profiling: validation messages and cost estimates."""

import copy

import pytest

from tools import l0_hardware_profiling

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "sglang"}


def _config(**changes):
    cfg = {**copy.deepcopy(l0_hardware_profiling.EXAMPLE_INPUT_CONFIG), "target": dict(TARGET)}
    cfg.update(changes)
    return cfg


def test_validate_example_is_valid() -> None:
    assert l0_hardware_profiling.validate(_config()) == []


@pytest.mark.parametrize("field", ["hardware", "weight_format", "batch_size", "prompt_tokens", "output_tokens"])
def test_validate_missing_field(field: str) -> None:
    cfg = _config()
    del cfg[field]

    errors = l0_hardware_profiling.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith(f"{field} is missing")


@pytest.mark.parametrize("field", ["model_id", "hardware", "engine"])
def test_validate_missing_target_field(field: str) -> None:
    cfg = _config()
    del cfg["target"][field]

    errors = l0_hardware_profiling.validate(cfg)

    assert len(errors) == 1
    assert errors[0].startswith(f"target.{field} is missing")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"hardware": []}, "hardware [] is invalid: use a non-empty list"),
        ({"hardware": ["H100-SXM", "TPUv5"]}, "hardware[1] 'TPUv5' is not a known GPU: use one of A10, A100-40GB"),
        ({"hardware": ["L4", "L4"]}, "hardware contains 'L4' more than once"),
        ({"weight_format": "nf4"}, "weight_format 'nf4' is not a known weight format"),
        ({"batch_size": 0}, "batch_size 0 is invalid: use an integer from 1 to 4096"),
        ({"prompt_tokens": 1.5}, "prompt_tokens 1.5 is invalid"),
    ],
)
def test_validate_bad_values(changes: dict, expected: str) -> None:
    errors = l0_hardware_profiling.validate(_config(**changes))

    assert len(errors) == 1
    assert errors[0].startswith(expected)


def test_validate_fp8_names_each_ampere_gpu() -> None:
    cfg = _config(weight_format="fp8", hardware=["H100-SXM", "A100-80GB", "L4", "A10"])

    errors = l0_hardware_profiling.validate(cfg)

    assert len(errors) == 2
    assert errors[0].startswith("weight_format 'fp8' is not supported on A100-80GB")
    assert errors[1].startswith("weight_format 'fp8' is not supported on A10")


def test_validate_fp8_checks_baseline_gpu() -> None:
    cfg = _config(weight_format="fp8", hardware=["H100-SXM"])
    cfg["target"]["hardware"] = "A100-40GB"

    errors = l0_hardware_profiling.validate(cfg)

    expected = (
        "weight_format 'fp8' is not supported on A100-40GB: Ampere GPUs have no FP8 tensor cores, "
        "use one of bf16, fp16, int8-awq, int4-awq or a Hopper or Ada Lovelace GPU"
    )
    assert errors == [expected]


def test_validate_reports_every_problem() -> None:
    cfg = _config(hardware=["B300"], batch_size=None, output_tokens=0)
    cfg["target"]["model_id"] = "gpt-5"

    errors = l0_hardware_profiling.validate(cfg)

    assert any(error.startswith("target.model_id 'gpt-5' is not a known model") for error in errors)
    assert any(error.startswith("hardware[0] 'B300'") for error in errors)
    assert any(error.startswith("batch_size None is invalid") for error in errors)
    assert any(error.startswith("output_tokens 0 is invalid") for error in errors)
    assert len(errors) == 4


@pytest.mark.parametrize("cfg", [{}, _config(), {"hardware": ["H100-SXM"] * 50, "target": {"gpu_count": 16}}])
def test_estimate_cost_always_zero(cfg: dict) -> None:
    assert l0_hardware_profiling.estimate_cost(cfg) == 0.0
