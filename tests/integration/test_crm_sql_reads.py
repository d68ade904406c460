"""What the SQL CRM gives back — ``export``, ``stats``, ``find_contact`` — field by field,
and the engine setup and error translation of ``crm/sql/store.py``. Pinned literally, so
any change of a read or a rule shows up here (the mutation run relies on it)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import text

from proca_sync.crm.sql import SCHEMA_VERSION, SqlBackend, create_store_engine, normalise_url
from proca_sync.crm.sql.store import _translate
from proca_sync.engine import Engine
from proca_sync.errors import BackendRejectedError, BackendUnavailableError, ConfigError
from tests.support.builders import action, campaign_updated, dumps, email_status

A, B, C = "A" * 43, "B" * 43, "C" * 43

BODIES = [
    dumps(action(11, ref=A, email="Anna@Example.org ", created="2024-01-02T10:00:00Z",
                 first_name="Anna", custom={"q": "yes"},
                 record={"lastName": "Alpha", "postcode": "1000", "country": "BE",
                         "phone": "123"})),
    # a follow-up: newer data (its first name wins), no consent
    dumps(action(12, ref=A, email=None, created="2024-01-03T10:00:00Z", action_type="share",
                 with_consent=False, opt_in=None, campaign="other_camp")),
    dumps(action(21, ref=B, email="bob@example.org", created="2024-01-02T11:00:00Z",
                 first_name="Bob", testing=True, opt_in=False)),
    dumps(email_status(ref=B, email="bob@example.org", status="bounce",
                       changed="2024-01-05T00:00:00Z")),
    # a status for a supporter never delivered: stays pending, invisible
    dumps(email_status(ref=C, email="carl@example.org", status="unsub",
                       changed="2024-01-05T00:00:00Z")),
    dumps(campaign_updated("petition_x", "Petition X renamed", when="2024-01-04T00:00:00Z",
                           external_id=99)),
]

TRACKING = {"source": "unknown", "medium": "unknown", "campaign": "unknown", "content": "",
            "location": ""}


def exported_action(action_id: int, kind: str, campaign: str, created: str, *,
                    testing: bool = False, consent: bool = True, opt_in: bool | None = True,
                    custom: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "actionId": action_id, "actionType": kind, "campaign": campaign, "createdAt": created,
        "customFields": custom or {}, "testing": testing, "withConsent": consent,
        "optIn": opt_in, "dupeRank": 0, "donation": None,
        "actionPage": "example.org/petition/en", "orgId": 7, "tracking": TRACKING,
    }


EXPECTED = {
    "contacts": [
        {
            "email": "anna@example.org", "firstName": "Ada", "lastName": "Alpha",
            "postcode": "1000", "country": "BE", "contactRefs": [A],
            "emails": ["anna@example.org"], "subscribed": True, "optIn": True,
            "optInAt": "2024-01-02T10:00:00Z", "emailStatus": None,
            "emailStatusChanged": None, "testing": False,
            "fields": {"country": "BE", "email": "anna@example.org", "firstName": "Ada",
                       "lastName": "Alpha", "phone": "123", "postcode": "1000"},
            "consents": [{"actionId": 11, "optIn": True, "givenAt": "2024-01-02T10:00:00Z"}],
            "emailStatusHistory": [],
            "actions": [
                exported_action(11, "register", "petition_x", "2024-01-02T10:00:00Z",
                                custom={"q": "yes"}),
                exported_action(12, "share", "other_camp", "2024-01-03T10:00:00Z",
                                consent=False, opt_in=None),
            ],
        },
        {
            "email": "bob@example.org", "firstName": "Ada", "lastName": None,
            "postcode": None, "country": None, "contactRefs": [B],
            "emails": ["bob@example.org"], "subscribed": False, "optIn": False,
            "optInAt": None, "emailStatus": "bounce",
            "emailStatusChanged": "2024-01-05T00:00:00Z", "testing": False,
            "fields": {"email": "bob@example.org", "firstName": "Ada"},
            "consents": [{"actionId": 21, "optIn": False, "givenAt": "2024-01-02T11:00:00Z"}],
            "emailStatusHistory": [{"status": "bounce", "changedAt": "2024-01-05T00:00:00Z"}],
            "actions": [exported_action(21, "register", "petition_x", "2024-01-02T11:00:00Z",
                                        testing=True, opt_in=False)],
        },
    ],
    "campaigns": [
        {"name": "other_camp", "title": "Other Camp", "externalId": None,
         "contactSchema": "basic", "campaignId": 5, "config": None},
        {"name": "petition_x", "title": "Petition X renamed", "externalId": 99,
         "contactSchema": "basic", "campaignId": 5, "config": {"lang_setting": "en"}},
    ],
    "pendingContacts": 1,
}

EXPECTED_STATS = {
    "contacts": 2, "subscribed": 1, "testing_contacts": 0, "pending_contacts": 1,
    "email_statuses": {"bounce": 1}, "actions": 3, "testing_actions": 1,
    "actions_per_campaign": [
        {"campaign": "other_camp", "actionType": "share", "actions": 1},
        {"campaign": "petition_x", "actionType": "register", "actions": 2},
    ],
    "campaigns": 2, "applied_messages": 6,
}


@pytest.fixture
def filled(crm_url: str) -> SqlBackend:
    engine = Engine(backend=SqlBackend("sqlite://"))
    records = [engine.prepare(body) for body in BODIES]
    with SqlBackend(crm_url) as backend:
        assert backend.apply_sync(records) == ["applied"] * len(records)  # type: ignore[arg-type]
        assert backend.apply_sync(records[:2]) == ["duplicate"] * 2  # type: ignore[arg-type]
        assert backend.apply_sync([]) == []
    return SqlBackend(crm_url)


def test_export_holds_every_field(filled: SqlBackend) -> None:
    with filled as backend:
        assert backend.export() == EXPECTED


def test_stats_count_without_personal_data(filled: SqlBackend) -> None:
    with filled as backend:
        assert backend.stats() == EXPECTED_STATS


def test_find_contact_by_any_spelling_of_the_email(filled: SqlBackend) -> None:
    with filled as backend:
        assert backend.find_contact("  ANNA@example.org") == EXPECTED["contacts"][0]
        assert backend.find_contact("bob@example.org") == EXPECTED["contacts"][1]
        assert backend.find_contact("carl@example.org") is None  # pending: not exported
        assert backend.find_contact("nobody@example.org") is None


def test_reopening_keeps_the_schema_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    for _ in range(2):
        with SqlBackend(url) as backend:
            backend.open_sync()  # a second open of the same backend changes nothing
            with backend.engine.connect() as conn:
                rows = conn.execute(text("SELECT key, value FROM proca_meta")).all()
            assert rows == [("schema_version", str(SCHEMA_VERSION))]


# ---- store.py --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///x.db", "sqlite:///x.db"),
    ],
)
def test_normalise_url(url: str, expected: str) -> None:
    assert normalise_url(url) == expected


def test_unusable_urls_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"^CRM URL is not a database URL$"):
        create_store_engine("not a url", what="CRM")
    with pytest.raises(ConfigError, match=r"^unsupported parking database 'mysql' "
                                          r"\(sqlite or postgresql\)$"):
        create_store_engine("mysql://u@h/db", what="parking")


def test_sqlite_engine_settings(tmp_path: Path) -> None:
    engine, dialect = create_store_engine(f"sqlite:///{tmp_path / 'a.db'}", what="CRM",
                                          synchronous="FULL")
    assert dialect == "sqlite"
    with engine.connect() as conn:
        pragmas = [conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                   for name in ("journal_mode", "synchronous", "foreign_keys")]
    assert pragmas == ["wal", 2, 1]  # WAL, FULL, on
    assert engine.hide_parameters
    engine.dispose()
    # without ?timeout= a locked file is waited on for 15 s; with it, that long
    default, _ = create_store_engine(f"sqlite:///{tmp_path / 'b.db'}", what="CRM")
    short, _ = create_store_engine(f"sqlite:///{tmp_path / 'c.db'}?timeout=0.2", what="CRM")
    for engine, seconds in ((default, 15), (short, 0.2)):
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert isinstance(raw, sqlite3.Connection)
            assert raw.execute("PRAGMA busy_timeout").fetchone()[0] == int(seconds * 1000)
        engine.dispose()


@pytest.mark.postgres
def test_postgres_engine_settings(pg_url: str) -> None:
    engine, dialect = create_store_engine(pg_url, what="CRM")
    assert dialect == "postgresql"
    assert engine.pool._pre_ping  # type: ignore[attr-defined]
    assert engine.hide_parameters
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar() == 1
    engine.dispose()


class Orig(Exception):
    pass


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (sa_exc.DataError("INSERT", {"email": "x@example.org"}, Orig()), BackendRejectedError,
         "crm_rejected: database refused a value (Orig)"),
        (sa_exc.IntegrityError("INSERT", {}, Orig()), BackendUnavailableError,
         "concurrent write conflict (Orig)"),
        (sa_exc.OperationalError("INSERT", {}, Orig()), BackendUnavailableError,
         "database unavailable (Orig)"),
        (sa_exc.TimeoutError(), BackendUnavailableError, "database unavailable (TimeoutError)"),
    ],
    ids=["data", "integrity", "operational", "pool-timeout"],
)
def test_database_errors_are_translated_naming_the_class_only(
    error: sa_exc.SQLAlchemyError, kind: type[Exception], message: str
) -> None:
    translated = _translate(error)
    assert type(translated) is kind
    assert str(translated) == message
