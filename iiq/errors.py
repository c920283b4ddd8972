"""The one exception hierarchy of iiq; the API maps these to HTTP responses in one place."""

from __future__ import annotations

import uuid
from datetime import datetime

from iiq.timefmt import iso_utc


class IIQError(Exception):
    """Base of every error iiq raises on purpose."""


class ConfigurationError(IIQError):
    """A setting or a tool registration is invalid; the message names it and the fix."""


class DuplicateToolError(ConfigurationError):
    """A second `ToolHandler` was registered under a tool_id that is already taken."""


class AuthenticationError(IIQError):
    """The request's credentials are missing, invalid, expired or revoked (HTTP 401)."""


class NotFoundError(IIQError):
    """The entity does not exist or belongs to another org (both give the same error, so existence does not leak)."""

    def __init__(self, entity: str, entity_id: object) -> None:
        super().__init__(f"{entity} {entity_id} not found")
        self.entity = entity
        self.entity_id = entity_id


class InvalidTransitionError(IIQError):
    """A state change was requested from a state that does not allow it."""

    def __init__(self, experiment_id: uuid.UUID, current: str | None, requested: str) -> None:
        super().__init__(f"experiment {experiment_id} cannot move from {current or 'unknown'} to {requested}")
        self.experiment_id = experiment_id
        self.current = current
        self.requested = requested


class ValidationFailed(IIQError):
    """Input was rejected; `errors` lists every problem found, not only the first."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


class UnknownToolError(ValidationFailed):
    """The requested tool_id is not registered in this process."""

    def __init__(self, tool_id: str, known: list[str]) -> None:
        super().__init__([f"unknown tool_id {tool_id!r}: registered tools are {', '.join(sorted(known)) or 'none'}"])
        self.tool_id = tool_id


class QuotaExceeded(IIQError):
    """Admission refused: `reason` is "concurrency" (HTTP 429) or "budget" (HTTP 402)."""

    def __init__(self, reason: str, message: str, details: dict[str, object], retry_after: int | None) -> None:
        super().__init__(message)
        self.reason = reason
        self.details = details
        self.retry_after = retry_after


class ConflictError(IIQError):
    """The request conflicts with the entity's current state (HTTP 409)."""


class EventTooLargeError(IIQError):
    """An event payload is over the documented maximum size."""


class IdempotencyKeyReused(IIQError):
    """An Idempotency-Key was sent again with a different request (HTTP 422)."""

    def __init__(self, key: str, expires_at: datetime) -> None:
        super().__init__(
            f"Idempotency-Key {key!r} was already used for a different request (another route or body) "
            f"and stays reserved until {iso_utc(expires_at)}: send a new key for a different request"
        )
        self.key = key
        self.expires_at = expires_at
