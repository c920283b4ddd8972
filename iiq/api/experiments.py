"""Routes for experiments: create (directly or from a template), read, list, cancel."""

from __future__ import annotations

import base64
import binascii
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from iiq.api.request_db import RequestDb
from iiq.api.responses import CREATE_RESPONSES, FROM_TEMPLATE_RESPONSES, IDEMPOTENCY_HEADERS, READ_RESPONSES
from iiq.api.schemas import CreateExperiment, Experiment, ExperimentPage, TemplateOverrides
from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.errors import NotFoundError
from iiq.experiments import idempotency, lifecycle, templates
from iiq.experiments.create import create_experiment
from iiq.experiments.states import Status
from iiq.orgs import Principal
from iiq.runtime import Runtime

MAX_PAGE = 200

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name=idempotency.HEADER,
        required=False,
        description=(
            f"A value unique to this create, 1 to {idempotency.MAX_KEY_LENGTH} characters, such as a UUID. "
            "A retry with the same key and the same request returns the experiment the first request created "
            "(201 with `Idempotent-Replayed: true`) and reserves no more quota; the same key with a different "
            "route or body is rejected with 422. Keys are scoped to the org and expire "
            "IIQ_IDEMPOTENCY_KEY_TTL_SECONDS after first use (24 hours by default). A request that was rejected "
            "leaves no key behind."
        ),
    ),
]


def encode_cursor(created_at: datetime, experiment_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{experiment_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        created, _, ident = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        return datetime.fromisoformat(created), uuid.UUID(ident)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationException(f"invalid cursor {cursor[:100]!r}: pass the next_cursor of a previous page") from None


def _or_empty(override: dict[str, Any] | msgspec.UnsetType) -> dict[str, Any]:
    return {} if isinstance(override, msgspec.UnsetType) else override


async def _create_with_key(
    db: RequestDb,
    runtime: Runtime,
    principal: Principal,
    key: str | None,
    route: str,
    body: Any,
    create: Callable[[Connection], Awaitable[asyncpg.Record]],
    *,
    reads_first: bool,
) -> Response[Experiment]:
    """Run `create` at most once per Idempotency-Key; set `reads_first` when `create` reads the org's rows first.

    A create that reads first runs in the request's org-scoped transaction. Any other create
    without a key is one statement that sets its own scope and commits by itself.
    """
    if key is not None:
        problem = idempotency.check_key(key)
        if problem is not None:
            raise ValidationException(problem)
    elif not reads_first:
        # Outside a transaction the create statement commits by itself, in one round trip, so
        # the org's quota row is free again before the response is built.
        return Response(Experiment.from_row(await create(await db.connection())), status_code=201)

    # The request's transaction, committed after the response is built.
    conn = await db.scoped(principal.org_id)
    if key is None:
        return Response(Experiment.from_row(await create(conn)), status_code=201)
    outcome = await idempotency.create_once(
        conn,
        principal.org_id,
        key,
        idempotency.request_hash(route, body),
        runtime.settings.idempotency_key_ttl_seconds,
        lambda: create(conn),
    )
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return Response(Experiment.from_row(outcome.row), status_code=201, headers=headers)


class ExperimentController(Controller):
    path = "/experiments"
    tags = ["experiments"]

    @post(
        "/",
        status_code=201,
        responses=CREATE_RESPONSES,
        response_headers=IDEMPOTENCY_HEADERS,
        summary="Create an experiment",
    )
    async def create(
        self,
        data: JSONBody[CreateExperiment],
        principal: NamedDependency[Principal],
        runtime: NamedDependency[Runtime],
        db: NamedDependency[RequestDb],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Experiment]:
        async def create(conn: Connection) -> asyncpg.Record:
            return await create_experiment(
                conn,
                runtime.bus,
                runtime.settings,
                principal,
                tool_id=data.tool_id,
                target=data.target,
                input_config=data.input_config,
                goal=data.goal,
            )

        body = msgspec.to_builtins(data)
        return await _create_with_key(
            db, runtime, principal, idempotency_key, "POST /experiments", body, create, reads_first=False
        )

    @post(
        "/from-template/{template_id:uuid}",
        status_code=201,
        responses=FROM_TEMPLATE_RESPONSES,
        response_headers=IDEMPOTENCY_HEADERS,
        summary="Create an experiment from a template, with overrides deep-merged over its configuration",
    )
    async def create_from_template(
        self,
        template_id: FromPath[uuid.UUID],
        principal: NamedDependency[Principal],
        runtime: NamedDependency[Runtime],
        db: NamedDependency[RequestDb],
        data: JSONBody[TemplateOverrides | None] = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[Experiment]:
        overrides = data or TemplateOverrides()

        async def create(conn: Connection) -> asyncpg.Record:
            return await templates.create_from_template(
                conn,
                runtime.bus,
                runtime.settings,
                principal,
                template_id,
                target=_or_empty(overrides.target),
                input_config=_or_empty(overrides.input_config),
                goal=overrides.goal,
            )

        route = f"POST /experiments/from-template/{template_id}"
        body = msgspec.to_builtins(overrides)
        return await _create_with_key(db, runtime, principal, idempotency_key, route, body, create, reads_first=True)

    @get("/{experiment_id:uuid}", responses=READ_RESPONSES, summary="Read one experiment")
    async def read(self, experiment_id: FromPath[uuid.UUID], conn: NamedDependency[Connection]) -> Experiment:
        row = await conn.fetchrow(query("get_experiment"), experiment_id)
        if row is None:
            raise NotFoundError("experiment", experiment_id)
        return Experiment.from_row(row)

    @get("/", responses=READ_RESPONSES, summary="List experiments, newest first")
    async def list(
        self,
        conn: NamedDependency[Connection],
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
        conn: NamedDependency[Connection],
        runtime: NamedDependency[Runtime],
    ) -> Experiment:
        row = await lifecycle.cancel(conn, runtime.bus, experiment_id, runtime.remove_job)
        return Experiment.from_row(row)
