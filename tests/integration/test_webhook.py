"""The webhook backend against a real HTTP CRM on loopback (``tests.support.crm_server``):
status mapping, Retry-After, timeouts, resets, signatures and per-lane ordering."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import orjson
import pytest

from proca_sync.crm.base import NullBackend
from proca_sync.crm.webhook import WebhookBackend
from proca_sync.engine import Engine
from proca_sync.errors import BackendRejectedError, BackendUnavailableError, Reason
from proca_sync.sync.records import CampaignFact, SyncRecord
from tests.support.crm_server import CrmServer, Received

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"


def load(name: str) -> SyncRecord:
    prepared = Engine(backend=NullBackend()).prepare((FIXTURES / name).read_bytes())
    assert isinstance(prepared, SyncRecord)
    return prepared


@pytest.fixture
def optin() -> SyncRecord:
    return load("petition_optin.json")


@pytest.fixture
def records() -> list[SyncRecord]:
    """One record per lane: three different supporters and a campaign."""
    return [
        load("petition_optin.json"),
        load("petition_optout.json"),
        load("event.json"),
        SyncRecord(
            key="campaign_updated:1",
            kind="campaign_updated",
            campaign=CampaignFact(name="animalconsult", data={"title": "T"}, stamp="1"),
        ),
    ]


@pytest.fixture
def crm() -> Iterator[CrmServer]:
    with CrmServer() as server:
        yield server


@contextlib.asynccontextmanager
async def opened(backend: WebhookBackend) -> AsyncIterator[WebhookBackend]:
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def backend(crm: CrmServer) -> AsyncIterator[WebhookBackend]:
    async with opened(WebhookBackend(crm.url, timeout=2.0)) as webhook:
        yield webhook


def statuses(crm: CrmServer) -> list[int]:
    return [r.status for r in crm.received()]


def personal_strings(record: SyncRecord) -> list[str]:
    assert record.contact is not None
    values = [*record.contact.emails, *record.contact.refs]
    values += [v for v in record.contact.fields.values() if isinstance(v, str) and len(v) > 3]
    return values


# ---- the request ------------------------------------------------------------------------------


async def test_posts_the_documented_body_with_an_idempotency_key(
    crm: CrmServer, backend: WebhookBackend, optin: SyncRecord
) -> None:
    assert list(await backend.apply([optin])) == ["applied"]
    [seen] = crm.received()
    assert seen.headers["idempotency-key"] == optin.key
    assert seen.headers["content-type"] == "application/json"
    assert "x-proca-signature" not in seen.headers
    body = orjson.loads(seen.body)
    assert set(body) == {"key", "kind", "lane", "contact", "action", "campaign"}
    assert (body["key"], body["kind"], body["lane"]) == (optin.key, "action", optin.lane)
    assert optin.contact is not None and optin.action is not None
    contact = body["contact"]
    assert contact["refs"] == sorted(optin.contact.refs)
    assert contact["emails"] == sorted(optin.contact.emails)
    assert contact["fields"] == optin.contact.fields
    assert contact["testing"] is (not optin.contact.real)
    assert contact["consent"] == {
        "actionId": 1732850,
        "optIn": True,
        "givenAt": "2022-11-20T23:21:54Z",
    }
    assert contact["emailStatus"] is None
    assert body["action"]["actionId"] == optin.action.action_id
    assert body["action"]["data"] == optin.action.data
    assert body["campaign"]["name"] == "animalconsult"


async def test_signature_header_verifies_with_the_secret(optin: SyncRecord) -> None:
    with CrmServer(secret="s3cret") as crm:
        async with opened(WebhookBackend(crm.url, secret="s3cret")) as webhook:
            assert list(await webhook.apply([optin])) == ["applied"]
        [seen] = crm.received()
        expected = hmac.new(b"s3cret", seen.body, hashlib.sha256).hexdigest()
        assert seen.headers["x-proca-signature"] == f"sha256={expected}"

        # A wrong secret: the CRM answers 401, a permanent refusal of that record.
        crm.clear()
        async with opened(WebhookBackend(crm.url, secret="wrong")) as webhook:
            [result] = await webhook.apply([optin])
        assert isinstance(result, BackendRejectedError)
        assert "401" in str(result)
        assert crm.applied_keys() == []


async def test_timeout_in_the_url_is_used_and_not_sent(crm: CrmServer, optin: SyncRecord) -> None:
    webhook = WebhookBackend(crm.url + "?timeout=0.5")
    assert webhook.timeout == 0.5
    assert webhook.url == crm.url
    crm.stall(30)
    async with opened(webhook):
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            await webhook.apply([optin])
    assert time.monotonic() - started < 5


# ---- transient failures -----------------------------------------------------------------------


async def test_500_then_success(crm: CrmServer, backend: WebhookBackend, optin: SyncRecord) -> None:
    crm.fail_with(500, count=1)
    with pytest.raises(BackendUnavailableError) as caught:
        await backend.apply([optin])
    assert caught.value.retry_after is None
    assert "500" in str(caught.value)
    assert crm.applied_keys() == []
    assert list(await backend.apply([optin])) == ["applied"]
    assert statuses(crm) == [500, 200]
    assert crm.applied_keys() == [optin.key]


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
async def test_transient_statuses_raise_for_the_batch(
    crm: CrmServer, backend: WebhookBackend, records: list[SyncRecord], status: int
) -> None:
    crm.fail_with(status)
    with pytest.raises(BackendUnavailableError):
        await backend.apply(records)


async def test_one_transient_failure_fails_the_batch_and_the_retry_is_idempotent(
    crm: CrmServer, backend: WebhookBackend, records: list[SyncRecord]
) -> None:
    crm.fail_with(503, count=1)
    with pytest.raises(BackendUnavailableError):
        await backend.apply(records)
    results = await backend.apply(records)
    assert all(result in {"applied", "duplicate"} for result in results)
    assert results.count("applied") >= 1
    # Every record is held exactly once, whatever the first attempt managed to store.
    assert sorted(crm.applied_keys()) == sorted(r.key for r in records)


async def test_a_lane_stops_at_its_first_transient_failure(
    crm: CrmServer, backend: WebhookBackend, optin: SyncRecord
) -> None:
    lane = [dataclasses.replace(optin, key=f"{optin.key}#{i}") for i in range(3)]
    crm.fail_with(503, count=1)
    with pytest.raises(BackendUnavailableError):
        await backend.apply(lane)
    # A later record of the lane never overtakes the one that failed.
    assert [r.key for r in crm.received()] == [lane[0].key]


async def test_429_retry_after_seconds(
    crm: CrmServer, backend: WebhookBackend, records: list[SyncRecord]
) -> None:
    crm.fail_with(429, retry_after=7)
    with pytest.raises(BackendUnavailableError) as caught:
        await backend.apply(records)
    assert caught.value.retry_after == 7.0
    with pytest.raises(BackendUnavailableError) as pinged:
        await backend.ping()
    assert pinged.value.retry_after == 7.0


async def test_429_retry_after_http_date(
    crm: CrmServer, backend: WebhookBackend, optin: SyncRecord
) -> None:
    crm.fail_with(
        429, retry_after=format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    )
    with pytest.raises(BackendUnavailableError) as caught:
        await backend.apply([optin])
    assert caught.value.retry_after is not None
    assert 100 < caught.value.retry_after <= 120


async def test_503_retry_after_is_kept(
    crm: CrmServer, backend: WebhookBackend, optin: SyncRecord
) -> None:
    crm.fail_with(503, count=1, retry_after=30)
    with pytest.raises(BackendUnavailableError) as caught:
        await backend.apply([optin])
    assert caught.value.retry_after == 30.0


async def test_stall_longer_than_the_timeout_is_transient(
    crm: CrmServer, optin: SyncRecord
) -> None:
    async with opened(WebhookBackend(crm.url, timeout=0.5)) as webhook:
        crm.stall(30, count=1)
        started = time.monotonic()
        with pytest.raises(BackendUnavailableError) as caught:
            await webhook.apply([optin])
        assert time.monotonic() - started < 5
        assert "timed out" in str(caught.value)
        # The stalled request is still held by the server; the CRM works again.
        assert list(await webhook.apply([optin])) == ["applied"]


async def test_connection_reset_is_transient(
    crm: CrmServer, backend: WebhookBackend, optin: SyncRecord
) -> None:
    crm.reset_connections(1)
    with pytest.raises(BackendUnavailableError):
        await backend.apply([optin])
    assert statuses(crm) == [0]
    assert crm.applied_keys() == []
    assert list(await backend.apply([optin])) == ["applied"]


async def test_refused_connection_is_transient(
    crm: CrmServer, backend: WebhookBackend, optin: SyncRecord
) -> None:
    with crm.down():
        with pytest.raises(BackendUnavailableError):
            await backend.apply([optin])
        with pytest.raises(BackendUnavailableError):
            await backend.ping()
    await backend.ping()
    assert list(await backend.apply([optin])) == ["applied"]


# ---- permanent refusals -----------------------------------------------------------------------


async def test_422_is_permanent_in_its_slot_and_never_echoes_personal_data(
    crm: CrmServer, backend: WebhookBackend, records: list[SyncRecord]
) -> None:
    refused = records[0]
    crm.validation_error_for(lambda payload: payload["key"] == refused.key)
    results = await backend.apply(records)
    assert isinstance(results[0], BackendRejectedError)
    assert results[0].reason is Reason.CRM_REJECTED
    assert list(results[1:]) == ["applied"] * (len(records) - 1)
    message = f"{results[0]} {results[0]!r}"
    assert "422" in message
    # The server's 422 body quotes the e-mail: none of it may reach our error.
    [answer] = [r for r in crm.received() if r.status == 422]
    assert answer.key == refused.key
    for value in personal_strings(refused):
        assert value not in message


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 413])
async def test_other_4xx_are_permanent(
    crm: CrmServer, backend: WebhookBackend, optin: SyncRecord, status: int
) -> None:
    crm.fail_with(status)
    [result] = await backend.apply([optin])
    assert isinstance(result, BackendRejectedError)
    assert str(status) in str(result)


async def test_409_means_duplicate(
    crm: CrmServer, backend: WebhookBackend, optin: SyncRecord
) -> None:
    crm.fail_with(409, count=1)
    assert list(await backend.apply([optin])) == ["duplicate"]


# ---- ping -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 405, 401])
async def test_ping_accepts_any_answer_below_500(
    crm: CrmServer, backend: WebhookBackend, status: int
) -> None:
    crm.fail_with(status)
    await backend.ping()
    assert crm.pings == 1


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_ping_raises_on_5xx_and_429(
    crm: CrmServer, backend: WebhookBackend, status: int
) -> None:
    crm.fail_with(status, count=1)
    with pytest.raises(BackendUnavailableError):
        await backend.ping()
    await backend.ping()


# ---- ordering and concurrency -----------------------------------------------------------------


def overlap(a: Received, b: Received) -> bool:
    return a.arrived < b.answered and b.arrived < a.answered


async def test_per_lane_order_within_a_batch_while_lanes_run_concurrently(
    records: list[SyncRecord],
) -> None:
    batch = [
        dataclasses.replace(record, key=f"{record.key}#{i}") for i in range(4) for record in records
    ]
    with CrmServer(latency=0.05) as crm:
        async with opened(WebhookBackend(crm.url)) as webhook:
            results = await webhook.apply(batch)
        assert list(results) == ["applied"] * len(batch)
        received = crm.received()
    by_lane: dict[str, list[Received]] = {}
    for seen in received:
        assert seen.lane is not None
        by_lane.setdefault(seen.lane, []).append(seen)
    assert len(by_lane) == len(records)
    for lane, in_lane in by_lane.items():
        assert [s.key for s in in_lane] == [r.key for r in batch if r.lane == lane]
        for earlier, later in itertools.pairwise(in_lane):
            # Sent only once the previous record of the lane was answered.
            assert later.arrived >= earlier.answered
    lanes = list(by_lane.values())
    assert any(overlap(a, b) for a in lanes[0] for b in lanes[1]), "lanes were not concurrent"


async def test_max_connections_bounds_requests_in_flight(records: list[SyncRecord]) -> None:
    batch = [dataclasses.replace(r, key=f"{r.key}#{i}") for i in range(3) for r in records]
    with CrmServer(latency=0.05) as crm:
        async with opened(WebhookBackend(crm.url, max_connections=2)) as webhook:
            assert list(await webhook.apply(batch)) == ["applied"] * len(batch)
        received = crm.received()
    events: list[tuple[float, int]] = []
    for seen in received:
        events += [(seen.arrived, 1), (seen.answered, -1)]
    in_flight = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        in_flight += step
        peak = max(peak, in_flight)
    assert peak == 2
