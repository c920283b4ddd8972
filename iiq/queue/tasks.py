"""The procrastinate app of a process and the tasks it runs.

The app shares the service pool, so an API transaction can insert an experiment and defer
its job atomically: a rollback leaves neither a row without a job nor a job without a row.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import procrastinate

from iiq.db.pool import service_server_settings
from iiq.db.types import Connection
from iiq.experiments.runner import run_experiment
from iiq.queue.connector import AsyncpgConnector
from iiq.queue.names import EXPERIMENTS_QUEUE, MAINTENANCE_QUEUE, PRUNE_TASK, RUN_TASK

if TYPE_CHECKING:
    from iiq.runtime import Runtime

logger = logging.getLogger(__name__)

# Finished jobs are kept this long for inspection, then deleted.
FINISHED_JOB_RETENTION_HOURS = 24


def build_queue_app(runtime: Runtime) -> procrastinate.App:
    connector = AsyncpgConnector(runtime.pool, dsn=runtime.dsn, server_settings=service_server_settings())
    app = procrastinate.App(connector=connector)

    @app.task(name=RUN_TASK, queue=EXPERIMENTS_QUEUE)
    async def run_experiment_job(experiment_id: str) -> None:
        await run_experiment(
            runtime.pool,
            uuid.UUID(experiment_id),
            runtime.bus,
            settings=runtime.settings,
            collaborators=runtime.collaborators,
        )

    # A registered periodic task also keeps procrastinate 3.10's worker supervising its side
    # tasks (heartbeat, listener); without one it stops watching them at start-up.
    @app.periodic(cron="17 * * * *")
    @app.task(name=PRUNE_TASK, queue=MAINTENANCE_QUEUE)
    async def prune_finished_jobs(timestamp: int) -> None:
        await app.job_manager.delete_old_jobs(
            nb_hours=FINISHED_JOB_RETENTION_HOURS, queue=None, include_failed=True, include_cancelled=True
        )
        logger.info("finished jobs pruned", extra={"older_than_hours": FINISHED_JOB_RETENTION_HOURS})

    return app


async def remove_job(app: procrastinate.App, conn: Connection, job_id: int) -> None:
    """Delete a job that has not started, inside `conn`'s transaction; a started job is left alone."""
    await app.job_manager.cancel_job_by_id_async(job_id, delete_job=True, connection=conn)
