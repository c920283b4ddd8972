"""Query translation and JSON codecs of the asyncpg connector, without a database."""

from __future__ import annotations

import json
import math

import pytest

from iiq.queue import codecs
from iiq.queue.connector import translate_query


def test_translate_query_numbers_names_in_order() -> None:
    sql, names = translate_query("SELECT %(b)s, %(a)s, %(b)s")

    assert sql == "SELECT $1, $2, $1"
    assert names == ("b", "a")


def test_translate_query_unescapes_percent() -> None:
    sql, names = translate_query("SELECT '100%%', 'job id: %%)' || %(x)s, '%%(y)s'")

    assert sql == "SELECT '100%', 'job id: %)' || $1, '%(y)s'"
    assert names == ("x",)


def test_translate_query_without_placeholders() -> None:
    assert translate_query("SELECT 1") == ("SELECT 1", ())


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1, "nested": {"list": [1, 2.5, None, True, False]}},
        ["é", "\u2028", "snow ☃"],
        2**70,
        -(2**63) - 1,
        0.1,
        "",
        None,
    ],
)
def test_json_round_trip_matches_stdlib(value: object) -> None:
    encoded = codecs.encode_json(value)

    assert codecs.decode_json(encoded) == value
    assert json.loads(encoded) == value


def test_encode_json_is_compact() -> None:
    assert codecs.encode_json({"a": [1, 2], "b": None}) == b'{"a":[1,2],"b":null}'


def test_encode_json_nan_becomes_null() -> None:
    assert codecs.encode_json([math.nan, math.inf, -math.inf]) == b"[null,null,null]"


def test_decode_json_huge_float_falls_back() -> None:
    assert codecs.decode_json(b"[1e400]") == [math.inf]


def test_decode_json_malformed_raises() -> None:
    with pytest.raises(json.JSONDecodeError):
        codecs.decode_json(b"{not json")


def test_jsonb_binary_format_has_version_byte() -> None:
    encoded = codecs._encode_jsonb({"k": "v"})

    assert encoded == b'\x01{"k":"v"}'
    assert codecs._decode_jsonb(encoded) == {"k": "v"}


def test_jsonb_unknown_version_raises() -> None:
    with pytest.raises(ValueError, match="unsupported jsonb binary format version"):
        codecs._decode_jsonb(b'\x02{"k":"v"}')
