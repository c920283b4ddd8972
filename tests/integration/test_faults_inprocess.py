"""Cancel races, the default soft time limit, and stall detection, in this process."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import pytest

from iiq.experiments.runner import run_experiment
from iiq.experiments.states import Status
from iiq.experiments.watchdog import LoopWatchdog
from tests.conftest import Server, Tenant
from tests.support.lifecycle import RecordingBus, create_unqueued, fetch_events, fetch_experiment

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}
TERMINAL = {"completed", "failed", "cancelled", "timed_out"}


async def _terminal_events(server: Server, experiment_id: Any) -> list[str]:
    events = await fetch_events(server.runtime.pool, experiment_id)
    return [event["stage"] for event in events if event["event_type"] == "status" and event["stage"] in TERMINAL]


async def _jobs_left(server: Server, experiment_id: str) -> list[str]:
    """Jobs of the experiment that procrastinate would still run or is running."""
    async with server.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT status::text FROM procrastinate.procrastinate_jobs "
            "WHERE args ->> 'experiment_id' = $1 AND status IN ('todo', 'doing')",
            experiment_id,
        )
    return [row["status"] for row in rows]


async def test_cancel_races_completion(server: Server, tenant: Tenant) -> None:
    """Cancel lands at every point of a short run; each run must end exactly once."""
    outcomes: set[str] = set()
    for attempt in range(25):
        experiment_id = await create_unqueued(
            server.runtime.pool,
            server.settings,
            tenant.org_id,
            "test.sleep",
            {"steps": 1, "step_seconds": 0.002 * (attempt % 5)},
            TARGET,
        )
        run = asyncio.create_task(
            run_experiment(server.runtime.pool, experiment_id, RecordingBus(), settings=server.settings)
        )
        await asyncio.sleep(0.002 * (attempt % 7))
        cancel = await tenant.client.post(f"/experiments/{experiment_id}/cancel")
        await asyncio.wait_for(run, timeout=10)

        row = await fetch_experiment(server.runtime.pool, experiment_id)
        assert cancel.status_code in (200, 409)
        assert row["status"] in TERMINAL
        assert await _terminal_events(server, experiment_id) == [row["status"]]
        outcomes.add(row["status"])
    assert outcomes <= {"completed", "cancelled"}


async def test_cancel_queued_races_worker(tenant: Tenant, server: Server) -> None:
    """The real worker starts runs while cancels arrive; every run ends exactly once."""
    body = {"tool_id": "test.sleep", "target": TARGET, "input_config": {"steps": 2, "step_seconds": 0.01}}
    created = [(await tenant.client.post("/experiments", json=body)).json()["id"] for _ in range(20)]
    await asyncio.gather(*(tenant.client.post(f"/experiments/{experiment_id}/cancel") for experiment_id in created))

    for experiment_id in created:
        for _ in range(100):
            status = (await tenant.client.get(f"/experiments/{experiment_id}")).json()["status"]
            if status in TERMINAL:
                break
            await asyncio.sleep(0.05)
        assert status in ("cancelled", "completed")
        assert await _terminal_events(server, experiment_id) == [status]
        assert await _jobs_left(server, experiment_id) == []


async def test_default_time_limit_scaled_down(server: Server, tenant: Tenant) -> None:
    settings = msgspec.structs.replace(server.settings, default_timeout_seconds=0.3)
    experiment_id = await create_unqueued(
        server.runtime.pool, settings, tenant.org_id, "test.ignore_cancel", {"seconds": 30}, TARGET
    )

    status = await asyncio.wait_for(
        run_experiment(server.runtime.pool, experiment_id, RecordingBus(), settings=settings), timeout=10
    )

    row = await fetch_experiment(server.runtime.pool, experiment_id)
    assert status is Status.TIMED_OUT
    assert row["error_message"] == "exceeded the soft time limit of 0.3 s"


async def test_handler_swallowing_cancel_still_times_out(server: Server, tenant: Tenant) -> None:
    settings = msgspec.structs.replace(server.settings, default_timeout_seconds=0.3, cancel_grace_seconds=0.5)
    experiment_id = await create_unqueued(
        server.runtime.pool,
        settings,
        tenant.org_id,
        "test.ignore_cancel",
        {"seconds": 30, "swallow_cancel": True},
        TARGET,
    )

    status = await asyncio.wait_for(
        run_experiment(server.runtime.pool, experiment_id, RecordingBus(), settings=settings), timeout=10
    )

    assert status is Status.TIMED_OUT


async def test_blocked_loop_logged_with_experiment(
    server: Server, tenant: Tenant, caplog: pytest.LogCaptureFixture
) -> None:
    watchdog = LoopWatchdog(threshold=0.2)
    await watchdog.start()
    experiment_id = await create_unqueued(
        server.runtime.pool, server.settings, tenant.org_id, "test.block", {"seconds": 0.6}, TARGET
    )
    try:
        with caplog.at_level(logging.WARNING, logger="iiq.experiments.watchdog"):
            await run_experiment(server.runtime.pool, experiment_id, RecordingBus(), settings=server.settings)
    finally:
        await watchdog.stop()

    stalls = [record for record in caplog.records if record.name == "iiq.experiments.watchdog"]
    assert stalls
    assert stalls[0].experiment_id == str(experiment_id)  # type: ignore[attr-defined]
    assert "tools.py" in stalls[0].where  # type: ignore[attr-defined]
