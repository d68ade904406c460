"""The SQL CRM writes a batch at once; the rows it leaves must be the ones that applying
the same records one per batch leaves — ids included — on SQLite and on PostgreSQL.

Each case applies its records as one batch to a CRM holding some stored records, reads
every table, starts again from the same stored records, applies the batch one record per
batch and compares. Only the public API is used.
"""

from __future__ import annotations

from typing import Any

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
) -> tuple[list[str], dict[str, Any]]:
    """Apply ``stored`` then the batches to an empty CRM: results, rows and export."""
    with SqlBackend(url) as backend:
        with backend.engine.begin() as conn:
            metadata.drop_all(conn)  # (serial ids start again at 1)
        with SqlBackend(url) as fresh:
            if stored:
                fresh.apply_sync(stored)
            results = [_outcome(r) for batch in batches for r in fresh.apply_sync(batch)]
            return results, {"rows": _rows(fresh), "export": fresh.export()}


def _check_same_as_one_by_one(
    url: str, records: list[SyncRecord], stored: list[SyncRecord] | None = None
) -> dict[str, Any]:
    together = _apply(url, stored or [], [records])
    one_by_one = _apply(url, stored or [], [[record] for record in records])
    assert together == one_by_one
    return together[1]


def test_a_record_linking_two_contacts_of_the_same_batch(crm_url: str) -> None:
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
    state = _check_same_as_one_by_one(crm_url, records, stored)
    contacts = sorted(state["export"]["contacts"], key=lambda c: c["contactRefs"])
    assert [c["contactRefs"] for c in contacts] == [
        ["r0", "r1", "r7", "r8", "r9"],
        ["s1", "s2", "s3"],
    ]
    assert contacts[0]["firstName"] == "Ida"
    assert len(state["rows"]["email_status_history"]) == 3


def test_an_action_redelivered_with_a_newer_version_in_the_same_batch(crm_url: str) -> None:
    records = [
        _record("v1", refs=("r1",), day=1, action_id=7, version="v1", campaign="Bees"),
        _record("v2", refs=("r1",), day=1, action_id=7, version="v2", campaign="Bees!"),
        # The older copy again, now from another contact: the action moves, v2 stays.
        _record("v1-again", refs=("r2",), day=1, action_id=7, version="v1", campaign="B"),
        _record("v3", refs=("r2",), emails=("x@example.org",), day=2, action_id=7, version="v3"),
        _record("other", refs=("r3",), day=2, action_id=8, version="v1"),
    ]
    state = _check_same_as_one_by_one(crm_url, records)
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
    _check_same_as_one_by_one(crm_url, records)
