"""The SQL CRM writes a batch at once; the rows it leaves must be the ones that applying
the same records one per batch leaves — ids included — on SQLite and on PostgreSQL.

Each case applies its records as one batch to a CRM holding some stored records, reads
every table, starts again from the same stored records, applies the batch one record per
batch and compares. Only the public API is used. Each case runs twice: as it is, and with
one more record the batch writer does not take, so that the whole batch is written by the
record-by-record writer instead — which must reach the same rows too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from sqlalchemy import text

from proca_sync.crm.sql import SqlBackend, metadata
from proca_sync.errors import PermanentError
from proca_sync.sync.records import (
    ActionRecord,
    CampaignFact,
    ConsentFact,
    ContactFacts,
    StatusFact,
    SyncRecord,
)


def _stamp(day: int, action_id: int) -> str:
    return f"2024-03-{day:02d}T10:00:00.000000Z|1|{action_id:020d}"


def _record(
    key: str,
    *,
    refs: tuple[str, ...] = (),
    emails: tuple[str, ...] = (),
    fields: dict[str, Any] | None = None,
    day: int = 1,
    action_id: int | None = None,
    version: str = "v1",
    consent: bool | None = None,
    status: str | None = None,
    campaign: str | None = None,
) -> SyncRecord:
    """A record as the model makes them: contact facts, maybe an action and a campaign."""
    stamp_id = action_id or 0
    facts = ContactFacts(
        refs=frozenset(refs),
        emails=frozenset(emails),
        fields=fields or {},
        stamp=_stamp(day, stamp_id),
        admit=True,
        real=True,
        consent=None
        if consent is None
        else ConsentFact(stamp_id, consent, f"2024-03-{day:02d}T10:00:00Z"),
        status=None
        if status is None
        else StatusFact(status, f"2024-03-{day:02d}T11:00:00Z", f"{day:02d}|{status}", "event"),
    )
    action = None
    if action_id is not None:
        action = ActionRecord(
            action_id=action_id,
            action_type="register",
            campaign="bees",
            created_at=f"2024-03-{day:02d}T10:00:00Z",
            testing=False,
            data={"actionId": action_id, "version": version, "customFields": {"n": day}},
            version=version,
        )
    fact = None
    if campaign is not None:
        fact = CampaignFact("bees", {"title": campaign, "externalId": 7}, f"0|{day:02d}|{key}")
    return SyncRecord(key=key, kind="action", contact=facts, action=action, campaign=fact)


def _rows(backend: SqlBackend) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (ids included; the write time excluded)."""
    fields = "fields::text" if backend.dialect == "postgresql" else "fields"
    data = "data::text" if backend.dialect == "postgresql" else "data"
    queries = {
        "contacts": "SELECT id, admitted, email, first_name, last_name, postcode, country, "
        f"{fields}, real, opted_in, opt_in_at, email_status, email_status_changed, "
        "email_status_stamp, subscribed FROM contacts ORDER BY id",
        "contact_keys": "SELECT kind, value, contact_id FROM contact_keys ORDER BY kind, value",
        "actions": "SELECT action_id, contact_id, action_type, campaign, created_at, testing, "
        f"version, {data} FROM actions ORDER BY action_id",
        "consents": "SELECT * FROM consents ORDER BY id",
        "email_status_history": "SELECT * FROM email_status_history ORDER BY id",
        "campaigns": f"SELECT name, title, external_id, stamp, {data} FROM campaigns",
        "applied_messages": "SELECT key, kind FROM applied_messages ORDER BY key",
    }
    with backend.engine.connect() as conn:
        return {
            table: [tuple(row) for row in conn.execute(text(sql))] for table, sql in queries.items()
        }


def _outcome(result: Any) -> str:
    return f"refused: {result}" if isinstance(result, PermanentError) else str(result)


def _apply(
    url: str, stored: list[SyncRecord], batches: list[list[SyncRecord]]
) -> tuple[list[str], dict[str, Any], list[tuple[str, str, Any]]]:
    """Apply ``stored`` then the batches to an empty CRM: results, rows and export, and
    the change log rows the batches wrote (kind, entity, time)."""
    with SqlBackend(url) as backend:
        with backend.engine.begin() as conn:
            metadata.drop_all(conn)  # (serial ids start again at 1)
        with SqlBackend(url) as fresh:
            if stored:
                fresh.apply_sync(stored)
            with fresh.engine.connect() as conn:
                last = conn.execute(text("SELECT coalesce(max(seq), 0) FROM changes")).scalar()
            results = [_outcome(r) for batch in batches for r in fresh.apply_sync(batch)]
            with fresh.engine.connect() as conn:
                changes = [
                    (row[0], row[1], row[2])
                    for row in conn.execute(
                        text(f"SELECT kind, entity, at FROM changes WHERE seq > {last}")
                    )
                ]
            return results, {"rows": _rows(fresh), "export": fresh.export()}, changes


# A float of 1e16 or more, which JSONB would give back as an integer: the batch writer
# refuses a batch holding it (_BatchWriter.accepts), so the whole batch goes record by
# record. Its contact stands apart (its own ref), last, so no other id depends on it.
_ODD = "odd-float"


@pytest.fixture(params=["batch-writer", "record-writer"])
def writer(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _check_same_as_one_by_one(
    url: str,
    writer: str,
    records: list[SyncRecord],
    stored: list[SyncRecord] | None = None,
    *,
    one_transaction: bool = True,
) -> dict[str, Any]:
    """``records`` as one batch and one per batch give the same rows; the rows and the
    export (without the record-by-record case's extra contact)."""
    if writer == "record-writer":
        records = [*records, _record(_ODD, refs=(_ODD,), fields={"big": 1e17}, day=28)]
    together = _apply(url, stored or [], [records])
    one_by_one = _apply(url, stored or [], [[record] for record in records])
    assert together[:2] == one_by_one[:2]
    if one_transaction:
        # The batch was written in one transaction (its change rows bear one time, and one
        # per entity): the writer did not fail and leave the records to one at a time.
        assert len({at for _, _, at in together[2]}) == 1, together[2]
        assert len({c[:2] for c in together[2]}) == len(together[2]), together[2]
    state = together[1]
    contacts = state["export"]["contacts"]
    state["export"]["contacts"] = [c for c in contacts if _ODD not in c["contactRefs"]]
    assert len(state["export"]["contacts"]) == len(contacts) - (writer == "record-writer")
    return state


def test_a_record_linking_two_contacts_of_the_same_batch(crm_url: str, writer: str) -> None:
    # A stored contact, so that the batch also merges into one it did not create.
    stored = [
        _record("old", refs=("r0",), fields={"firstName": "Zoe"}, status="ok", action_id=5),
        _record("older", refs=("r8",), day=2, action_id=6),
    ]
    records = [
        _record("a", refs=("r1",), fields={"firstName": "Ada"}, day=1, action_id=1, consent=True),
        _record("b", emails=("b@example.org",), fields={"lastName": "B"}, day=2, status="bounce"),
        # Links the contacts of a and b (its ref is a's, its e-mail b's): they merge.
        _record("c", refs=("r1",), emails=("b@example.org",), day=3, action_id=3, consent=False),
        # Seen again after the merge, under b's e-mail only, with newer data.
        _record("d", emails=("b@example.org",), fields={"firstName": "Ida"}, day=4, status="ok"),
        # The merged contact and a new one, linked through an action of the batch.
        _record("e", refs=("r9",), day=5, action_id=3, version="v0"),
        _record("f", refs=("r9", "r0"), day=6),
        _record("c", refs=("r1",), emails=("b@example.org",), day=3, action_id=3),  # again
        # A stored action redelivered from a new contact, then that contact linked to b.
        _record("g", refs=("r7",), day=7, action_id=6),
        _record("h", refs=("r7", "r1"), day=8),
        # The contact merged away (the later one) owned an action; it comes again.
        _record("i", refs=("s1",), day=9),
        _record("j", refs=("s2",), day=9, action_id=11),
        _record("k", refs=("s1", "s2"), day=9),
        _record("l", refs=("s3",), day=9, action_id=11),
    ]
    state = _check_same_as_one_by_one(crm_url, writer, records, stored)
    contacts = sorted(state["export"]["contacts"], key=lambda c: c["contactRefs"])
    assert [c["contactRefs"] for c in contacts] == [
        ["r0", "r1", "r7", "r8", "r9"],
        ["s1", "s2", "s3"],
    ]
    assert contacts[0]["firstName"] == "Ida"
    assert len(state["rows"]["email_status_history"]) == 3


def test_an_action_redelivered_with_a_newer_version_in_the_same_batch(
    crm_url: str, writer: str
) -> None:
    records = [
        _record("v1", refs=("r1",), day=1, action_id=7, version="v1", campaign="Bees"),
        _record("v2", refs=("r1",), day=1, action_id=7, version="v2", campaign="Bees!"),
        # The older copy again, now from another contact: the action moves, v2 stays.
        _record("v1-again", refs=("r2",), day=1, action_id=7, version="v1", campaign="B"),
        _record("v3", refs=("r2",), emails=("x@example.org",), day=2, action_id=7, version="v3"),
        _record("other", refs=("r3",), day=2, action_id=8, version="v1"),
    ]
    state = _check_same_as_one_by_one(crm_url, writer, records)
    (action, _) = state["rows"]["actions"]
    assert action[0] == 7 and action[6] == "v3"
    assert state["rows"]["campaigns"][0][1] == "Bees!"


def test_a_value_the_database_may_refuse_is_written_as_record_by_record(crm_url: str) -> None:
    # PostgreSQL refuses a NUL character: the record carrying it is refused even when a
    # later record of the batch replaces the value (its own state was written first).
    records = [
        _record("nul", refs=("r1",), fields={"firstName": "A\x00da"}, day=1, action_id=1),
        _record("newer", refs=("r1",), fields={"firstName": "Ada"}, day=2, action_id=2),
        _record("number", refs=("r2",), fields={"lastName": 42, "postcode": 1000.5}, day=1),
        _record("object", refs=("r3",), fields={"address": {"street": "x", "no": 1}}, day=1),
    ]
    _check_same_as_one_by_one(crm_url, "batch-writer", records, one_transaction=False)


@pytest.mark.parametrize("value", [1e17, 1e16, -0.0], ids=["1e17", "1e16", "minus-zero"])
def test_a_float_jsonb_gives_back_otherwise_is_written_as_record_by_record(
    crm_url: str, value: float
) -> None:
    # JSONB gives 1e16 and more back as an integer and -0.0 as 0.0, so a later record of
    # the same contact, applied on its own, starts from what the database gives back: the
    # batch holding the float must be written record by record to leave the same text
    # in the contact's column (last_name here) as one record per batch.
    records = [
        _record("float", refs=("r1",), fields={"lastName": value}, day=1),
        _record("later", refs=("r1",), emails=("f@example.org",), day=2),
    ]
    _check_same_as_one_by_one(crm_url, "batch-writer", records)


def test_floats_and_lists_the_batch_writer_takes(crm_url: str, writer: str) -> None:
    records = [
        _record("a", refs=("r1",), fields={"country": 0.0, "postcode": 99.5, "n": -2.5,
                                           "tags": [1, "x", None, True, 0.5]}, day=1),
        _record("b", refs=("r1",), emails=("f@example.org",), day=2),
    ]
    state = _check_same_as_one_by_one(crm_url, writer, records)
    (contact,) = state["export"]["contacts"]
    assert contact["postcode"] == "99.5"


def test_a_stored_contact_is_read_back_as_it_was_written(crm_url: str, writer: str) -> None:
    # A later record reads the stored row back (opted in once, then an action without
    # opt-in: still opted in). A consent without a time is stored without one.
    stored = [
        _record("in", refs=("r1",), day=1, action_id=1, consent=True),
        _record("out", refs=("r1",), day=2, action_id=2, consent=False),
    ]
    timeless = _record("timeless", refs=("r2",), day=3, action_id=3, consent=True)
    assert timeless.contact is not None
    timeless = dataclasses.replace(
        timeless,
        contact=dataclasses.replace(timeless.contact, consent=ConsentFact(3, True, None)),
    )
    records = [_record("later", refs=("r1",), emails=("l@example.org",), day=3), timeless]
    state = _check_same_as_one_by_one(crm_url, writer, records, stored)
    first, second = sorted(state["export"]["contacts"], key=lambda c: c["contactRefs"])
    assert (first["optIn"], first["optInAt"]) == (True, "2024-03-01T10:00:00Z")
    assert second["consents"] == [{"actionId": 3, "optIn": True, "givenAt": None}]


def _changes_since(backend: SqlBackend, last: int) -> list[tuple[str, str]]:
    with backend.engine.connect() as conn:
        rows = conn.execute(text(f"SELECT kind, entity FROM changes WHERE seq > {last}"))
        return [(row[0], row[1]) for row in rows]


def _last_change(backend: SqlBackend) -> int:
    with backend.engine.connect() as conn:
        return int(conn.execute(text("SELECT coalesce(max(seq), 0) FROM changes")).scalar_one())


def test_the_record_writer_logs_a_campaign_when_it_wrote_it_only(crm_url: str) -> None:
    with SqlBackend(crm_url) as backend:
        assert backend.apply_sync([_record("s", refs=("r1",), campaign="Old", day=2)]) == [
            "applied"
        ]
    # A new process (no campaign stamps in memory); each batch written record by record.
    with SqlBackend(crm_url) as backend:
        for day, title, logged in ((1, "Stale", []), (3, "New", [("campaign", "bees")])):
            last = _last_change(backend)
            odd = _record(f"{_ODD}{day}", refs=(f"{_ODD}{day}",), fields={"big": 1e17}, day=day)
            batch = [_record(title, refs=(f"r{day}",), campaign=title, day=day), odd]
            assert backend.apply_sync(batch) == ["applied", "applied"]
            changes = _changes_since(backend, last)
            assert [c for c in changes if c[0] == "campaign"] == logged
            assert _rows(backend)["campaigns"][0][1] == "Old" if day == 1 else title


def test_a_record_with_two_refs_and_two_emails(crm_url: str, writer: str) -> None:
    stored = [_record("x", refs=("r1",), emails=("a@example.org",), day=1)]
    records = [
        _record("y", refs=("r1", "r2"), emails=("a@example.org", "b@example.org"), day=2),
        _record("z", refs=("r3",), emails=("c@example.org", "b@example.org"), day=3),
    ]
    state = _check_same_as_one_by_one(crm_url, writer, records, stored)
    (contact,) = state["export"]["contacts"]
    assert contact["emails"] == ["a@example.org", "b@example.org", "c@example.org"]


def test_a_pending_contact_read_back_stays_pending(crm_url: str, writer: str) -> None:
    # Not admitted (a status event of someone never delivered): invisible in the export,
    # also once a later record of the same person, not admitting either, reads it back.
    def pending(record: SyncRecord) -> SyncRecord:
        assert record.contact is not None
        return dataclasses.replace(
            record, contact=dataclasses.replace(record.contact, admit=False)
        )

    stored = [pending(_record("p1", refs=("r1",), day=1, status="bounce"))]
    records = [pending(_record("p2", refs=("r1",), day=2, status="ok"))]
    state = _check_same_as_one_by_one(crm_url, writer, records, stored)
    assert state["export"]["contacts"] == []
    assert not state["rows"]["contacts"][0][1]  # id 1, stored first
