"""Routes for experiments: create, read, list, cancel."""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Annotated

import asyncpg
from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.params import FromPath, JSONBody, QueryParameter

from iiq.api.responses import CREATE_RESPONSES, READ_RESPONSES
from iiq.api.schemas import CreateExperiment, Experiment, ExperimentPage
from iiq.db.queries import query
from iiq.errors import NotFoundError
from iiq.experiments import lifecycle
from iiq.experiments.create import create_experiment
from iiq.experiments.quota import utc_now
from iiq.experiments.states import Status
from iiq.orgs import Principal
from iiq.runtime import Runtime

MAX_PAGE = 200


def encode_cursor(created_at: datetime, experiment_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{experiment_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, _, ident = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(ident)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationException(f"invalid cursor {cursor[:100]!r}: pass the next_cursor of a previous page") from None


class ExperimentController(Controller):
    path = "/experiments"
    tags = ["experiments"]

    @post("/", status_code=201, responses=CREATE_RESPONSES, summary="Create an experiment")
    async def create(
        self,
        data: JSONBody[CreateExperiment],
        principal: NamedDependency[Principal],
        conn: NamedDependency[asyncpg.Connection],
        runtime: NamedDependency[Runtime],
    ) -> Experiment:
        row = await create_experiment(
            conn,
            runtime.bus,
            runtime.defer_run,
            runtime.settings,
            principal,
            tool_id=data.tool_id,
            target=data.target,
            input_config=data.input_config,
            goal=data.goal,
            now=utc_now(),
        )
        return Experiment.from_row(row)

    @get("/{experiment_id:uuid}", responses=READ_RESPONSES, summary="Read one experiment")
    async def read(self, experiment_id: FromPath[uuid.UUID], conn: NamedDependency[asyncpg.Connection]) -> Experiment:
        row = await conn.fetchrow(query("get_experiment"), experiment_id)
        if row is None:
            raise NotFoundError("experiment", experiment_id)
        return Experiment.from_row(row)

    @get("/", responses=READ_RESPONSES, summary="List experiments, newest first")
    async def list(
        self,
        conn: NamedDependency[asyncpg.Connection],
        status: Annotated[Status | None, QueryParameter(description="Only experiments in this state")] = None,
        tool_id: Annotated[
            str | None, QueryParameter(max_length=200, description="Only this tool's experiments")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE, description="Page size")] = 50,
        cursor: Annotated[
            str | None, QueryParameter(max_length=500, description="next_cursor of the previous page")
        ] = None,
    ) -> ExperimentPage:
        after_created, after_id = decode_cursor(cursor) if cursor else (None, None)
        rows = await conn.fetch(
            query("list_experiments"), status.value if status else None, tool_id, after_created, after_id, limit + 1
        )
        items = [Experiment.from_row(row) for row in rows[:limit]]
        next_cursor = encode_cursor(rows[limit - 1]["created_at"], rows[limit - 1]["id"]) if len(rows) > limit else None
        return ExperimentPage(items=items, next_cursor=next_cursor)

    @post("/{experiment_id:uuid}/cancel", status_code=200, responses=READ_RESPONSES, summary="Cancel an experiment")
    async def cancel(
        self,
        experiment_id: FromPath[uuid.UUID],
        conn: NamedDependency[asyncpg.Connection],
        runtime: NamedDependency[Runtime],
    ) -> Experiment:
        row = await lifecycle.cancel(conn, runtime.bus, experiment_id, runtime.remove_job)
        return Experiment.from_row(row)
