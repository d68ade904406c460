"""HubSpot destination against the HubSpot emulator: batches pushed straight in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from proca_sync.destinations import destination_from_config
from proca_sync.destinations.base import DestinationRejectedError, Erasure
from proca_sync.destinations.hubspot import HubSpotDestination
from proca_sync.errors import TransientError
from tests.support.emulators.base import WindowLimit
from tests.support.emulators.hubspot import DRIVER, SUBSCRIPTION, HubSpotEmulator
from tests.support.saas_views import action, batch, contact, push_until_done


@pytest.fixture
async def emu(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[HubSpotEmulator]:
    async with DRIVER.serving(monkeypatch) as emulator:
        yield emulator


def make(emu: HubSpotEmulator, **extra: Any) -> HubSpotDestination:
    table = {**DRIVER.config(emu), **extra}
    destination = destination_from_config("hs", table)
    assert isinstance(destination, HubSpotDestination)
    return destination


def trio() -> Any:
    contacts = [
        contact(1, "ada@example.org", subscribed=True, phone="+3212345"),
        contact(2, "bob@example.org", status="unsub"),
        contact(3, "cy@example.org", first="Cy", last=None, postcode=None),
    ]
    actions = [
        action(11, 1),
        action(12, 1, action_type="share", campaign="stop_oil"),
        action(21, 2),
        action(31, 3),
    ]
    return batch(contacts, actions)


async def test_contacts_subscriptions_and_one_note_per_action(emu: HubSpotEmulator) -> None:
    dest = make(emu)
    try:
        report = await dest.push(trio())
    finally:
        await dest.close()
    assert report.failed == {}
    ada = emu.by_email("ada@example.org")
    assert ada is not None
    assert ada["properties"]["firstname"] == "Ada" and ada["properties"]["zip"] == "1000"
    assert ada["properties"]["phone"] == "+3212345"
    cy = emu.by_email("cy@example.org")
    assert cy is not None and "lastname" not in cy["properties"]
    assert emu.statuses[("ada@example.org", SUBSCRIPTION)] == "SUBSCRIBED"
    assert emu.statuses[("bob@example.org", SUBSCRIPTION)] == "NOT_SUBSCRIBED"
    assert ("cy@example.org", SUBSCRIPTION) not in emu.statuses  # not opted in: untouched
    assert emu.notes_of("ada@example.org") == [11, 12]
    assert emu.notes_of("bob@example.org") == [21]
    # one upsert, one status read, one status write, one notes create: batch endpoints
    assert report.requests == 4


async def test_redelivery_records_no_note_twice(emu: HubSpotEmulator) -> None:
    dest = make(emu)
    try:
        await dest.push(trio())
        notes = len(emu.notes)
        second = await dest.push(trio())
    finally:
        await dest.close()
    assert second.failed == {}
    assert len(emu.notes) == notes == 4
    assert emu.notes_of("ada@example.org") == [11, 12]
    paths = [h.path for h in emu.hits if h.method == "POST"]
    assert paths.count("/crm/v3/objects/notes/batch/create") == 1


async def test_opt_out_in_hubspot_is_never_resubscribed(emu: HubSpotEmulator) -> None:
    emu.statuses[("ada@example.org", SUBSCRIPTION)] = "NOT_SUBSCRIBED"  # opted out in HubSpot
    emu.statuses[("cy@example.org", SUBSCRIPTION)] = "SUBSCRIBED"  # a subscriber already
    dest = make(emu)
    try:
        report = await dest.push(trio())
    finally:
        await dest.close()
    assert report.failed == {}
    assert emu.statuses[("ada@example.org", SUBSCRIPTION)] == "NOT_SUBSCRIBED"
    assert emu.statuses[("cy@example.org", SUBSCRIPTION)] == "SUBSCRIBED"  # not unsubscribed


async def test_double_opt_in_then_bounce(emu: HubSpotEmulator) -> None:
    dest = make(emu)
    try:
        await dest.push(
            batch(
                [
                    contact(
                        5,
                        "dee@example.org",
                        status="double_opt_in",
                        subscribed=True,
                        opted_in=False,
                    )
                ]
            )
        )
        assert emu.statuses[("dee@example.org", SUBSCRIPTION)] == "SUBSCRIBED"
        await dest.push(batch([contact(5, "dee@example.org", version=2, status="bounce")]))
    finally:
        await dest.close()
    assert emu.statuses[("dee@example.org", SUBSCRIPTION)] == "NOT_SUBSCRIBED"


async def test_refused_address_is_reported_with_the_api_code(emu: HubSpotEmulator) -> None:
    dest = make(emu)
    the_batch = batch(
        [contact(1, "ada@example.org", subscribed=True), contact(9, "not-an-address")],
        [action(11, 1), action(91, 9)],
    )
    try:
        report = await dest.push(the_batch)
    finally:
        await dest.close()
    error = report.failed[("contact", "9")]
    assert isinstance(error, DestinationRejectedError) and error.code == "INVALID_EMAIL"
    assert "not-an-address" not in str(error)  # no personal data in errors
    assert isinstance(report.failed[("action", "91")], DestinationRejectedError)
    assert set(report.failed) == {("contact", "9"), ("action", "91")}
    assert emu.notes_of("ada@example.org") == [11]
    assert any(h.status == 207 for h in emu.hits)


async def test_note_written_but_answer_lost_is_not_written_twice(emu: HubSpotEmulator) -> None:
    dest = make(emu, timeout=0.5)
    the_batch = trio()
    try:
        await dest.push(batch(list(the_batch.contacts)))  # the contacts exist already
        emu.stall(1.0, count=1, path="/crm/v3/objects/notes/batch/create")
        reports = await push_until_done(dest, the_batch)
    finally:
        await dest.close()
    first = reports[0]
    assert first is not None and isinstance(first.failed[("action", "11")], TransientError)
    assert len(emu.notes) == 4  # the stalled create was applied once, then found
    assert emu.notes_of("ada@example.org") == [11, 12]


async def test_outage_of_5xx_and_resets_loses_nothing(emu: HubSpotEmulator) -> None:
    dest = make(emu)
    emu.fail_with(503, count=6)
    emu.reset_connections(count=2)
    try:
        await push_until_done(dest, trio())
    finally:
        await dest.close()
    assert DRIVER.snapshot(emu)["activities"] == {
        "11": [[["ada@example.org"], "2024-03-01T10:00:00Z"]],
        "12": [[["ada@example.org"], "2024-03-01T10:00:00Z"]],
        "21": [[["bob@example.org"], "2024-03-01T10:00:00Z"]],
        "31": [[["cy@example.org"], "2024-03-01T10:00:00Z"]],
    }
    assert max(emu.created.values()) == 1


async def test_rate_limited_burst_is_throttled_and_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    emulator = HubSpotEmulator(
        limit=WindowLimit(10, 1.0), token=DRIVER.key, subscription_ids=frozenset({SUBSCRIPTION})
    )
    await emulator.start()
    # configured well above the account's quota: HubSpot answers 429 with its headers
    dest = make(emulator, rate=100.0, burst=30)
    try:
        batches = [
            batch([contact(i, f"p{i}@example.org", subscribed=True)], [action(1000 + i, i)])
            for i in range(12)
        ]
        for b in batches:
            await push_until_done(dest, b)
    finally:
        await dest.close()
        await emulator.stop()
    assert emulator.throttled_count() > 0
    assert len(emulator.contacts) == 12 and len(emulator.notes) == 12
    assert dest.client.stats.throttled == emulator.throttled_count()


async def test_steady_rate_stays_under_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    emulator = HubSpotEmulator(
        limit=WindowLimit(10, 1.0), token=DRIVER.key, subscription_ids=frozenset({SUBSCRIPTION})
    )
    await emulator.start()
    dest = make(emulator, rate=9.0, burst=1)
    try:
        for i in range(6):
            await dest.push(
                batch([contact(i, f"p{i}@example.org", subscribed=True)], [action(1000 + i, i)])
            )
    finally:
        await dest.close()
        await emulator.stop()
    assert emulator.throttled_count() == 0


async def test_erasure_through_gdpr_delete(emu: HubSpotEmulator) -> None:
    dest = make(emu)
    try:
        await dest.push(trio())
        report = await dest.push(
            batch(
                [],
                erasures=[
                    Erasure(tombstone_id=1, email="ada@example.org", refs=("r",)),
                    Erasure(tombstone_id=2, email="nobody@example.org", refs=()),
                ],
            )
        )
    finally:
        await dest.close()
    assert report.failed == {}
    assert emu.by_email("ada@example.org") is None
    assert emu.deleted == ["ada@example.org"]
    assert sorted(DRIVER.snapshot(emu)["activities"]) == ["21", "31"]  # ada's notes archived


async def test_driver_expected_matches_snapshot_after_a_push(emu: HubSpotEmulator) -> None:
    export = {
        "contacts": [
            {
                "email": "ada@example.org",
                "firstName": "Ada",
                "lastName": "Lovelace",
                "postcode": "1000",
                "country": "BE",
                "fields": {"phone": "+3212345"},
                "subscribed": True,
                "emailStatus": None,
                "testing": False,
                "actions": [
                    {"actionId": 11, "createdAt": "2024-03-01T10:00:00Z", "testing": False},
                    {"actionId": 12, "createdAt": "2024-03-01T10:00:00Z", "testing": False},
                ],
            },
            {
                "email": "bob@example.org",
                "firstName": "Ada",
                "lastName": "Lovelace",
                "postcode": "1000",
                "country": "BE",
                "fields": {},
                "subscribed": False,
                "emailStatus": "unsub",
                "testing": False,
                "actions": [
                    {"actionId": 21, "createdAt": "2024-03-01T10:00:00Z", "testing": False}
                ],
            },
            {
                "email": "cy@example.org",
                "firstName": "Cy",
                "lastName": None,
                "postcode": None,
                "country": "BE",
                "fields": {},
                "subscribed": False,
                "emailStatus": None,
                "testing": False,
                "actions": [
                    {"actionId": 31, "createdAt": "2024-03-01T10:00:00Z", "testing": False}
                ],
            },
        ]
    }
    dest = make(emu)
    try:
        await dest.push(trio())
    finally:
        await dest.close()
    assert DRIVER.snapshot(emu) == DRIVER.expected(export, DRIVER.config(emu))
