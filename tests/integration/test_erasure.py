"""Erasure in the ledger (``crm/sql/changelog.py``), row by row on SQLite and PostgreSQL:
the erasure key file, the tombstone ``forget`` leaves and everything it deletes (and
nothing more), and when ``scrub_propagated`` drops a tombstone's address. Pinned
literally, so that a change of one of these rules shows up here (the mutation run relies
on it)."""

from __future__ import annotations

import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, select, text

from proca_sync.crm.sql import SqlBackend
from proca_sync.crm.sql.changelog import TombstoneCheck, load_erasure_key, scrub_propagated
from proca_sync.crm.sql.schema import tombstones
from proca_sync.errors import ConfigError
from tests.support.builders import action, dumps, email_status, records
from tests.support.changes import held_change

KEY = b"k" * 64
CHECK = TombstoneCheck(KEY)
A, A2, B = "A" * 43, "a" * 43, "B" * 43
ANNA, ANNA_B, BOB = "anna@example.org", "anna.b@example.org", "bob@example.org"

# Anna: two refs, two e-mails (the status event makes ANNA her current one), three
# actions, consents and a status history; Bob: one of each, untouched by her erasure.
BODIES = [
    dumps(action(11, ref=A, email=ANNA, created="2024-01-02T10:00:00Z")),
    dumps(action(12, ref=A2, email=ANNA, created="2024-01-03T10:00:00Z")),
    dumps(action(13, ref=A, email=ANNA_B, created="2024-01-04T10:00:00Z")),
    dumps(email_status(ref=A, email=ANNA, status="bounce", changed="2024-01-05T00:00:00Z")),
    dumps(action(21, ref=B, email=BOB, created="2024-01-02T11:00:00Z")),
]
ERASED_AT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def _rows(conn: Connection, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in conn.execute(text(sql)).all()]


def _tombstones(conn: Connection) -> list[tuple[Any, ...]]:
    """(id, erased_at, email, refs) of every tombstone; refs decoded from JSON."""
    t = tombstones.c
    query = select(t.id, t.erased_at, t.email, t.refs).order_by(t.id)
    return [tuple(row) for row in conn.execute(query).all()]


def _owner(conn: Connection, kind: str, value: str) -> int:
    found = conn.execute(
        text("SELECT contact_id FROM contact_keys WHERE kind = :k AND value = :v"),
        {"k": kind, "v": value},
    ).scalar()
    assert found is not None
    return int(found)


def _destination_rows(conn: Connection, anna: int, bob: int) -> None:
    """What two destinations recorded: of Anna (to go) and of Bob and others (to stay)."""
    items = [
        ("d", "contact", str(anna)), ("d", "address", str(anna)), ("d", "retired", str(anna)),
        ("d", "action", "11"), ("d", "action", "13"), ("e", "contact", str(anna)),
        # these stay: another contact, another kind under Anna's id, Bob's action
        ("d", "contact", str(bob)), ("d", "campaign", str(anna)), ("d", "erasure", str(anna)),
        ("d", "action", "21"), ("d", "action", str(anna)),
    ]
    for destination, kind, entity in items:
        conn.execute(
            text(
                "INSERT INTO destination_items (destination, kind, entity, version, digest) "
                "VALUES (:d, :k, :e, 1, 'x')"
            ),
            {"d": destination, "k": kind, "e": entity},
        )
        conn.execute(
            text(
                "INSERT INTO destination_parked "
                "(destination, kind, entity, version, code, message, parked_at) "
                "VALUES (:d, :k, :e, 1, 'c', 'm', 0)"
            ),
            {"d": destination, "k": kind, "e": entity},
        )


def _register(conn: Connection, name: str, cursor: int) -> None:
    conn.execute(
        text("INSERT INTO destinations (name, cursor) VALUES (:n, :c)"), {"n": name, "c": cursor}
    )


@pytest.fixture
def ledger(crm_url: str) -> SqlBackend:
    with SqlBackend(crm_url, erasure_key=KEY) as backend:
        assert backend.apply_sync(records(BODIES)) == ["applied"] * len(BODIES)
    return SqlBackend(crm_url, erasure_key=KEY)


# ---- the key ---------------------------------------------------------------------------


def test_tombstone_hashes_are_hmac_sha256_of_the_value_and_the_key_never_shows() -> None:
    # Stored hashes must stay comparable across versions: the algorithm is fixed.
    assert CHECK.digest(ANNA) == (
        "1a6b1ad93b308c331b4b28ee9ed47e700d369bab5b720244eb8c4952ee3f9726"
    )
    assert TombstoneCheck(b"l" * 64).digest(ANNA) != CHECK.digest(ANNA)
    assert repr(CHECK) == "TombstoneCheck(<key>)"


def test_an_absent_key_file_is_created_0600_with_64_hex_digits(
    tmp_path: Path, umask: None
) -> None:
    path = tmp_path / "erasure.key"
    assert load_erasure_key(path, create=False) is None
    assert not path.exists()
    key = load_erasure_key(path, create=True)
    assert key is not None and re.fullmatch(rb"[0-9a-f]{64}", key)
    assert path.read_text(encoding="ascii") == key.decode() + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_erasure_key(path, create=True) == key  # read, not made again
    assert load_erasure_key(path, create=False) == key
    assert load_erasure_key(tmp_path / "other.key", create=True) != key  # random


def test_a_dangling_link_in_place_of_the_key_file_is_neither_followed_nor_replaced(
    tmp_path: Path,
) -> None:
    # What another process creating the file between our read and our create looks like
    # to the create (it exists); the key is then read, never written over.
    path = tmp_path / "erasure.key"
    path.symlink_to(tmp_path / "elsewhere.key")
    assert load_erasure_key(path, create=True) is None
    assert path.is_symlink() and not (tmp_path / "elsewhere.key").exists()


def test_a_key_file_is_read_without_surrounding_space(tmp_path: Path) -> None:
    path = tmp_path / "erasure.key"
    path.write_text("  " + "x" * 32 + " \n\n", encoding="ascii")
    assert load_erasure_key(path, create=False) == b"x" * 32  # 32 characters: enough


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        pytest.param(
            lambda p: p.write_text("x" * 31 + "\n"),
            r"^erasure key {path} is too short \(32\+ characters\)$",
            id="short",
        ),
        pytest.param(
            lambda p: p.write_bytes(b"\xff" * 40),
            r"^cannot read erasure key {path} \(UnicodeDecodeError\)$",
            id="not-ascii",
        ),
        pytest.param(
            lambda p: p.write_text("é" * 40, encoding="utf-8"),
            r"^cannot read erasure key {path} \(UnicodeDecodeError\)$",
            id="not-ascii-utf8",
        ),
        pytest.param(
            lambda p: p.mkdir(),
            r"^cannot read erasure key {path} \(IsADirectoryError\)$",
            id="folder",
        ),
    ],
)
def test_an_unusable_key_file_is_a_config_error_naming_it(
    tmp_path: Path, setup: Any, message: str
) -> None:
    path = tmp_path / "erasure.key"
    setup(path)
    for create in (False, True):
        with pytest.raises(ConfigError, match=message.format(path=re.escape(str(path)))):
            load_erasure_key(path, create=create)


def test_a_key_file_that_cannot_be_created_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "erasure.key"
    expected = rf"^cannot create erasure key {re.escape(str(path))} \(FileNotFoundError\)$"
    with pytest.raises(ConfigError, match=expected):
        load_erasure_key(path, create=True)
    assert load_erasure_key(path, create=False) is None


# ---- forget ----------------------------------------------------------------------------


def test_forget_leaves_a_tombstone_of_every_key_and_deletes_the_person_only(
    ledger: SqlBackend,
) -> None:
    with ledger as backend:
        assert backend.forget_sync(ref=ANNA) is None  # an e-mail is not a ref
        assert backend.forget_sync(email=A2) is None  # nor is a ref an e-mail
        with backend.engine.begin() as conn:
            anna, bob = _owner(conn, "email", ANNA), _owner(conn, "email", BOB)
            _destination_rows(conn, anna, bob)
            _register(conn, "d", 0)  # a destination to propagate to: the address is kept
            last = conn.execute(text("SELECT max(seq) FROM changes")).scalar()
        before = time.time()
        tombstone = backend.forget_sync(email=" Anna@Example.org")
        assert isinstance(tombstone, int)
        with backend.engine.connect() as conn:
            rows = _tombstones(conn)
            assert len(rows) == 1
            tid, erased_at, email, refs = rows[0]
            assert tid == tombstone
            assert ERASED_AT.match(erased_at)
            # the current address (not the first of the sorted two), the refs sorted
            assert (email, refs) == (ANNA, [A, A2])
            assert _rows(conn, "SELECT hash, tombstone_id, erased_at FROM tombstone_keys "
                               "ORDER BY hash") == sorted(
                (CHECK.digest(v), tid, erased_at) for v in (A, A2, ANNA, ANNA_B)
            )
            assert _rows(conn, "SELECT kind, value FROM contact_keys ORDER BY kind") == [
                ("email", BOB), ("ref", B)
            ]
            assert _rows(conn, "SELECT id FROM contacts") == [(bob,)]
            for table in ("actions", "consents"):
                assert _rows(conn, f"SELECT DISTINCT contact_id FROM {table}") == [(bob,)]
            assert _rows(conn, "SELECT action_id FROM actions") == [(21,)]
            assert _rows(conn, "SELECT contact_id FROM email_status_history") == []
            for table in ("destination_items", "destination_parked"):
                left = _rows(conn, f"SELECT destination, kind, entity FROM {table}")
                assert sorted(left) == sorted([
                    ("d", "contact", str(bob)), ("d", "campaign", str(anna)),
                    ("d", "erasure", str(anna)), ("d", "action", "21"),
                    ("d", "action", str(anna)),
                ]), table
            assert _rows(conn, f"SELECT kind, entity FROM changes WHERE seq > {last}") == [
                ("erasure", str(tid))
            ]
            at = conn.execute(text("SELECT at FROM changes WHERE kind = 'erasure'")).scalar_one()
            assert before - 1 <= float(at) <= time.time() + 1
        # No one holds these keys any more; and a ref is not an e-mail, nor the reverse.
        assert backend.forget_sync(ref=B.lower()) is None
        assert backend.forget_sync(email=ANNA) is None
        assert backend.forget_sync(ref=A2) is None
        assert backend.forget_sync(ref=B) == tid + 1  # found by ref


def test_without_a_destination_the_tombstone_keeps_no_address(ledger: SqlBackend) -> None:
    with ledger as backend:
        tombstone = backend.forget_sync(ref=A2)
        with backend.engine.connect() as conn:
            assert [(i, e, r) for i, _, e, r in _tombstones(conn)] == [(tombstone, None, [])]
            assert len(_rows(conn, "SELECT hash FROM tombstone_keys")) == 4


def test_a_person_erased_twice_has_their_keys_point_at_the_second_tombstone(
    ledger: SqlBackend,
) -> None:
    with ledger as backend:
        first = backend.forget_sync(email=BOB)
        # A newer action brings Bob back (same keys); erased again, the hashes move.
        newer = action(22, ref=B, email=BOB, created="2099-01-01T00:00:00Z")
        assert backend.apply_sync(records([dumps(newer)])) == ["applied"]
        second = backend.forget_sync(ref=B)
        assert first is not None and second is not None and second > first
        with backend.engine.connect() as conn:
            assert sorted(_rows(conn, "SELECT hash, tombstone_id FROM tombstone_keys")) == sorted(
                [(CHECK.digest(B), second), (CHECK.digest(BOB), second)]
            )


@pytest.mark.parametrize("writer", ["batch-writer", "record-writer"])
def test_a_record_about_an_erased_person_is_written_only_when_newer_than_the_erasure(
    ledger: SqlBackend, writer: str
) -> None:
    """Each record reaching a tombstone's key is judged by when its data was true: an
    action by its creation, a record without one by the time part of its contact stamp.
    At or before the erasure it counts as applied and writes nothing; after it, the
    person is back. In one batch, through either writer (a last record the batch writer
    does not take, about someone else, sends the whole batch record by record)."""
    with ledger as backend:
        tombstone = backend.forget_sync(email=ANNA)
        with backend.engine.connect() as conn:
            ((tid, erased_at, _, _),) = _tombstones(conn)
        assert tid == tombstone
        bodies = [
            # No action: the time of the status event's data (givenAt here).
            email_status(ref=A, email=None, status="bounce", changed="2024-02-01T00:00:00Z"),
            email_status(ref=A2, email=None, status="bounce", changed=erased_at),
            email_status(ref=A, email=ANNA_B, status="ok", changed="2099-01-01T00:00:00Z"),
            # With an action: its creation time.
            action(14, ref=A, email=ANNA, created="2024-02-02T00:00:00Z"),
            action(15, ref=A2, email=ANNA, created=erased_at),
            action(16, ref=A, email=None, created="2099-01-02T00:00:00Z"),
        ]
        if writer == "record-writer":
            bodies.append(action(41, ref="C" * 43, email=None, created="2024-01-01T00:00:00Z",
                                 record={"big": 1e17}))
        recs = records([dumps(b) for b in bodies])
        assert backend.apply_sync(recs) == ["applied"] * len(recs)
        with backend.engine.connect() as conn:
            back = _owner(conn, "email", ANNA_B)
            assert _owner(conn, "ref", A) == back
            keys = _rows(conn, "SELECT kind, value, contact_id FROM contact_keys "
                               "ORDER BY kind, value")
            # Only Bob's keys and those of the newer records: A2 and ANNA stay out.
            assert [k for k in keys if k[1] in (A, A2, ANNA, ANNA_B)] == [
                ("email", ANNA_B, back), ("ref", A, back)
            ]
            assert _rows(conn, f"SELECT action_id FROM actions WHERE contact_id = {back}") == [
                (16,)
            ]
            assert _rows(conn, "SELECT action_id FROM actions WHERE action_id IN (14, 15)") == []
            assert _rows(conn, "SELECT status FROM email_status_history WHERE contact_id = "
                               f"{back}") == [("ok",)]


def test_a_contact_without_an_email_leaves_a_tombstone_of_its_ref(ledger: SqlBackend) -> None:
    with ledger as backend:
        with backend.engine.begin() as conn:
            _register(conn, "d", 0)
        lone = action(31, ref="L" * 43, email=None, created="2024-02-01T00:00:00Z")
        assert backend.apply_sync(records([dumps(lone)])) == ["applied"]
        tombstone = backend.forget_sync(ref="L" * 43)
        with backend.engine.connect() as conn:
            assert [(i, e, r) for i, _, e, r in _tombstones(conn)] == [
                (tombstone, None, ["L" * 43])
            ]
            assert _rows(conn, "SELECT hash FROM tombstone_keys") == [(CHECK.digest("L" * 43),)]


# ---- scrub_propagated ------------------------------------------------------------------


def _erasure_seq(conn: Connection, tombstone: int) -> int:
    seq = conn.execute(
        text("SELECT seq FROM changes WHERE kind = 'erasure' AND entity = :e"),
        {"e": str(tombstone)},
    ).scalar()
    assert seq is not None
    return int(seq)


def _kept(conn: Connection) -> list[tuple[Any, ...]]:
    return [(i, e, r) for i, _, e, r in _tombstones(conn)]


def test_a_tombstone_is_scrubbed_once_every_destination_is_past_its_erasure(
    ledger: SqlBackend,
) -> None:
    with ledger as backend:
        with backend.engine.begin() as conn:
            _register(conn, "d", 0)
            _register(conn, "e", 0)
        anna = backend.forget_sync(email=ANNA)
        bob = backend.forget_sync(email=BOB)
        assert anna is not None and bob is not None
        with backend.engine.begin() as conn:
            first, second = _erasure_seq(conn, anna), _erasure_seq(conn, bob)
            assert scrub_propagated(conn) == 0
            # "d" has read Anna's erasure (its cursor is that change), "e" not yet
            conn.execute(text(f"UPDATE destinations SET cursor = {first}"))
            conn.execute(text(f"UPDATE destinations SET cursor = {first - 1} WHERE name = 'e'"))
            assert scrub_propagated(conn) == 0
            assert _kept(conn) == [(anna, ANNA, [A, A2]), (bob, BOB, [B])]
            # both at Anna's erasure: hers goes, Bob's (later) stays
            conn.execute(text(f"UPDATE destinations SET cursor = {first}"))
            assert scrub_propagated(conn) == 1
            assert _kept(conn) == [(anna, None, []), (bob, BOB, [B])]
            # past Bob's, but "e" parked his erasure: it stays until that is settled
            conn.execute(text(f"UPDATE destinations SET cursor = {second + 5}"))
            conn.execute(
                text(
                    "INSERT INTO destination_parked "
                    "(destination, kind, entity, version, code, message, parked_at) "
                    "VALUES ('e', 'erasure', :e, 1, 'c', 'm', 0), "
                    "('e', 'contact', :other, 1, 'c', 'm', 0)"
                ),
                {"e": str(bob), "other": str(anna)},
            )
            assert scrub_propagated(conn) == 0
            assert _kept(conn)[1] == (bob, BOB, [B])
            conn.execute(text("DELETE FROM destination_parked WHERE kind = 'erasure'"))
            assert scrub_propagated(conn) == 1
            assert _kept(conn) == [(anna, None, []), (bob, None, [])]
            assert scrub_propagated(conn) == 0  # nothing left to scrub


def test_with_every_destination_gone_every_tombstone_is_scrubbed(ledger: SqlBackend) -> None:
    with ledger as backend:
        with backend.engine.begin() as conn:
            _register(conn, "d", 0)
        anna = backend.forget_sync(email=ANNA)
        bob = backend.forget_sync(email=BOB)
        with backend.engine.begin() as conn:
            conn.execute(text("DELETE FROM destinations"))
            assert scrub_propagated(conn) == 2
            assert _kept(conn) == [(anna, None, []), (bob, None, [])]


@pytest.mark.postgres
def test_an_erasure_takes_its_change_number_in_commit_order_on_postgres(pg_url: str) -> None:
    """As the writers' change rows (test_changelog.py): a transaction holding the change
    log's lock holds back the erasure's change row until it commits."""
    with SqlBackend(pg_url, erasure_key=KEY) as backend:
        assert backend.apply_sync(records(BODIES)) == ["applied"] * len(BODIES)
        with held_change(pg_url) as (slow, held):
            done = threading.Event()
            result: dict[str, int | None] = {}

            def erase() -> None:
                result["tombstone"] = backend.forget_sync(email=BOB)
                done.set()

            eraser = threading.Thread(target=erase)
            eraser.start()
            assert not done.wait(1.0)  # a bounded wait for something that must not happen
            slow.commit()
            eraser.join(30)
            assert done.is_set() and result["tombstone"] is not None
            with backend.engine.connect() as conn:
                erasure = _erasure_seq(conn, result["tombstone"])
            assert erasure > held, "the held change was overtaken"
