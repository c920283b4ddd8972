"""L5 Batching: pick the batch size that serves the target best, from a roofline estimate.

Each candidate batch size is evaluated on the target's model, GPU and GPU count with one
weight format. Candidates whose weights and KV cache do not fit in memory are reported but
never win. The baseline is the first batch size in the list.

Ranking metric by experiment goal:

- None or "throughput": output tokens per second, higher is better.
- "latency": time per output token (one decode step), lower is better.
- "cost": GPU-hours per million output tokens, lower is better.
- "memory": output tokens per second per GB of memory needed, higher is better. The plain
  footprint would always pick the smallest batch, so this ranks memory efficiency instead.
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
    check_target,
    check_tokens,
    check_unknown_fields,
    check_weight_format_field,
    gpu_count_or_default,
    is_int,
    list_length_or_zero,
    require_valid,
)
from tools.catalog import WEIGHT_FORMATS

if TYPE_CHECKING:
    from iiq.experiments.context import ExperimentContext

MAX_BATCH_SIZE: Final = 4096
GPU_HOURS_PER_CANDIDATE: Final = 0.05

EXAMPLE_INPUT_CONFIG: Final[dict[str, Any]] = {
    "batch_sizes": [1, 8, 32, 64, 128],
    "prompt_tokens": 512,
    "output_tokens": 256,
    "weight_format": "bf16",
}

_FIELDS: Final = tuple(EXAMPLE_INPUT_CONFIG)

_FITTING = "among batch sizes that fit"
_THROUGHPUT = Goal("throughput_tokens_per_s", True, f"highest output tokens per second {_FITTING}")
GOALS: Final[dict[str | None, Goal]] = {
    None: _THROUGHPUT,
    "throughput": _THROUGHPUT,
    "latency": Goal("time_per_output_token_ms", False, f"lowest time per output token {_FITTING}"),
    "cost": Goal("gpu_hours_per_million_tokens", False, f"fewest GPU-hours per million output tokens {_FITTING}"),
    "memory": Goal(
        "throughput_tokens_per_s_per_gb", True, f"highest output tokens per second per GB of memory needed {_FITTING}"
    ),
}


def validate(cfg: dict[str, Any]) -> list[str]:
    """Return every problem with the target, batch_sizes, token counts and weight_format."""
    errors, target = check_target(cfg)
    errors += check_unknown_fields(cfg, _FIELDS)

    list_errors, batch_sizes = check_distinct_list(cfg, "batch_sizes", EXAMPLE_INPUT_CONFIG["batch_sizes"])
    errors += list_errors
    for index, batch_size in enumerate(batch_sizes):
        if not is_int(batch_size) or not 1 <= batch_size <= MAX_BATCH_SIZE:
            errors.append(f"batch_sizes[{index}] {batch_size!r} is invalid: use an integer from 1 to {MAX_BATCH_SIZE}")

    errors += check_tokens(cfg, target.model)
    errors += check_weight_format_field(cfg, "weight_format", target.gpu)
    return errors


def estimate_cost(cfg: dict[str, Any]) -> float:
    """Return 0.05 GPU-hours per batch size times target.gpu_count.

    An invalid list counts as no candidates and an invalid gpu_count as 1, so no dict makes this raise.
    """
    return round(GPU_HOURS_PER_CANDIDATE * list_length_or_zero(cfg, "batch_sizes") * gpu_count_or_default(cfg), 6)


async def run(ctx: ExperimentContext) -> None:
    """Estimate every batch size with the roofline model and save the winner for ctx.goal."""
    config = ctx.input_config
    target = require_valid({**config, "target": ctx.target}, validate)
    weight_format = WEIGHT_FORMATS[config["weight_format"]]
    prompt_tokens: int = config["prompt_tokens"]
    output_tokens: int = config["output_tokens"]

    candidates = [
        Candidate(
            name=f"batch-{batch_size}",
            recipe=deployment_recipe(
                model_id=target.model.model_id,
                engine=target.engine,
                hardware=target.gpu.name,
                gpu_count=target.gpu_count,
                weight_format=weight_format.name,
                max_batch_size=batch_size,
            ),
        )
        for batch_size in config["batch_sizes"]
    ]

    def evaluate(candidate: Candidate) -> dict[str, Any]:
        result = roofline.estimate(
            target.model,
            target.gpu,
            weight_format,
            batch_size=candidate.recipe["max_batch_size"],
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            gpu_count=target.gpu_count,
        )
        metrics = result.to_dict()
        metrics["batch_size"] = candidate.recipe["max_batch_size"]
        metrics["throughput_tokens_per_s_per_gb"] = roofline.round_significant(
            result.throughput_tokens_per_s / result.memory_needed_gb
        )
        return metrics

    await run_candidates(
        ctx,
        candidates=candidates,
        evaluate=evaluate,
        goals=GOALS,
        baseline=candidates[0].name,
        setup={
            "model_id": target.model.model_id,
            "parameter_count": target.model.parameter_count,
            "hardware": target.gpu.name,
            "gpu_count": target.gpu_count,
            "weight_format": weight_format.name,
            "weight_gb": round(roofline.weight_bytes(target.model, weight_format) / roofline.BYTES_PER_GB, 3),
            "memory_usable_gb": round(
                roofline.usable_memory_bytes(target.gpu, target.gpu_count) / roofline.BYTES_PER_GB, 3
            ),
        },
        report_context={
            "model": describe_model(target.model),
            "gpu": describe_gpu(target.gpu),
            "weight_format": asdict(weight_format),
            "assumptions": roofline.ASSUMPTIONS,
        },
    )


register(
    ToolHandler(
        tool_id="L5",
        name="L5 Batching",
        description=(
            "Estimates throughput, latency and memory of each batch size on the target GPU with a "
            "roofline model and picks the best batch size that fits in memory."
        ),
        validate=validate,
        estimate_cost=estimate_cost,
        run=run,
        uses_gpu=True,
        example_input_config=EXAMPLE_INPUT_CONFIG,
        example_target=dict(EXAMPLE_TARGET),
    )
)
