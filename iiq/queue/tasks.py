"""The procrastinate app of a process and the tasks it runs.

The app shares the service pool, so an API transaction can insert an experiment and defer
its job atomically: a rollback leaves neither a row without a job nor a job without a row.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

import procrastinate
from procrastinate import sql as procrastinate_sql
from procrastinate.types import JobToDefer

from iiq.db.pool import service_server_settings
from iiq.db.types import Connection
from iiq.experiments.runner import run_experiment
from iiq.queue.connector import AsyncpgConnector, translate_query

if TYPE_CHECKING:
    from iiq.runtime import Runtime

logger = logging.getLogger(__name__)

EXPERIMENTS_QUEUE = "experiments"
MAINTENANCE_QUEUE = "maintenance"
RUN_TASK = "iiq.run_experiment"
PRUNE_TASK = "iiq.prune_finished_jobs"
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


# procrastinate's own defer statement, run directly: its Python defer path builds the job's
# details for two log lines and costs more than the statement on every create.
_DEFER_JOBS = translate_query(procrastinate_sql.queries["defer_jobs"])[0]


async def defer_run(conn: Connection, experiment_id: uuid.UUID) -> int:
    """Defer the run of `experiment_id` inside `conn`'s transaction; return the job id."""
    job = JobToDefer(
        queue_name=EXPERIMENTS_QUEUE,
        task_name=RUN_TASK,
        priority=0,
        lock=None,
        queueing_lock=None,
        args={"experiment_id": str(experiment_id)},
        scheduled_at=None,
    )
    job_id = await conn.fetchval(_DEFER_JOBS, [job])
    if not isinstance(job_id, int):
        raise RuntimeError(f"procrastinate's defer_jobs returned {job_id!r} for experiment {experiment_id}")
    return job_id


async def remove_job(app: procrastinate.App, conn: Connection, job_id: int) -> None:
    """Delete a job that has not started, inside `conn`'s transaction; a started job is left alone."""
    await app.job_manager.cancel_job_by_id_async(job_id, delete_job=True, connection=conn)
