"""The pusher through the toy HTTP destination: a campaign update re-pushes what projects
the campaign, and the per-destination Prometheus metrics move as a push runs (and name
no person)."""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proca_sync.consumer.breaker import Breaker
from proca_sync.crm.sql import SqlBackend
from proca_sync.destinations import destination_from_config
from proca_sync.destinations.pusher import Pusher, PusherCollector, PushResult
from proca_sync.engine import Engine
from tests.support import scenario
from tests.support.builders import action, campaign_updated, dumps
from tests.support.emulators.toy import ToyDriver, ToyEmulator

DRIVER = ToyDriver()


async def replay(url: str, bodies: list[bytes]) -> None:
    backend = SqlBackend(url)
    await backend.open()
    try:
        summary = await Engine(backend=backend, keystore=scenario.keystore()).run(bodies)
        assert not summary.rejected
    finally:
        await backend.close()


def export(url: str) -> dict[str, Any]:
    with SqlBackend(url) as backend:
        return backend.export()


@pytest.fixture
async def toy(monkeypatch: pytest.MonkeyPatch) -> Any:
    async with DRIVER.serving(monkeypatch) as emulator:
        yield emulator


def config(emulator: ToyEmulator) -> dict[str, Any]:
    return {**DRIVER.config(emulator), "rate": 500.0, "burst": 50}


async def push(url: str, emulator: ToyEmulator, pusher: Pusher | None = None) -> PushResult:
    backend = SqlBackend(url)
    pusher = pusher or Pusher(backend, destination_from_config("toy", config(emulator)))
    try:
        return await pusher.run(within=60)
    finally:
        pusher.close()
        await backend.close()


def ref(n: int) -> str:
    return "C" * 40 + f"{n:03d}"


def tags(emulator: ToyEmulator) -> dict[str, list[str]]:
    return {email: row["tags"] for email, row in emulator.contacts.items()}


# ---- a campaign update -------------------------------------------------------------------


async def test_a_campaign_update_re_pushes_the_contacts_that_project_it(
    tmp_path: Path, toy: ToyEmulator
) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    await replay(url, [
        dumps(action(9_400_001, ref=ref(1), email="one@example.org",
                     created="2025-02-01T10:00:00Z", campaign="camp_t")),
        dumps(action(9_400_002, ref=ref(2), email="two@example.org",
                     created="2025-02-01T11:00:00Z", campaign="camp_t")),
        dumps(action(9_400_003, ref=ref(3), email="three@example.org",
                     created="2025-02-01T12:00:00Z", campaign="camp_u")),
    ])
    first = await push(url, toy)
    assert first.caught_up and first.stats.contacts == 3
    assert tags(toy) == {
        "one@example.org": ["Camp T"], "two@example.org": ["Camp T"],
        "three@example.org": ["Camp U"],
    }
    # The campaign is renamed: the change log records it, the pusher re-pushes the two
    # contacts that acted in it (the toy tags contacts with their campaigns' titles).
    later = (datetime.now(UTC) + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await replay(url, [dumps(campaign_updated("camp_t", "Renamed", when=later))])
    renamed = await push(url, toy)
    assert renamed.caught_up and renamed.parked == 0
    assert renamed.stats.contacts == 2 and renamed.stats.actions == 0
    assert tags(toy) == {
        "one@example.org": ["Renamed"], "two@example.org": ["Renamed"],
        "three@example.org": ["Camp U"],
    }
    assert DRIVER.snapshot(toy) == DRIVER.expected(export(url), {})
    # Nothing new to project: a second push sends nothing.
    writes = toy.writes()
    again = await push(url, toy)
    assert again.caught_up and again.stats.requests == 0 and toy.writes() == writes
    # An update that projects nothing new (same title, newer stamp) re-pushes nobody.
    newer = (datetime.now(UTC) + timedelta(seconds=4)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await replay(url, [dumps(campaign_updated("camp_t", "Renamed", when=newer))])
    same = await push(url, toy)
    assert same.caught_up and same.stats.requests == 0 and toy.writes() == writes


# ---- metrics -------------------------------------------------------------------------------


def scrape(registry: CollectorRegistry) -> tuple[str, dict[str, float]]:
    """The exposition text (what ``/metrics`` serves) and its samples by name{labels}."""
    text = generate_latest(registry).decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return text, samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    key = ",".join(f"{k}={v}" for k, v in sorted({"destination": "toy", **labels}.items()))
    return samples[f"proca_sync_destination_{name}{{{key}}}"]


async def test_the_metrics_move_as_a_push_runs_and_name_no_person(
    tmp_path: Path, toy: ToyEmulator
) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    people = 250
    await replay(url, [
        dumps(action(9_500_000 + n, ref=ref(n), email=f"person{n}@example.org",
                     first_name=f"Firstname{n}", created="2025-03-01T10:00:00Z"))
        for n in range(people)
    ])
    backend = SqlBackend(url)
    pusher = Pusher(
        backend, destination_from_config("toy", {**config(toy), "batch_size": 50}),
        max_delay=0.2, breaker=Breaker(threshold=3, base_delay=0.05, max_delay=0.2),
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PusherCollector([pusher]))
    _, before = scrape(registry)
    assert metric(before, "items_total", kind="contacts") == 0
    assert metric(before, "requests_total") == 0
    assert metric(before, "breaker_open") == 0
    during: list[dict[str, float]] = []
    texts: list[str] = []

    def progress(_stats: Any) -> None:
        text, samples = scrape(registry)
        texts.append(text)
        during.append(samples)

    pusher.progress = progress
    # Two 429s (each followed by the client's own retry), then enough 503s (the client
    # tries each request 3 times, up to 4 batches are in flight) for the pusher to give
    # up on batches more than three times in a row: the breaker opens, then closes
    # again once a probe answers.
    toy.fail_with(429, count=2, retry_after=0.05, path="/contacts/batch")
    toy.fail_with(503, count=36, path="/activities/batch")
    result = await push(url, toy, pusher)
    assert result.caught_up and result.parked == 0
    text, after = scrape(registry)
    texts.append(text)
    # Pending changes and a lag while pushing; none once caught up.
    assert max(metric(s, "pending_changes") for s in during) > 0
    assert max(metric(s, "lag_seconds") for s in during) > 0
    assert metric(after, "pending_changes") == 0 and metric(after, "lag_seconds") == 0
    # Items and requests count up as batches land, to the whole ledger.
    pushed = [metric(s, "items_total", kind="contacts") for s in during]
    assert pushed == sorted(pushed) and len(set(pushed)) > 2  # it moves, batch by batch
    assert metric(after, "items_total", kind="contacts") == people
    assert metric(after, "items_total", kind="actions") == people
    assert metric(after, "requests_total") == result.stats.requests > 0
    # The 429s, the transient failures and the breaker's opening are seen.
    assert metric(after, "throttled_total") == 2
    assert metric(after, "transient_failures_total") >= 3
    assert max(metric(s, "breaker_open") for s in during) == 1
    assert metric(after, "breaker_open") == 0
    assert metric(after, "last_success_seconds") > 0
    assert metric(after, "parked_total") == 0
    # No personal data: labels are the destination's name and an item kind only, and
    # no address or name of the ledger appears anywhere in what was served.
    labels = {
        label
        for samples in [*during, after]
        for key in samples
        for label in key[key.index("{") + 1 : -1].split(",")
        if label
    }
    assert {label.partition("=")[0] for label in labels} <= {"destination", "kind"}
    data = export(url)
    personal = {c["email"] for c in data["contacts"]} | {
        c["firstName"] for c in data["contacts"]
    } | {ref_ for c in data["contacts"] for ref_ in c["contactRefs"]}
    assert len(personal) == 3 * people
    for served in texts:
        assert not [p for p in personal if p in served]


# ---- the window read ahead -----------------------------------------------------------------


async def test_a_merge_committed_while_a_window_is_pushed_is_retired_by_the_next(
    tmp_path: Path, toy: ToyEmulator
) -> None:
    """The next window is read while the current one is pushed: a merge committed in
    between names a contact the current window is writing (its address not yet in the
    ledger). The window read ahead must still retire that contact's address."""
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    first, second = "ahead.first@example.org", "ahead.second@example.org"
    await replay(url, [
        dumps(action(9_600_001, ref=ref(1), email=first, created="2025-01-02T10:00:00Z")),
        dumps(action(9_600_002, ref=ref(2), email=second, created="2025-01-01T10:00:00Z")),
    ])
    merge = dumps(action(9_600_003, ref=ref(1), email=second, created="2024-06-01T10:00:00Z"))
    backend = SqlBackend(url)
    pusher = Pusher(backend, destination_from_config("toy", config(toy)))
    merged: list[bool] = []

    def progress(_stats: Any) -> None:
        # Called once the first window is read, before its batches go out and before the
        # next window is read: the merge commits in between (from another thread, as a
        # consumer would).
        if not merged:
            merged.append(True)
            worker = threading.Thread(target=lambda: asyncio.run(replay(url, [merge])))
            worker.start()
            worker.join()

    pusher.progress = progress
    result = await push(url, toy, pusher)
    assert merged and result.caught_up and result.parked == 0
    assert result.stats.retired == 1
    data = export(url)
    assert [c["email"] for c in data["contacts"]] == [first]
    assert set(toy.contacts) == {first}
    assert DRIVER.snapshot(toy) == DRIVER.expected(data, {})


async def test_windows_overlap_without_a_contact_in_two_requests_at_once(
    tmp_path: Path, toy: ToyEmulator
) -> None:
    """Small windows, people acting again across them: the next window's batches of
    other people start while the current window's last requests are in flight; nobody
    is ever in two requests at once, and the end state is the ledger's."""
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    people = 60
    bodies = [
        dumps(action(9_700_000 + round_ * people + n, ref=ref(n), email=f"p{n}@example.org",
                     created=f"2025-04-{1 + round_:02d}T10:00:00Z",
                     campaign=f"camp_{round_ % 2}"))
        for round_ in range(3)
        for n in range(people)
    ]
    for start in range(0, len(bodies), 30):
        await replay(url, bodies[start : start + 30])  # commits that interleave people
    toy.hold = 0.02
    backend = SqlBackend(url)
    pusher = Pusher(
        backend,
        destination_from_config("toy", {**config(toy), "batch_size": 5}),
        window=60,
    )
    result = await push(url, toy, pusher)
    assert result.caught_up and result.parked == 0
    assert result.stats.overlapped > 0, "no window started early"
    assert toy.overlaps == 0
    assert DRIVER.snapshot(toy) == DRIVER.expected(export(url), {})
    assert max(toy.created.values()) == 1
