"""The Mailchimp destination pushing batches straight into the Mailchimp emulator:
batch upsert, tags, subscription rules (never a silent re-subscription), events recorded
once, per-item refusals with Mailchimp's code, the connection cap, 5xx, timeouts, erasure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proca_sync.destinations import destination_from_config
from proca_sync.destinations.base import Batch, DestinationRejectedError, Erasure
from proca_sync.destinations.mailchimp import MailchimpDestination, subscriber_hash
from proca_sync.errors import ConfigError, TransientError
from tests.support.emulators.export import action, contact
from tests.support.emulators.mailchimp import DRIVER, MailchimpEmulator

ADA = "ada@example.org"
BOB = "bob@example.org"
CY = "cy@example.org"


@pytest.fixture
async def emu() -> AsyncIterator[MailchimpEmulator]:
    emulator = DRIVER.make()
    await emulator.start()
    yield emulator
    await emulator.stop()


def make(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch, **extra: Any
) -> MailchimpDestination:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    table = DRIVER.config(emu) | {"erasure": "delete-permanent"} | extra
    destination = destination_from_config("mc", table)
    assert isinstance(destination, MailchimpDestination)
    return destination


async def push(destination: MailchimpDestination, batch: Batch) -> Any:
    await destination.open()
    try:
        return await destination.push(batch)
    finally:
        await destination.close()


async def test_upsert_status_tags_and_events(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = Batch(
        contacts=[
            contact(1, ADA),
            contact(2, BOB, subscribed=False, email_status="bounce", campaigns=("a", "b")),
            contact(3, CY, subscribed=False, first_name=None),
        ],
        actions=[action(11, 1), action(12, 1, action_type="share"), action(13, 2, campaign="b")],
    )
    report = await push(make(emu, monkeypatch), batch)
    assert report.failed == {}
    state = emu.state()
    assert state[ADA] == {
        "status": "subscribed",
        "merge_fields": {"FNAME": "Ada", "LNAME": "Lovelace"},
        "tags": ["save-bees"],
        "events": [11, 12],
    }
    assert state[BOB]["status"] == "cleaned"
    assert state[BOB]["tags"] == ["a", "b"]
    assert state[CY] == {
        "status": "transactional",
        "merge_fields": {"LNAME": "Lovelace"},
        "tags": ["save-bees"],
        "events": [],
    }
    # Two marketing members in one batch call; the quiet one alone.
    assert sum(1 for h in emu.hits if h.method == "POST" and h.path == "/3.0/lists/a1b2c3d4e5") == 1
    # Pushing again records no event twice.
    report = await push(make(emu, monkeypatch), batch)
    assert report.failed == {}
    assert emu.state() == state


async def test_many_events_of_new_members_go_in_one_batch_operation(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.batch_delay = 0.3  # polled until finished
    contacts = [contact(i, f"p{i}@example.org") for i in range(1, 31)]
    actions = [action(100 + i, i) for i in range(1, 31)] + [
        action(200 + i, i) for i in range(1, 31)
    ]
    actions.append(action(999, 5, action_type="x" * 40))  # a name Mailchimp would refuse…
    destination = make(emu, monkeypatch, batch_events_from=10, poll_interval=0.1)
    report = await push(destination, Batch(contacts=contacts, actions=actions))
    # …is cut to 30 characters by the connector, so everything arrives.
    assert report.failed == {}
    assert sum(1 for h in emu.hits if h.path == "/3.0/batches") == 1
    assert sum(1 for h in emu.hits if h.path.endswith("/events")) == 0
    assert emu.state()["p5@example.org"]["events"] == [105, 205, 999]
    # Pushed again: the members exist now, their events are looked up, none is re-sent.
    again = await push(make(emu, monkeypatch), Batch(contacts=contacts, actions=actions))
    assert again.failed == {}
    assert all(
        len(m["events"]) == len(set(e["properties"]["action_id"] for e in m["events"]))
        for m in emu.members.values()
    )


async def test_a_batch_operation_refusal_is_reported_per_action(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    contacts = [contact(i, f"p{i}@example.org") for i in range(1, 4)]
    actions = [action(100 + i, i) for i in range(1, 4)]
    emu.batch_delay = 0.2
    destination = make(emu, monkeypatch, batch_events_from=2, poll_interval=0.05)
    await destination.open()
    try:
        task = asyncio.create_task(destination.push(Batch(contacts=contacts, actions=actions)))
        deadline = time.monotonic() + 5
        while not emu.batches:  # archive p2 between the batch call and its processing
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)  # sleep-ok: polling observable state under a deadline
        emu.members[subscriber_hash("p2@example.org")]["status"] = "archived"
        report = await task
    finally:
        await destination.close()
    error = report.failed[("action", "102")]
    assert isinstance(error, DestinationRejectedError) and error.code == "resource_not_found"
    assert set(report.failed) == {("action", "102")}


async def test_not_opted_in_never_unsubscribes_an_existing_subscriber(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)]))
    changed = contact(1, ADA, subscribed=False, first_name="Adele")
    report = await push(make(emu, monkeypatch), Batch(contacts=[changed]))
    assert report.failed == {}
    assert emu.state()[ADA]["status"] == "subscribed"
    assert emu.state()[ADA]["merge_fields"]["FNAME"] == "Adele"


async def test_unsubscribed_member_is_never_silently_resubscribed(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    unsub = contact(1, ADA, subscribed=False, email_status="unsub")
    await push(
        make(emu, monkeypatch),
        Batch(contacts=[unsub, contact(2, BOB, subscribed=False, email_status="unsub")]),
    )
    assert emu.members[subscriber_hash(ADA)]["status"] == "unsubscribed"
    # A plain opt-in does not override the unsubscription: refused with Mailchimp's reason.
    report = await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)]))
    error = report.failed[("contact", "1")]
    assert isinstance(error, DestinationRejectedError)
    assert error.code == "member_in_compliance_state"
    assert ADA not in str(error)
    assert emu.members[subscriber_hash(ADA)]["status"] == "unsubscribed"
    # A newer double opt-in asks Mailchimp to confirm: pending, Mailchimp's own e-mail.
    doi = contact(2, BOB, email_status="double_opt_in")
    report = await push(make(emu, monkeypatch), Batch(contacts=[doi]))
    assert report.failed == {}
    assert emu.members[subscriber_hash(BOB)]["status"] == "pending"


async def test_refused_address_is_reported_with_the_api_code_and_others_arrive(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.reject.add(BOB)
    batch = Batch(
        contacts=[contact(1, ADA), contact(2, BOB), contact(3, CY, subscribed=False)],
        actions=[action(11, 1), action(12, 2)],
    )
    report = await push(make(emu, monkeypatch), batch)
    assert set(report.failed) == {("contact", "2"), ("action", "12")}
    error = report.failed[("contact", "2")]
    assert isinstance(error, DestinationRejectedError) and error.code == "ERROR_GENERIC"
    assert BOB not in str(error)
    assert set(emu.state()) == {ADA, CY}
    assert emu.state()[ADA]["events"] == [11]


async def test_connection_cap_answers_429_and_everything_arrives(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.concurrency = 2
    emu.latency = 0.05
    contacts = [contact(i, f"p{i}@example.org", subscribed=False) for i in range(1, 13)]
    report = await push(make(emu, monkeypatch, tags=False), Batch(contacts=contacts))
    assert report.failed == {}
    assert emu.throttled_count() > 0
    assert len(emu.state()) == 12


async def test_5xx_is_retried_and_a_lost_event_answer_is_not_recorded_twice(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    emu.fail_with(503, count=2, path="/3.0/lists/a1b2c3d4e5")
    batch = Batch(contacts=[contact(1, ADA)], actions=[action(11, 1)])
    emu.stall(1.0, count=1, path="/events")
    first = await push(make(emu, monkeypatch, timeout=0.4), batch)
    assert isinstance(first.failed.get(("action", "11")), TransientError)
    assert emu.throttled_count() == 0
    assert any(h.status == 503 for h in emu.hits)
    await _wait_event_recorded(emu)  # the stalled post landed after the client gave up
    second = await push(make(emu, monkeypatch), batch)
    assert second.failed == {}
    assert emu.state()[ADA]["events"] == [11]


async def _wait_event_recorded(emu: MailchimpEmulator) -> None:
    deadline = time.monotonic() + 5
    while not emu.members[subscriber_hash(ADA)]["events"]:
        assert time.monotonic() < deadline, "the stalled event never landed"
        await asyncio.sleep(0.02)  # sleep-ok: polling observable state under a deadline


async def test_erasure_forgets_and_a_later_add_is_refused_with_mailchimps_reason(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)], actions=[action(11, 1)]))
    report = await push(
        make(emu, monkeypatch), Batch(erasures=[Erasure(tombstone_id=5, email=ADA, refs=())])
    )
    assert report.failed == {}
    assert ADA not in emu.state()
    again = await push(
        make(emu, monkeypatch), Batch(erasures=[Erasure(tombstone_id=5, email=ADA, refs=())])
    )
    assert again.failed == {}  # already gone: nothing to do
    report = await push(make(emu, monkeypatch), Batch(contacts=[contact(1, ADA)]))
    error = report.failed[("contact", "1")]
    assert isinstance(error, DestinationRejectedError)
    assert error.code == "forgotten_email_not_subscribed"


async def test_archive_erasure_lets_a_newer_action_create_the_member_anew(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    await push(make(emu, monkeypatch, erasure="archive"), Batch(contacts=[contact(1, ADA)]))
    await push(
        make(emu, monkeypatch, erasure="archive"),
        Batch(erasures=[Erasure(tombstone_id=5, email=ADA, refs=())]),
    )
    assert ADA not in emu.state()
    report = await push(
        make(emu, monkeypatch, erasure="archive"), Batch(contacts=[contact(9, ADA)])
    )
    assert report.failed == {}
    assert emu.state()[ADA]["status"] == "subscribed"


def test_base_url_comes_from_the_key_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MC_KEY", "0123abcd-us6")
    destination = destination_from_config(
        "mc", {"type": "mailchimp", "list_id": "x", "api_key_env": "MC_KEY"}
    )
    assert isinstance(destination, MailchimpDestination)
    assert destination._client.base_url == "https://us6.api.mailchimp.com/3.0"
    monkeypatch.setenv("MC_KEY", "nosuffix")
    with pytest.raises(ConfigError):
        destination_from_config(
            "mc", {"type": "mailchimp", "list_id": "x", "api_key_env": "MC_KEY"}
        )


async def test_wrong_key_is_transient_and_unknown_list_is_a_config_error(
    emu: MailchimpEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination = make(emu, monkeypatch, list_id="nope")
    await destination.open()
    try:
        with pytest.raises(ConfigError):
            await destination.ping()
    finally:
        await destination.close()
    monkeypatch.setenv(DRIVER.key_env, "wrong-us6")
    destination = destination_from_config("mc", DRIVER.config(emu))
    with pytest.raises(TransientError, match="refused the credentials"):
        await push(destination, Batch(contacts=[contact(1, ADA)]))  # type: ignore[arg-type]
