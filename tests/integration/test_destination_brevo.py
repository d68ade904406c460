"""The Brevo destination pushing batches straight into the Brevo emulator: upsert with
attributes, lists per subscription and campaign, the blocklist (never lifted by a plain
opt-in), bulk import with process polling, per-item refusals with Brevo's code, 429 with
the x-sib-ratelimit headers, 5xx, timeouts, erasure."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proca_sync.destinations import destination_from_config
from proca_sync.destinations.base import Batch, DestinationRejectedError, Erasure
from proca_sync.destinations.brevo import BrevoDestination, brevo_retry_after
from proca_sync.destinations.http import ApiResponse
from tests.support.emulators.base import WindowLimit
from tests.support.emulators.brevo import DRIVER, BrevoEmulator
from tests.support.emulators.export import action, contact

ADA = "ada@example.org"
BOB = "bob@example.org"
CY = "cy@example.org"


@pytest.fixture
async def emu() -> AsyncIterator[BrevoEmulator]:
    emulator = DRIVER.make()
    await emulator.start()
    yield emulator
    await emulator.stop()


def make(emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> BrevoDestination:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    destination = destination_from_config("brevo", DRIVER.config(emu) | extra)
    assert isinstance(destination, BrevoDestination)
    return destination


async def push(destination: BrevoDestination, batch: Batch) -> Any:
    await destination.open()
    try:
        return await destination.push(batch)
    finally:
        await destination.close()


async def test_upsert_lists_blocklist_and_quiet_contacts(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {
        "campaign_lists": {"save-bees": 7},
        "attributes": {"first_name": "FIRSTNAME", "postcode": "ZIP", "fields.phone": "NOT_DEFINED"},
    }
    first = Batch(contacts=[contact(1, ADA), contact(2, BOB), contact(3, CY)])
    assert (await push(make(emu, monkeypatch, **options), first)).failed == {}
    second = Batch(
        contacts=[
            contact(1, ADA, fields={"phone": "+32 1"}),
            contact(2, BOB, subscribed=False, email_status="unsub"),
            contact(3, CY, subscribed=False, first_name="Cyd"),
        ]
    )
    report = await push(make(emu, monkeypatch, **options), second)
    assert report.failed == {}
    state = emu.state()
    assert state[ADA] == {
        "attributes": {"FIRSTNAME": "Ada", "ZIP": "1000"},  # undefined attributes ignored
        "lists": [2, 7],
        "blocklisted": False,
        "events": [],
    }
    assert state[BOB]["lists"] == [] and state[BOB]["blocklisted"] is True
    # Never opted in (no objection either): data updated, subscription left alone.
    assert state[CY]["lists"] == [2, 7] and state[CY]["attributes"]["FIRSTNAME"] == "Cyd"


async def test_a_plain_opt_in_never_lifts_the_blocklist_a_newer_doi_does(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await push(
        make(emu, monkeypatch),
        Batch(contacts=[contact(1, ADA, subscribed=False, email_status="spam")]),
    )
    assert emu.state()[ADA]["blocklisted"] is True
    await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)]))
    assert emu.state()[ADA]["blocklisted"] is True
    await push(
        make(emu, monkeypatch), Batch(contacts=[contact(1, ADA, email_status="double_opt_in")])
    )
    assert emu.state()[ADA]["blocklisted"] is False
    assert emu.state()[ADA]["lists"] == [2]


async def test_bulk_import_is_polled_and_refused_records_are_reported_with_the_code(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.reject.add("p3@example.org")
    emu.import_delay = 0.3  # several polls before the process completes
    contacts = [contact(i, f"p{i}@example.org") for i in range(1, 7)]
    report = await push(make(emu, monkeypatch, import_threshold=3), Batch(contacts=contacts))
    assert set(report.failed) == {("contact", "3")}
    error = report.failed[("contact", "3")]
    assert isinstance(error, DestinationRejectedError) and error.code == "invalid_parameter"
    assert "p3@" not in str(error)
    assert sorted(emu.state()) == [f"p{i}@example.org" for i in (1, 2, 4, 5, 6)]
    assert all(c["lists"] == [2] for c in emu.state().values())
    paths = [h.path for h in emu.hits]
    assert paths.count("/v3/contacts/import") == 1
    assert sum(1 for p in paths if p.startswith("/v3/processes/")) >= 2


async def test_without_problems_an_import_is_one_call_and_polls(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    contacts = [contact(i, f"p{i}@example.org") for i in range(1, 201)]
    report = await push(make(emu, monkeypatch), Batch(contacts=contacts))
    assert report.failed == {}
    assert len(emu.state()) == 200
    assert sum(1 for h in emu.hits if h.path == "/v3/contacts") == 0
    assert report.requests <= 4


async def test_when_the_poll_budget_is_spent_imports_are_confirmed_before_a_later_write(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.import_delay = 0.3
    destination = make(emu, monkeypatch, import_threshold=2, poll_budget=3, poll_interval=0.4)
    first = [contact(i, f"p{i}@example.org") for i in (1, 2)]
    second = [contact(i, f"p{i}@example.org") for i in (3, 4)]
    await destination.open()
    try:
        assert (await destination.push(Batch(contacts=first))).failed == {}
        assert {"p1@example.org", "p2@example.org"} <= set(emu.state())  # waited for it
        assert (await destination.push(Batch(contacts=second))).failed == {}  # deferred
        assert "p3@example.org" not in emu.state()
        # p3 unsubscribes: the deferred import that subscribes p3 must land first.
        gone = contact(3, "p3@example.org", subscribed=False, email_status="unsub")
        assert (await destination.push(Batch(contacts=[gone]))).failed == {}
    finally:
        await destination.close()
    state = emu.state()
    assert state["p3@example.org"]["lists"] == [] and state["p3@example.org"]["blocklisted"]
    assert state["p4@example.org"]["lists"] == [2]
    assert sum(1 for h in emu.hits if h.path.startswith("/v3/processes")) == 3


async def test_the_default_rate_stays_within_brevos_limit(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    contacts = [contact(i, f"p{i}@example.org", subscribed=False) for i in range(1, 26)]
    report = await push(make(emu, monkeypatch), Batch(contacts=contacts))
    assert report.failed == {}
    assert emu.throttled_count() == 0  # never beyond 10 requests in any second


async def test_429_waits_for_the_x_sib_reset_and_everything_arrives(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.contacts_limit = WindowLimit(3, 1.0)
    contacts = [contact(i, f"p{i}@example.org", subscribed=False) for i in range(1, 9)]
    report = await push(make(emu, monkeypatch, rate=100, burst=20), Batch(contacts=contacts))
    assert report.failed == {}
    assert emu.throttled_count() > 0
    assert len(emu.state()) == 8
    answer = ApiResponse(429, {"x-sib-ratelimit-reset": "7"}, None)
    assert brevo_retry_after(answer) == 7.0


async def test_5xx_and_timeouts_are_retried(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.fail_with(502, count=2)
    emu.stall(1.0, count=1)
    report = await push(make(emu, monkeypatch, timeout=0.4), Batch(contacts=[contact(1, ADA)]))
    assert report.failed == {}
    assert emu.state()[ADA]["lists"] == [2]
    assert any(h.status == 502 for h in emu.hits)


async def test_events_once_per_action_and_erasure(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = Batch(contacts=[contact(1, ADA)], actions=[action(11, 1), action(12, 1, testing=True)])
    assert (await push(make(emu, monkeypatch, events=True), batch)).failed == {}
    assert emu.state()[ADA]["events"] == [11]
    erase = Batch(erasures=[Erasure(tombstone_id=4, email=ADA, refs=())])
    assert (await push(make(emu, monkeypatch), erase)).failed == {}
    assert ADA not in emu.state()
    assert (await push(make(emu, monkeypatch), erase)).failed == {}  # already gone


async def test_unknown_list_is_a_config_error(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proca_sync.errors import ConfigError

    destination = make(emu, monkeypatch, list_ids=[2, 99])
    await destination.open()
    try:
        with pytest.raises(ConfigError, match="list 99"):
            await destination.ping()
    finally:
        await destination.close()


async def test_pushes_in_flight_together_never_spend_the_poll_reserve(
    emu: BrevoEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four pushes at once (what ``concurrency`` does), each with an import to poll, and a
    budget of five polls: three go to imports (each completed at its first poll), the
    fourth import is deferred, and the last two polls stay for confirming it (one push at
    a time never had two imports check the budget before either polled)."""
    emu.import_delay = 0.0
    destination = make(
        emu, monkeypatch, import_threshold=2, poll_budget=5, poll_interval=0.2, concurrency=4
    )
    groups = [
        [contact(i, f"p{i}@example.org") for i in (2 * n + 1, 2 * n + 2)] for n in range(4)
    ]
    await destination.open()
    try:
        reports = await asyncio.gather(*(destination.push(Batch(contacts=g)) for g in groups))
        assert all(r.failed == {} for r in reports)
        polled = sum(1 for h in emu.hits if h.path.startswith("/v3/processes/"))
        assert polled == 3  # then fewer than 3 polls were left: the last import deferred
        # A later write to a deferred import's contact confirms it first, within budget.
        late = contact(1, "p1@example.org", subscribed=False, email_status="unsub")
        assert (await destination.push(Batch(contacts=[late]))).failed == {}
    finally:
        await destination.close()
    state = emu.state()
    assert len(state) == 8 and state["p1@example.org"]["blocklisted"]
    assert sum(1 for h in emu.hits if h.path.startswith("/v3/processes")) <= 5
