"""The pipeline's processing without a broker: the §4 table, coalitions, duplicates, and
what lands in the outbox — decoded with our wire models and compared, key for key, with
messages.md and the shared fixtures."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import Engine, select

from proca_sync.crypto import KeyPair, Keystore, decrypt_message
from proca_sync.messages.decode import decode
from proca_sync.messages.schemas import ActionMessage, CampaignUpdatedEvent, EmailStatusEvent
from proca_sync.pipeline import admin
from proca_sync.pipeline.instance import InstanceSecrets
from proca_sync.pipeline.intake import (
    ActionContactIn,
    AddActionIn,
    IntakeProblem,
    add_action,
    add_action_contact,
)
from proca_sync.pipeline.processing import (
    Emit,
    Processor,
    Recipient,
    Settings,
    Transition,
    decide,
    recipients,
)
from proca_sync.pipeline.state import ActionStatus as A
from proca_sync.pipeline.state import EmailStatusValue, actions, migrate, open_engine, outbox
from proca_sync.pipeline.state import SupporterStatus as S
from tests.conftest import FIXTURES

NOW = datetime(2024, 10, 14, 11, 2, 24, 123456, tzinfo=UTC)
SECOND = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
OFF = Settings(supporter_confirm=False, action_confirm=False)
SUP = Settings(supporter_confirm=True, action_confirm=False)
ACT = Settings(supporter_confirm=False, action_confirm=True)


@pytest.mark.parametrize(
    ("action", "supporter", "with_consent", "settings", "expected"),
    [
        pytest.param(A.DELIVERED, S.ACCEPTED, True, OFF, Transition(), id="1-done"),
        pytest.param(A.NEW, None, False, OFF, Transition(), id="2-no-supporter"),
        pytest.param(A.NEW, S.NEW, True, SUP,
                     Transition(A.NEW, S.CONFIRMING, Emit.SUPPORTER_CONFIRM), id="3-confirm"),
        pytest.param(A.NEW, S.NEW, False, SUP,
                     Transition(A.NEW, S.CONFIRMING, Emit.SUPPORTER_CONFIRM),
                     id="3-ignores-withConsent"),
        pytest.param(A.NEW, S.NEW, True, ACT,
                     Transition(A.CONFIRMING, S.ACCEPTED, Emit.ACTION_CONFIRM), id="3b-moderate"),
        pytest.param(A.NEW, S.NEW, True, OFF,
                     Transition(A.DELIVERED, S.ACCEPTED, Emit.DELIVER), id="3c-deliver"),
        pytest.param(A.NEW, S.CONFIRMING, True, SUP, Transition(), id="4-wait"),
        pytest.param(A.NEW, S.REJECTED, True, OFF, Transition(A.REJECTED, S.REJECTED),
                     id="5-rejected"),
        pytest.param(A.NEW, S.ACCEPTED, True, ACT,
                     Transition(A.CONFIRMING, S.ACCEPTED, Emit.ACTION_CONFIRM), id="6"),
        pytest.param(A.CONFIRMING, S.ACCEPTED, True, ACT, Transition(), id="7-moderating"),
        pytest.param(A.REJECTED, S.ACCEPTED, True, OFF, Transition(), id="8"),
        pytest.param(A.NEW, S.ACCEPTED, False, ACT,
                     Transition(A.DELIVERED, S.ACCEPTED, Emit.DELIVER), id="9-follow-up"),
        pytest.param(A.ACCEPTED, S.ACCEPTED, True, ACT,
                     Transition(A.DELIVERED, S.ACCEPTED, Emit.DELIVER), id="9-moderated"),
        pytest.param(A.DELIVERED, S.REJECTED, True, OFF, Transition(), id="10"),
        pytest.param(A.REPEAT, S.ACCEPTED, True, OFF, Transition(), id="11"),
    ],
)
def test_transition_table(
    action: A, supporter: S | None, with_consent: bool, settings: Settings, expected: Transition
) -> None:
    assert decide(action, supporter, with_consent=with_consent, settings=settings) == expected


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        pytest.param(dict(page_org=1, lead_org=1, page_delivery=True, force_delivery=False,
                          opt_in=None, lead_opt_in=None), [Recipient(1, None, True)], id="single"),
        pytest.param(dict(page_org=2, lead_org=1, page_delivery=True, force_delivery=False,
                          opt_in=True, lead_opt_in=None), [Recipient(2, True, True)],
                     id="partner-only"),
        pytest.param(dict(page_org=2, lead_org=1, page_delivery=True, force_delivery=False,
                          opt_in=False, lead_opt_in=True),
                     [Recipient(2, False, True), Recipient(1, True, False)], id="lead-consent"),
        pytest.param(dict(page_org=2, lead_org=1, page_delivery=False, force_delivery=False,
                          opt_in=None, lead_opt_in=False), [Recipient(1, False, True)],
                     id="lead-delivers"),
        pytest.param(dict(page_org=2, lead_org=1, page_delivery=True, force_delivery=True,
                          opt_in=True, lead_opt_in=None),
                     [Recipient(2, True, True), Recipient(1, None, True)], id="forced"),
    ],
)
def test_coalition_recipients(kwargs: dict[str, Any], expected: list[Recipient]) -> None:
    assert recipients(**kwargs) == expected


# ---- the outbox ------------------------------------------------------------------------


class World:
    def __init__(self, tmp: Path, **org_flags: bool) -> None:
        self.engine: Engine = open_engine(f"sqlite:///{tmp / 'state.db'}")
        migrate(self.engine)
        self.processor = Processor(InstanceSecrets.generate())
        admin.add_org(self.engine, org_id=766, name="your_org", title="Your Organisation",
                      **org_flags)
        admin.add_campaign(self.engine, campaign_id=9, name="petition_x", title="Petition X",
                           org_id=766, external_id=621987)
        admin.add_page(self.engine, page_id=2466, name="test/en", locale="en", campaign_id=9,
                       org_id=766)
        admin.add_page(self.engine, page_id=2467, name="test/de", locale="de", campaign_id=9,
                       org_id=766)
        self.cursor = 0

    def submit(self, n: int, *, page: int = 2466, when: datetime = NOW, **extra: Any) -> Any:
        body = {
            "actionPageId": page,
            "action": {"actionType": "register",
                       "customFields": {"comment": "hi", "email_provider": "example.org"}},
            "contact": {"firstName": "Simone", "lastName": "de Beauvoir",
                        "email": f" Person{n}@Example.org", "phone": "+41 22",
                        "address": {"country": "be", "postcode": "1000", "locality": "Brussels"}},
            "privacy": {"optIn": True},
            "tracking": {"source": "test", "medium": "proca", "campaign": "test",
                         "location": "https://example.org"},
        }
        body.update(extra)
        with self.engine.begin() as conn:
            return add_action_contact(conn, self.processor, ActionContactIn.model_validate(body),
                                      when)

    def follow_up(self, ref: str, *, page: int = 2466, when: datetime = NOW) -> Any:
        body = AddActionIn.model_validate({"actionPageId": page, "action": {
            "actionType": "share", "customFields": {"medium": "twitter"}}})
        with self.engine.begin() as conn:
            return add_action(conn, self.processor, ref, body, when)

    def emitted(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Outbox rows written since the last call: (exchange, routing key, body)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox).where(outbox.c.id > self.cursor)
                                .order_by(outbox.c.id)).all()
        if rows:
            self.cursor = rows[-1].id
        return [(r.exchange, r.routing_key, orjson.loads(r.body)) for r in rows]

    def status(self, action_id: int) -> str:
        with self.engine.connect() as conn:
            return str(conn.execute(select(actions.c.status)
                                    .where(actions.c.id == action_id)).scalar())


def fixture(name: str) -> dict[str, Any]:
    document: dict[str, Any] = orjson.loads((FIXTURES / name).read_bytes())
    return document


def shape(document: Any, *, skip: frozenset[str] = frozenset()) -> Any:
    """Key structure with value kinds (None stays None), ignoring ``skip`` paths."""
    if isinstance(document, dict):
        return {k: shape(v) for k, v in document.items() if k not in skip}
    if document is None:
        return None
    return type(document).__name__


def test_deliver_message_matches_messages_md_and_fixture(tmp_path: Path) -> None:
    world = World(tmp_path, custom_action_deliver=True)
    world.emitted()  # campaign_updated of the creation
    stored = world.submit(1)
    [(exchange, key, body)] = world.emitted()
    assert (exchange, key) == ("org.766.deliver", "register.petition_x")
    assert isinstance(decode(orjson.dumps(body)), ActionMessage)
    reference = fixture("petition_optin.json")
    # Fixture quirks (fixtures/README.md): campaign.id, no externalId, street at top level.
    reference["campaign"].pop("id")
    reference["campaign"]["externalId"] = 1
    for quirk in ("street", "locality"):
        reference["contact"].pop(quirk)
    reference["contact"]["address"] = {"region": None, "locality": "x", "street": None,
                                       "streetNumber": None}
    reference["action"]["customFields"] = body["action"]["customFields"]
    assert shape(body) == shape(reference)
    assert body["contact"]["email"] == "person1@example.org"
    assert body["contact"]["contactRef"] == stored.contact_ref and len(stored.contact_ref) == 43
    assert body["action"]["customFields"] == {"comment": "hi", "email_provider": "example.org"}
    for stamp in (body["action"]["createdAt"], body["privacy"]["givenAt"]):
        assert SECOND.fullmatch(stamp)
    assert body["privacy"] == {"optIn": True, "givenAt": "2024-10-14T11:02:24Z",
                               "withConsent": True, "emailStatus": None,
                               "emailStatusChanged": None}
    # A follow-up share of the same supporter: row 9, withConsent false (share_twitter.json).
    world.follow_up(stored.contact_ref, when=NOW + timedelta(minutes=5))
    [(_, key, share)] = world.emitted()
    assert key == "share.petition_x"
    reference = fixture("share_twitter.json")
    reference["contact"]["address"] = body["contact"]["address"]
    reference["contact"]["phone"] = "x"
    reference["campaign"]["externalId"] = 1
    reference["tracking"] = None  # the share came without UTM data (messages.md §2.10)
    assert shape(share) == shape(reference)
    assert share["privacy"]["withConsent"] is False
    assert share["privacy"]["givenAt"] == "2024-10-14T11:02:24Z"


def test_email_status_event_matches_fixture(tmp_path: Path) -> None:
    world = World(tmp_path, custom_action_deliver=True, custom_event_deliver=True)
    stored = world.submit(1)
    world.emitted()
    later = NOW + timedelta(minutes=1)
    with world.engine.begin() as conn:
        assert world.processor.double_opt_in(conn, stored.action_id, stored.contact_ref, later)
    [(exchange, key, event)] = world.emitted()
    assert (exchange, key) == ("org.766.event", "supporter.email_status")
    assert isinstance(decode(orjson.dumps(event)), EmailStatusEvent)
    reference = fixture("event_doubleoptin.json")
    for part in ("action", "actionPage", "campaign"):
        reference[part].pop("id")  # added by @proca/queue, not on the wire
    reference["action"]["customFields"] = event["action"]["customFields"]
    reference["supporter"]["contact"] = event["supporter"]["contact"]
    reference["actionPage"]["thankYouTemplate"] = None  # our page has no template
    assert shape(event) == shape(reference)
    # Keys of customFields are camelCased in events; e-mail cleared after delivery (§9)
    # but the clear payload restores it.
    assert event["action"]["customFields"] == {"comment": "hi", "emailProvider": "example.org"}
    assert event["supporter"]["privacy"]["withConsent"] is False
    assert event["supporter"]["privacy"]["emailStatus"] == "double_opt_in"
    assert event["timestamp"] == event["supporter"]["privacy"]["emailStatusChanged"]
    assert SECOND.fullmatch(event["timestamp"])
    assert "orgId" not in event and "stage" not in event
    # Every click emits again (duplicate events, processing.md §12).
    with world.engine.begin() as conn:
        world.processor.double_opt_in(conn, stored.action_id, stored.contact_ref, later)
    assert len(world.emitted()) == 1


def test_campaign_updated_shape(tmp_path: Path) -> None:
    world = World(tmp_path)
    [(exchange, key, event)] = world.emitted()
    assert (exchange, key) == ("org.766.event", "system.campaign_updated")
    assert isinstance(decode(orjson.dumps(event)), CampaignUpdatedEvent)
    assert event["campaign"] == {"id": 9, "name": "petition_x", "title": "Petition X",
                                 "externalId": 621987, "contactSchema": "basic", "config": {},
                                 "org": {"name": "your_org", "title": "Your Organisation"}}
    assert event["orgId"] == 766 and SECOND.fullmatch(event["timestamp"])


def test_encrypted_for_an_org_with_a_key(tmp_path: Path) -> None:
    world = World(tmp_path, custom_action_deliver=True)
    pair = KeyPair.generate()
    admin.add_org_key(world.engine, 766, pair.public)
    world.emitted()
    stored = world.submit(1)
    [(_, _, body)] = world.emitted()
    assert set(body["contact"]) == {"contactRef", "dupeRank", "firstName", "email", "area"}
    assert body["personalInfo"]["encryptKey"]["public"] == pair.public
    message = decrypt_message(decode(orjson.dumps(body)), Keystore([pair]))
    assert isinstance(message, ActionMessage)
    assert message.contact.record()["lastName"] == "de Beauvoir"
    # After delivery the clear e-mail is gone: a follow-up carries email null (§9).
    world.follow_up(stored.contact_ref)
    [(_, _, share)] = world.emitted()
    assert share["contact"]["email"] is None and share["personalInfo"] is not None


def test_duplicates_rank_and_repeat(tmp_path: Path) -> None:
    world = World(tmp_path, custom_action_deliver=True)
    world.emitted()
    first = world.submit(1)
    again = world.submit(1, when=NOW + timedelta(seconds=1))
    other_page = world.submit(1, page=2467, when=NOW + timedelta(seconds=2))
    ranks = [body["contact"]["dupeRank"] for _, _, body in world.emitted()]
    assert ranks == [0, 1, 2]
    assert world.status(first.action_id) == "delivered"
    assert world.status(again.action_id) == "repeat"  # same page: repeat, still published
    # Cross-page: no earlier record on page 2467 itself → delivered with rank 2.
    assert world.status(other_page.action_id) == "delivered"
    third = world.submit(2, page=2467)
    fourth = world.submit(2, page=2466, when=NOW + timedelta(seconds=1))
    assert world.status(third.action_id) == "delivered"
    assert world.status(fourth.action_id) == "delivered"  # cross-page: delivered, rank 1
    assert [b["contact"]["dupeRank"] for _, _, b in world.emitted()] == [0, 1]


def test_follow_up_waits_for_its_supporter(tmp_path: Path) -> None:
    world = World(tmp_path, custom_action_deliver=True)
    world.emitted()
    ref = world.processor.contact_ref("person7@example.org")
    early = world.follow_up(ref)
    assert world.emitted() == [] and world.status(early.action_id) == "new"
    world.submit(7)
    emitted = world.emitted()
    assert [body["actionId"] for _, _, body in emitted] == [early.action_id + 1, early.action_id]


def test_supporter_confirmation_then_links(tmp_path: Path) -> None:
    world = World(tmp_path, custom_supporter_confirm=True, custom_action_deliver=True,
                  custom_event_deliver=True)
    world.emitted()
    stored = world.submit(1)
    [(exchange, _, body)] = world.emitted()
    assert exchange == "org.766.confirm.supporter" and body["stage"] == "supporter_confirm"
    share = world.follow_up(stored.contact_ref)
    assert world.emitted() == []  # row 4: waits for the supporter
    with world.engine.begin() as conn:
        outcome = world.processor.confirm_supporter(
            conn, stored.action_id, stored.contact_ref, accept=True, doi=True, now=NOW)
    assert outcome == "ok"
    kinds = [(e, b.get("stage") or b.get("eventType"), b["actionId"]) for e, _, b in world.emitted()]
    assert kinds == [
        ("org.766.event", "email_status", stored.action_id),
        ("org.766.deliver", "deliver", stored.action_id),
        ("org.766.deliver", "deliver", share.action_id),
    ]
    # Reject after DOI: supporter and action rejected, DOI revoked → unsub event.
    with world.engine.begin() as conn:
        world.processor.confirm_supporter(
            conn, stored.action_id, stored.contact_ref, accept=False, doi=False, now=NOW)
    [(_, _, event)] = world.emitted()
    assert event["supporter"]["privacy"]["emailStatus"] == "unsub"
    assert world.status(stored.action_id) == "rejected"
    with world.engine.begin() as conn:
        assert world.processor.email_report(conn, stored.action_id, EmailStatusValue.BOUNCE, NOW)
    assert [b["supporter"]["privacy"]["emailStatus"] for _, _, b in world.emitted()] == ["bounce"]


def test_intake_rejects_without_echoing(tmp_path: Path) -> None:
    world = World(tmp_path)
    with pytest.raises(IntakeProblem) as caught:
        world.submit(1, contact={"firstName": "X", "email": "hidden-value@@nowhere"})
    assert caught.value.field == "contact.email" and "hidden-value" not in str(caught.value)
    with pytest.raises(IntakeProblem, match="actionPageId"):
        world.submit(1, actionPageId=999)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_migrations_match_the_tables_and_run_on_both_databases(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from proca_sync.pipeline.state import metadata

    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue(
        "pg_url")
    engine = open_engine(url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent
        with engine.connect() as conn:
            drift = compare_metadata(MigrationContext.configure(conn), metadata)
        assert drift == []
        admin.add_org(engine, org_id=766, name="o", title="O", custom_action_deliver=True)
        admin.add_campaign(engine, campaign_id=9, name="c", title="C", org_id=766)
        admin.add_page(engine, page_id=1, name="p", locale="en", campaign_id=9, org_id=766)
        processor = Processor(InstanceSecrets.generate())
        body = ActionContactIn.model_validate({
            "actionPageId": 1, "action": {"actionType": "register"},
            "contact": {"firstName": "A", "email": "a@example.org"}, "privacy": {"optIn": True}})
        with engine.begin() as conn:
            stored = add_action_contact(conn, processor, body, NOW)
        with engine.connect() as conn:
            status = conn.execute(select(actions.c.status)
                                  .where(actions.c.id == stored.action_id)).scalar()
        assert status == "delivered"
    finally:
        engine.dispose()


def test_coalition_split_consent_and_per_org_encryption(tmp_path: Path) -> None:
    """A partner's page in the lead's campaign: each org gets its own message, with its
    own opt-in, encrypted only for the org that has a key (processing.md §6)."""
    world = World(tmp_path, custom_action_deliver=True)  # org 766 leads campaign 9
    admin.add_org(world.engine, org_id=800, name="partner", title="Partner",
                  custom_action_deliver=True)
    admin.add_page(world.engine, page_id=3000, name="partner/en", locale="en", campaign_id=9,
                   org_id=800)
    lead_key = KeyPair.generate()
    admin.add_org_key(world.engine, 766, lead_key.public)
    world.emitted()
    world.submit(1, page=3000, privacy={"optIn": False, "leadOptIn": True})
    sent = {exchange: body for exchange, _, body in world.emitted()}
    assert set(sent) == {"org.800.deliver", "org.766.deliver"}
    partner, lead = sent["org.800.deliver"], sent["org.766.deliver"]
    assert partner["orgId"] == lead["orgId"] == 800  # the collecting org, in both
    assert partner["privacy"]["optIn"] is False and lead["privacy"]["optIn"] is True
    assert partner["personalInfo"] is None and partner["contact"]["lastName"] == "de Beauvoir"
    assert lead["personalInfo"]["encryptKey"]["public"] == lead_key.public
    assert "lastName" not in lead["contact"]
    # Without lead consent and with the partner delivering, the lead gets nothing.
    world.submit(2, page=3000, privacy={"optIn": True})
    assert [exchange for exchange, _, _ in world.emitted()] == ["org.800.deliver"]
