"""Each SaaS driver of this branch against its own connector, fed from a real ledger: the
modelling scenario (merges, consent, DOI, bounces, testing actions…) is replayed into a
SQLite CRM, its ``crm export`` is turned into batches the way the pusher hands them, and
the emulator's state must be exactly what the driver's ``expected()`` (the docs page's
promise) computes — in one push, and in many small pushes of a half-replayed ledger
followed by the full one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from proca_sync.crm.sql import SqlBackend
from proca_sync.destinations import destination_from_config
from proca_sync.destinations.base import Batch, CampaignView
from proca_sync.destinations.pusher import Pusher
from proca_sync.engine import Engine
from tests.support import scenario
from tests.support.emulators.base import Driver
from tests.support.emulators.brevo import DRIVER as BREVO
from tests.support.emulators.civicrm import DRIVER as CIVICRM
from tests.support.emulators.export import pushed
from tests.support.emulators.mailchimp import DRIVER as MAILCHIMP


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


def batches(export: dict[str, Any], config: dict[str, Any], size: int) -> Iterator[Batch]:
    campaigns = {
        c["name"]: CampaignView(
            name=c["name"], title=c.get("title"), external_id=c.get("externalId")
        )
        for c in export.get("campaigns", [])
    }
    items = list(pushed(export, config | {"include_testing": True}))
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        yield Batch(
            contacts=[c for c, _ in chunk],
            actions=[a for _, acts in chunk for a in acts],
            campaigns=campaigns,
        )


@pytest.mark.parametrize("driver", [BREVO, MAILCHIMP, CIVICRM], ids=lambda d: d.type)
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
    emulator = driver.make()
    await emulator.start()
    try:
        config = driver.config(emulator)
        destination: Any = destination_from_config(driver.type, config)
        await destination.open()
        try:
            # The pusher drops testing contacts/actions unless include_testing: so does
            # the connector, and the batches here carry them to prove it.
            rounds = [half, full] if size < 1000 else [full]
            for export in rounds:
                for batch in batches(export, config, size):
                    report = await destination.push(batch)
                    assert report.failed == {}, {k: str(v) for k, v in report.failed.items()}
        finally:
            await destination.close()
        assert driver.snapshot(emulator) == driver.expected(full, config)
    finally:
        await emulator.stop()


@pytest.mark.parametrize("driver", [BREVO, MAILCHIMP, CIVICRM], ids=lambda d: d.type)
async def test_through_the_pusher_then_a_second_push_writes_nothing(
    driver: Driver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    export = await asyncio.to_thread(replay, url, scenario.bodies())
    monkeypatch.setenv(driver.key_env, driver.key)
    emulator = driver.make()
    await emulator.start()
    try:
        config = driver.config(emulator)
        first = await Pusher(SqlBackend(url), destination_from_config("d", config)).run()
        assert first.caught_up and first.parked == 0
        assert driver.snapshot(emulator) == driver.expected(export, config)
        writes = emulator.writes()
        second = await Pusher(SqlBackend(url), destination_from_config("d", config)).run()
        assert second.caught_up and second.parked == 0
        assert emulator.writes() == writes
    finally:
        await emulator.stop()
