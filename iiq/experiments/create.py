"""Creating an experiment: validate and estimate, then admit, defer and insert in one statement.

The statement (`create_experiment` in sql/queries/experiments.sql) sets its own row-level
scope. Sent on a connection outside a transaction it commits by itself, in one round trip;
inside the caller's transaction it commits with it. Either way a refusal or an error leaves
nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from iiq.db.queries import query
from iiq.db.tx import scoped_transaction
from iiq.db.types import Connection
from iiq.errors import QuotaExceeded, UnknownToolError, ValidationFailed
from iiq.experiments import metrics, quota
from iiq.experiments.events import EventBus, StoredEvent
from iiq.experiments.registry import ToolHandler, all_handlers, get_handler
from iiq.experiments.states import GOALS, STATUS_EVENT
from iiq.orgs import Principal
from iiq.queue.names import EXPERIMENTS_QUEUE, RUN_TASK
from iiq.settings import Settings

logger = logging.getLogger(__name__)

# Creates tried before giving up when the org's quota keeps changing under the create.
_ADMIT_ATTEMPTS = 3

MAX_GPU_COUNT = 64
_MAX_TEXT = 200


def canonical_json(value: Any) -> bytes:
    """Encode `value` as compact JSON with object keys sorted at every depth, so key order never changes the bytes."""
    return msgspec.json.encode(value, order="sorted")


def config_hash(tool_id: str, target: dict[str, Any], input_config: dict[str, Any], goal: str | None) -> str:
    """Return ``sha256:<hex>`` of the canonical JSON of an experiment's whole configuration."""
    config = {"tool_id": tool_id, "target": target, "input_config": input_config, "goal": goal}
    return "sha256:" + hashlib.sha256(canonical_json(config)).hexdigest()


def _check_target(target: dict[str, Any], goal: str | None) -> list[str]:
    errors = []
    for key in ("model_id", "hardware"):
        value = target.get(key)
        if not isinstance(value, str) or not value.strip():
            errors.append(
                f"target.{key} is required: a non-empty string such as "
                f"{'meta-llama/Llama-3.1-8B-Instruct' if key == 'model_id' else 'H100-SXM'}"
            )
        elif len(value) > _MAX_TEXT:
            errors.append(f"target.{key} is {len(value)} characters long; the maximum is {_MAX_TEXT}")
    gpu_count = target.get("gpu_count", 1)
    if isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or not 1 <= gpu_count <= MAX_GPU_COUNT:
        errors.append(f"target.gpu_count must be an integer from 1 to {MAX_GPU_COUNT}, got {gpu_count!r}")
    if goal is not None and goal not in GOALS:
        errors.append(f"goal {goal!r} is not valid: use one of {', '.join(GOALS)} or null")
    return errors


def validate_and_estimate(
    handler: ToolHandler, target: dict[str, Any], input_config: dict[str, Any], goal: str | None
) -> float:
    """Run the engine's and the tool's checks; return the estimate or raise with every error."""
    engine_errors = _check_target(target, goal)
    cfg = {**input_config, "target": target}
    try:
        tool_errors = [str(error) for error in handler.validate(cfg)]
    except Exception as exc:  # a tool's bug must not become a 500 without a message
        logger.exception("tool validate raised", extra={"tool_id": handler.tool_id})
        tool_errors = [f"tool {handler.tool_id} could not validate this input ({type(exc).__name__}: {exc})"]
    # Tools often check the same target fields; keep one message per field, the tool's.
    tool_fields = {error.split(" ", 1)[0] for error in tool_errors}
    errors = [error for error in engine_errors if error.split(" ", 1)[0] not in tool_fields] + tool_errors
    if errors:
        raise ValidationFailed(errors)

    try:
        estimate = float(handler.estimate_cost(cfg))
    except Exception as exc:
        logger.exception("tool estimate_cost raised", extra={"tool_id": handler.tool_id})
        raise ValidationFailed(
            [f"tool {handler.tool_id} could not estimate the cost of this input ({type(exc).__name__}: {exc})"]
        ) from exc
    if not math.isfinite(estimate) or estimate < 0:
        raise ValidationFailed(
            [f"tool {handler.tool_id} estimated {estimate} GPU-hours; expected a finite number >= 0"]
        )
    return estimate


async def _read_quota(conn: Connection, org_id: uuid.UUID, now: datetime | None) -> quota.QuotaSnapshot:
    if conn.is_in_transaction():
        return await quota.snapshot(conn, org_id, now)
    async with scoped_transaction(conn, org_id):
        return await quota.snapshot(conn, org_id, now)


async def create_experiment(
    conn: Connection,
    bus: EventBus,
    settings: Settings,
    principal: Principal,
    *,
    tool_id: str,
    target: dict[str, Any],
    input_config: dict[str, Any],
    goal: str | None,
    now: datetime | None = None,
    template_id: uuid.UUID | None = None,
) -> asyncpg.Record:
    """Create and queue an experiment; `template_id` records the template it was made from.

    `conn` is either outside any transaction, and the create commits before this returns, or
    in a transaction scoped to `principal`'s org, and the create commits with it.

    The quota's month is that of `now`, or of the database's clock when `now` is None (as in
    production, so that every process agrees on when a month ends).
    """
    handler = get_handler(tool_id)
    if handler is None:
        raise UnknownToolError(tool_id, [h.tool_id for h in all_handlers()])
    estimate = validate_and_estimate(handler, target, input_config, goal)

    gpu_count = int(target.get("gpu_count", 1)) if handler.uses_gpu else 0
    timeout = handler.timeout_seconds or settings.default_timeout_seconds
    experiment_id = uuid.uuid4()
    args = (
        experiment_id,
        principal.org_id,
        tool_id,
        target,
        input_config,
        goal,
        estimate,
        gpu_count,
        timeout,
        principal.created_by,
        template_id,
        config_hash(tool_id, target, input_config, goal),
        now,
        EXPERIMENTS_QUEUE,
        RUN_TASK,
        {"experiment_id": str(experiment_id)},
    )
    for _attempt in range(_ADMIT_ATTEMPTS):
        row = await conn.fetchrow(query("create_experiment"), *args)
        if row is not None:
            break
        # Refused: read the numbers for the error. When an experiment of the org ended between
        # the two statements, they show room again, so the create is tried again.
        refused = quota.refusal(await _read_quota(conn, principal.org_id, now), estimate)
        if refused is not None:
            metrics.experiment_quota_rejections_total.labels(refused.reason).inc()
            raise refused
    else:
        metrics.experiment_quota_rejections_total.labels("concurrency").inc()
        raise QuotaExceeded(
            "concurrency",
            f"org {principal.org_id} kept reaching a quota limit while this experiment was admitted: retry shortly",
            {},
            retry_after=1,
        )

    await bus.publish(
        conn,
        StoredEvent(
            experiment_id=experiment_id,
            seq=row["last_event_seq"],
            event_type=STATUS_EVENT,
            stage=row["status"],
            payload={"status": row["status"]},
            created_at=row["queued_event_created_at"],
        ),
    )
    metrics.experiment_events_total.labels(STATUS_EVENT).inc(2)
    job_id = row["job_id"]

    metrics.experiments_created_total.labels(tool_id).inc()
    logger.info(
        "experiment created",
        extra={
            "experiment_id": str(experiment_id),
            "org_id": str(principal.org_id),
            "tool_id": tool_id,
            "job_id": job_id,
        },
    )
    return row
