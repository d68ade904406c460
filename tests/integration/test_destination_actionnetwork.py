"""Action Network destination against its emulator: batches pushed straight in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from proca_sync.destinations import destination_from_config
from proca_sync.destinations.actionnetwork import ActionNetworkDestination
from proca_sync.destinations.base import Batch, DestinationRejectedError, Erasure
from proca_sync.errors import TransientError
from tests.support.emulators.actionnetwork import DRIVER, ActionNetworkEmulator
from tests.support.emulators.base import WindowLimit
from tests.support.saas_views import action, batch, contact, push_until_done


@pytest.fixture
async def emu(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ActionNetworkEmulator]:
    async with DRIVER.serving(monkeypatch) as emulator:
        yield emulator


def make(emu: ActionNetworkEmulator, **extra: Any) -> ActionNetworkDestination:
    """Faster than 4/s unless a test sets ``rate`` (``None``: the connector's default)."""
    table = {**DRIVER.config(emu), "rate": 200.0, **extra}
    if table["rate"] is None:
        del table["rate"]
    destination = destination_from_config("an", table)
    assert isinstance(destination, ActionNetworkDestination)
    return destination


def trio() -> Batch:
    return batch(
        [
            contact(1, "ada@example.org", subscribed=True),
            contact(2, "bob@example.org", status="spam"),
            contact(3, "cy+x@example.org", first="Cy", last=None, postcode=None),
        ],
        [
            action(11, 1),
            action(12, 1, action_type="share", campaign="stop_oil"),
            action(21, 2),
            action(31, 3, action_type="mail2target"),
        ],
    )


async def test_people_status_tags_signatures_and_submissions(emu: ActionNetworkEmulator) -> None:
    dest = make(emu)
    try:
        report = await dest.push(trio())
    finally:
        await dest.close()
    assert report.failed == {}
    assert emu.status_of("ada@example.org") == "subscribed"
    assert emu.status_of("bob@example.org") == "unsubscribed"
    assert emu.status_of("cy+x@example.org") == "unsubscribed"  # new, never opted in
    assert emu.tags_of("ada@example.org") == [
        "proca:register",
        "proca:save_bees",
        "proca:share",
        "proca:stop_oil",
    ]
    assert emu.records_of("ada@example.org", "signatures") == [11]
    assert emu.records_of("ada@example.org", "submissions") == [12]
    assert emu.records_of("cy+x@example.org", "submissions") == [31]
    assert len(emu.petitions) == 1 and len(emu.forms) == 2  # one per campaign and kind
    ada = emu.by_email("ada@example.org")
    assert ada is not None and ada["postal_addresses"][0]["postal_code"] == "1000"


async def test_redelivery_records_nothing_twice(emu: ActionNetworkEmulator) -> None:
    dest = make(emu)
    try:
        await dest.push(trio())
        second = await dest.push(trio())
    finally:
        await dest.close()
    assert second.failed == {}
    assert len(emu.records) == 4
    assert len(emu.people) == 3


async def test_opt_out_never_becomes_a_subscription(emu: ActionNetworkEmulator) -> None:
    dest = make(emu)
    try:
        await dest.push(batch([contact(1, "ada@example.org", status="unsub")]))
        await dest.push(
            batch([contact(1, "ada@example.org", version=2, subscribed=True)], [action(11, 1)])
        )
    finally:
        await dest.close()
    assert emu.status_of("ada@example.org") == "unsubscribed"
    assert emu.records_of("ada@example.org", "signatures") == [11]


async def test_subscriber_not_unsubscribed_by_a_form_without_the_box(
    emu: ActionNetworkEmulator,
) -> None:
    dest = make(emu)
    try:
        await dest.push(batch([contact(1, "ada@example.org", subscribed=True)]))
        await dest.push(batch([contact(1, "ada@example.org", version=2)], [action(11, 1)]))
    finally:
        await dest.close()
    assert emu.status_of("ada@example.org") == "subscribed"


async def test_double_opt_in_subscribes_and_bounce_unsubscribes(
    emu: ActionNetworkEmulator,
) -> None:
    dest = make(emu)
    try:
        await dest.push(batch([contact(1, "ada@example.org")], [action(11, 1)]))
        assert emu.status_of("ada@example.org") == "unsubscribed"  # created, not opted in
        # confirmed later by double opt-in: unsubscribed only for want of consent (never
        # mailed, so never able to opt out), the person is subscribed now
        await dest.push(
            batch(
                [
                    contact(
                        1,
                        "ada@example.org",
                        version=2,
                        status="double_opt_in",
                        subscribed=True,
                        opted_in=False,
                    )
                ]
            )
        )
        assert emu.status_of("ada@example.org") == "subscribed"
        await dest.push(batch([contact(1, "ada@example.org", version=3, status="bounce")]))
        assert emu.status_of("ada@example.org") == "unsubscribed"
        # a bounce is an objection: a newer opt-in no longer subscribes them
        await dest.push(batch([contact(1, "ada@example.org", version=4, subscribed=True)]))
    finally:
        await dest.close()
    assert emu.status_of("ada@example.org") == "unsubscribed"


async def test_unsubscribed_in_action_network_is_not_subscribed(
    emu: ActionNetworkEmulator,
) -> None:
    emu.people["p1"] = {  # joined and left through Action Network itself
        "id": "p1",
        "identifiers": ["action_network:p1"],
        "email_addresses": [
            {"primary": True, "address": "ada@example.org", "status": "unsubscribed"}
        ],
        "postal_addresses": [],
        "custom_fields": {},
    }
    dest = make(emu)
    try:
        await dest.push(batch([contact(1, "ada@example.org", subscribed=True)], [action(11, 1)]))
    finally:
        await dest.close()
    assert emu.status_of("ada@example.org") == "unsubscribed"
    assert emu.records_of("ada@example.org", "signatures") == [11]


async def test_a_deleted_form_is_created_again(emu: ActionNetworkEmulator) -> None:
    dest = make(emu)
    try:
        await dest.push(trio())
        emu.petitions.clear()  # an organiser deleted the petition in Action Network
        reports = await push_until_done(
            dest, batch([contact(4, "dee@example.org", subscribed=True)], [action(41, 4)])
        )
    finally:
        await dest.close()
    first = reports[0]
    assert first is not None and isinstance(first.failed[("action", "41")], TransientError)
    assert len(emu.petitions) == 1
    assert emu.records_of("dee@example.org", "signatures") == [41]


async def test_refused_address(emu: ActionNetworkEmulator) -> None:
    dest = make(emu)
    try:
        report = await dest.push(
            batch(
                [contact(1, "ada@example.org", subscribed=True), contact(9, "not-an-address")],
                [action(11, 1), action(91, 9)],
            )
        )
    finally:
        await dest.close()
    error = report.failed[("contact", "9")]
    assert isinstance(error, DestinationRejectedError) and error.code == "http_400"
    assert "not-an-address" not in str(error)
    assert set(report.failed) == {("contact", "9"), ("action", "91")}
    assert emu.records_of("ada@example.org", "signatures") == [11]


async def test_signature_written_but_answer_lost_is_not_recorded_twice(
    emu: ActionNetworkEmulator,
) -> None:
    dest = make(emu, timeout=0.5)
    try:
        # new people: the record helpers are the first requests under these paths
        emu.stall(1.0, count=1, path="/api/v2/petitions/")
        emu.stall(1.0, count=1, path="/api/v2/forms/")
        reports = await push_until_done(dest, trio())
    finally:
        await dest.close()
    first = reports[0]
    assert first is not None and isinstance(first.failed[("action", "11")], TransientError)
    assert emu.records_of("ada@example.org", "signatures") == [11]
    assert emu.records_of("ada@example.org", "submissions") == [12]
    assert len(emu.records) == 4


async def test_outage_loses_nothing(emu: ActionNetworkEmulator) -> None:
    dest = make(emu)
    emu.fail_with(503, count=6)
    emu.reset_connections(count=2)
    try:
        await push_until_done(dest, trio())
    finally:
        await dest.close()
    export = {
        "contacts": [
            {
                "email": "ada@example.org",
                "firstName": "Ada",
                "lastName": "Lovelace",
                "postcode": "1000",
                "country": "BE",
                "subscribed": True,
                "emailStatus": None,
                "actions": [
                    {"actionId": 11, "actionType": "register", "campaign": "save_bees"},
                    {"actionId": 12, "actionType": "share", "campaign": "stop_oil"},
                ],
            },
            {
                "email": "bob@example.org",
                "firstName": "Ada",
                "lastName": "Lovelace",
                "postcode": "1000",
                "country": "BE",
                "subscribed": False,
                "emailStatus": "spam",
                "actions": [{"actionId": 21, "actionType": "register", "campaign": "save_bees"}],
            },
            {
                "email": "cy+x@example.org",
                "firstName": "Cy",
                "lastName": None,
                "postcode": None,
                "country": "BE",
                "subscribed": False,
                "emailStatus": None,
                "actions": [{"actionId": 31, "actionType": "mail2target", "campaign": "save_bees"}],
            },
        ]
    }
    assert DRIVER.snapshot(emu) == DRIVER.expected(export, DRIVER.config(emu))


async def test_rate_limited_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    emulator = ActionNetworkEmulator(limit=WindowLimit(4, 1.0), token=DRIVER.key)
    await emulator.start()
    dest = make(emulator, rate=40.0, burst=10)
    try:
        await push_until_done(
            dest, batch([contact(1, "ada@example.org", subscribed=True)], [action(11, 1)])
        )
    finally:
        await dest.close()
        await emulator.stop()
    assert emulator.throttled_count() > 0
    assert emulator.records_of("ada@example.org", "signatures") == [11]


async def test_default_rate_keeps_under_four_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    emulator = ActionNetworkEmulator(limit=WindowLimit(4, 1.0), token=DRIVER.key)
    await emulator.start()
    dest = make(emulator, rate=None)
    try:
        report = await dest.push(
            batch([contact(1, "ada@example.org", subscribed=True)], [action(11, 1)])
        )
    finally:
        await dest.close()
        await emulator.stop()
    assert report.failed == {} and emulator.throttled_count() == 0


async def test_erasure_unsubscribes_and_blanks_the_person(emu: ActionNetworkEmulator) -> None:
    dest = make(emu)
    try:
        await dest.push(trio())
        report = await dest.push(
            batch(
                [],
                erasures=[
                    Erasure(tombstone_id=1, email="ada@example.org", refs=()),
                    Erasure(tombstone_id=2, email="nobody@example.org", refs=()),
                ],
            )
        )
    finally:
        await dest.close()
    assert report.failed == {}
    ada = emu.by_email("ada@example.org")
    assert ada is not None  # Action Network cannot delete a person (documented)
    assert ada["email_addresses"][0]["status"] == "unsubscribed"
    assert "given_name" not in ada and "family_name" not in ada
    assert ada["postal_addresses"] == []
