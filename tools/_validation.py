"""Input checks shared by the tools: the target, integer fields, token counts, weight formats.

Every check returns error messages instead of raising, so `validate` can report all problems
at once. A message names the field, shows the bad value and states what is allowed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from tools.catalog import ENGINES, GPUS, MODELS, WEIGHT_FORMATS, GpuSpec, ModelSpec

MAX_GPU_COUNT: Final = 16

EXAMPLE_TARGET: Final[dict[str, Any]] = {
    "model_id": "meta-llama/Llama-3.1-8B-Instruct",
    "hardware": "H100-SXM",
    "engine": "vllm",
    "gpu_count": 1,
}

# Token counts of an unknown model are bounded by the longest context in the catalog.
_MAX_CONTEXT_TOKENS: Final = max(model.max_position_embeddings for model in MODELS.values())


@dataclass(frozen=True)
class Target:
    """The parts of a target that passed validation, with None for each field that failed."""

    model: ModelSpec | None
    gpu: GpuSpec | None
    engine: str | None
    gpu_count: int | None


def _choices(names: Iterable[str]) -> str:
    return ", ".join(names)


def is_int(value: object) -> TypeGuard[int]:
    """Return whether `value` is an int and not a bool, which Python counts as an int."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(cfg: Mapping[str, Any], field: str, minimum: int, maximum: int, example: int) -> list[str]:
    """Check that `cfg[field]` is present and an integer from `minimum` to `maximum`."""
    if field not in cfg:
        return [f"{field} is missing: set it to an integer from {minimum} to {maximum}, e.g. {example}"]
    value = cfg[field]
    if not is_int(value) or not minimum <= value <= maximum:
        return [f"{field} {value!r} is invalid: use an integer from {minimum} to {maximum}"]
    return []


def check_unknown_fields(cfg: Mapping[str, Any], allowed: Iterable[str]) -> list[str]:
    """Report input_config keys the tool does not read, which are usually misspelled names."""
    known = set(allowed) | {"target"}
    return [
        f"unknown field {key!r}: this tool reads {_choices(sorted(known - {'target'}))}"
        for key in sorted(set(cfg) - known, key=str)
    ]


def check_target(cfg: Mapping[str, Any]) -> tuple[list[str], Target]:
    """Check model_id, hardware, engine and the optional gpu_count (default 1) of cfg['target']."""
    target = cfg.get("target")
    unresolved = Target(None, None, None, None)
    if target is None:
        return [f"target is missing: set model_id, hardware and engine, e.g. {json.dumps(EXAMPLE_TARGET)}"], unresolved
    if not isinstance(target, Mapping):
        return [f"target {target!r} is invalid: use an object with model_id, hardware and engine"], unresolved

    errors: list[str] = []
    model = _lookup(target, "model_id", MODELS, "a known model", errors)
    gpu = _lookup(target, "hardware", GPUS, "a known GPU", errors)
    engine = _lookup(target, "engine", {name: name for name in ENGINES}, "a known engine", errors)

    # An absent or null gpu_count means one GPU.
    raw_count = target.get("gpu_count")
    gpu_count = 1 if raw_count is None else raw_count
    if not is_int(gpu_count) or not 1 <= gpu_count <= MAX_GPU_COUNT:
        errors.append(f"target.gpu_count {raw_count!r} is invalid: use an integer from 1 to {MAX_GPU_COUNT}")
        gpu_count = None
    return errors, Target(model, gpu, engine, gpu_count)


def _lookup(target: Mapping[str, Any], field: str, table: Mapping[str, Any], kind: str, errors: list[str]) -> Any:
    choices = _choices(sorted(table))
    if field not in target:
        errors.append(f"target.{field} is missing: use one of {choices}")
        return None
    value = target[field]
    if not isinstance(value, str) or value not in table:
        errors.append(f"target.{field} {value!r} is not {kind}: use one of {choices}")
        return None
    return table[value]


def check_tokens(cfg: Mapping[str, Any], model: ModelSpec | None) -> list[str]:
    """Check prompt_tokens and output_tokens, and that together they fit the model's context."""
    limit = model.max_position_embeddings if model else _MAX_CONTEXT_TOKENS
    errors = check_int(cfg, "prompt_tokens", 1, limit - 1, 512) + check_int(cfg, "output_tokens", 1, limit - 1, 256)
    if errors or model is None:
        return errors

    total = cfg["prompt_tokens"] + cfg["output_tokens"]
    if total > limit:
        errors.append(
            f"prompt_tokens + output_tokens = {total} exceeds the {limit}-token context of {model.model_id}: "
            "lower either count"
        )
    return errors


def check_weight_format(value: object, field: str, gpu: GpuSpec | None) -> list[str]:
    """Check that `value` is a known weight format and that `gpu` runs it natively."""
    if not isinstance(value, str) or value not in WEIGHT_FORMATS:
        return [f"{field} {value!r} is not a known weight format: use one of {_choices(WEIGHT_FORMATS)}"]
    if gpu is not None and WEIGHT_FORMATS[value].uses_fp8_tensor_cores and not gpu.supports_fp8:
        native = _choices(name for name, spec in WEIGHT_FORMATS.items() if not spec.uses_fp8_tensor_cores)
        message = (
            f"{field} {value!r} is not supported on {gpu.name}: {gpu.architecture} GPUs have no FP8 tensor cores, "
            f"use one of {native} or a Hopper or Ada Lovelace GPU"
        )
        return [message]
    return []


def check_weight_format_field(cfg: Mapping[str, Any], field: str, gpu: GpuSpec | None) -> list[str]:
    """Check that `cfg[field]` is present and passes `check_weight_format`."""
    if field not in cfg:
        return [f"{field} is missing: use one of {_choices(WEIGHT_FORMATS)}"]
    return check_weight_format(cfg[field], field, gpu)


def check_distinct_list(cfg: Mapping[str, Any], field: str, example: list[Any]) -> tuple[list[str], list[Any]]:
    """Check that `cfg[field]` is a non-empty list without repeats, and return the errors and the list."""
    if field not in cfg:
        return [f"{field} is missing: set it to a non-empty list, e.g. {example}"], []
    value = cfg[field]
    if not isinstance(value, list) or not value:
        return [f"{field} {value!r} is invalid: use a non-empty list, e.g. {example}"], []

    seen: list[Any] = []
    errors: list[str] = []
    for item in value:
        if item in seen:
            errors.append(f"{field} contains {item!r} more than once: list each value once")
        seen.append(item)
    return errors, value


def gpu_count_or_default(cfg: Mapping[str, Any]) -> int:
    """Return target.gpu_count when it is valid, else 1, for cost estimates of invalid configs."""
    target = cfg.get("target")
    gpu_count = target.get("gpu_count") if isinstance(target, Mapping) else None
    return gpu_count if is_int(gpu_count) and 1 <= gpu_count <= MAX_GPU_COUNT else 1


def list_length_or_zero(cfg: Mapping[str, Any], field: str) -> int:
    """Return len(cfg[field]) when it is a list, else 0, for cost estimates of invalid configs."""
    value = cfg.get(field)
    return len(value) if isinstance(value, list) else 0


@dataclass(frozen=True)
class ResolvedTarget:
    """The catalog entries of a target that passed validation."""

    model: ModelSpec
    gpu: GpuSpec
    engine: str
    gpu_count: int


def require_valid(cfg: Mapping[str, Any], validate: Callable[[dict[str, Any]], list[str]]) -> ResolvedTarget:
    """Return the target's catalog entries, or raise ValueError listing every problem in `cfg`.

    This repeats `validate` inside `run`, for a config that was stored without validation
    or validated against an older catalog.
    """
    errors = validate(dict(cfg))
    if errors:
        raise ValueError("invalid experiment config: " + "; ".join(errors))

    _, target = check_target(cfg)
    if target.model is None or target.gpu is None or target.engine is None or target.gpu_count is None:
        target_value = cfg.get("target")
        raise ValueError(f"invalid experiment target {target_value!r}: it passed validate but is not in the catalog")
    return ResolvedTarget(target.model, target.gpu, target.engine, target.gpu_count)
