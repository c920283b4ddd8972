"""The long-lived parts of one iiq process: settings, pool, event bus, LISTEN hub, queue, worker."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import procrastinate

from iiq.db.embedded import start_embedded, stop_embedded
from iiq.db.migrate import migrate
from iiq.db.pool import connect_admin, create_service_pool, service_server_settings
from iiq.db.types import Connection
from iiq.errors import ConfigurationError
from iiq.experiments.events import PostgresEventBus
from iiq.experiments.hub import EventHub
from iiq.experiments.registry import discover_tools
from iiq.experiments.watchdog import LoopWatchdog, handler_tasks
from iiq.queue import names, tasks
from iiq.queue.recovery import heartbeat_loop, recovery_loop
from iiq.settings import Settings

logger = logging.getLogger(__name__)

# Names the LISTEN connection in pg_stat_activity, for operators and tests.
LISTEN_APPLICATION_NAME = "iiq-listen"
# Collections of the middle generation before a full collection is considered (Python's
# default is 10). See `_tune_garbage_collector`.
FULL_COLLECTION_EVERY = 100


@dataclass
class Runtime:
    settings: Settings
    dsn: str
    pool: asyncpg.Pool
    bus: PostgresEventBus
    hub: EventHub | None = None
    queue: procrastinate.App = field(init=False)
    collaborators: dict[str, Any] = field(default_factory=dict)

    async def remove_job(self, conn: Connection, job_id: int) -> None:
        await tasks.remove_job(self.queue, conn, job_id)


async def resolve_dsn(settings: Settings) -> str:
    return settings.database_url or await asyncio.to_thread(start_embedded, settings.data_dir)


async def run_migrations(dsn: str) -> list[str]:
    conn = await connect_admin(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


async def pending_migrations(dsn: str) -> bool:
    from iiq.db.migrate import migration_files

    conn = await connect_admin(dsn)
    try:
        exists = await conn.fetchval("SELECT to_regclass('iiq.schema_migrations') IS NOT NULL")
        rows = await conn.fetch("SELECT name FROM iiq.schema_migrations") if exists else []
        names = {row["name"] for row in rows}
    finally:
        await conn.close()
    return any(path.name not in names for path in migration_files())


@asynccontextmanager
async def open_runtime(
    settings: Settings, *, listen: bool = True, auto_migrate: bool | None = None
) -> AsyncIterator[Runtime]:
    """Open the pool, the LISTEN hub and the queue app; close them in reverse order."""
    discover_tools(settings.tool_modules)
    dsn = await resolve_dsn(settings)
    if auto_migrate is None:
        auto_migrate = settings.embedded
    if auto_migrate:
        await run_migrations(dsn)
    elif await pending_migrations(dsn):
        raise ConfigurationError("the database has pending migrations: run `iiq migrate` first")

    pool = await create_service_pool(dsn, min_size=settings.pool_min_size, max_size=settings.pool_max_size)
    runtime = Runtime(settings=settings, dsn=dsn, pool=pool, bus=PostgresEventBus())
    try:
        if listen:

            async def connect() -> asyncpg.Connection:
                server_settings = {**service_server_settings(), "application_name": LISTEN_APPLICATION_NAME}
                conn: asyncpg.Connection = await asyncpg.connect(dsn, server_settings=server_settings)
                return conn

            runtime.hub = EventHub(connect, pool=pool)
            # The runner of this process hands its committed events straight to the streams here.
            # Other processes still learn of them from the notification.
            runtime.bus.local = runtime.hub
            await runtime.hub.start()
        runtime.queue = tasks.build_queue_app(runtime)
        async with runtime.queue.open_async():
            _tune_garbage_collector()
            yield runtime
    finally:
        if runtime.hub is not None:
            await runtime.hub.stop()
        await pool.close()
        if settings.embedded:
            # uvicorn re-raises SIGTERM once it has shut down, so exit handlers never run:
            # release the embedded server here, which stops it if this was its last user.
            await asyncio.to_thread(stop_embedded, settings.data_dir)


def _tune_garbage_collector() -> None:
    """Move the objects of start-up out of the garbage collector's scans, and make full collections rarer.

    Modules, the app and the pools live as long as the process. Left in the oldest generation,
    every full collection scanned them all. In the fan-out benchmark, `iiq serve` with 1,000 open
    streams paused 110 to 177 ms per full collection, and each pause delayed every stream.

    A full collection still scans the objects of the open streams: 40 to 100 ms with 1,000
    streams in the same benchmark. By default Python considers one after every 10 collections of
    the middle generation (`gc.set_threshold`). The allocations of 1,000 streams connecting at
    once brought the next one due about 10 s later, in the middle of a delivery to every stream.
    """
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


async def run_worker(runtime: Runtime, *, stop: asyncio.Event) -> None:
    """Run the procrastinate worker and the loop watchdog until `stop` is set.

    On `stop`, the worker takes no new job and gives running ones `cancel_grace_seconds` to
    finish. Then it cancels them, and the runner ends each cancelled run in a terminal state.
    """
    watchdog = LoopWatchdog(runtime.settings.loop_stall_seconds)
    await watchdog.start()
    # Runs on after `stop`, while the worker drains its jobs, and ends with the worker.
    heartbeat_stop = asyncio.Event()
    heartbeat = asyncio.create_task(
        heartbeat_loop(
            runtime.pool,
            lambda: set(handler_tasks.values()),
            interval_seconds=runtime.settings.worker_heartbeat_seconds,
            stop=heartbeat_stop,
            on_lost=_stop_lost_handlers,
        ),
        name="iiq-run-heartbeat",
    )
    try:
        await _supervise_worker(runtime, stop)
    finally:
        heartbeat_stop.set()
        await heartbeat
        await watchdog.stop()


def _stop_lost_handlers(experiment_ids: set[uuid.UUID]) -> None:
    """Cancel the handler tasks of runs that ended elsewhere, so a resumed worker stops them."""
    for task, experiment_id in list(handler_tasks.items()):
        if experiment_id in experiment_ids and not task.done():
            logger.warning("handler of an ended run stopped", extra={"experiment_id": str(experiment_id)})
            task.cancel()


def start_recovery(runtime: Runtime, stop: asyncio.Event) -> asyncio.Task[None]:
    """Sweep for runs of lost workers in the background; every iiq process runs one sweep."""
    settings = runtime.settings
    return asyncio.create_task(
        recovery_loop(
            runtime.pool,
            runtime.bus,
            interval_seconds=settings.recovery_interval_seconds,
            lost_after_seconds=settings.worker_lost_seconds,
            stop=stop,
        ),
        name="iiq-recovery",
    )


async def _supervise_worker(runtime: Runtime, stop: asyncio.Event) -> None:
    settings = runtime.settings
    name = settings.worker_name or f"iiq-worker-{uuid.uuid4().hex[:8]}"
    while not stop.is_set():
        logger.info("worker starting", extra={"worker": name, "concurrency": settings.worker_concurrency})
        worker = asyncio.create_task(
            runtime.queue.run_worker_async(
                queues=[names.EXPERIMENTS_QUEUE, names.MAINTENANCE_QUEUE],
                concurrency=settings.worker_concurrency,
                name=name,
                install_signal_handlers=False,
                shutdown_graceful_timeout=settings.cancel_grace_seconds,
                update_heartbeat_interval=settings.worker_heartbeat_seconds,
                stalled_worker_timeout=settings.worker_lost_seconds,
            )
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({worker, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            # Cancelling run_worker_async is procrastinate's graceful stop request.
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            break
        stopping.cancel()
        error = worker.exception() if not worker.cancelled() else None
        # run_worker_async returns normally when one of its side tasks fails.
        logger.error("worker stopped unexpectedly; restarting", extra={"worker": name, "error": repr(error)})
        await asyncio.sleep(1.0)
    logger.info("worker stopped", extra={"worker": name})
