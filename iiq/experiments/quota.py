"""Per-org quota: a monthly GPU-hour budget and a cap on concurrent experiments.

Admission runs in the transaction that inserts the experiment, with the org's quota row
locked (``FOR UPDATE``), so concurrent creates for one org are decided one at a time and
cannot overshoot either limit. Charging runs in the transaction of the terminal
transition, which matches at most once per experiment, so a run is charged at most once.
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


async def lock_quota(conn: Connection, org_id: uuid.UUID, now: datetime) -> asyncpg.Record:
    """Lock the org's quota row and apply the monthly reset if `month_resets_at` has passed."""
    row = await conn.fetchrow(query("lock_quota"), org_id)
    if row is None:
        raise NotFoundError("quota of org", org_id)
    if now >= row["month_resets_at"]:
        row = await conn.fetchrow(query("reset_quota_month"), org_id, next_month_start(now))
        if row is None:
            raise NotFoundError("quota of org", org_id)
    return row


async def snapshot(conn: Connection, org_id: uuid.UUID, now: datetime) -> QuotaSnapshot:
    row = await lock_quota(conn, org_id, now)
    in_flight = await conn.fetchrow(query("count_in_flight"), org_id)
    if in_flight is None:
        # An aggregate without GROUP BY returns exactly one row.
        raise RuntimeError(f"count_in_flight returned no row for org {org_id}")
    used = row["used_gpu_hours"]
    reserved = in_flight["reserved"]
    return QuotaSnapshot(
        org_id=org_id,
        monthly_gpu_hours=row["monthly_gpu_hours"],
        used_gpu_hours=used,
        reserved_gpu_hours=reserved,
        remaining_gpu_hours=max(0.0, row["monthly_gpu_hours"] - used - reserved),
        max_concurrent=row["max_concurrent"],
        active=in_flight["active"],
        month_resets_at=row["month_resets_at"],
    )


async def admit(conn: Connection, org_id: uuid.UUID, estimate: float, now: datetime) -> QuotaSnapshot:
    """Raise `QuotaExceeded` unless the org may start one more experiment costing `estimate`."""
    quota = await snapshot(conn, org_id, now)
    resets_at = iso_utc(quota.month_resets_at)

    if quota.active >= quota.max_concurrent:
        raise QuotaExceeded(
            "concurrency",
            f"org has {quota.active} active experiments, the cap is {quota.max_concurrent}: "
            "wait for one to finish or cancel one",
            {"max_concurrent": quota.max_concurrent, "active": quota.active, "month_resets_at": resets_at},
            retry_after=CONCURRENCY_RETRY_AFTER_SECONDS,
        )

    committed = quota.used_gpu_hours + quota.reserved_gpu_hours
    if estimate > 0 and committed + estimate > quota.monthly_gpu_hours + _EPSILON:
        raise QuotaExceeded(
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
    return quota


async def charge(conn: Connection, org_id: uuid.UUID, gpu_hours: float, now: datetime) -> None:
    """Add a finished run's GPU-hours to the month current at `now` (after any reset)."""
    if gpu_hours <= 0:
        return
    await lock_quota(conn, org_id, now)
    await conn.execute(query("charge_quota"), org_id, gpu_hours)


async def update_limits(
    conn: Connection, org_id: uuid.UUID, monthly_gpu_hours: float | None, max_concurrent: int | None
) -> asyncpg.Record:
    row = await conn.fetchrow(query("update_quota_limits"), org_id, monthly_gpu_hours, max_concurrent)
    if row is None:
        raise NotFoundError("quota of org", org_id)
    return row
