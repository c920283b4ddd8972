"""L0 Hardware Profiling: compare GPU types for the target's model, from a roofline estimate.

Each candidate GPU type is evaluated with target.gpu_count GPUs, one weight format and one
batch size. GPUs that cannot hold the weights and KV cache are reported but never win. The
baseline is target.hardware, which is added as the first candidate when the list lacks it.
The tool only computes, so it uses no GPU and costs nothing.

Ranking metric by experiment goal:

- None or "throughput": output tokens per second per GPU, higher is better.
- "latency": time per output token (one decode step), lower is better.
- "cost": GPU-hours per million output tokens, lower is better. This counts an hour of every
  GPU type as equal, because the catalog has no prices.
- "memory": usable memory left after weights and KV cache, higher is better.
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
    check_weight_format_field,
    require_valid,
)
from tools.catalog import GPUS, WEIGHT_FORMATS, GpuSpec

if TYPE_CHECKING:
    from iiq.experiments.context import ExperimentContext

MAX_BATCH_SIZE: Final = 4096

EXAMPLE_INPUT_CONFIG: Final[dict[str, Any]] = {
    "hardware": ["H100-SXM", "A100-80GB", "L4"],
    "weight_format": "bf16",
    "batch_size": 16,
    "prompt_tokens": 512,
    "output_tokens": 256,
}

_FIELDS: Final = tuple(EXAMPLE_INPUT_CONFIG)

_FITTING_GPUS = "among GPUs that fit the model"
_THROUGHPUT = Goal("throughput_tokens_per_s_per_gpu", True, f"highest output tokens per second per GPU {_FITTING_GPUS}")
GOALS: Final[dict[str | None, Goal]] = {
    None: _THROUGHPUT,
    "throughput": _THROUGHPUT,
    "latency": Goal("time_per_output_token_ms", False, f"lowest time per output token {_FITTING_GPUS}"),
    "cost": Goal(
        "gpu_hours_per_million_tokens",
        False,
        f"fewest GPU-hours per million output tokens {_FITTING_GPUS}, all GPU types priced equally",
    ),
    "memory": Goal("memory_headroom_gb", True, f"most usable memory left after weights and KV cache {_FITTING_GPUS}"),
}


def validate(cfg: dict[str, Any]) -> list[str]:
    """Return every problem with the target, hardware list, weight format, batch size and token counts."""
    errors, target = check_target(cfg)
    errors += check_unknown_fields(cfg, _FIELDS)

    list_errors, hardware = check_distinct_list(cfg, "hardware", EXAMPLE_INPUT_CONFIG["hardware"])
    errors += list_errors
    gpus: list[GpuSpec] = [target.gpu] if target.gpu else []
    for index, name in enumerate(hardware):
        if isinstance(name, str) and name in GPUS:
            gpus.append(GPUS[name])
        else:
            errors.append(f"hardware[{index}] {name!r} is not a known GPU: use one of {', '.join(sorted(GPUS))}")

    # The format must run on the baseline and on every candidate GPU.
    format_errors = check_weight_format_field(cfg, "weight_format", None)
    errors += format_errors
    if not format_errors:
        for gpu in _unique(gpus):
            errors += check_weight_format(cfg["weight_format"], "weight_format", gpu)

    errors += check_int(cfg, "batch_size", 1, MAX_BATCH_SIZE, EXAMPLE_INPUT_CONFIG["batch_size"])
    errors += check_tokens(cfg, target.model)
    return errors


def _unique(gpus: list[GpuSpec]) -> list[GpuSpec]:
    return list({gpu.name: gpu for gpu in gpus}.values())


def estimate_cost(cfg: dict[str, Any]) -> float:
    """Return 0.0 GPU-hours for any config, because the tool only computes and uses no GPU."""
    return 0.0


async def run(ctx: ExperimentContext) -> None:
    """Estimate the model on every GPU type with the roofline model and save the winner for ctx.goal."""
    config = ctx.input_config
    target = require_valid({**config, "target": ctx.target}, validate)
    weight_format = WEIGHT_FORMATS[config["weight_format"]]
    batch_size: int = config["batch_size"]
    names = list(dict.fromkeys([target.gpu.name, *config["hardware"]]))

    candidates = [
        Candidate(
            name=name,
            recipe=deployment_recipe(
                model_id=target.model.model_id,
                engine=target.engine,
                hardware=name,
                gpu_count=target.gpu_count,
                weight_format=weight_format.name,
                max_batch_size=batch_size,
            ),
        )
        for name in names
    ]

    def evaluate(candidate: Candidate) -> dict[str, Any]:
        result = roofline.estimate(
            target.model,
            GPUS[candidate.name],
            weight_format,
            batch_size=batch_size,
            prompt_tokens=config["prompt_tokens"],
            output_tokens=config["output_tokens"],
            gpu_count=target.gpu_count,
        )
        metrics = result.to_dict()
        metrics["hardware"] = candidate.name
        metrics["memory_headroom_gb"] = roofline.round_significant(result.memory_usable_gb - result.memory_needed_gb)
        return metrics

    await run_candidates(
        ctx,
        candidates=candidates,
        evaluate=evaluate,
        goals=GOALS,
        baseline=target.gpu.name,
        setup={
            "model_id": target.model.model_id,
            "parameter_count": target.model.parameter_count,
            "hardware": names,
            "gpu_count": target.gpu_count,
            "weight_format": weight_format.name,
            "weight_gb": round(roofline.weight_bytes(target.model, weight_format) / roofline.BYTES_PER_GB, 3),
        },
        report_context={
            "model": describe_model(target.model),
            "gpus": {name: describe_gpu(GPUS[name]) for name in names},
            "weight_format": asdict(weight_format),
            "assumptions": roofline.ASSUMPTIONS,
        },
    )


register(
    ToolHandler(
        tool_id="L0",
        name="L0 Hardware Profiling",
        description=(
            "Estimates throughput per GPU, latency and memory fit of the target's model on each GPU type "
            "with a roofline model and picks the best GPU that fits. Runs without a GPU."
        ),
        validate=validate,
        estimate_cost=estimate_cost,
        run=run,
        uses_gpu=False,
        example_input_config=EXAMPLE_INPUT_CONFIG,
        example_target=dict(EXAMPLE_TARGET),
    )
)
