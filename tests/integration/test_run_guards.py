"""Guards found by attacking the engine: stalled workers, late events, shutdown during a cancel."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from iiq.db.pool import connect_admin
from iiq.db.tx import service_transaction
from iiq.errors import InvalidTransitionError
from iiq.experiments import lifecycle
from iiq.experiments.quota import utc_now
from iiq.experiments.registry import ToolHandler, register, unregister
from iiq.experiments.runner import run_experiment
from iiq.experiments.states import Status
from iiq.queue.recovery import heartbeat_loop, recover_lost_runs
from tests.conftest import Server, Tenant
from tests.support.lifecycle import RecordingBus, create_unqueued, fetch_events, fetch_experiment

TARGET = {"model_id": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-SXM", "engine": "vllm"}


async def _wait_running(server: Server, experiment_id: uuid.UUID) -> None:
    for _ in range(200):
        if (await fetch_experiment(server.runtime.pool, experiment_id))["status"] == "running":
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"experiment {experiment_id} never started")


async def test_run_ended_elsewhere_stops_and_writes_nothing(server: Server, tenant: Tenant) -> None:
    """A sweep fails the run while its worker is stalled; the resumed handler must stop."""
    pool = server.runtime.pool
    experiment_id = await create_unqueued(
        pool, server.settings, tenant.org_id, "test.sleep", {"steps": 400, "step_seconds": 0.02}, TARGET
    )
    run = asyncio.create_task(run_experiment(pool, experiment_id, RecordingBus(), settings=server.settings))
    await _wait_running(server, experiment_id)

    async with service_transaction(pool) as conn:
        await lifecycle.mark_ended(
            conn, RecordingBus(), experiment_id, Status.FAILED, "worker lost (test)", 0.01, utc_now()
        )
    status = await asyncio.wait_for(run, timeout=10)

    events = await fetch_events(pool, experiment_id)
    assert status is Status.FAILED
    assert (events[-1]["event_type"], events[-1]["stage"]) == ("status", "failed")
    assert events[-1]["payload"]["error_message"] == "worker lost (test)"


async def test_heartbeat_reports_runs_ended_elsewhere(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    experiment_id = await create_unqueued(pool, server.settings, tenant.org_id, "test.sleep", {"steps": 1}, TARGET)
    await tenant.client.post(f"/experiments/{experiment_id}/cancel")
    reported: list[set[uuid.UUID]] = []
    stop = asyncio.Event()

    def on_lost(ids: set[uuid.UUID]) -> None:
        reported.append(ids)
        stop.set()

    await asyncio.wait_for(
        heartbeat_loop(pool, lambda: [experiment_id], interval_seconds=0.05, stop=stop, on_lost=on_lost), timeout=5
    )

    assert reported == [{experiment_id}]


async def test_emits_racing_results_never_follow_terminal(server: Server, tenant: Tenant) -> None:
    rejected_emits: list[BaseException] = []

    async def run(ctx: Any) -> None:
        async def chatter() -> None:
            for index in range(50):
                try:
                    await ctx.emit("progress", stage=f"side-{index}", payload={})
                except InvalidTransitionError as exc:
                    rejected_emits.append(exc)
                    return

        side = [asyncio.create_task(chatter()) for _ in range(8)]
        await asyncio.sleep(0.01)
        await ctx.save_results({"done": True})
        await asyncio.gather(*side)

    register(ToolHandler(tool_id="test.chatter", validate=lambda cfg: [], estimate_cost=lambda cfg: 0.0, run=run))
    try:
        for _ in range(5):
            experiment_id = await create_unqueued(
                server.runtime.pool, server.settings, tenant.org_id, "test.chatter", {}, TARGET
            )
            await run_experiment(server.runtime.pool, experiment_id, RecordingBus(), settings=server.settings)
            events = await fetch_events(server.runtime.pool, experiment_id)
            assert (events[-1]["event_type"], events[-1]["stage"]) == ("status", "completed")
    finally:
        unregister("test.chatter")
    assert rejected_emits


async def test_shutdown_during_cancel_grace_ends_cancelled(server: Server, tenant: Tenant) -> None:
    pool = server.runtime.pool
    experiment_id = await create_unqueued(
        pool, server.settings, tenant.org_id, "test.ignore_cancel", {"seconds": 30, "swallow_cancel": True}, TARGET
    )
    run = asyncio.create_task(run_experiment(pool, experiment_id, RecordingBus(), settings=server.settings))
    await _wait_running(server, experiment_id)
    await tenant.client.post(f"/experiments/{experiment_id}/cancel")
    await asyncio.sleep(server.settings.cancel_poll_seconds * 3)  # the runner has seen the request

    run.cancel()  # what the worker does to its jobs when its shutdown grace period is over
    await asyncio.gather(run, return_exceptions=True)

    row = await fetch_experiment(pool, experiment_id)
    assert row["status"] == "cancelled"
    assert row["error_message"] == "cancelled on request"


async def test_orphaned_job_of_ended_run_deleted(server: Server, tenant: Tenant) -> None:
    body = {"tool_id": "test.sleep", "target": TARGET, "input_config": {"steps": 1}}
    experiment = (await tenant.client.post("/experiments", json=body)).json()
    for _ in range(100):
        if (await tenant.client.get(f"/experiments/{experiment['id']}")).json()["status"] == "completed":
            break
        await asyncio.sleep(0.05)
    admin = await connect_admin(server.runtime.dsn)
    try:
        # A worker that died after the terminal transition leaves its job `doing`, then is pruned.
        await admin.execute(
            "UPDATE procrastinate.procrastinate_jobs SET status = 'doing', worker_id = NULL "
            "WHERE args ->> 'experiment_id' = $1",
            experiment["id"],
        )

        await recover_lost_runs(server.runtime.pool, server.runtime.bus, lost_after_seconds=1)

        left = await admin.fetchval(
            "SELECT count(*) FROM procrastinate.procrastinate_jobs WHERE args ->> 'experiment_id' = $1",
            experiment["id"],
        )
    finally:
        await admin.close()
    assert left == 0
