"""Routes for experiment templates: create, list, read, replace and delete.

Experiments are created from a template by `POST /experiments/from-template/{id}`, in
`iiq.api.experiments`.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from litestar import Controller, delete, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, QueryParameter

from iiq.api.experiments import MAX_PAGE, decode_cursor, encode_cursor
from iiq.api.responses import READ_RESPONSES, TEMPLATE_WRITE_RESPONSES
from iiq.api.schemas import Template, TemplateBody, TemplatePage
from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.experiments import templates
from iiq.orgs import Principal


def _fields(data: TemplateBody) -> templates.TemplateFields:
    return templates.TemplateFields(
        name=data.name, tool_id=data.tool_id, target=data.target, input_config=data.input_config, goal=data.goal
    )


class TemplateController(Controller):
    path = "/experiment-templates"
    tags = ["experiment templates"]

    @post("/", status_code=201, responses=TEMPLATE_WRITE_RESPONSES, summary="Save an experiment template")
    async def create(
        self,
        data: JSONBody[TemplateBody],
        principal: NamedDependency[Principal],
        conn: NamedDependency[Connection],
    ) -> Template:
        row = await templates.insert_template(conn, principal.org_id, _fields(data))
        return Template.from_row(row)

    @get("/", responses=READ_RESPONSES, summary="List experiment templates, newest first")
    async def list(
        self,
        conn: NamedDependency[Connection],
        tool_id: Annotated[
            str | None, QueryParameter(max_length=200, description="Only templates of this tool")
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE, description="Page size")] = 50,
        cursor: Annotated[
            str | None, QueryParameter(max_length=500, description="next_cursor of the previous page")
        ] = None,
    ) -> TemplatePage:
        after_created, after_id = decode_cursor(cursor) if cursor else (None, None)
        rows = await conn.fetch(query("list_templates"), tool_id, after_created, after_id, limit + 1)
        items = [Template.from_row(row) for row in rows[:limit]]
        next_cursor = encode_cursor(rows[limit - 1]["created_at"], rows[limit - 1]["id"]) if len(rows) > limit else None
        return TemplatePage(items=items, next_cursor=next_cursor)

    @get("/{template_id:uuid}", responses=READ_RESPONSES, summary="Read one experiment template")
    async def read(self, template_id: FromPath[uuid.UUID], conn: NamedDependency[Connection]) -> Template:
        return Template.from_row(await templates.get_template(conn, template_id))

    @put(
        "/{template_id:uuid}",
        responses=TEMPLATE_WRITE_RESPONSES,
        summary="Replace every field of an experiment template; experiments made from it keep their configuration",
    )
    async def replace(
        self,
        template_id: FromPath[uuid.UUID],
        data: JSONBody[TemplateBody],
        conn: NamedDependency[Connection],
    ) -> Template:
        row = await templates.update_template(conn, template_id, _fields(data))
        return Template.from_row(row)

    @delete("/{template_id:uuid}", status_code=204, responses=READ_RESPONSES, summary="Delete an experiment template")
    async def remove(self, template_id: FromPath[uuid.UUID], conn: NamedDependency[Connection]) -> None:
        await templates.delete_template(conn, template_id)
