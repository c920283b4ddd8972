"""Browser access without a database: the CORS and stream-token settings, and API-key detection in URLs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from iiq.api.app import _cors_config, create_app
from iiq.errors import ConfigurationError
from iiq.orgs import looks_like_api_key
from iiq.settings import load_settings
from iiq.stream_tokens import NewStreamToken

API_KEY = "iiq_0123456789abcdef_" + "A" * 43


def test_defaults_turn_cors_off() -> None:
    settings = load_settings({})

    assert settings.stream_token_ttl_seconds == 600.0
    assert settings.cors_origin_list == []
    assert _cors_config(settings) is None


def test_cors_origins_parsed_from_environment() -> None:
    settings = load_settings({"IIQ_CORS_ORIGINS": " https://app.example.com, http://127.0.0.1:3000 ,"})

    assert settings.cors_origin_list == ["https://app.example.com", "http://127.0.0.1:3000"]


def test_cors_config_lists_methods_and_headers() -> None:
    config = _cors_config(load_settings({"IIQ_CORS_ORIGINS": "https://app.example.com"}))

    assert config is not None
    assert config.allow_origins == ["https://app.example.com"]
    assert set(config.allow_methods) == {"GET", "POST", "PUT", "PATCH", "DELETE"}
    assert set(config.allow_headers) == {"authorization", "content-type", "last-event-id", "idempotency-key"}
    assert config.allow_credentials is False


def test_cors_wildcard_accepted() -> None:
    settings = load_settings({"IIQ_CORS_ORIGINS": "*"})

    assert settings.cors_origin_list == ["*"]


@pytest.mark.parametrize(
    "origin", ["https://app.example.com/", "https://app.example.com/path", "app.example.com", "ftp://host"]
)
def test_cors_origin_rejected(origin: str) -> None:
    with pytest.raises(ConfigurationError, match="IIQ_CORS_ORIGINS") as error:
        load_settings({"IIQ_CORS_ORIGINS": origin})

    assert repr(origin) in str(error.value)


@pytest.mark.parametrize("ttl", ["0", "-1"])
def test_stream_token_ttl_must_be_positive(ttl: str) -> None:
    with pytest.raises(ConfigurationError, match="IIQ_STREAM_TOKEN_TTL_SECONDS"):
        load_settings({"IIQ_STREAM_TOKEN_TTL_SECONDS": ttl})


def test_stream_token_ttl_capped_at_one_day() -> None:
    with pytest.raises(ConfigurationError, match="IIQ_STREAM_TOKEN_TTL_SECONDS=86401.0 exceeds 86400"):
        load_settings({"IIQ_STREAM_TOKEN_TTL_SECONDS": "86401"})


@pytest.mark.parametrize(
    "value",
    [API_KEY, API_KEY[:30], "iiq_", f"Bearer {API_KEY}", f"x{API_KEY}"],
    ids=["whole", "truncated", "prefix-only", "bearer", "embedded"],
)
def test_api_key_detected(value: str) -> None:
    assert looks_like_api_key(value)


@pytest.mark.parametrize("value", ["iiqs_" + "A" * 43, "", "garbage", "3", "iiq"])
def test_non_key_not_detected(value: str) -> None:
    assert not looks_like_api_key(value)


def test_openapi_documents_stream_tokens() -> None:
    document = create_app(load_settings({})).openapi_schema.to_schema()

    events = document["paths"]["/experiments/{experiment_id}/events"]["get"]
    assert "stream_token" in {parameter["name"] for parameter in events["parameters"]}
    assert "last_event_id" in {parameter["name"] for parameter in events["parameters"]}
    assert "201" in document["paths"]["/experiments/{experiment_id}/stream-tokens"]["post"]["responses"]


def test_stream_token_events_url() -> None:
    experiment_id = uuid.uuid4()
    issued = NewStreamToken(token="iiqs_" + "A" * 43, experiment_id=experiment_id, expires_at=datetime.now(UTC))

    assert issued.events_url == f"/experiments/{experiment_id}/events?stream_token=iiqs_{'A' * 43}"
