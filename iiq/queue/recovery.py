"""Recovery of runs whose worker died (kill -9, OOM, lost machine).

Each worker process refreshes `heartbeat_at` of the runs it executes (`heartbeat_loop`), also
while it drains them during a graceful shutdown, when procrastinate's own worker heartbeat has
already stopped. Every iiq process runs `recovery_loop`, which ends runs with a stale heartbeat
as failed, charges the GPU-hours they used, writes the terminal event and deletes the job, all
in one transaction per run. The guarded UPDATE makes concurrent sweeps harmless. A worker
restarted under the same name does not refresh its predecessor's runs, so they still look
lost.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable

import asyncpg

from iiq.db.queries import query
from iiq.db.tx import service_transaction
from iiq.errors import InvalidTransitionError
from iiq.experiments import lifecycle, metrics
from iiq.experiments.events import EventBus
from iiq.experiments.states import Status

logger = logging.getLogger(__name__)


async def recover_lost_runs(pool: asyncpg.Pool, bus: EventBus, lost_after_seconds: float) -> int:
    """End every lost run as failed and requeue jobs whose run never started; return the runs ended."""
    async with service_transaction(pool) as conn:
        lost = await conn.fetch(query("find_lost_runs"), lost_after_seconds)
        unstarted = await conn.fetch(query("find_lost_queued_jobs"), lost_after_seconds)
        orphaned = await conn.fetch(query("find_orphaned_jobs"), lost_after_seconds)

    for row in orphaned:
        async with service_transaction(pool) as conn:
            await conn.execute(query("finish_lost_job"), row["job_id"])
        logger.warning("job of an ended experiment deleted", extra={"job_id": row["job_id"]})

    for row in unstarted:
        async with service_transaction(pool) as conn:
            requeued = await conn.execute(query("requeue_lost_job"), row["job_id"])
        if requeued.endswith(" 1"):
            logger.warning(
                "job of a lost worker requeued", extra={"experiment_id": str(row["id"]), "job_id": row["job_id"]}
            )

    ended = 0
    for row in lost:
        if await _end_lost_run(pool, bus, row["id"], lost_after_seconds):
            ended += 1
            metrics.experiments_recovered_total.labels(row["tool_id"]).inc()
    return ended


async def _end_lost_run(pool: asyncpg.Pool, bus: EventBus, experiment_id: uuid.UUID, lost_after: float) -> bool:
    async with service_transaction(pool) as conn:
        row = await conn.fetchrow(query("lock_running_experiment"), experiment_id)
        if row is None:
            return False  # finished meanwhile, or another worker's sweep got there first
        gpu_hours = row["running_seconds"] / 3600.0 * row["gpu_count"]
        message = (
            f"worker lost: no heartbeat for more than {lost_after:g} s while running; "
            "the run was stopped and its GPU-hours up to now were charged"
        )
        try:
            await lifecycle.mark_ended(conn, bus, experiment_id, Status.FAILED, message, gpu_hours)
        except InvalidTransitionError:
            return False
        if row["job_id"] is not None:
            await conn.execute(query("finish_lost_job"), row["job_id"])
    logger.warning(
        "lost run ended as failed",
        extra={
            "experiment_id": str(experiment_id),
            "org_id": str(row["org_id"]),
            "tool_id": row["tool_id"],
            "gpu_hours": gpu_hours,
        },
    )
    metrics.experiments_completed_total.labels(row["tool_id"], Status.FAILED.value).inc()
    return True


async def heartbeat_loop(
    pool: asyncpg.Pool,
    running: Callable[[], Iterable[uuid.UUID]],
    *,
    interval_seconds: float,
    stop: asyncio.Event,
    on_lost: Callable[[set[uuid.UUID]], None] = lambda ids: None,
) -> None:
    """Refresh `heartbeat_at` of the runs `running()` returns, every `interval_seconds`, until `stop`."""
    while not stop.is_set():
        ids = list(running())
        if ids:
            try:
                async with service_transaction(pool) as conn:
                    beaten = {row["id"] for row in await conn.fetch(query("beat_running"), ids)}
                if lost := set(ids) - beaten:
                    # Ended elsewhere, for example failed by a sweep while this process was stalled.
                    on_lost(lost)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                logger.error("run heartbeat failed; retrying next interval", extra={"error": repr(exc)})
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
        except TimeoutError:
            pass


async def recovery_loop(
    pool: asyncpg.Pool, bus: EventBus, *, interval_seconds: float, lost_after_seconds: float, stop: asyncio.Event
) -> None:
    """Sweep for lost runs every `interval_seconds` until `stop` is set."""
    while not stop.is_set():
        try:
            ended = await recover_lost_runs(pool, bus, lost_after_seconds)
            if ended:
                logger.info("recovery sweep ended lost runs", extra={"ended": ended})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            logger.error("recovery sweep failed; retrying next interval", extra={"error": repr(exc)})
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_seconds)
        except TimeoutError:
            pass
