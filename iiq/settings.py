"""Settings: one struct read from `IIQ_*` environment variables and validated at start-up."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import msgspec

from iiq.errors import ConfigurationError

ENV_PREFIX = "IIQ_"

# A stream token travels in a URL, which access logs and browser history keep, so it must be short-lived.
MAX_STREAM_TOKEN_TTL_SECONDS = 86400.0
# Browsers send Origin as scheme://host[:port] with no path, and Litestar matches it exactly (`*` is a wildcard).
_ORIGIN = re.compile(r"^https?://[^/\s]+$")


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
    # Port on which `iiq worker` serves /metrics (0: none); `iiq serve` serves them with the API.
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"
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
    # Lifetime of a stream token, seconds. EventSource reconnects reuse the token's URL, so a token must
    # outlive the gaps between reconnects. A stream already open runs on after its token expires.
    stream_token_ttl_seconds: float = 600.0
    # Origins allowed to call the API from a browser (CORS), comma-separated, such as
    # "https://app.example.com". "*" allows every origin, and empty turns CORS off.
    cors_origins: str = ""
    # Largest event payload accepted by `ctx.emit`, bytes of compact JSON.
    max_event_payload_bytes: int = 65536
    # Quota of a new org.
    default_monthly_gpu_hours: float = 100.0
    default_max_concurrent: int = 5
    # Seconds an Idempotency-Key stays bound to the experiment its first request created; a
    # retry after that creates a new experiment. Default: 24 hours.
    idempotency_key_ttl_seconds: float = 86400.0
    # Extra modules to import at start-up, comma-separated; each registers its tools.
    tool_modules: str = ""
    log_format: str = "text"
    log_level: str = "INFO"

    @property
    def artifact_dir(self) -> Path:
        return Path(self.data_dir) / "artifacts"

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

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
    "stream_token_ttl_seconds",
    "max_event_payload_bytes",
    "default_max_concurrent",
    "idempotency_key_ttl_seconds",
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
    if settings.stream_token_ttl_seconds > MAX_STREAM_TOKEN_TTL_SECONDS:
        raise ConfigurationError(
            f"{ENV_PREFIX}STREAM_TOKEN_TTL_SECONDS={settings.stream_token_ttl_seconds} exceeds "
            f"{MAX_STREAM_TOKEN_TTL_SECONDS:.0f}: stream tokens travel in URLs, so keep them short-lived"
        )
    for origin in settings.cors_origin_list:
        if origin != "*" and not _ORIGIN.match(origin):
            raise ConfigurationError(
                f"{ENV_PREFIX}CORS_ORIGINS contains {origin!r}: write each origin as scheme://host[:port] "
                "with no path or trailing slash, such as https://app.example.com, or '*' for every origin"
            )
    if not 0 <= settings.worker_metrics_port <= 65535:
        raise ConfigurationError(f"{ENV_PREFIX}WORKER_METRICS_PORT={settings.worker_metrics_port} is not a TCP port")
    if settings.log_format not in ("text", "json"):
        raise ConfigurationError(f"{ENV_PREFIX}LOG_FORMAT={settings.log_format!r} must be 'text' or 'json'")
    if settings.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigurationError(f"{ENV_PREFIX}LOG_LEVEL={settings.log_level!r} must be DEBUG, INFO, WARNING or ERROR")
