"""Settings: one struct read from `IIQ_*` environment variables and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import msgspec

from iiq.errors import ConfigurationError

ENV_PREFIX = "IIQ_"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Every tunable of iiq, with its unit in the field name or comment."""

    # Postgres URL; empty means: start the embedded server in `data_dir`.
    database_url: str = ""
    # Directory for the embedded Postgres cluster and for artifacts.
    data_dir: str = ".iiq"
    pool_min_size: int = 2
    pool_max_size: int = 10
    # Base URL clients use to reach the API, for artifact links in results.
    public_url: str = "http://127.0.0.1:8000"
    # Soft time limit of a run, seconds, unless the tool sets `timeout_seconds`.
    default_timeout_seconds: float = 1800.0
    # Seconds a running handler gets to return after a cancel request before its task is cancelled.
    cancel_grace_seconds: float = 10.0
    # Seconds between the runner's checks of the row for a cancel request.
    cancel_poll_seconds: float = 1.0
    # Jobs one worker runs at once.
    worker_concurrency: int = 10
    worker_name: str = ""
    # Seconds between a worker's heartbeats.
    worker_heartbeat_seconds: float = 5.0
    # Seconds without a heartbeat after which a worker counts as lost and its runs fail.
    worker_lost_seconds: float = 30.0
    # Seconds between sweeps for runs of lost workers.
    recovery_interval_seconds: float = 10.0
    # Seconds the event loop may be blocked before the stall is logged.
    loop_stall_seconds: float = 1.0
    # Seconds between keep-alive comments on an idle event stream.
    sse_keepalive_seconds: float = 15.0
    # Largest event payload accepted by `ctx.emit`, bytes of compact JSON.
    max_event_payload_bytes: int = 65536
    # Quota of a new org.
    default_monthly_gpu_hours: float = 100.0
    default_max_concurrent: int = 5
    # Extra modules to import at start-up, comma-separated; each registers its tools.
    tool_modules: str = ""
    log_format: str = "text"
    log_level: str = "INFO"

    @property
    def artifact_dir(self) -> Path:
        return Path(self.data_dir) / "artifacts"

    @property
    def embedded(self) -> bool:
        return not self.database_url


_POSITIVE = (
    "pool_min_size",
    "pool_max_size",
    "default_timeout_seconds",
    "cancel_grace_seconds",
    "cancel_poll_seconds",
    "worker_concurrency",
    "worker_heartbeat_seconds",
    "worker_lost_seconds",
    "recovery_interval_seconds",
    "loop_stall_seconds",
    "sse_keepalive_seconds",
    "max_event_payload_bytes",
    "default_max_concurrent",
)


def load_settings(environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
    """Build `Settings` from `IIQ_*` variables; a bad value raises naming the variable."""
    environ = os.environ if environ is None else environ
    raw: dict[str, object] = {}
    for field in msgspec.structs.fields(Settings):
        name = ENV_PREFIX + field.name.upper()
        if name in environ:
            raw[field.name] = _parse(name, environ[name], field.type)
    raw.update(overrides)
    try:
        settings = msgspec.convert(raw, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"invalid setting: {exc}") from exc
    _check(settings)
    return settings


def _parse(name: str, value: str, kind: object) -> object:
    try:
        if kind is int:
            return int(value)
        if kind is float:
            return float(value)
    except ValueError:
        raise ConfigurationError(
            f"{name}={value!r} is not a valid {getattr(kind, '__name__', kind)}: set a number"
        ) from None
    return value


def _check(settings: Settings) -> None:
    for name in _POSITIVE:
        value = getattr(settings, name)
        if value <= 0:
            raise ConfigurationError(f"{ENV_PREFIX}{name.upper()}={value} must be positive")
    if settings.pool_min_size > settings.pool_max_size:
        raise ConfigurationError(
            f"{ENV_PREFIX}POOL_MIN_SIZE={settings.pool_min_size} exceeds "
            f"{ENV_PREFIX}POOL_MAX_SIZE={settings.pool_max_size}"
        )
    if settings.worker_lost_seconds <= 2 * settings.worker_heartbeat_seconds:
        raise ConfigurationError(
            f"{ENV_PREFIX}WORKER_LOST_SECONDS={settings.worker_lost_seconds} must exceed twice "
            f"{ENV_PREFIX}WORKER_HEARTBEAT_SECONDS={settings.worker_heartbeat_seconds}, or live workers look lost"
        )
    if settings.log_format not in ("text", "json"):
        raise ConfigurationError(f"{ENV_PREFIX}LOG_FORMAT={settings.log_format!r} must be 'text' or 'json'")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigurationError(f"{ENV_PREFIX}LOG_LEVEL={settings.log_level!r} must be DEBUG, INFO, WARNING or ERROR")
