"""The CRM state depends only on the set of messages, not on their order or repetition,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proca_sync.crm.sql import SqlBackend
from proca_sync.engine import Engine, Summary
from tests.support import scenario


def replay(
    url: str, bodies: list[bytes], *, batch_size: int = 500
) -> tuple[Summary, dict[str, Any]]:
    backend = SqlBackend(url)

    async def go() -> Summary:
        await backend.open()
        try:
            engine = Engine(backend=backend, keystore=scenario.keystore())
            return await engine.run(bodies, batch_size=batch_size)
        finally:
            await backend.close()

    summary = asyncio.run(go())
    with SqlBackend(url) as reader:
        return summary, reader.export()


def test_scenario_reaches_the_expected_state(crm_url: str) -> None:
    summary, export = replay(crm_url, scenario.bodies())
    assert not summary.rejected
    scenario.check_expected(export)


def test_twice_and_reversed_give_the_same_export(crm_url: str, tmp_path: Path) -> None:
    bodies = scenario.bodies()
    _, forward = replay(crm_url, bodies)
    again, twice = replay(crm_url, bodies)
    assert again.synced == 0 and again.duplicates == len(bodies)
    assert twice == forward
    _, backward = replay(f"sqlite:///{tmp_path / 'reversed.db'}", list(reversed(bodies)))
    assert backward == forward


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    url = f"sqlite:///{tmp_path_factory.mktemp('ref') / 'crm.db'}"
    return replay(url, scenario.bodies())[1]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=st.permutations(range(len(scenario.bodies()))), batch=st.sampled_from([1, 3, 500]))
def test_any_permutation_gives_the_same_export(
    order: list[int],
    batch: int,
    reference: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    bodies = scenario.bodies()
    url = f"sqlite:///{tmp_path_factory.mktemp('perm') / 'crm.db'}"
    _, export = replay(url, [bodies[i] for i in order], batch_size=batch)
    assert export == reference


@pytest.mark.postgres
def test_permutations_on_postgres_match_sqlite(pg_url: str, reference: dict[str, Any]) -> None:
    bodies = scenario.bodies()
    rng = random.Random(7)
    shuffled = bodies[:]
    rng.shuffle(shuffled)
    # Redeliveries interleaved: a third of the stream comes again.
    shuffled += rng.sample(bodies, len(bodies) // 3)
    _, export = replay(pg_url, shuffled, batch_size=4)
    assert export == reference
