"""The webhook body, signature, Retry-After and URL handling: pure parts, no network."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import pytest

from proca_sync.crm.base import NullBackend
from proca_sync.crm.webhook import (
    DEFAULT_TIMEOUT,
    WebhookBackend,
    encode_record,
    parse_retry_after,
    record_payload,
    sign,
)
from proca_sync.engine import Engine
from proca_sync.errors import ConfigError
from proca_sync.sync.records import SyncRecord

SAMPLES = [
    "event.json",
    "event_doubleoptin.json",
    "petition_doubleoptin.json",
    "petition_optin.json",
    "petition_optout.json",
    "share_twitter.json",
]


@pytest.mark.parametrize("name", [pytest.param(n, id=n.removesuffix(".json")) for n in SAMPLES])
def test_body_carries_every_fact_of_the_record(
    name: str, load_fixture: Callable[[str], bytes]
) -> None:
    record = Engine(backend=NullBackend()).prepare(load_fixture(name))
    assert isinstance(record, SyncRecord)
    body = orjson.loads(encode_record(record))
    assert body == orjson.loads(orjson.dumps(record_payload(record)))
    assert (body["key"], body["kind"], body["lane"]) == (record.key, record.kind, record.lane)
    assert record.contact is not None
    contact = body["contact"]
    assert contact["refs"] == sorted(record.contact.refs)
    assert contact["emails"] == sorted(record.contact.emails)
    assert contact["fields"] == record.contact.fields
    assert contact["stamp"] == record.contact.stamp
    assert contact["admit"] is record.contact.admit
    assert contact["testing"] is (not record.contact.real)
    if record.contact.consent is None:
        assert contact["consent"] is None
    else:
        assert contact["consent"]["actionId"] == record.contact.consent.action_id
    if record.contact.status is None:
        assert contact["emailStatus"] is None
    else:
        assert contact["emailStatus"]["status"] == record.contact.status.status
        assert contact["emailStatus"]["stamp"] == record.contact.status.stamp
    if record.action is None:
        assert body["action"] is None
    else:
        assert body["action"]["actionId"] == record.action.action_id
        assert body["action"]["version"] == record.action.version
        assert body["action"]["data"] == record.action.data
    if record.campaign is None:
        assert body["campaign"] is None
    else:
        assert body["campaign"] == {
            "name": record.campaign.name,
            "data": record.campaign.data,
            "stamp": record.campaign.stamp,
        }


def test_body_without_contact_action_or_campaign() -> None:
    body = orjson.loads(encode_record(SyncRecord(key="k", kind="x")))
    assert body == {
        "key": "k",
        "kind": "x",
        "lane": "key:k",
        "contact": None,
        "action": None,
        "campaign": None,
    }


def test_signature_is_hmac_sha256_of_the_body() -> None:
    expected = hmac.new(b"secret", b"{}", hashlib.sha256).hexdigest()
    assert sign(b"secret", b"{}") == f"sha256={expected}"


NOW = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, None, id="absent"),
        pytest.param("", None, id="empty"),
        pytest.param("120", 120.0, id="seconds"),
        pytest.param(" 1.5 ", 1.5, id="fractional"),
        pytest.param("-3", 0.0, id="negative"),
        pytest.param("Mon, 01 Jan 2024 12:02:00 GMT", 120.0, id="http-date"),
        pytest.param("Mon, 01 Jan 2024 11:00:00 GMT", 0.0, id="date-in-the-past"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("nan", None, id="nan"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_timeout_from_the_url_is_removed_from_it() -> None:
    backend = WebhookBackend("https://crm.example/hook?token=t&timeout=2.5")
    assert backend.timeout == 2.5
    assert backend.url == "https://crm.example/hook?token=t"
    assert WebhookBackend("https://crm.example/hook?timeout=2", timeout=7).timeout == 7
    assert WebhookBackend("https://crm.example/hook").timeout == DEFAULT_TIMEOUT


@pytest.mark.parametrize(
    ("url", "kwargs"),
    [
        pytest.param("ftp://crm.example/", {}, id="scheme"),
        pytest.param("http:///nohost", {}, id="no-host"),
        pytest.param("https://crm.example/?timeout=soon", {}, id="timeout-not-a-number"),
        pytest.param("https://crm.example/", {"timeout": 0}, id="zero-timeout"),
        pytest.param("https://crm.example/", {"max_connections": 0}, id="no-connections"),
    ],
)
def test_bad_configuration_is_a_config_error(url: str, kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        WebhookBackend(url, **kwargs)  # type: ignore[arg-type]
