"""`GET /metrics`: Prometheus text format, with cluster-wide gauges read from Postgres first."""

from __future__ import annotations

import logging

import asyncpg
from litestar import Response, get
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from iiq.db.queries import query
from iiq.db.tx import service_transaction
from iiq.experiments import metrics
from iiq.runtime import Runtime

logger = logging.getLogger(__name__)


async def refresh_cluster_gauges(pool: asyncpg.Pool) -> None:
    async with service_transaction(pool) as conn:
        running = await conn.fetch(query("count_running_by_tool"))
        queued = await conn.fetch(query("count_queued_jobs"))
    # Clear first, so a tool with nothing running any more drops to no series rather than
    # keeping its last value.
    metrics.experiments_running.clear()
    for row in running:
        metrics.experiments_running.labels(row["tool_id"]).set(row["running"])
    metrics.experiment_queue_depth.clear()
    for row in queued:
        metrics.experiment_queue_depth.labels(row["queue_name"]).set(row["depth"])


@get("/metrics", tags=["health"], summary="Prometheus metrics", media_type=CONTENT_TYPE_LATEST)
async def metrics_route(state: State) -> Response[bytes]:
    runtime: Runtime = state.runtime
    try:
        await refresh_cluster_gauges(runtime.pool)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        # Serve the process-local metrics anyway; the stale gauges are the lesser harm.
        logger.warning("cluster gauges not refreshed", extra={"error": repr(exc)})
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
