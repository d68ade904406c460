"""The ledger's change log: written in the writers' transaction (both writers), one row
per changed entity, nothing for a duplicate, commit-ordered on PostgreSQL, seeded when an
older database is upgraded; ``crm export`` is unchanged by it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from proca_sync.crm.sql import SCHEMA_VERSION, SqlBackend
from proca_sync.sync.records import ActionRecord, CampaignFact, ContactFacts, SyncRecord
from tests.support.changes import held_change


def _record(
    key: str, *, ref: str, email: str, action_id: int, day: int = 1, comment: str = "hi"
) -> SyncRecord:
    stamp = f"2024-03-{day:02d}T10:00:00.000000Z|1|{action_id:020d}"
    return SyncRecord(
        key=key,
        kind="action",
        contact=ContactFacts(
            refs=frozenset({ref}),
            emails=frozenset({email}),
            fields={"email": email, "comment": comment},
            stamp=stamp,
            admit=True,
            real=True,
        ),
        action=ActionRecord(
            action_id=action_id,
            action_type="register",
            campaign="camp",
            created_at=f"2024-03-{day:02d}T10:00:00Z",
            testing=False,
            data={},
            version=f"v{day}",
        ),
        campaign=CampaignFact(name="camp", data={"title": "Camp"}, stamp=f"2024-03-{day:02d}"),
    )


def _changes(backend: SqlBackend) -> list[tuple[int, str, str]]:
    with backend.engine.connect() as conn:
        rows = conn.execute(text("SELECT seq, kind, entity FROM changes ORDER BY seq")).all()
    return [(int(s), k, e) for s, k, e in rows]


@pytest.mark.parametrize("nul", [False, True], ids=["batch-writer", "record-writer"])
def test_every_commit_logs_its_changed_entities_once(crm_url: str, nul: bool) -> None:
    # A NUL character sends the batch to the record writer (the batch writer refuses it).
    comment = "a\x00b" if nul else "ab"
    records = [
        _record("m1", ref="R" * 43, email="a@example.org", action_id=1, comment=comment),
        _record("m2", ref="S" * 43, email="b@example.org", action_id=2),
    ]
    if nul and crm_url.startswith("postgresql"):
        pytest.skip("PostgreSQL refuses NUL in text: the record writer parks it")
    with SqlBackend(crm_url) as backend:
        before = backend.export()
        backend.apply_sync(records)
        rows = _changes(backend)
        kinds = sorted((k, e) for _, k, e in rows)
        with backend.engine.connect() as conn:
            ids = {str(r[0]) for r in conn.execute(text("SELECT id FROM contacts")).all()}
        assert kinds == sorted(
            [("contact", i) for i in ids]
            + [("action", "1"), ("action", "2"), ("campaign", "camp")]
        )
        # A redelivery changes nothing and logs nothing.
        assert backend.apply_sync(records[:1]) == ["duplicate"]
        assert _changes(backend) == rows
        # A merge (one record naming both people) logs the survivor, the action, and
        # the merged-away contact with the one it joined ("other:survivor").
        with backend.engine.connect() as conn:
            owner = dict(
                conn.execute(
                    text("SELECT value, contact_id FROM contact_keys WHERE kind = 'email'")
                ).all()
            )
        backend.apply_sync(
            [_record("m3", ref="R" * 43, email="b@example.org", action_id=3, day=2)]
        )
        new = _changes(backend)[len(rows) :]
        assert {k for _, k, _ in new} == {"contact", "action", "campaign", "merge"}
        survivor, other = owner["a@example.org"], owner["b@example.org"]
        assert [e for _, k, e in new if k == "merge"] == [f"{other}:{survivor}"]
        assert [e for _, k, e in new if k == "contact"] == [str(survivor)]
        assert [s for s, _, _ in _changes(backend)] == sorted(s for s, _, _ in _changes(backend))
        assert before["contacts"] == []


def test_an_older_database_is_upgraded_in_place_and_its_entities_logged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with SqlBackend(url) as backend:
        backend.apply_sync([_record("m1", ref="R" * 43, email="a@example.org", action_id=1)])
        exported = backend.export()
        with backend.engine.begin() as conn:  # back to what version 1 had
            for table in (
                "changes",
                "destination_parked",
                "destination_items",
                "destinations",
                "tombstone_keys",
                "tombstones",
            ):
                conn.execute(text(f"DROP TABLE {table}"))
            conn.execute(text("UPDATE proca_meta SET value = '1' WHERE key = 'schema_version'"))
    with SqlBackend(url) as backend:
        assert sorted((k, e) for _, k, e in _changes(backend)) == [
            ("action", "1"), ("campaign", "camp"), ("contact", "1")
        ]
        with backend.engine.connect() as conn:
            version = conn.execute(
                text("SELECT value FROM proca_meta WHERE key = 'schema_version'")
            ).scalar()
        assert version == str(SCHEMA_VERSION) == "2"
        assert backend.export() == exported


@pytest.mark.postgres
def test_change_numbers_are_drawn_in_commit_order_on_postgres(pg_url: str) -> None:
    """A transaction that has drawn a change number and not committed holds back every
    other writer's change rows, so a reader never sees n+1 before n."""
    with SqlBackend(pg_url) as backend:
        backend.apply_sync([_record("m0", ref="Q" * 43, email="q@example.org", action_id=9)])
        with held_change(pg_url) as (slow, held):
            done = threading.Event()
            result: dict[str, Any] = {}

            def write() -> None:
                result["r"] = backend.apply_sync(
                    [_record("m1", ref="R" * 43, email="a@example.org", action_id=1)]
                )
                done.set()

            writer = threading.Thread(target=write)
            writer.start()
            # The other writer must wait for the held transaction (it would commit a
            # higher number first without the lock).
            assert not done.wait(1.0)  # a bounded wait for something that must not happen
            visible = max(s for s, _, _ in _changes(backend))
            assert visible < held
            slow.commit()
            writer.join(30)
            assert done.is_set() and result["r"] == ["applied"]
            later = [s for s, _, _ in _changes(backend) if s > visible]
            assert held == min(later), "the held change was overtaken"

