"""Experiment templates: saved configurations that experiments are created from.

A template stores a tool_id, target, input_config and goal under a name that is unique in its
org. Saving or updating one runs the same checks as creating an experiment, so an invalid
template cannot be stored. Creating an experiment from a template deep-merges the request's
overrides over the stored configuration and then runs the ordinary create: validation, cost
estimate and quota admission. The experiment stores the merged configuration whole, with the
template id and a hash of that configuration, so later edits of the template never change
existing experiments.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.errors import ConflictError, NotFoundError, UnknownToolError, ValidationFailed
from iiq.experiments.create import create_experiment, validate_and_estimate
from iiq.experiments.events import EventBus
from iiq.experiments.registry import all_handlers, get_handler
from iiq.orgs import Principal
from iiq.settings import Settings

logger = logging.getLogger(__name__)

MAX_NAME_LENGTH = 200
# Name of the UNIQUE (org_id, name) constraint in the migration that creates the table.
_NAME_CONSTRAINT = "experiment_templates_org_name"


@dataclass(frozen=True)
class TemplateFields:
    """Everything a client sets on a template."""

    name: str
    tool_id: str
    target: dict[str, Any]
    input_config: dict[str, Any]
    goal: str | None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return `base` with `override` merged in, leaving both arguments unchanged.

    Where both values of a key are objects, they merge key by key. Any other value in
    `override` (a list, scalar or null) replaces the value in `base`.
    """
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            merged[key] = deep_merge(current, value)
        else:
            merged[key] = value
    return merged


def validate_template(fields: TemplateFields) -> None:
    """Raise `ValidationFailed` listing every problem of the name, the tool and its configuration."""
    errors: list[str] = []
    if not fields.name.strip():
        errors.append("name must not be blank: give the template a name such as 'llama-8b-h100-batching'")
    elif len(fields.name) > MAX_NAME_LENGTH:
        errors.append(f"name is {len(fields.name)} characters long; the maximum is {MAX_NAME_LENGTH}")

    handler = get_handler(fields.tool_id)
    if handler is None:
        errors.extend(UnknownToolError(fields.tool_id, [h.tool_id for h in all_handlers()]).errors)
    else:
        try:
            validate_and_estimate(handler, fields.target, fields.input_config, fields.goal)
        except ValidationFailed as exc:
            errors.extend(exc.errors)

    if errors:
        raise ValidationFailed(errors)


def _name_taken(name: str) -> ConflictError:
    return ConflictError(
        f"the org already has an experiment template named {name!r}: choose another name or update that template"
    )


async def insert_template(conn: Connection, org_id: uuid.UUID, fields: TemplateFields) -> asyncpg.Record:
    validate_template(fields)

    row = await conn.fetchrow(
        query("insert_template"),
        uuid.uuid4(),
        org_id,
        fields.name,
        fields.tool_id,
        fields.target,
        fields.input_config,
        fields.goal,
    )
    if row is None:
        raise _name_taken(fields.name)

    logger.info(
        "experiment template created",
        extra={"template_id": str(row["id"]), "org_id": str(org_id), "tool_id": fields.tool_id},
    )
    return row


async def get_template(conn: Connection, template_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(query("get_template"), template_id)
    if row is None:
        raise NotFoundError("experiment template", template_id)
    return row


async def update_template(conn: Connection, template_id: uuid.UUID, fields: TemplateFields) -> asyncpg.Record:
    """Replace every field of the template; experiments created from it earlier keep their configuration."""
    validate_template(fields)

    try:
        row = await conn.fetchrow(
            query("update_template"),
            template_id,
            fields.name,
            fields.tool_id,
            fields.target,
            fields.input_config,
            fields.goal,
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != _NAME_CONSTRAINT:
            raise
        raise _name_taken(fields.name) from None
    if row is None:
        raise NotFoundError("experiment template", template_id)

    logger.info(
        "experiment template updated",
        extra={"template_id": str(template_id), "org_id": str(row["org_id"]), "tool_id": fields.tool_id},
    )
    return row


async def delete_template(conn: Connection, template_id: uuid.UUID) -> None:
    """Delete the template; experiments created from it keep its id and their configuration."""
    if await conn.fetchval(query("delete_template"), template_id) is None:
        raise NotFoundError("experiment template", template_id)
    logger.info("experiment template deleted", extra={"template_id": str(template_id)})


async def create_from_template(
    conn: Connection,
    bus: EventBus,
    settings: Settings,
    principal: Principal,
    template_id: uuid.UUID,
    *,
    target: dict[str, Any],
    input_config: dict[str, Any],
    goal: str | None | msgspec.UnsetType,
    now: datetime | None = None,
) -> asyncpg.Record:
    """Create an experiment from the template with `target` and `input_config` deep-merged over
    the template's; `goal` replaces the template's goal unless it is UNSET."""
    template = await get_template(conn, template_id)
    tool_id: str = template["tool_id"]
    if get_handler(tool_id) is None:
        registered = ", ".join(h.tool_id for h in all_handlers()) or "none"
        raise ValidationFailed(
            [
                f"experiment template {template_id} uses tool_id {tool_id!r}, which is not registered in this "
                f"process (registered tools are {registered}): register the tool or update the template's tool_id"
            ]
        )

    return await create_experiment(
        conn,
        bus,
        settings,
        principal,
        tool_id=tool_id,
        target=deep_merge(template["target"], target),
        input_config=deep_merge(template["input_config"], input_config),
        goal=template["goal"] if isinstance(goal, msgspec.UnsetType) else goal,
        now=now,
        template_id=template_id,
    )
