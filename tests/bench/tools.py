"""Tools for the benchmark, registered when this module is imported.

iiq processes started by the benchmark load them with ``IIQ_TOOL_MODULES=tests.bench.tools``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from iiq.experiments.context import ExperimentContext
from iiq.experiments.registry import ToolHandler, get_handler, register

# Seconds `bench.emit` waits for its start file before it gives up and fails.
_MAX_WAIT_SECONDS = 300.0


def _no_errors(cfg: dict[str, Any]) -> list[str]:
    return []


def _small_cost(cfg: dict[str, Any]) -> float:
    return 0.01


async def _save_only(ctx: ExperimentContext) -> None:
    await ctx.save_results({})


async def _emit_timed(ctx: ExperimentContext) -> None:
    """Wait for the start file, then emit `count` events `interval_s` apart, each carrying its emit time.

    The start file contains the Unix time of the first emit; `offset_s` shifts this
    experiment's emits, so many experiments can emit spread over the interval.
    """
    start_file = Path(str(ctx.input_config["start_file"]))
    count = int(ctx.input_config.get("count", 10))
    interval = float(ctx.input_config.get("interval_s", 1.0))
    offset = float(ctx.input_config.get("offset_s", 0.0))

    give_up = time.monotonic() + float(ctx.input_config.get("wait_s", _MAX_WAIT_SECONDS))
    # A stat() of a local file takes microseconds; a thread per poll would cost more than it saves.
    while not start_file.exists():  # noqa: ASYNC240
        if time.monotonic() > give_up:
            raise TimeoutError(f"start file {start_file} did not appear")
        await asyncio.sleep(0.02)
    start = float(start_file.read_text()) + offset  # noqa: ASYNC240

    for index in range(count):
        delay = start + index * interval - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await ctx.emit("progress", stage=f"tick-{index}", payload={"t": time.time(), "index": index})
    await ctx.save_results({"emitted": count})


_BENCH_TOOLS = [
    ToolHandler(
        tool_id="bench.noop",
        validate=_no_errors,
        estimate_cost=_small_cost,
        run=_save_only,
        name="Benchmark no-op",
        description="Saves empty results at once: measures the engine, not a tool.",
    ),
    ToolHandler(
        tool_id="bench.emit",
        validate=_no_errors,
        estimate_cost=_small_cost,
        run=_emit_timed,
        name="Benchmark emitter",
        description="Emits events carrying their emit time, for stream latency.",
    ),
]

for _handler in _BENCH_TOOLS:
    if get_handler(_handler.tool_id) is None:
        register(_handler)
