"""HubSpot, ActiveCampaign and Action Network through the real pusher: the modelling
scenario replayed into a SQLite ledger, pushed by :class:`Pusher` into each emulator
(with a burst of 5xx and resets on the way), must leave exactly what ``expected()``
promises; a second push sends no write request; an erased contact is erased remotely the
way the docs page says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proca_sync.crm.sql import SqlBackend
from proca_sync.destinations import destination_from_config
from proca_sync.destinations.pusher import Pusher
from proca_sync.engine import Engine
from tests.support import scenario
from tests.support.emulators.actionnetwork import DRIVER as ACTIONNETWORK
from tests.support.emulators.actionnetwork import ActionNetworkEmulator
from tests.support.emulators.activecampaign import DRIVER as ACTIVECAMPAIGN
from tests.support.emulators.activecampaign import ActiveCampaignEmulator
from tests.support.emulators.base import Driver, Emulator
from tests.support.emulators.hubspot import DRIVER as HUBSPOT
from tests.support.emulators.hubspot import HubSpotEmulator

ERASURE_KEY = b"k" * 32


def erased(emulator: Emulator, email: str) -> bool:
    if isinstance(emulator, HubSpotEmulator | ActiveCampaignEmulator):
        return emulator.by_email(email) is None
    assert isinstance(emulator, ActionNetworkEmulator)
    person = emulator.by_email(email)  # no delete in Action Network: unsubscribed, blanked
    return (
        person is not None
        and person["email_addresses"][0]["status"] == "unsubscribed"
        and "given_name" not in person
    )


@pytest.mark.parametrize("driver", [HUBSPOT, ACTIVECAMPAIGN, ACTIONNETWORK], ids=lambda d: d.type)
async def test_pusher_leaves_what_the_docs_promise(
    driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    backend = SqlBackend(url, erasure_key=ERASURE_KEY)
    await backend.open()
    try:
        await Engine(backend=backend, keystore=scenario.keystore()).run(scenario.bodies())
    finally:
        await backend.close()
    monkeypatch.setenv(driver.key_env, driver.key)
    emulator = driver.make(rate_limited=False)
    await emulator.start()
    backend = SqlBackend(url, erasure_key=ERASURE_KEY)
    try:
        config = {**driver.config(emulator), "rate": 500.0}

        def pusher() -> Pusher:
            return Pusher(backend, destination_from_config("d", config), max_delay=0.5)

        emulator.fail_with(503, count=4)
        emulator.reset_connections(count=2)
        first = pusher()
        try:
            result = await first.run(within=60)
        finally:
            first.close()
        assert result.caught_up and result.parked == 0
        export: dict[str, Any] = backend.export()
        assert driver.snapshot(emulator) == driver.expected(export, config)

        writes = emulator.writes()
        second = pusher()
        try:
            again = await second.run(within=30)
        finally:
            second.close()
        assert again.caught_up and emulator.writes() == writes  # nothing sent twice

        assert backend.forget_sync(email="ada@example.org") is not None
        third = pusher()
        try:
            forgot = await third.run(within=30)
        finally:
            third.close()
        assert forgot.caught_up and forgot.stats.erasures == 1
        assert erased(emulator, "ada@example.org")
    finally:
        backend.close_sync()
        await emulator.stop()
