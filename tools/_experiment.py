"""The run loop the tools share: progress events, cancellation, winner choice and results.

A tool lists its candidates and passes a function that evaluates one. `run_candidates`
emits a ``setup`` event and one ``candidate-<n>`` event per candidate, with n counting
from 1. It checks for a cancel after each event, then writes ``report.json`` and saves
the summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tools import roofline
from tools.catalog import GpuSpec, ModelSpec

if TYPE_CHECKING:
    from iiq.experiments.context import ExperimentContext

logger = logging.getLogger(__name__)

DELTA_PCT_DEFINITION = (
    "Gain of the winner over the baseline, in percent of the baseline's value. Positive is better, "
    "so for a lower-is-better metric it is the reduction. It is null when the baseline does not fit "
    "in memory or no candidate is eligible."
)


@dataclass(frozen=True)
class Goal:
    """The metric that ranks candidates for one experiment goal."""

    metric: str
    higher_is_better: bool
    rule: str


@dataclass(frozen=True)
class Candidate:
    """One configuration to evaluate. Its `recipe` is the settings a deployment would use."""

    name: str
    recipe: dict[str, Any]


Evaluate = Callable[[Candidate], dict[str, Any]]


def deployment_recipe(
    *, model_id: str, engine: str, hardware: str, gpu_count: int, weight_format: str, max_batch_size: int
) -> dict[str, Any]:
    """Return the settings a deployment of a candidate needs, with the same keys in every tool."""
    return {
        "model_id": model_id,
        "engine": engine,
        "hardware": hardware,
        "gpu_count": gpu_count,
        "weight_format": weight_format,
        "max_batch_size": max_batch_size,
    }


def describe_model(model: ModelSpec) -> dict[str, Any]:
    """Return the model's config fields plus the derived sizes the roofline uses."""
    return {
        **asdict(model),
        "head_dim": model.head_dim,
        "parameters": asdict(roofline.parameter_split(model)),
        "kv_cache_bytes_per_token": roofline.kv_cache_bytes_per_token(model),
    }


def describe_gpu(gpu: GpuSpec) -> dict[str, Any]:
    """Return the GPU's datasheet fields."""
    return asdict(gpu)


def resolve_goal(goals: Mapping[str | None, Goal], goal: str | None) -> tuple[Goal, str | None]:
    """Return the Goal for `goal`, or the default (key None) and a note when `goal` is unknown."""
    if goal in goals:
        return goals[goal], None
    known = ", ".join(sorted(name for name in goals if name is not None))
    return goals[None], f"goal {goal!r} is not known to this tool ({known}): ranked by the default metric"


def recipe_hash(recipe: Mapping[str, Any]) -> str:
    """Return "sha256:" and the hex digest of the recipe's canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def choose_winner(results: Sequence[Mapping[str, Any]], goal: Goal) -> Mapping[str, Any] | None:
    """Return the best eligible result, the earliest on ties, or None if none is eligible.

    A result is eligible when it fits in memory and its metrics carry no ``excluded`` reason.
    """
    winner: Mapping[str, Any] | None = None
    for result in results:
        if not result["metrics"]["fits"] or result["metrics"].get("excluded"):
            continue
        if winner is None or _is_better(result["metrics"][goal.metric], winner["metrics"][goal.metric], goal):
            winner = result
    return winner


def _is_better(value: float, best: float, goal: Goal) -> bool:
    return value > best if goal.higher_is_better else value < best


def gain_pct(winner_value: float, baseline_value: float, goal: Goal) -> float | None:
    """Return the winner's gain over the baseline in percent, rounded to 2 decimals, as DELTA_PCT_DEFINITION states."""
    if baseline_value == 0:
        return None
    change = (winner_value - baseline_value) / baseline_value * 100
    gain = change if goal.higher_is_better else -change
    # Adding 0.0 turns the -0.0 of an unchanged lower-is-better metric into 0.0.
    return round(gain, 2) + 0.0


def _summarize(results: Sequence[Mapping[str, Any]], goal: Goal, baseline_name: str) -> dict[str, Any]:
    winner = choose_winner(results, goal)
    baseline = next(result for result in results if result["name"] == baseline_name)
    baseline_fits = bool(baseline["metrics"]["fits"])

    delta = None
    if winner is not None and baseline_fits:
        delta = gain_pct(winner["metrics"][goal.metric], baseline["metrics"][goal.metric], goal)
    return {
        "winner": winner["name"] if winner else None,
        "metric": goal.metric,
        "higher_is_better": goal.higher_is_better,
        "winner_value": winner["metrics"][goal.metric] if winner else None,
        "baseline": baseline_name,
        "baseline_value": baseline["metrics"][goal.metric],
        "baseline_fits": baseline_fits,
        "delta_pct": delta,
        "recipe": winner["recipe"] if winner else None,
        "recipe_hash": recipe_hash(winner["recipe"]) if winner else None,
        "candidates": len(results),
        "candidates_fitting": sum(1 for result in results if result["metrics"]["fits"]),
    }


async def run_candidates(
    ctx: ExperimentContext,
    *,
    candidates: Sequence[Candidate],
    evaluate: Evaluate,
    goals: Mapping[str | None, Goal],
    baseline: str,
    setup: Mapping[str, Any],
    report_context: Mapping[str, Any],
) -> None:
    """Evaluate `candidates` in order with progress events, then save the summary.

    `evaluate` returns a candidate's metrics, which must contain ``fits`` and every goal's
    metric. `baseline` names one of the candidates. `setup` is the payload of the first
    event, and `report_context` (model and GPU specs, assumptions) is copied into the report.
    Returns without saving anything once a cancel is requested.
    """
    goal, goal_note = resolve_goal(goals, ctx.goal)
    if goal_note:
        logger.warning("unknown experiment goal", extra={"experiment_id": str(ctx.experiment_id), "goal": ctx.goal})

    setup_payload = {**setup, "goal": ctx.goal, "metric": goal.metric, "candidates": len(candidates)}
    await ctx.emit("progress", stage="setup", payload=setup_payload)
    log_ids = {"experiment_id": str(ctx.experiment_id), "tool_id": ctx.tool_id}
    if await ctx.check_cancelled():
        logger.info("experiment cancelled", extra={**log_ids, "stage": "setup"})
        return

    results: list[dict[str, Any]] = []
    for index, candidate in enumerate(candidates, start=1):
        metrics = evaluate(candidate)
        results.append({"name": candidate.name, "recipe": candidate.recipe, "metrics": metrics})
        payload = {"candidate": candidate.name, "index": index, "total": len(candidates), "metrics": metrics}
        await ctx.emit("progress", stage=f"candidate-{index}", payload=payload)
        if await ctx.check_cancelled():
            logger.info("experiment cancelled", extra={**log_ids, "stage": f"candidate-{index}"})
            return

    summary = _summarize(results, goal, baseline)
    report = {
        "tool_id": ctx.tool_id,
        "experiment_id": str(ctx.experiment_id),
        "target": ctx.target,
        "input_config": ctx.input_config,
        "goal": ctx.goal,
        "goal_note": goal_note,
        "ranking_rule": goal.rule,
        "delta_pct_definition": DELTA_PCT_DEFINITION,
        **report_context,
        "candidates": results,
        "summary": summary,
    }
    ctx.artifact_path("report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    await ctx.save_results({**summary, "report_url": ctx.artifact_url("report.json")})
