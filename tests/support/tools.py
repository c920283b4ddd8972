"""Test-only tools, registered when this module is imported.

Worker processes started by tests load them with ``IIQ_TOOL_MODULES=tests.support.tools``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from iiq.experiments.context import ExperimentContext
from iiq.experiments.registry import ToolHandler, get_handler, register


def _no_errors(cfg: dict[str, Any]) -> list[str]:
    return []


def _configured_cost(cfg: dict[str, Any]) -> float:
    return float(cfg.get("cost", 0.01))


async def _sleep_in_steps(ctx: ExperimentContext) -> None:
    """Sleep `steps` x `step_seconds`, checking for cancellation before each step."""
    steps = int(ctx.input_config.get("steps", 3))
    step_seconds = float(ctx.input_config.get("step_seconds", 0.05))
    for step in range(steps):
        if await ctx.check_cancelled():
            return
        await ctx.emit("progress", stage=f"step-{step}", payload={"step": step})
        await asyncio.sleep(step_seconds)
    await ctx.save_results({"steps": steps})


async def _ignore_cancel(ctx: ExperimentContext) -> None:
    """Sleep without ever checking for cancellation, and swallow the first task cancellation."""
    seconds = float(ctx.input_config.get("seconds", 5))
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if not ctx.input_config.get("swallow_cancel", False):
            raise
        await asyncio.sleep(seconds)
    await ctx.save_results({"slept": seconds})


async def _fail(ctx: ExperimentContext) -> None:
    await ctx.emit("progress", stage="about-to-fail", payload={})
    raise RuntimeError(str(ctx.input_config.get("message", "the tool failed on purpose")))


async def _return_without_results(ctx: ExperimentContext) -> None:
    await ctx.emit("progress", stage="nothing", payload={})


async def _save_twice(ctx: ExperimentContext) -> None:
    await ctx.save_results({"first": True})
    await ctx.save_results({"second": True})


async def _block_loop(ctx: ExperimentContext) -> None:
    time.sleep(float(ctx.input_config.get("seconds", 1.0)))  # noqa: ASYNC251 - blocking on purpose
    await ctx.save_results({"blocked": True})


async def _emit_payloads(ctx: ExperimentContext) -> None:
    """Emit `count` events, each with a text field of `size` characters of `char`."""
    count = int(ctx.input_config.get("count", 10))
    text = str(ctx.input_config.get("char", "x")) * int(ctx.input_config.get("size", 10))
    for index in range(count):
        await ctx.emit("progress", stage=f"event-{index}", payload={"index": index, "text": text})
    await ctx.save_results({"emitted": count})


_TEST_TOOLS = [
    ToolHandler(
        tool_id="test.sleep",
        validate=_no_errors,
        estimate_cost=_configured_cost,
        run=_sleep_in_steps,
        name="Test sleep",
        description="Sleeps in steps and honours cancellation.",
    ),
    ToolHandler(
        tool_id="test.ignore_cancel",
        validate=_no_errors,
        estimate_cost=_configured_cost,
        run=_ignore_cancel,
        name="Test ignore cancel",
    ),
    ToolHandler(tool_id="test.fail", validate=_no_errors, estimate_cost=_configured_cost, run=_fail),
    ToolHandler(
        tool_id="test.no_results", validate=_no_errors, estimate_cost=_configured_cost, run=_return_without_results
    ),
    ToolHandler(tool_id="test.save_twice", validate=_no_errors, estimate_cost=_configured_cost, run=_save_twice),
    ToolHandler(tool_id="test.block", validate=_no_errors, estimate_cost=_configured_cost, run=_block_loop),
    ToolHandler(tool_id="test.emit", validate=_no_errors, estimate_cost=_configured_cost, run=_emit_payloads),
    ToolHandler(
        tool_id="test.short_timeout",
        validate=_no_errors,
        estimate_cost=_configured_cost,
        run=_ignore_cancel,
        timeout_seconds=0.5,
    ),
    ToolHandler(
        tool_id="test.free", validate=_no_errors, estimate_cost=lambda cfg: 0.0, run=_sleep_in_steps, uses_gpu=False
    ),
]

for _handler in _TEST_TOOLS:
    if get_handler(_handler.tool_id) is None:
        register(_handler)
