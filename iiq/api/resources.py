"""Small read-only routes: the org's quota, the registered tools and run artifacts."""

from __future__ import annotations

import uuid
from pathlib import Path

from litestar import get
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.response import File

from iiq.api.responses import READ_RESPONSES
from iiq.api.schemas import Quota, Tool
from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.errors import NotFoundError
from iiq.experiments import quota
from iiq.experiments.registry import all_handlers
from iiq.orgs import Principal
from iiq.runtime import Runtime


@get("/quota", responses=READ_RESPONSES, tags=["quota"], summary="The caller's org quota")
async def read_quota(principal: NamedDependency[Principal], conn: NamedDependency[Connection]) -> Quota:
    snap = await quota.snapshot(conn, principal.org_id)
    return Quota(
        monthly_gpu_hours=snap.monthly_gpu_hours,
        used_gpu_hours=snap.used_gpu_hours,
        reserved_gpu_hours=snap.reserved_gpu_hours,
        remaining_gpu_hours=snap.remaining_gpu_hours,
        max_concurrent=snap.max_concurrent,
        active=snap.active,
        month_resets_at=snap.month_resets_at,
    )


@get("/tools", responses=READ_RESPONSES, tags=["tools"], summary="Registered tools, each with a valid example")
async def list_tools(principal: NamedDependency[Principal], runtime: NamedDependency[Runtime]) -> list[Tool]:
    return [
        Tool(
            tool_id=handler.tool_id,
            name=handler.name or handler.tool_id,
            description=handler.description,
            uses_gpu=handler.uses_gpu,
            timeout_seconds=handler.timeout_seconds or runtime.settings.default_timeout_seconds,
            example_target=dict(handler.example_target),
            example_input_config=dict(handler.example_input_config),
        )
        for handler in all_handlers()
    ]


@get(
    "/experiments/{experiment_id:uuid}/artifacts/{name:str}",
    responses=READ_RESPONSES,
    tags=["experiments"],
    summary="Download an artifact of a run",
    media_type="application/octet-stream",
)
async def read_artifact(
    experiment_id: FromPath[uuid.UUID],
    name: FromPath[str],
    conn: NamedDependency[Connection],
    runtime: NamedDependency[Runtime],
) -> File:
    # The row lookup runs under the caller's org, so another org's artifacts are 404 too.
    if await conn.fetchrow(query("get_experiment_status"), experiment_id) is None:
        raise NotFoundError("experiment", experiment_id)
    # 255 bytes is the longest file name Linux file systems accept.
    if "/" in name or "\\" in name or name.startswith(".") or len(name.encode()) > 255:
        raise NotFoundError("artifact", name[:100])
    path = Path(runtime.settings.artifact_dir) / str(experiment_id) / name
    try:
        found = path.is_file()
    except OSError:
        found = False
    if not found:
        raise NotFoundError("artifact", name)
    return File(path=path, filename=name)
