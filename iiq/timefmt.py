"""One text form for instants in messages and CLI output: ISO 8601 in UTC with a "Z", as the API writes them."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")
