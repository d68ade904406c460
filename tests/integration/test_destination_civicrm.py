"""The CiviCRM destination pushing batches straight into the CiviCRM APIv4 emulator:
Individuals matched by e-mail, groups per campaign, activities once per action, CiviCRM's
opt-out and on-hold flags, per-call refusals, 5xx, lost answers, erasure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proca_sync.destinations import destination_from_config
from proca_sync.destinations.base import Batch, CampaignView, DestinationRejectedError, Erasure
from proca_sync.destinations.civicrm import CivicrmDestination
from proca_sync.errors import ConfigError, TransientError
from tests.support.emulators.civicrm import DRIVER, CivicrmEmulator
from tests.support.emulators.export import action, contact

ADA = "ada@example.org"
BOB = "bob@example.org"
CY = "cy@example.org"


@pytest.fixture
async def emu() -> AsyncIterator[CivicrmEmulator]:
    emulator = DRIVER.make()
    await emulator.start()
    yield emulator
    await emulator.stop()


def make(emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> CivicrmDestination:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    destination = destination_from_config("civi", DRIVER.config(emu) | extra)
    assert isinstance(destination, CivicrmDestination)
    return destination


async def push(destination: CivicrmDestination, batch: Batch) -> Any:
    await destination.open()
    try:
        return await destination.push(batch)
    finally:
        await destination.close()


def seed_contact(emu: CivicrmEmulator, email: str, first_name: str) -> int:
    contact_row = emu._create("Contact", {"contact_type": "Individual", "first_name": first_name})
    emu._create("Email", {"contact_id": contact_row["id"], "email": email, "is_primary": True})
    return int(contact_row["id"])


async def test_contacts_groups_and_activities_once(
    emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = seed_contact(emu, ADA, "Old")
    batch = Batch(
        contacts=[contact(1, ADA), contact(2, BOB, subscribed=False, campaigns=("a", "save-bees"))],
        actions=[action(11, 1), action(12, 2, campaign="a"), action(13, 2, action_type="share")],
        campaigns={"a": CampaignView(name="a", title="Campaign A", external_id=None)},
    )
    report = await push(make(emu, monkeypatch), batch)
    assert report.failed == {}
    assert report.requests == 4  # look-up, new groups, contacts, activities
    state = emu.state()
    assert state[ADA] == {
        "first_name": "Ada",
        "last_name": "Lovelace",
        "postal_code": "1000",
        "country": "BE",
        "is_opt_out": False,
        "do_not_email": False,
        "on_hold": 0,
        "groups": ["newsletter", "proca_save-bees"],
        "activities": [11],
    }
    assert state[BOB]["groups"] == ["proca_a", "proca_save-bees"]  # never opted in: no newsletter
    assert state[BOB]["activities"] == [12, 13]
    # Matched by e-mail: the existing Individual was updated, not duplicated.
    assert len(emu.tables["Contact"]) == 2
    assert emu.tables["Contact"][existing]["first_name"] == "Ada"
    titles = sorted(g["title"] for g in emu.tables["Group"].values())
    assert "Campaign A (proca_a)" in titles
    # Pushed again: nothing recorded twice, no group created twice.
    again = await push(make(emu, monkeypatch), batch)
    assert again.failed == {}
    assert emu.state() == state
    assert len(emu.tables["Activity"]) == 3
    assert len(emu.tables["Group"]) == 3


async def test_opt_out_bounce_and_a_newer_doi(
    emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)]))
    await push(
        make(emu, monkeypatch),
        Batch(contacts=[contact(1, ADA, subscribed=False, email_status="bounce")]),
    )
    state = emu.state()[ADA]
    assert (state["is_opt_out"], state["do_not_email"], state["on_hold"]) == (True, True, 1)
    assert "newsletter" not in state["groups"]
    # A plain opt-in later does not clear the flags (no silent re-subscription)…
    await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)]))
    assert emu.state()[ADA]["is_opt_out"] is True
    # …a newer confirmed double opt-in does.
    await push(
        make(emu, monkeypatch), Batch(contacts=[contact(1, ADA, email_status="double_opt_in")])
    )
    state = emu.state()[ADA]
    assert (state["is_opt_out"], state["do_not_email"], state["on_hold"]) == (False, False, 0)
    assert "newsletter" in state["groups"]


async def test_refused_address_is_reported_with_the_code_and_others_arrive(
    emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.reject.add(BOB)
    batch = Batch(
        contacts=[contact(1, ADA), contact(2, BOB), contact(3, CY, country="Belgium")],
        actions=[action(11, 1), action(12, 2)],
    )
    report = await push(make(emu, monkeypatch), batch)
    assert set(report.failed) == {("contact", "2"), ("contact", "3"), ("action", "12")}
    error = report.failed[("contact", "2")]
    assert isinstance(error, DestinationRejectedError) and error.code == "invalid_email"
    assert isinstance(report.failed[("action", "12")], DestinationRejectedError)
    assert BOB not in str(error) and "Belgium" not in str(report.failed[("contact", "3")])
    # Calls are not transactional in CiviCRM: what ran before the refusal stays (the
    # docs page states it) — Bob's Individual without an e-mail, Cy without an address.
    assert sorted(emu.state()) == [ADA, CY]
    assert emu.state()[CY]["postal_code"] is None
    assert len(emu.tables["Contact"]) == 3
    assert emu.state()[ADA]["activities"] == [11]


async def test_permission_refusal_is_transient(
    emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every activity call refused (403): CiviCRM answers the request 403 — a configuration
    # matter (the API user's permissions), offered again later, never parked.
    emu.forbidden.add("Activity")
    batch = Batch(contacts=[contact(1, ADA)], actions=[action(11, 1)])
    with pytest.raises(TransientError):
        await push(make(emu, monkeypatch), batch)
    # One call refused among others that succeeded: 200, the item failed transiently.
    batch = Batch(contacts=[contact(1, ADA), contact(2, BOB)], actions=[action(11, 1)])
    emu.forbidden = {"GroupContact"}
    emu.tables["Contact"].clear()
    emu.tables["Email"].clear()
    seed_contact(emu, BOB, "Bob")
    report = await push(make(emu, monkeypatch, campaign_groups=False, group_id=None), batch)
    assert report.failed == {}
    report = await push(
        make(emu, monkeypatch),
        Batch(contacts=[contact(1, ADA), contact(3, CY, subscribed=False, campaigns=())]),
    )
    assert isinstance(report.failed[("contact", "1")], TransientError)
    assert not isinstance(report.failed[("contact", "1")], DestinationRejectedError)


async def test_maintenance_503_is_retried_a_bare_500_fails_the_push(
    emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.fail_with(503, count=2)
    assert (await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)]))).failed == {}
    emu.fail_with(500, count=1)
    with pytest.raises(TransientError):
        await push(make(emu, monkeypatch), Batch(contacts=[contact(2, BOB)]))
    assert (await push(make(emu, monkeypatch), Batch(contacts=[contact(2, BOB)]))).failed == {}
    assert sorted(emu.state()) == [ADA, BOB]


async def test_a_lost_answer_creates_nothing_twice(
    emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = Batch(contacts=[contact(1, ADA)], actions=[action(11, 1)])
    # A stalled look-up is retried by the client (reads are safe to repeat).
    emu.stall(1.0, count=1, path="/civicrm/ajax/api4")
    assert (await push(make(emu, monkeypatch, timeout=0.4), batch)).failed == {}
    # A stalled write is not repeated by the client: the push fails transiently…
    emu.slow_action, emu.slow_count, emu.slow_seconds = "create", 2, 0.8
    batch = Batch(contacts=[contact(2, BOB)], actions=[action(12, 2)])
    with pytest.raises(TransientError):
        await push(make(emu, monkeypatch, timeout=0.4), batch)
    deadline = time.monotonic() + 5
    while BOB not in emu.state():  # …while the write lands after the client gave up
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)  # sleep-ok: polling observable state under a deadline
    # Offered again: the look-up finds the contact, the activity is created once.
    with pytest.raises(TransientError):  # this time the activity's answer is lost
        await push(make(emu, monkeypatch, timeout=0.4), batch)
    while 12 not in emu.state()[BOB]["activities"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)  # sleep-ok: polling observable state under a deadline
    third = await push(make(emu, monkeypatch), batch)
    assert third.failed == {}
    assert sum(1 for e in emu.tables["Email"].values() if e["email"] == BOB) == 1
    assert emu.state()[BOB]["activities"] == [12]
    assert len(emu.tables["Activity"]) == 2


async def test_erasure_deletes_for_good_and_a_newer_action_creates_anew(
    emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)], actions=[action(11, 1)]))
    erase = Batch(erasures=[Erasure(tombstone_id=3, email=ADA, refs=())])
    assert (await push(make(emu, monkeypatch), erase)).failed == {}
    assert ADA not in emu.state()
    assert not emu.tables["Contact"] and not emu.tables["Activity"]
    assert (await push(make(emu, monkeypatch), erase)).failed == {}
    report = await push(
        make(emu, monkeypatch), Batch(contacts=[contact(9, ADA)], actions=[action(19, 9)])
    )
    assert report.failed == {}
    assert emu.state()[ADA]["activities"] == [19]


async def test_ping_checks_the_group(emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    destination = make(emu, monkeypatch)
    await destination.open()
    try:
        await destination.ping()
    finally:
        await destination.close()
    destination = make(emu, monkeypatch, group_id=12345)
    await destination.open()
    try:
        with pytest.raises(ConfigError):
            await destination.ping()
    finally:
        await destination.close()


async def test_an_existing_contact_with_nothing_to_update_still_gets_its_groups(
    emu: CivicrmEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed_contact(emu, ADA, "Ada")
    quiet = contact(
        1, ADA, subscribed=False, first_name=None, last_name=None, postcode=None, country=None
    )
    report = await push(make(emu, monkeypatch), Batch(contacts=[quiet], actions=[action(11, 1)]))
    assert report.failed == {}
    assert emu.state()[ADA]["groups"] == ["proca_save-bees"]
    assert emu.state()[ADA]["activities"] == [11]
