"""The `iiq` command: serve, worker, migrate, demo, and operator commands for orgs, keys and quota."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import asyncpg

from iiq.errors import IIQError
from iiq.logs import configure_logging
from iiq.settings import Settings, load_settings
from iiq.timefmt import iso_utc


def _uuid(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a UUID") from None


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"{value} must be a finite number >= 0")
    return number


def _name(value: str) -> str:
    name = value.strip()
    if not 1 <= len(name) <= 200:
        raise argparse.ArgumentTypeError(f"a name must be 1 to 200 characters, got {len(name)}")
    return name


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iiq", description="iiq experiment engine")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the REST API and, unless --no-worker, a worker")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--no-worker", action="store_true", help="serve the API only; run workers with `iiq worker`")

    commands.add_parser("worker", help="run a worker without the API")
    commands.add_parser("migrate", help="apply pending database migrations")
    demo = commands.add_parser("demo", help="run one L5 Batching experiment end to end and print its events")
    demo.add_argument("--port", type=int, default=0, help="TCP port for the demo server (default: a free one)")

    orgs = commands.add_parser("orgs", help="manage orgs").add_subparsers(dest="action", required=True)
    org_create = orgs.add_parser("create", help="create an org with the default quota")
    org_create.add_argument("name", type=_name, help="display name of the org (1 to 200 characters)")
    org_create.add_argument("--json", action="store_true", help="print one JSON object")

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    key_create = keys.add_parser("create", help="create an API key; the key is shown once")
    key_create.add_argument("--org", type=_uuid, required=True, help="org id")
    key_create.add_argument("--name", type=_name, default="default", help="label of the key (1 to 200 characters)")
    key_create.add_argument("--json", action="store_true", help="print one JSON object")
    key_revoke = keys.add_parser("revoke", help="revoke an API key; effective on the next request")
    key_revoke.add_argument("key_id", type=_uuid, help="id of the key (not the key itself)")
    key_revoke.add_argument("--json", action="store_true", help="print one JSON object")

    quota = commands.add_parser("quota", help="manage quotas").add_subparsers(dest="action", required=True)
    quota_set = quota.add_parser("set", help="change an org's quota")
    quota_set.add_argument("--org", type=_uuid, required=True, help="org id")
    quota_set.add_argument("--monthly-gpu-hours", type=_non_negative, help="monthly GPU-hour budget")
    quota_set.add_argument(
        "--max-concurrent", type=_positive_int, help="cap on pending, queued and running experiments"
    )
    quota_set.add_argument("--json", action="store_true", help="print one JSON object")
    quota_recount = quota.add_parser(
        "recount", help="recount in-flight experiments into the quota, after an upgrade left a count wrong"
    )
    quota_recount.add_argument("--org", type=_uuid, help="org id (default: every org)")
    quota_recount.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, default=lambda value: iso_utc(value) if isinstance(value, datetime) else str(value)))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's loop factory when uvloop is installed (as uvicorn also prefers it), else None."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except IIQError as exc:
        print(f"iiq: {exc}", file=sys.stderr)
        return 2
    # The demo prints its own narrative; only problems should interrupt it.
    level = "WARNING" if args.command == "demo" and "IIQ_LOG_LEVEL" not in os.environ else settings.log_level
    configure_logging(settings.log_format, level)

    from iiq import commands

    handlers: dict[
        str, Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, dict[str, Any] | int | None] | int]
    ] = {
        "serve": commands.serve,
        "worker": commands.worker,
        "migrate": commands.migrate,
        "demo": commands.demo,
        "orgs": commands.orgs,
        "keys": commands.keys,
        "quota": commands.quota,
    }
    try:
        outcome = handlers[args.command](settings, args)
        if isinstance(outcome, int):
            return outcome
        with asyncio.Runner(loop_factory=fast_loop_factory()) as runner:
            result = runner.run(outcome)
    except IIQError as exc:
        print(f"iiq: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except asyncpg.UndefinedTableError as exc:
        print(f"iiq: the database is not migrated ({exc}): run `iiq migrate` first", file=sys.stderr)
        return 1
    except asyncpg.PostgresError as exc:
        print(f"iiq: database error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"iiq: cannot reach the database: {exc}; check IIQ_DATABASE_URL", file=sys.stderr)
        return 1
    if isinstance(result, int):
        return result
    if isinstance(result, dict):
        _print(result, getattr(args, "json", False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
