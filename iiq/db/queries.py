"""Named SQL statements loaded from `sql/queries/*.sql`.

Each statement follows a ``-- name: verb_noun`` line and is named after the Python function
that runs it, so a grep for the name finds both.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_NAME_LINE = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def sql_dir() -> Path:
    """Return the `sql/` directory: packaged beside iiq in a wheel, or the checkout's."""
    packaged = Path(__file__).resolve().parent.parent / "_sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "sql"


@cache
def _all_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for path in sorted((sql_dir() / "queries").glob("*.sql")):
        parts = _NAME_LINE.split(path.read_text())
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in queries:
                raise RuntimeError(f"query {name!r} is defined twice; the second is in {path}")
            queries[name] = body.strip().rstrip(";")
    return queries


def query(name: str) -> str:
    try:
        return _all_queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in {sql_dir() / 'queries'}") from None
