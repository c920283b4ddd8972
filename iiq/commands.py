"""Implementations of the `iiq` sub-commands; `iiq.cli` parses their arguments."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import uuid
from typing import Any

import asyncpg
import msgspec
import prometheus_client
import uvicorn

from iiq import orgs as org_store
from iiq.db.pool import connect_admin
from iiq.db.queries import query
from iiq.db.tx import set_bypass
from iiq.errors import ConfigurationError, NotFoundError
from iiq.experiments import quota as quota_store
from iiq.experiments.registry import discover_tools
from iiq.runtime import open_runtime, pending_migrations, resolve_dsn, run_migrations, run_worker, start_recovery
from iiq.server import IIQServer
from iiq.settings import Settings
from iiq.timefmt import iso_utc

logger = logging.getLogger(__name__)


def serve(settings: Settings, args: argparse.Namespace) -> int:
    from iiq.api.app import create_app

    if "IIQ_PUBLIC_URL" not in os.environ:
        # Artifact links in results must reach this server; an operator behind a proxy sets the URL.
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        settings = msgspec.structs.replace(settings, public_url=f"http://{host}:{args.port}")
    # Check what start-up needs before uvicorn runs the app, so a problem is one line, not a traceback.
    asyncio.run(_preflight(settings))
    app = create_app(settings, with_worker=not args.no_worker)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.cancel_grace_seconds) + 1,
    )
    IIQServer(config, app).run()
    return 0


async def _preflight(settings: Settings) -> None:
    discover_tools(settings.tool_modules)
    dsn = await resolve_dsn(settings)
    if settings.embedded:
        await run_migrations(dsn)
    elif await pending_migrations(dsn):
        raise ConfigurationError("the database has pending migrations: run `iiq migrate` first")


async def worker(settings: Settings, args: argparse.Namespace) -> None:
    if settings.worker_metrics_port:
        # A worker has no API; its run counters and histograms need an endpoint of their own.
        prometheus_client.start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host)
        logger.info(
            "worker metrics served", extra={"host": settings.worker_metrics_host, "port": settings.worker_metrics_port}
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_runtime(settings, listen=False) as runtime:
        recovery_stop = asyncio.Event()
        recovery = start_recovery(runtime, recovery_stop)
        try:
            await run_worker(runtime, stop=stop)
        finally:
            recovery_stop.set()
            await recovery


async def migrate(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    applied = await run_migrations(await resolve_dsn(settings))
    return {"applied": ", ".join(applied) or "nothing: the database is up to date"}


async def _admin(settings: Settings) -> Any:
    dsn = await resolve_dsn(settings)
    if settings.embedded:
        await run_migrations(dsn)
    return await connect_admin(dsn)


async def orgs(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    conn = await _admin(settings)
    try:
        async with conn.transaction():
            org = await org_store.create_org(
                conn,
                args.name,
                monthly_gpu_hours=settings.default_monthly_gpu_hours,
                max_concurrent=settings.default_max_concurrent,
                now=quota_store.utc_now(),
            )
    finally:
        await conn.close()
    return {
        "org_id": str(org["id"]),
        "name": org["name"],
        "monthly_gpu_hours": settings.default_monthly_gpu_hours,
        "max_concurrent": settings.default_max_concurrent,
    }


async def keys(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    conn = await _admin(settings)
    try:
        async with conn.transaction():
            if args.action == "create":
                key = await org_store.create_key(conn, args.org, args.name)
                return {
                    "key_id": str(key.id),
                    "org_id": str(key.org_id),
                    "name": key.name,
                    "api_key": key.secret,
                    "note": "the key is shown only now: store it",
                }
            row = await org_store.revoke_key(conn, args.key_id)
            return {
                "key_id": str(row["id"]),
                "org_id": str(row["org_id"]),
                "name": row["name"],
                "revoked_at": iso_utc(row["revoked_at"]),
            }
    finally:
        await conn.close()


async def quota(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    if args.action == "recount":
        return await _recount_quota(settings, args.org)
    if args.monthly_gpu_hours is None and args.max_concurrent is None:
        raise SystemExit("iiq quota set: give --monthly-gpu-hours, --max-concurrent or both")
    conn = await _admin(settings)
    try:
        async with conn.transaction():
            await set_bypass(conn)
            await quota_store.update_limits(conn, args.org, args.monthly_gpu_hours, args.max_concurrent)
            snap = await quota_store.snapshot(conn, args.org)
    finally:
        await conn.close()
    return {
        "org_id": str(snap.org_id),
        "monthly_gpu_hours": snap.monthly_gpu_hours,
        "max_concurrent": snap.max_concurrent,
        "used_gpu_hours": snap.used_gpu_hours,
        "reserved_gpu_hours": snap.reserved_gpu_hours,
        "remaining_gpu_hours": snap.remaining_gpu_hours,
        "active": snap.active,
        "month_resets_at": iso_utc(snap.month_resets_at),
    }


# Tries of `iiq quota recount` when its table locks deadlock with the engine.
_RECOUNT_ATTEMPTS = 3


async def _recount_quota(settings: Settings, org_id: uuid.UUID | None) -> dict[str, Any]:
    """Recount in-flight experiments into the quota rows, briefly holding up creates and endings."""
    conn = await _admin(settings)
    try:
        for attempt in range(_RECOUNT_ATTEMPTS):
            try:
                async with conn.transaction():
                    await set_bypass(conn)
                    await conn.execute(query("lock_for_recount"))
                    rows = await conn.fetch(query("recount_quota"), org_id)
                break
            except asyncpg.DeadlockDetectedError:
                # Locking both tables can deadlock with a create or an ending that holds one of
                # them; Postgres aborts one side, and the recount simply runs again.
                if attempt == _RECOUNT_ATTEMPTS - 1:
                    raise
    finally:
        await conn.close()
    if org_id is not None and not rows:
        raise NotFoundError("quota of org", org_id)
    changed = [
        {
            "org_id": str(row["org_id"]),
            "active_before": row["active_before"],
            "active": row["active"],
            "reserved_gpu_hours_before": row["reserved_before"],
            "reserved_gpu_hours": row["reserved"],
        }
        for row in rows
        if row["changed"]
    ]
    return {"orgs_checked": len(rows), "orgs_corrected": changed}


async def demo(settings: Settings, args: argparse.Namespace) -> int | None:
    from iiq.demo import run_demo

    return await run_demo(settings, args.port)
