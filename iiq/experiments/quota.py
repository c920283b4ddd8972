"""Per-org quota: a monthly GPU-hour budget and a cap on concurrent experiments.

The quota row of an org holds its in-flight count (`active`) and the GPU-hours those
experiments reserve by estimate. Admission is a guarded UPDATE of that row inside the
statement that creates the experiment (`create_experiment`, sql/queries/experiments.sql), so
concurrent creates of one org are decided one at a time, cannot overshoot either limit, and
hold the row lock only from that statement to their commit. Every transition out of pending,
queued or running releases the experiment's share and charges the run's GPU-hours in the
transition's own statement (`iiq.release_quota`); that statement matches at most once per
experiment, so a run is released and charged exactly once.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from iiq.db.queries import query
from iiq.db.types import Connection
from iiq.errors import NotFoundError, QuotaExceeded
from iiq.timefmt import iso_utc

# Float sums of estimates such as 0.1 + 0.2 must not refuse a budget they exactly fill.
_EPSILON = 1e-9
# Retry-After, in seconds, sent with a 429 for the concurrency cap.
CONCURRENCY_RETRY_AFTER_SECONDS = 10


@dataclass(frozen=True)
class QuotaSnapshot:
    org_id: uuid.UUID
    monthly_gpu_hours: float
    used_gpu_hours: float
    reserved_gpu_hours: float
    remaining_gpu_hours: float
    max_concurrent: int
    active: int
    month_resets_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def utc_now() -> datetime:
    return datetime.now(UTC)


def next_month_start(now: datetime) -> datetime:
    """Return the first instant of the month after `now`'s month, in UTC."""
    now = now.astimezone(UTC)
    if now.month == 12:
        return datetime(now.year + 1, 1, 1, tzinfo=UTC)
    return datetime(now.year, now.month + 1, 1, tzinfo=UTC)


async def insert_quota(
    conn: Connection, org_id: uuid.UUID, monthly_gpu_hours: float, max_concurrent: int, now: datetime
) -> None:
    await conn.execute(query("insert_quota"), org_id, monthly_gpu_hours, max_concurrent, next_month_start(now))


async def snapshot(conn: Connection, org_id: uuid.UUID, now: datetime | None = None) -> QuotaSnapshot:
    """Read the org's quota as of `now` (None: the database's clock), showing a due monthly reset."""
    row = await conn.fetchrow(query("read_quota"), org_id)
    if row is None:
        raise NotFoundError("quota of org", org_id)
    if now is None:
        now = row["db_now"]
    used, resets_at = row["used_gpu_hours"], row["month_resets_at"]
    if now >= resets_at:
        used, resets_at = 0.0, next_month_start(now)
    reserved = row["reserved_gpu_hours"]
    return QuotaSnapshot(
        org_id=org_id,
        monthly_gpu_hours=row["monthly_gpu_hours"],
        used_gpu_hours=used,
        reserved_gpu_hours=reserved,
        remaining_gpu_hours=max(0.0, row["monthly_gpu_hours"] - used - reserved),
        max_concurrent=row["max_concurrent"],
        active=row["active"],
        month_resets_at=resets_at,
    )


def refusal(quota: QuotaSnapshot, estimate: float) -> QuotaExceeded | None:
    """Return why `quota` has no room for an experiment estimated at `estimate` GPU-hours, or None."""
    resets_at = iso_utc(quota.month_resets_at)
    if quota.active >= quota.max_concurrent:
        return QuotaExceeded(
            "concurrency",
            f"org has {quota.active} active experiments, the cap is {quota.max_concurrent}: "
            "wait for one to finish or cancel one",
            {"max_concurrent": quota.max_concurrent, "active": quota.active, "month_resets_at": resets_at},
            retry_after=CONCURRENCY_RETRY_AFTER_SECONDS,
        )
    committed = quota.used_gpu_hours + quota.reserved_gpu_hours
    if estimate > 0 and committed + estimate > quota.monthly_gpu_hours + _EPSILON:
        return QuotaExceeded(
            "budget",
            f"estimated {estimate:g} GPU-hours exceed the {quota.remaining_gpu_hours:g} GPU-hours left "
            f"this month: wait for the reset at {resets_at} or ask an operator to raise the budget",
            {
                "monthly_gpu_hours": quota.monthly_gpu_hours,
                "used_gpu_hours": quota.used_gpu_hours,
                "reserved_gpu_hours": quota.reserved_gpu_hours,
                "estimated_gpu_hours": estimate,
                "month_resets_at": resets_at,
            },
            retry_after=None,
        )
    return None


async def update_limits(
    conn: Connection, org_id: uuid.UUID, monthly_gpu_hours: float | None, max_concurrent: int | None
) -> asyncpg.Record:
    row = await conn.fetchrow(query("update_quota_limits"), org_id, monthly_gpu_hours, max_concurrent)
    if row is None:
        raise NotFoundError("quota of org", org_id)
    return row
