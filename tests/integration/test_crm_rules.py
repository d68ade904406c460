"""Rules of the SQL CRM that the order-independence tests do not pin on their own, each
through the backend, on SQLite and on PostgreSQL:

* a redelivered message whose bytes differ (re-serialised, other key order) leaves one
  consent row and one e-mail status history row;
* a double opt-in and an unsubscribe with the same change time end unsubscribed;
* the first opt-in time is the earliest consent time, whatever the arrival order.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from proca_sync.crm.sql import SqlBackend
from proca_sync.crm.sql.schema import applied_messages, consents, email_status_history
from proca_sync.engine import Engine
from proca_sync.sync.records import SyncRecord
from tests.support.builders import action, dumps, email_status, records

REF = "R".ljust(43, "x")
EMAIL = "rules@example.org"


def apply(url: str, bodies: list[bytes], *, batch: bool) -> dict[str, Any]:
    """Apply ``bodies`` (one batch, or one batch each); the exported contact and counts."""
    with SqlBackend(url) as backend:
        recs = records(bodies)
        results = backend.apply_sync(recs) if batch else [
            r for rec in recs for r in backend.apply_sync([rec])
        ]
        assert all(r in ("applied", "duplicate") for r in results), results
        with backend.engine.connect() as conn:
            counts = {
                table.name: conn.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (consents, email_status_history, applied_messages)
            }
        exported = backend.export()
    (contact,) = exported["contacts"]
    return {"contact": contact, "counts": counts}


def reserialised(message: dict[str, Any]) -> bytes:
    """The same message, other bytes: sorted keys, indented, non-ASCII escaped."""
    body = json.dumps(message, sort_keys=True, indent=1).encode()
    assert body != dumps(message)
    return body


@pytest.mark.parametrize("batch", [True, False], ids=["one-batch", "two-batches"])
def test_redelivery_with_other_bytes_leaves_one_consent_and_one_status_row(
    crm_url: str, batch: bool
) -> None:
    message = action(501, ref=REF, email=EMAIL, created="2024-02-01T10:00:00Z",
                     given_at="2024-02-01T10:00:00Z", email_status="double_opt_in",
                     status_changed="2024-02-01T11:00:00Z")
    event = email_status(ref=REF, email=EMAIL, status="unsub", changed="2024-02-02T09:00:00Z",
                         action_id=501, created="2024-02-01T10:00:00Z")
    bodies = [dumps(message), dumps(event), reserialised(message), reserialised(event)]
    state = apply(crm_url, bodies, batch=batch)
    # Four distinct messages for the idempotency table (their bytes differ) …
    assert state["counts"]["applied_messages"] == 4
    # … but one consent and one fact per status: nothing is counted twice.
    assert state["counts"]["consents"] == 1
    assert state["counts"]["email_status_history"] == 2
    contact = state["contact"]
    assert contact["consents"] == [
        {"actionId": 501, "optIn": True, "givenAt": "2024-02-01T10:00:00Z"}
    ]
    assert contact["emailStatusHistory"] == [
        {"status": "double_opt_in", "changedAt": "2024-02-01T11:00:00Z"},
        {"status": "unsub", "changedAt": "2024-02-02T09:00:00Z"},
    ]
    assert len(contact["actions"]) == 1


@pytest.mark.parametrize("batch", [True, False], ids=["one-batch", "two-batches"])
@pytest.mark.parametrize("order", ["doi-first", "unsub-first"])
def test_unsubscribe_beats_double_opt_in_at_the_same_time(
    crm_url: str, batch: bool, order: str
) -> None:
    when = "2024-04-01T12:00:00Z"
    bodies = [
        dumps(action(601, ref=REF, email=EMAIL, created="2024-04-01T10:00:00Z")),
        dumps(email_status(ref=REF, email=EMAIL, status="double_opt_in", changed=when)),
        dumps(email_status(ref=REF, email=EMAIL, status="unsub", changed=when)),
    ]
    if order == "unsub-first":
        bodies[1], bodies[2] = bodies[2], bodies[1]
    contact = apply(crm_url, bodies, batch=batch)["contact"]
    assert contact["emailStatus"] == "unsub"
    assert contact["subscribed"] is False
    assert contact["optIn"] is True  # the consent stays; the objection wins


def test_a_later_double_opt_in_after_an_unsubscribe_subscribes_again(crm_url: str) -> None:
    """The tie rule is about equal times only: newer still wins."""
    bodies = [
        dumps(action(602, ref=REF, email=EMAIL, created="2024-04-01T10:00:00Z")),
        dumps(email_status(ref=REF, email=EMAIL, status="double_opt_in",
                           changed="2024-04-01T12:00:01Z")),
        dumps(email_status(ref=REF, email=EMAIL, status="unsub", changed="2024-04-01T12:00:00Z")),
    ]
    contact = apply(crm_url, bodies, batch=True)["contact"]
    assert contact["emailStatus"] == "double_opt_in"
    assert contact["subscribed"] is True


CONSENT_TIMES = ["2024-05-03T08:00:00Z", "2024-05-01T09:30:00Z", "2024-05-02T07:00:00Z"]


@pytest.mark.parametrize(
    "order", list(itertools.permutations(range(3))), ids=lambda o: "".join(map(str, o))
)
def test_first_opt_in_time_is_the_earliest_consent_whatever_the_order(
    crm_url: str, order: tuple[int, ...]
) -> None:
    messages = [
        dumps(action(700 + n, ref=REF, email=EMAIL, created=given, given_at=given))
        for n, given in enumerate(CONSENT_TIMES)
    ]
    # a consent that said no, earlier than all: not an opt-in time
    refused = dumps(action(799, ref=REF, email=EMAIL, created="2024-04-01T00:00:00Z",
                           opt_in=False))
    bodies = [messages[i] for i in order]
    bodies.insert(order[0], refused)
    contact = apply(crm_url, bodies, batch=order[0] % 2 == 0)["contact"]
    assert contact["optInAt"] == "2024-05-01T09:30:00Z"
    assert contact["optIn"] is True and contact["subscribed"] is True


@pytest.mark.parametrize("batch", [True, False], ids=["one-batch", "two-batches"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
def test_merging_two_contacts_keeps_the_earliest_opt_in_time(
    crm_url: str, batch: bool, reverse: bool
) -> None:
    """One contact known by its ref, one by its e-mail, each opted in; a message naming
    both merges them: the merged opt-in time is the earlier one, whichever survives."""
    other = "O".ljust(43, "x")
    bodies = [
        dumps(action(801, ref=REF, email="first@example.org", created="2024-06-02T00:00:00Z")),
        dumps(action(802, ref=other, email=EMAIL, created="2024-06-01T00:00:00Z")),
        dumps(action(803, ref=REF, email=EMAIL, created="2024-06-05T00:00:00Z",
                     with_consent=False, opt_in=None)),
    ]
    state = apply(crm_url, bodies[::-1] if reverse else bodies, batch=batch)
    contact = state["contact"]
    assert contact["optInAt"] == "2024-06-01T00:00:00Z"
    assert sorted(contact["contactRefs"]) == sorted([REF, other])
    assert state["counts"]["consents"] == 2


def test_the_record_by_record_writer_reaches_the_batch_writers_state(tmp_path: Path) -> None:
    """A batch holding one value the batch writer does not take (a NUL character) is
    written record by record; on the shared scenario that writer must reach the batch
    writer's state (SQLite stores the NUL; PostgreSQL refuses that record, see
    test_crm_batch.py)."""
    from tests.support import scenario

    engine = Engine(backend=SqlBackend("sqlite://"), keystore=scenario.keystore())
    prepared = [engine.prepare(body) for body in scenario.bodies()]
    recs = [r for r in prepared if isinstance(r, SyncRecord)]
    odd = records([dumps(action(990, ref="N".ljust(43, "x"), email="nul@example.org",
                                created="2024-01-01T00:00:00Z", first_name="N\x00ul"))])
    states = []
    for name, batch in (("batch.db", recs), ("single.db", [*recs, *odd])):
        with SqlBackend(f"sqlite:///{tmp_path / name}") as backend:
            assert backend.apply_sync(batch) == ["applied"] * len(batch)
            exported = backend.export()
        exported["contacts"] = [c for c in exported["contacts"]
                                if "nul@example.org" not in c["emails"]]
        states.append(exported)
    assert states[0] == states[1]
    scenario.check_expected(states[0])
