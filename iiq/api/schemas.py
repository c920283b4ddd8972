"""Request and response bodies of the API, as msgspec structs (they also drive OpenAPI)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec


class CreateExperiment(msgspec.Struct, forbid_unknown_fields=True):
    tool_id: str
    target: dict[str, Any]
    input_config: dict[str, Any] = msgspec.field(default_factory=dict)
    goal: str | None = None


class Experiment(msgspec.Struct):
    id: uuid.UUID
    tool_id: str
    status: str
    target: dict[str, Any]
    input_config: dict[str, Any]
    goal: str | None
    # The template the experiment was created from; the id stays after the template is deleted.
    template_id: uuid.UUID | None
    # "sha256:<hex>" of the canonical JSON of tool_id, target, input_config and goal; null for
    # experiments created before config hashes were stored.
    config_hash: str | None
    estimated_gpu_hours: float
    actual_gpu_hours: float | None
    results_summary: dict[str, Any] | None
    error_message: str | None
    created_by: str | None
    cancel_requested: bool
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    events_url: str

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Experiment:
        return cls(
            id=row["id"],
            tool_id=row["tool_id"],
            status=row["status"],
            target=row["target"],
            input_config=row["input_config"],
            goal=row["goal"],
            template_id=row.get("template_id"),
            config_hash=row.get("config_hash"),
            estimated_gpu_hours=row["estimated_gpu_hours"],
            actual_gpu_hours=row["actual_gpu_hours"],
            results_summary=row["results_summary"],
            error_message=row["error_message"],
            created_by=row["created_by"],
            cancel_requested=row["cancel_requested_at"] is not None,
            created_at=row["created_at"],
            queued_at=row["queued_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            events_url=f"/experiments/{row['id']}/events",
        )


class ExperimentPage(msgspec.Struct):
    items: list[Experiment]
    next_cursor: str | None


class TemplateBody(msgspec.Struct, forbid_unknown_fields=True):
    """A template to create, or every field of one to replace."""

    name: str
    tool_id: str
    target: dict[str, Any]
    input_config: dict[str, Any] = msgspec.field(default_factory=dict)
    goal: str | None = None


class TemplateOverrides(msgspec.Struct, forbid_unknown_fields=True):
    """Changes to a template's configuration for one experiment.

    `target` and `input_config` are deep-merged over the template's: objects merge key by key,
    and any other value (list, scalar or null) replaces the template's. `goal` replaces the
    template's goal when present, and null clears it.
    """

    target: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    input_config: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    goal: str | None | msgspec.UnsetType = msgspec.UNSET


class Template(msgspec.Struct):
    id: uuid.UUID
    name: str
    tool_id: str
    target: dict[str, Any]
    input_config: dict[str, Any]
    goal: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Template:
        return cls(
            id=row["id"],
            name=row["name"],
            tool_id=row["tool_id"],
            target=row["target"],
            input_config=row["input_config"],
            goal=row["goal"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


class TemplatePage(msgspec.Struct):
    items: list[Template]
    next_cursor: str | None


class Quota(msgspec.Struct):
    monthly_gpu_hours: float
    used_gpu_hours: float
    reserved_gpu_hours: float
    remaining_gpu_hours: float
    max_concurrent: int
    active: int
    month_resets_at: datetime


class Tool(msgspec.Struct):
    tool_id: str
    name: str
    description: str
    uses_gpu: bool
    timeout_seconds: float
    example_target: dict[str, Any]
    example_input_config: dict[str, Any]


class StreamToken(msgspec.Struct):
    token: str
    experiment_id: uuid.UUID
    expires_at: datetime
    # Relative to the API's base URL; the token is URL-safe and needs no escaping.
    events_url: str


class ErrorBody(msgspec.Struct):
    status_code: int
    detail: str
    extra: dict[str, Any] | list[Any] | None = None
