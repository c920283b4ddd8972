"""Handler lifecycle through `run_experiment`, on real Postgres, with a recording event bus."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from iiq.errors import InvalidTransitionError
from iiq.experiments.runner import run_experiment
from iiq.experiments.states import Status
from tests.conftest import Server, Tenant
from tests.support.lifecycle import RecordingBus, create_unqueued, fetch_events, fetch_experiment

TARGET_8B = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}

SHIPPED = [
    ("L5", {"batch_sizes": [1, 8, 32], "prompt_tokens": 512, "output_tokens": 256, "weight_format": "bf16"}, 3),
    (
        "L2",
        {"weight_formats": ["bf16", "fp8", "int4-awq"], "batch_size": 32, "prompt_tokens": 512, "output_tokens": 256},
        3,
    ),
    (
        "L0",
        {
            "hardware": ["H100-SXM", "A100-80GB", "L4"],
            "weight_format": "bf16",
            "batch_size": 16,
            "prompt_tokens": 512,
            "output_tokens": 256,
        },
        3,
    ),
]


async def _run(
    server: Server, tenant: Tenant, tool_id: str, config: dict[str, Any], bus: RecordingBus | None = None
) -> tuple[Status, Any]:
    runtime = server.runtime
    experiment_id = await create_unqueued(runtime.pool, server.settings, tenant.org_id, tool_id, config, TARGET_8B)
    status = await run_experiment(runtime.pool, experiment_id, bus or RecordingBus(), settings=server.settings)
    return status, await fetch_experiment(runtime.pool, experiment_id)


@pytest.mark.parametrize(("tool_id", "config", "candidates"), SHIPPED)
async def test_shipped_tool_completes(
    server: Server, tenant: Tenant, tool_id: str, config: dict[str, Any], candidates: int
) -> None:
    bus = RecordingBus()
    status, row = await _run(server, tenant, tool_id, config, bus)

    assert status is Status.COMPLETED
    assert row["status"] == "completed"
    summary = row["results_summary"]
    assert summary["winner"]
    assert isinstance(summary["delta_pct"], float | int)
    assert summary["recipe_hash"].startswith("sha256:")
    assert summary["report_url"].endswith(f"/experiments/{row['id']}/artifacts/report.json")
    progress = [stage for kind, stage in bus.types_and_stages() if kind == "progress" and stage.startswith("candidate")]
    assert len(progress) == candidates
    assert bus.types_and_stages()[0] == ("status", "running")
    assert bus.types_and_stages()[-1] == ("status", "completed")


async def test_full_event_sequence_stored(server: Server, tenant: Tenant) -> None:
    _, row = await _run(server, tenant, "test.sleep", {"steps": 2, "step_seconds": 0.01})

    events = await fetch_events(server.runtime.pool, row["id"])
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert [(event["event_type"], event["stage"]) for event in events] == [
        ("status", "pending"),
        ("status", "queued"),
        ("status", "running"),
        ("progress", "step-0"),
        ("progress", "step-1"),
        ("status", "completed"),
    ]


async def test_handler_raises_ends_failed(server: Server, tenant: Tenant) -> None:
    bus = RecordingBus()
    status, row = await _run(server, tenant, "test.fail", {"message": "disk full on node 7"}, bus)

    assert status is Status.FAILED
    assert row["error_message"] == "RuntimeError: disk full on node 7"
    terminal = bus.published[-1]
    assert (terminal.event_type, terminal.stage) == ("status", "failed")
    assert terminal.payload["error_message"] == "RuntimeError: disk full on node 7"


async def test_return_without_results_fails(server: Server, tenant: Tenant) -> None:
    status, row = await _run(server, tenant, "test.no_results", {})

    assert status is Status.FAILED
    assert "without saving results" in row["error_message"]


async def test_save_results_twice_raises(server: Server, tenant: Tenant) -> None:
    status, row = await _run(server, tenant, "test.save_twice", {})

    # The first save completed the run; the second raised InvalidTransitionError inside the
    # handler, which cannot undo the completed state.
    assert status is Status.COMPLETED
    assert row["results_summary"] == {"first": True}


async def test_save_results_twice_error_type(server: Server, tenant: Tenant) -> None:
    from iiq.experiments.registry import ToolHandler, register, unregister

    seen: list[BaseException] = []

    async def run(ctx: Any) -> None:
        await ctx.save_results({"n": 1})
        try:
            await ctx.save_results({"n": 2})
        except InvalidTransitionError as exc:
            seen.append(exc)

    register(ToolHandler(tool_id="test.capture_twice", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=run))
    try:
        status, _ = await _run(server, tenant, "test.capture_twice", {})
    finally:
        unregister("test.capture_twice")

    assert status is Status.COMPLETED
    assert len(seen) == 1
    assert seen[0].current == "completed"


async def test_timeout_override_ends_timed_out(server: Server, tenant: Tenant) -> None:
    status, row = await _run(server, tenant, "test.short_timeout", {"seconds": 30})

    assert status is Status.TIMED_OUT
    assert "0.5 s" in row["error_message"]
    assert row["actual_gpu_hours"] > 0


async def test_cancel_running_ends_cancelled(server: Server, tenant: Tenant) -> None:
    runtime = server.runtime
    experiment_id = await create_unqueued(
        runtime.pool, server.settings, tenant.org_id, "test.sleep", {"steps": 200, "step_seconds": 0.05}, TARGET_8B
    )
    run = asyncio.create_task(run_experiment(runtime.pool, experiment_id, RecordingBus(), settings=server.settings))
    for _ in range(200):
        if (await fetch_experiment(runtime.pool, experiment_id))["status"] == "running":
            break
        await asyncio.sleep(0.02)

    response = await tenant.client.post(f"/experiments/{experiment_id}/cancel")
    status = await asyncio.wait_for(run, timeout=10)

    assert response.status_code == 200
    assert response.json()["cancel_requested"] is True
    assert status is Status.CANCELLED
    row = await fetch_experiment(runtime.pool, experiment_id)
    assert row["status"] == "cancelled"
    assert row["error_message"] == "cancelled on request"


async def test_ignored_cancel_ends_after_grace(server: Server, tenant: Tenant) -> None:
    runtime = server.runtime
    experiment_id = await create_unqueued(
        runtime.pool, server.settings, tenant.org_id, "test.ignore_cancel", {"seconds": 60}, TARGET_8B
    )
    run = asyncio.create_task(run_experiment(runtime.pool, experiment_id, RecordingBus(), settings=server.settings))
    for _ in range(200):
        if (await fetch_experiment(runtime.pool, experiment_id))["status"] == "running":
            break
        await asyncio.sleep(0.02)

    await tenant.client.post(f"/experiments/{experiment_id}/cancel")
    status = await asyncio.wait_for(run, timeout=server.settings.cancel_grace_seconds + 5)

    assert status is Status.CANCELLED


async def test_not_queued_is_left_alone(server: Server, tenant: Tenant) -> None:
    runtime = server.runtime
    experiment_id = await create_unqueued(runtime.pool, server.settings, tenant.org_id, "test.sleep", {}, TARGET_8B)
    await tenant.client.post(f"/experiments/{experiment_id}/cancel")

    bus = RecordingBus()
    status = await run_experiment(runtime.pool, experiment_id, bus, settings=server.settings)

    assert status is Status.CANCELLED
    assert bus.published == []


async def test_unregistered_tool_fails(server: Server, tenant: Tenant) -> None:
    from iiq.experiments.registry import ToolHandler, register, unregister

    async def run(ctx: Any) -> None:
        await ctx.save_results({})

    register(ToolHandler(tool_id="test.vanishing", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=run))
    try:
        experiment_id = await create_unqueued(
            server.runtime.pool, server.settings, tenant.org_id, "test.vanishing", {}, TARGET_8B
        )
    finally:
        unregister("test.vanishing")
    status = await run_experiment(server.runtime.pool, experiment_id, RecordingBus(), settings=server.settings)

    row = await fetch_experiment(server.runtime.pool, experiment_id)
    assert status is Status.FAILED
    assert "not registered in this worker" in row["error_message"]


async def test_emit_reserved_type_rejected(server: Server, tenant: Tenant) -> None:
    from iiq.experiments.registry import ToolHandler, register, unregister

    async def run(ctx: Any) -> None:
        await ctx.emit("status", stage="completed", payload={})

    register(ToolHandler(tool_id="test.fake_status", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=run))
    try:
        status, row = await _run(server, tenant, "test.fake_status", {})
    finally:
        unregister("test.fake_status")

    assert status is Status.FAILED
    assert "reserved" in row["error_message"]


async def test_emit_after_results_rejected(server: Server, tenant: Tenant) -> None:
    from iiq.experiments.registry import ToolHandler, register, unregister

    seen: list[BaseException] = []

    async def run(ctx: Any) -> None:
        await ctx.save_results({"done": True})
        try:
            await ctx.emit("progress", stage="late", payload={})
        except InvalidTransitionError as exc:
            seen.append(exc)

    register(ToolHandler(tool_id="test.late_emit", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=run))
    try:
        status, row = await _run(server, tenant, "test.late_emit", {})
    finally:
        unregister("test.late_emit")

    events = await fetch_events(server.runtime.pool, row["id"])
    assert status is Status.COMPLETED
    assert len(seen) == 1
    assert events[-1]["stage"] == "completed"


async def test_oversized_summary_fails_clearly(server: Server, tenant: Tenant) -> None:
    from iiq.experiments.registry import ToolHandler, register, unregister

    async def run(ctx: Any) -> None:
        await ctx.save_results({"blob": "x" * 100_000})

    register(ToolHandler(tool_id="test.big_summary", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=run))
    try:
        status, row = await _run(server, tenant, "test.big_summary", {})
    finally:
        unregister("test.big_summary")

    assert status is Status.FAILED
    assert "results summary of" in row["error_message"]
    assert "artifact" in row["error_message"]
