"""The Litestar application: routes, dependencies, error mapping and the process lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from litestar import Litestar, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from iiq import __version__
from iiq.api.auth import provide_org_conn, provide_principal, provide_runtime
from iiq.api.errors import handle_iiq_error, handle_postgres_error, handle_unexpected_error
from iiq.api.experiments import ExperimentController
from iiq.api.metrics_route import metrics_route
from iiq.api.request_db import provide_db
from iiq.api.resources import list_tools, read_artifact, read_quota
from iiq.api.stream import create_stream_token, stream_events
from iiq.api.templates import TemplateController
from iiq.errors import IIQError
from iiq.runtime import Runtime, open_runtime, run_worker, start_recovery
from iiq.settings import Settings

logger = logging.getLogger(__name__)

# Bodies above this get a 413 response; an experiment request is a few kilobytes.
MAX_BODY_BYTES = 1_000_000


@get("/health/live", tags=["health"], summary="Liveness: the process answers", include_in_schema=True)
async def live() -> dict[str, str]:
    return {"status": "ok"}


@get("/health/ready", tags=["health"], summary="Readiness: Postgres, LISTEN connection and worker are healthy")
async def ready(state: State) -> Response[dict[str, Any]]:
    runtime: Runtime = state.runtime
    checks: dict[str, str] = {}
    try:
        async with runtime.pool.acquire(timeout=2) as conn:
            await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout=2)
        checks["postgres"] = "ok"
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        checks["postgres"] = f"failed: {type(exc).__name__}"
    if runtime.hub is not None:
        checks["listen"] = "ok" if runtime.hub.connected else "disconnected"
    worker: asyncio.Task[None] | None = state.get("worker_task")
    if worker is not None:
        checks["worker"] = "ok" if not worker.done() else "stopped"
    healthy = all(value == "ok" for value in checks.values())
    return Response({"status": "ok" if healthy else "unhealthy", "checks": checks}, status_code=200 if healthy else 503)


def create_app(settings: Settings, *, with_worker: bool = True) -> Litestar:
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_runtime(settings) as runtime:
            app.state.runtime = runtime
            stop = asyncio.Event()
            app.state.worker_stop = stop
            worker = asyncio.create_task(run_worker(runtime, stop=stop)) if with_worker else None
            app.state.worker_task = worker
            # A separate event: the worker stops on SIGTERM, the sweep only at the very end.
            recovery_stop = asyncio.Event()
            recovery = start_recovery(runtime, recovery_stop)
            logger.info("iiq started", extra={"worker": with_worker, "version": __version__})
            try:
                yield
            finally:
                stop.set()
                if worker is not None:
                    await worker
                recovery_stop.set()
                await recovery
                logger.info("iiq stopped")

    return Litestar(
        route_handlers=[
            ExperimentController,
            TemplateController,
            stream_events,
            create_stream_token,
            read_quota,
            list_tools,
            read_artifact,
            live,
            ready,
            metrics_route,
        ],
        dependencies={
            "runtime": Provide(provide_runtime, sync_to_thread=False),
            "db": Provide(provide_db),
            "principal": Provide(provide_principal),
            "conn": Provide(provide_org_conn),
        },
        exception_handlers={
            IIQError: handle_iiq_error,
            asyncpg.PostgresError: handle_postgres_error,
            Exception: handle_unexpected_error,
        },
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(title="iiq", version=__version__, path="/schema"),
        request_max_body_size=MAX_BODY_BYTES,
        cors_config=_cors_config(settings),
        # iiq configures logging itself (IIQ_LOG_FORMAT, IIQ_LOG_LEVEL); Litestar's default would replace it.
        logging_config=None,
    )


def _cors_config(settings: Settings) -> CORSConfig | None:
    """Build the CORS config for the configured origins, or None (no CORS headers) when none are set.

    Credentials are API keys in the Authorization header, never cookies, so credentialed CORS stays off.
    """
    if not settings.cors_origin_list:
        return None
    return CORSConfig(
        allow_origins=settings.cors_origin_list,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key"],
        # Scripts see only CORS-safelisted response headers unless listed: a 429 carries Retry-After.
        expose_headers=["Retry-After", "Idempotent-Replayed"],
    )
