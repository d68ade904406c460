"""The HubSpot, ActiveCampaign and Action Network drivers against their own connectors, fed
from a real ledger: the modelling scenario (merges, consent, DOI, bounces, testing
actions, the shared fixtures) is replayed into a SQLite CRM, its ``crm export`` is turned
into batches the way the pusher hands them (merged state, every action's contact in the
same batch), and the emulator's state must be exactly what ``expected()`` — the docs
page's promise — computes: in one push, and in small pushes of a half-replayed ledger
followed by the full one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from proca_sync.crm.sql import SqlBackend
from proca_sync.destinations import destination_from_config
from proca_sync.destinations.base import ActionView, Batch, CampaignView, ContactView
from proca_sync.engine import Engine
from tests.support import scenario
from tests.support.emulators.actionnetwork import DRIVER as ACTIONNETWORK
from tests.support.emulators.activecampaign import DRIVER as ACTIVECAMPAIGN
from tests.support.emulators.base import Driver
from tests.support.emulators.hubspot import DRIVER as HUBSPOT


def replay(url: str, bodies: Sequence[bytes]) -> dict[str, Any]:
    backend = SqlBackend(url)

    async def go() -> None:
        await backend.open()
        try:
            await Engine(backend=backend, keystore=scenario.keystore()).run(list(bodies))
        finally:
            await backend.close()

    asyncio.run(go())
    with SqlBackend(url) as reader:
        export: dict[str, Any] = reader.export()
    return export


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    bodies = scenario.bodies()
    half = replay(
        f"sqlite:///{tmp_path_factory.mktemp('half') / 'crm.db'}", bodies[: len(bodies) // 2]
    )
    full = replay(f"sqlite:///{tmp_path_factory.mktemp('full') / 'crm.db'}", bodies)
    return half, full


def views(export: dict[str, Any]) -> Iterator[tuple[ContactView, list[ActionView]]]:
    """Each exported contact with an e-mail as the pusher's views (testing ones kept: the
    connectors must drop them)."""
    for number, c in enumerate(export["contacts"], start=1):
        if not c.get("email"):
            continue
        contact = ContactView(
            contact_id=number,
            version=1,
            email=c["email"],
            first_name=c.get("firstName"),
            last_name=c.get("lastName"),
            postcode=c.get("postcode"),
            country=c.get("country"),
            fields=c.get("fields") or {},
            refs=tuple(c.get("contactRefs") or ()),
            subscribed=bool(c.get("subscribed")),
            opted_in=bool(c.get("optIn")),
            opt_in_at=c.get("optInAt"),
            email_status=c.get("emailStatus"),
            email_status_changed=c.get("emailStatusChanged"),
            testing=bool(c.get("testing")),
            campaigns=tuple(sorted({a["campaign"] for a in c.get("actions") or ()})),
            updated_at="",
        )
        actions = [
            ActionView(
                action_id=int(a["actionId"]),
                contact_id=number,
                action_type=a["actionType"],
                campaign=a["campaign"],
                created_at=a["createdAt"],
                testing=bool(a.get("testing")),
                data={
                    "actionPage": {"name": a.get("actionPage")},
                    "customFields": a.get("customFields") or {},
                },
            )
            for a in c.get("actions") or ()
        ]
        yield contact, actions


def batches(export: dict[str, Any], size: int) -> Iterator[Batch]:
    campaigns = {
        c["name"]: CampaignView(
            name=c["name"], title=c.get("title"), external_id=c.get("externalId")
        )
        for c in export.get("campaigns", [])
    }
    items = list(views(export))
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield Batch(
            contacts=[c for c, _ in chunk],
            actions=[a for _, acts in chunk for a in acts],
            campaigns=campaigns,
        )


@pytest.mark.parametrize("driver", [HUBSPOT, ACTIVECAMPAIGN, ACTIONNETWORK], ids=lambda d: d.type)
@pytest.mark.parametrize("size", [1000, 2], ids=["one-push", "small-pushes"])
async def test_emulator_state_is_what_the_docs_promise(
    driver: Driver,
    size: int,
    exports: tuple[dict[str, Any], dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    half, full = exports
    assert full["contacts"], "the scenario produced no contact"
    monkeypatch.setenv(driver.key_env, driver.key)
    emulator = driver.make(rate_limited=False)
    await emulator.start()
    try:
        config = driver.config(emulator)
        destination: Any = destination_from_config(driver.type, {**config, "rate": 500.0})
        await destination.open()
        try:
            rounds = [half, full] if size < 1000 else [full]
            for export in rounds:
                for batch in batches(export, size):
                    report = await destination.push(batch)
                    assert report.failed == {}, {k: str(v) for k, v in report.failed.items()}
        finally:
            await destination.close()
        assert driver.snapshot(emulator) == driver.expected(full, config)
    finally:
        await emulator.stop()
