"""ActiveCampaign destination against its emulator: batches pushed straight in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from proca_sync.destinations import destination_from_config
from proca_sync.destinations.activecampaign import ActiveCampaignDestination
from proca_sync.destinations.base import Batch, DestinationRejectedError, Erasure
from proca_sync.errors import ConfigError
from tests.support.emulators.activecampaign import (
    DRIVER,
    FIELD_MAPPING,
    LIST_ID,
    ActiveCampaignEmulator,
)
from tests.support.emulators.base import WindowLimit
from tests.support.saas_views import action, batch, contact, push_until_done

L = str(LIST_ID)


@pytest.fixture
async def emu(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ActiveCampaignEmulator]:
    async with DRIVER.serving(monkeypatch) as emulator:
        yield emulator


def make(emu: ActiveCampaignEmulator, **extra: Any) -> ActiveCampaignDestination:
    """The destination; faster than the account's 5/s unless a test sets ``rate``
    (``rate=None``: the connector's default) — the emulator here has no quota."""
    table = {**DRIVER.config(emu), "fields": FIELD_MAPPING, "rate": 200.0, **extra}
    if table["rate"] is None:
        del table["rate"]
    destination = destination_from_config("ac", table)
    assert isinstance(destination, ActiveCampaignDestination)
    return destination


def trio() -> Batch:
    return batch(
        [
            contact(1, "ada@example.org", subscribed=True, phone="+3212345"),
            contact(2, "bob@example.org", status="unsub"),
            contact(3, "cy@example.org", first="Cy", last=None, postcode=None),
        ],
        [
            action(11, 1),
            action(12, 1, action_type="share", campaign="stop_oil"),
            action(21, 2),
            action(31, 3),
        ],
    )


def one() -> Batch:
    return batch([contact(1, "ada@example.org", subscribed=True)], [action(11, 1)])


def many(n: int, offset: int = 0) -> Batch:
    return batch(
        [
            contact(
                offset + i,
                f"p{offset + i}@example.org",
                subscribed=i % 3 == 0,
                status="bounce" if i % 3 == 1 else None,
            )
            for i in range(n)
        ],
        [action(10_000 + offset + i, offset + i) for i in range(n)],
    )


def state(emu: ActiveCampaignEmulator, email: str) -> tuple[int | None, list[str]]:
    found = emu.by_email(email)
    assert found is not None
    return emu.list_status.get((found["id"], L)), emu.tags_of(email)


@pytest.mark.parametrize(
    "threshold", [pytest.param(10, id="contact-sync"), pytest.param(0, id="bulk-import")]
)
async def test_contacts_list_status_tags_and_fields(
    emu: ActiveCampaignEmulator, threshold: int
) -> None:
    dest = make(emu, sync_threshold=threshold)
    try:
        report = await dest.push(trio())
    finally:
        await dest.close()
    assert report.failed == {}
    ada = emu.by_email("ada@example.org")
    assert ada is not None and ada["firstName"] == "Ada" and ada["phone"] == "+3212345"
    assert ada["fields"] == {"1": "1000", "2": "BE"}  # by title and by perstag
    assert state(emu, "ada@example.org") == (
        1,
        ["proca:register", "proca:save_bees", "proca:share", "proca:stop_oil"],
    )
    assert state(emu, "bob@example.org") == (2, ["proca:register", "proca:save_bees"])
    assert state(emu, "cy@example.org")[0] is None  # not opted in: not put on the list
    paths = [h.path for h in emu.hits]
    assert ("/api/3/import/bulk_import" in paths) is (threshold == 0)


@pytest.mark.parametrize(
    "threshold", [pytest.param(10, id="contact-sync"), pytest.param(0, id="bulk-import")]
)
async def test_unsubscribed_from_the_list_is_never_resubscribed(
    emu: ActiveCampaignEmulator, threshold: int
) -> None:
    dest = make(emu, sync_threshold=threshold)
    try:
        await dest.push(batch([contact(1, "ada@example.org", status="unsub")]))
        assert state(emu, "ada@example.org")[0] == 2
        # a newer opt-in in the ledger: ActiveCampaign keeps the person unsubscribed
        await dest.push(
            batch([contact(1, "ada@example.org", version=2, subscribed=True)], [action(11, 1)])
        )
    finally:
        await dest.close()
    assert state(emu, "ada@example.org") == (2, ["proca:register", "proca:save_bees"])


@pytest.mark.parametrize(
    "threshold", [pytest.param(10, id="contact-sync"), pytest.param(0, id="bulk-import")]
)
async def test_unsubscribed_in_activecampaign_between_pushes_is_not_resubscribed(
    emu: ActiveCampaignEmulator, threshold: int
) -> None:
    dest = make(emu, sync_threshold=threshold)
    try:
        await dest.push(batch([contact(1, "ada@example.org", subscribed=True)]))
        await dest.push(batch([contact(2, "bob@example.org", subscribed=True)]))
        reads = [h for h in emu.hits if h.path == "/api/3/contacts"]
        emu.unsubscribe_in_app("ada@example.org")  # after the connector's last full read
        await dest.push(
            batch([contact(1, "ada@example.org", version=2, subscribed=True)], [action(11, 1)])
        )
    finally:
        await dest.close()
    assert len(reads) == 2  # the later reads are incremental (updated_after), one page each
    assert state(emu, "ada@example.org") == (2, ["proca:register", "proca:save_bees"])


async def test_existing_subscriber_not_unsubscribed_by_a_form_without_consent(
    emu: ActiveCampaignEmulator,
) -> None:
    dest = make(emu)
    try:
        await dest.push(batch([contact(1, "ada@example.org", subscribed=True)]))
        await dest.push(batch([contact(1, "ada@example.org", version=2)], [action(11, 1)]))
    finally:
        await dest.close()
    assert state(emu, "ada@example.org")[0] == 1


async def test_redelivery_and_a_large_batch_in_bulk(emu: ActiveCampaignEmulator) -> None:
    dest = make(emu)
    try:
        first = await dest.push(many(300))
        second = await dest.push(many(300))
    finally:
        await dest.close()
    assert first.failed == {} and second.failed == {}
    assert len(emu.contacts) == 300
    assert len(emu.contact_tags) == 600  # two tags each, not four
    imports = [h for h in emu.hits if h.path == "/api/3/import/bulk_import"]
    assert len(imports) == 4  # 250 + 50, twice
    assert state(emu, "p0@example.org")[0] == 1 and state(emu, "p1@example.org")[0] == 2
    assert state(emu, "p2@example.org")[0] is None


async def test_double_opt_in_subscribes_then_bounce_unsubscribes(
    emu: ActiveCampaignEmulator,
) -> None:
    dest = make(emu)
    try:
        await dest.push(batch([contact(1, "ada@example.org")], [action(11, 1)]))
        assert state(emu, "ada@example.org")[0] is None  # not opted in: not on the list
        await dest.push(
            batch(
                [contact(1, "ada@example.org", version=2, status="double_opt_in", subscribed=True)]
            )
        )
        assert state(emu, "ada@example.org")[0] == 1
        await dest.push(batch([contact(1, "ada@example.org", version=3, status="bounce")]))
    finally:
        await dest.close()
    assert state(emu, "ada@example.org")[0] == 2


async def test_refused_addresses(emu: ActiveCampaignEmulator) -> None:
    dest = make(emu, sync_threshold=0)
    bad = batch(
        [contact(1, "ada@example.org", subscribed=True), contact(9, "not-an-address")],
        [action(11, 1), action(91, 9)],
    )
    try:
        bulk = await dest.push(bad)
        dest.config = dest.config.model_copy(update={"sync_threshold": 10})
        single = await dest.push(bad)
    finally:
        await dest.close()
    for report, code in ((bulk, "import_failure"), (single, "email_invalid")):
        error = report.failed[("contact", "9")]
        assert isinstance(error, DestinationRejectedError) and error.code == code
        assert "not-an-address" not in str(error)
        assert set(report.failed) == {("contact", "9"), ("action", "91")}
    assert state(emu, "ada@example.org")[0] == 1


async def test_outage_loses_nothing_and_tags_once(emu: ActiveCampaignEmulator) -> None:
    dest = make(emu, timeout=0.5)
    emu.fail_with(502, count=5)
    emu.stall(1.0, count=2, path="/api/3/contactTags")
    emu.reset_connections(count=2, path="/api/3/contact/sync")
    try:
        await push_until_done(dest, trio())
    finally:
        await dest.close()
    assert state(emu, "ada@example.org") == (
        1,
        ["proca:register", "proca:save_bees", "proca:share", "proca:stop_oil"],
    )
    assert len(emu.contact_tags) == 8


async def test_rate_limited_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    emulator = ActiveCampaignEmulator(limit=WindowLimit(5, 1.0), token=DRIVER.key)
    await emulator.start()
    dest = make(emulator, rate=40.0, burst=10)  # above the account's 5/s
    try:
        await push_until_done(dest, one())
    finally:
        await dest.close()
        await emulator.stop()
    assert emulator.throttled_count() > 0
    assert dest.client.stats.throttled == emulator.throttled_count()
    assert state(emulator, "ada@example.org") == (1, ["proca:register", "proca:save_bees"])


async def test_default_rate_keeps_under_five_per_second(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DRIVER.key_env, DRIVER.key)
    emulator = ActiveCampaignEmulator(limit=WindowLimit(5, 1.0), token=DRIVER.key)
    await emulator.start()
    dest = make(emulator, rate=None)
    try:
        report = await dest.push(one())
    finally:
        await dest.close()
        await emulator.stop()
    assert report.failed == {}
    assert emulator.throttled_count() == 0
    assert emulator.max_rate() <= 5


async def test_unknown_field_or_list_is_a_config_error(emu: ActiveCampaignEmulator) -> None:
    for extra in ({"fields": {"postcode": "Nope"}}, {"list_id": 99}):
        dest = make(emu, **extra)
        try:
            with pytest.raises(ConfigError):
                await dest.ping()
        finally:
            await dest.close()


async def test_erasure_deletes_the_contact(emu: ActiveCampaignEmulator) -> None:
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
    assert emu.by_email("ada@example.org") is None and len(emu.contacts) == 2
