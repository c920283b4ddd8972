"""L2 Quantization: pick the weight format that serves the target best, from a roofline estimate.

Each candidate weight format is evaluated on the target's model, GPU and GPU count at one
batch size. Candidates that do not fit in memory, or whose estimated quality drop exceeds
the optional ``max_quality_drop_pct``, are reported but never win. The baseline is bf16
when it is listed, else the first format.

Ranking metric by experiment goal:

- None or "throughput": output tokens per second, higher is better.
- "latency": time per output token (one decode step), lower is better.
- "cost": GPU-hours per million output tokens, lower is better.
- "memory": memory needed for weights and KV cache, lower is better.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

from iiq.experiments.registry import ToolHandler, register
from tools import roofline
from tools._experiment import Candidate, Goal, deployment_recipe, describe_gpu, describe_model, run_candidates
from tools._validation import (
    EXAMPLE_TARGET,
    check_distinct_list,
    check_int,
    check_target,
    check_tokens,
    check_unknown_fields,
    check_weight_format,
    gpu_count_or_default,
    list_length_or_zero,
    require_valid,
)
from tools.catalog import WEIGHT_FORMATS

if TYPE_CHECKING:
    from iiq.experiments.context import ExperimentContext

MAX_BATCH_SIZE: Final = 4096
GPU_HOURS_PER_CANDIDATE: Final = 0.1

# Estimated average accuracy drop, in percent of the BF16 score on common LLM benchmarks.
# NOTE: these are rough estimates, not measured by this tool, and real drops vary by model
# and task. Measure on your own evaluation set before deploying a quantized model.
QUALITY_DROP_PCT: Final[dict[str, float]] = {
    "bf16": 0.0,
    "fp16": 0.0,
    "fp8": 0.3,
    "int8-awq": 0.5,
    "int4-awq": 2.0,
}

EXAMPLE_INPUT_CONFIG: Final[dict[str, Any]] = {
    "weight_formats": ["bf16", "fp8", "int8-awq", "int4-awq"],
    "batch_size": 32,
    "prompt_tokens": 512,
    "output_tokens": 256,
}

_FIELDS: Final = (*EXAMPLE_INPUT_CONFIG, "max_quality_drop_pct")

_ELIGIBLE = "among formats that fit and stay within max_quality_drop_pct"
_THROUGHPUT = Goal("throughput_tokens_per_s", True, f"highest output tokens per second {_ELIGIBLE}")
GOALS: Final[dict[str | None, Goal]] = {
    None: _THROUGHPUT,
    "throughput": _THROUGHPUT,
    "latency": Goal("time_per_output_token_ms", False, f"lowest time per output token {_ELIGIBLE}"),
    "cost": Goal("gpu_hours_per_million_tokens", False, f"fewest GPU-hours per million output tokens {_ELIGIBLE}"),
    "memory": Goal("memory_needed_gb", False, f"least memory for weights and KV cache {_ELIGIBLE}"),
}


def validate(cfg: dict[str, Any]) -> list[str]:
    """Return every problem with the target, weight_formats, batch size, token counts and quality limit."""
    errors, target = check_target(cfg)
    errors += check_unknown_fields(cfg, _FIELDS)

    list_errors, weight_formats = check_distinct_list(cfg, "weight_formats", EXAMPLE_INPUT_CONFIG["weight_formats"])
    errors += list_errors
    for index, weight_format in enumerate(weight_formats):
        errors += check_weight_format(weight_format, f"weight_formats[{index}]", target.gpu)

    errors += check_int(cfg, "batch_size", 1, MAX_BATCH_SIZE, EXAMPLE_INPUT_CONFIG["batch_size"])
    errors += check_tokens(cfg, target.model)

    limit = cfg.get("max_quality_drop_pct")
    is_number = isinstance(limit, (int, float)) and not isinstance(limit, bool)
    if limit is not None and not (is_number and 0 <= limit <= 100):
        errors.append(f"max_quality_drop_pct {limit!r} is invalid: use a percentage from 0 to 100, or leave it out")
    return errors


def estimate_cost(cfg: dict[str, Any]) -> float:
    """Return 0.1 GPU-hours per weight format times target.gpu_count.

    An invalid list counts as no candidates and an invalid gpu_count as 1, so no dict makes this raise.
    """
    return round(GPU_HOURS_PER_CANDIDATE * list_length_or_zero(cfg, "weight_formats") * gpu_count_or_default(cfg), 6)


def _baseline_format(weight_formats: list[str]) -> str:
    return "bf16" if "bf16" in weight_formats else weight_formats[0]


async def run(ctx: ExperimentContext) -> None:
    """Estimate every weight format with the roofline model and save the winner for ctx.goal."""
    config = ctx.input_config
    target = require_valid({**config, "target": ctx.target}, validate)
    weight_formats: list[str] = config["weight_formats"]
    batch_size: int = config["batch_size"]
    max_quality_drop_pct: float | None = config.get("max_quality_drop_pct")

    candidates = [
        Candidate(
            name=name,
            recipe=deployment_recipe(
                model_id=target.model.model_id,
                engine=target.engine,
                hardware=target.gpu.name,
                gpu_count=target.gpu_count,
                weight_format=name,
                max_batch_size=batch_size,
            ),
        )
        for name in weight_formats
    ]

    def evaluate(candidate: Candidate) -> dict[str, Any]:
        result = roofline.estimate(
            target.model,
            target.gpu,
            WEIGHT_FORMATS[candidate.name],
            batch_size=batch_size,
            prompt_tokens=config["prompt_tokens"],
            output_tokens=config["output_tokens"],
            gpu_count=target.gpu_count,
        )
        quality_drop = QUALITY_DROP_PCT[candidate.name]
        metrics = result.to_dict()
        metrics["weight_format"] = candidate.name
        metrics["estimated_quality_drop_pct"] = quality_drop
        if max_quality_drop_pct is not None and quality_drop > max_quality_drop_pct:
            metrics["excluded"] = (
                f"estimated quality drop {quality_drop}% exceeds max_quality_drop_pct {max_quality_drop_pct}%"
            )
        return metrics

    await run_candidates(
        ctx,
        candidates=candidates,
        evaluate=evaluate,
        goals=GOALS,
        baseline=_baseline_format(weight_formats),
        setup={
            "model_id": target.model.model_id,
            "parameter_count": target.model.parameter_count,
            "hardware": target.gpu.name,
            "gpu_count": target.gpu_count,
            "batch_size": batch_size,
            "memory_usable_gb": round(
                roofline.usable_memory_bytes(target.gpu, target.gpu_count) / roofline.BYTES_PER_GB, 3
            ),
        },
        report_context={
            "model": describe_model(target.model),
            "gpu": describe_gpu(target.gpu),
            "weight_formats": {name: asdict(WEIGHT_FORMATS[name]) for name in weight_formats},
            "assumptions": {
                **roofline.ASSUMPTIONS,
                "estimated_quality_drop_pct": QUALITY_DROP_PCT,
                "quality_drop_source": "rough estimates of the average benchmark drop versus BF16, not measured",
            },
        },
    )


register(
    ToolHandler(
        tool_id="L2",
        name="L2 Quantization",
        description=(
            "Estimates throughput, latency and memory of each weight format on the target GPU with a "
            "roofline model, with an estimated quality drop per format, and picks the best format that fits."
        ),
        validate=validate,
        estimate_cost=estimate_cost,
        run=run,
        uses_gpu=True,
        example_input_config=EXAMPLE_INPUT_CONFIG,
        example_target=dict(EXAMPLE_TARGET),
    )
)
