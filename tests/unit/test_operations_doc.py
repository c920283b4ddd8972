"""docs/operations.md lists every setting with its default, and deploy/iiq.env.example lists every setting."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from iiq.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "operations.md"
ENV_EXAMPLE = ROOT / "deploy" / "iiq.env.example"

# A settings-table row: | `IIQ_NAME` | `default` or empty | unit | meaning |
_TABLE_ROW = re.compile(r"^\| `(IIQ_[A-Z0-9_]+)` \| (?:`([^`]*)`|(empty)) \|", re.MULTILINE)
_ENV_LINE = re.compile(r"^#?(IIQ_[A-Z0-9_]+)=", re.MULTILINE)


def documented_defaults() -> dict[str, str]:
    """Return the default column of the guide's settings table, by variable name."""
    return {name: "" if empty else value for name, value, empty in _TABLE_ROW.findall(GUIDE.read_text())}


def expected_defaults() -> dict[str, str]:
    """Return each setting's default as the guide writes it: `1800`, not `1800.0`."""
    defaults = {}
    for field in msgspec.structs.fields(Settings):
        value = field.default
        defaults[ENV_PREFIX + field.name.upper()] = f"{value:g}" if isinstance(value, float) else str(value)
    return defaults


def test_guide_lists_every_setting() -> None:
    documented = documented_defaults()
    expected = expected_defaults()

    assert set(documented) == set(expected), "settings table of docs/operations.md is out of date"


def test_guide_defaults_match_settings() -> None:
    documented = documented_defaults()

    for name, default in expected_defaults().items():
        assert documented.get(name) == default, f"{name}: the guide says {documented.get(name)!r}, Settings {default!r}"


def test_env_example_lists_every_setting() -> None:
    listed = set(_ENV_LINE.findall(ENV_EXAMPLE.read_text()))

    assert listed == set(expected_defaults()), "deploy/iiq.env.example is out of date"
