"""A console over real stores: a SQLite CRM holding the fixture contacts, a parking store
with one clear-text action and one broken body, and an account per role."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
from fastapi.testclient import TestClient

from proca_sync.consumer.parking import ParkingStore, ParkItem
from proca_sync.consumer.status import HealthServer, Stats
from proca_sync.crm.sql import SqlBackend
from proca_sync.engine import Engine
from proca_sync.sync.model import Options
from proca_sync.sync.records import Ignored
from proca_sync.web.accounts import AccountStore, HashCost, Role
from proca_sync.web.app import WebSettings, create_app
from tests.conftest import fixture_bytes

PASSWORD = "correct horse battery"
# Cheap argon2 parameters: the tests run on a busy 2-core machine; the checks are the same.
CHEAP = HashCost(time_cost=1, memory_kib=8192, parallelism=1)
USERS = {"ada": Role.ADMIN, "mo": Role.MODERATOR, "vic": Role.VIEWER}

PARKED_BODY = fixture_bytes("petition_optin.json")
_contact = orjson.loads(PARKED_BODY)["contact"]
# Personal data of the fixtures: none of it may reach a viewer or a log line.
PERSONAL = [
    _contact["email"], _contact["firstName"], _contact["lastName"], _contact["postcode"],
    _contact["phone"], _contact["street"],
]  # fmt: skip
CRM_BODIES = ["petition_optout.json", "petition_doubleoptin.json", "share_twitter.json"]

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF field in the page"
    return match.group(1)


@dataclass
class Console:
    tmp: Path
    settings: WebSettings
    parked_ids: list[int]
    crm_url: str
    parked_url: str

    def client(self, *, base_url: str = "http://testserver") -> TestClient:
        return TestClient(
            create_app(self.settings), base_url=base_url, follow_redirects=False
        )

    def login(self, client: TestClient, name: str, password: str = PASSWORD) -> str:
        """Sign in; returns the session's CSRF token."""
        token = csrf_of(client.get("/login").text)
        reply = client.post(
            "/login", data={"username": name, "password": password, "csrf": token}
        )
        assert reply.status_code == 303, reply.text
        return csrf_of(client.get("/").text)

    def parking(self) -> ParkingStore:
        store = ParkingStore(self.parked_url)
        store.open_sync()
        return store

    def accounts(self) -> AccountStore:
        return AccountStore(self.settings.accounts_url, cost=CHEAP)

    def crm(self) -> SqlBackend:
        backend = SqlBackend(self.crm_url)
        backend.open_sync()
        return backend


def make_console(tmp: Path, *, metrics_url: str | None = None) -> Console:
    crm_url = f"sqlite:///{tmp / 'crm.db'}"
    parked_url = f"sqlite:///{tmp / 'parked.db'}"
    accounts_url = f"sqlite:///{tmp / 'web.db'}"
    backend = SqlBackend(crm_url)
    backend.open_sync()
    engine = Engine(backend=backend, keystore=None, options=Options())

    async def load() -> None:
        records = [engine.prepare(fixture_bytes(name)) for name in CRM_BODIES]
        await engine.apply([r for r in records if not isinstance(r, Ignored)])

    asyncio.run(load())
    backend.close_sync()
    store = ParkingStore(parked_url)
    store.park_sync(
        [
            ParkItem(PARKED_BODY, "cus.766.deliver", "", "cus.766.deliver", {"x-retry": 3},
                     "crm_rejected", "the CRM refused it (test)", 3),
            ParkItem(b"{not json", "cus.766.deliver", "", "cus.766.deliver", None,
                     "invalid_json", "not JSON", 1),
        ]
    )  # fmt: skip
    ids = store.ids()
    store.engine.dispose()
    accounts = AccountStore(accounts_url, cost=CHEAP)
    accounts.open_sync()
    for name, role in USERS.items():
        accounts.set_user(name, role, PASSWORD)
    accounts.close()
    settings = WebSettings(
        accounts_url=accounts_url,
        secret=b"test secret of the console",
        parked_url=parked_url,
        crm_url=crm_url,
        metrics_url=metrics_url,
        erasure_key=tmp / "erasure.key",
        hash_cost=CHEAP,
        sample_seconds=0.25,  # the dashboard's history moves within a test's patience
    )
    return Console(tmp, settings, ids, crm_url, parked_url)


def copy_console(template: Console, tmp: Path, *, metrics_url: str | None = None) -> Console:
    """A fresh copy of ``template``'s stores in ``tmp`` (cheaper than building them)."""
    for name in ("crm.db", "parked.db", "web.db"):
        shutil.copy2(template.tmp / name, tmp / name)
    settings = dataclasses.replace(
        template.settings,
        accounts_url=f"sqlite:///{tmp / 'web.db'}",
        parked_url=f"sqlite:///{tmp / 'parked.db'}",
        crm_url=f"sqlite:///{tmp / 'crm.db'}",
        erasure_key=tmp / "erasure.key",
        metrics_url=metrics_url,
    )
    return Console(
        tmp, settings, template.parked_ids, str(settings.crm_url), str(settings.parked_url)
    )


@dataclass
class MetricsEndpoint:
    """A real consumer metrics endpoint (HealthServer over Stats) on its own loop."""

    stats: Stats
    url: str
    loop: asyncio.AbstractEventLoop

    def settle(self, outcome: object, count: int = 1) -> None:
        def work() -> None:
            for _ in range(count):
                self.stats.delivered()
                self.stats.settled(outcome, "test")  # type: ignore[arg-type]

        self.loop.call_soon_threadsafe(work)


def serve_metrics() -> Iterator[MetricsEndpoint]:
    stats = Stats()
    loop = asyncio.new_event_loop()
    server = HealthServer(stats, port=0)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield MetricsEndpoint(stats, f"http://127.0.0.1:{server.port}/metrics", loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
