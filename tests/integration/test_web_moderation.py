"""The console's moderation inbox over a real pipeline state (SQLite file, and PostgreSQL
for the races): who may see and decide, CSRF, what a decision writes (status, decision
record, outbox, audit), and two moderators deciding the same action at once."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text

from proca_sync.pipeline import admin
from proca_sync.pipeline.instance import InstanceSecrets
from proca_sync.pipeline.intake import ActionContactIn, add_action_contact
from proca_sync.pipeline.processing import Processor
from proca_sync.pipeline.state import actions, migrate, moderations, open_engine, outbox
from proca_sync.web.moderation import ModerationDesk, Taken, Verdict
from tests.support.web import Console, copy_console, csrf_of, make_console

ORG, CAMPAIGN, PAGE = 766, 9, 2466
ROUTES = [("GET", "/moderation"), ("POST", "/moderation/decide"), ("GET", "/moderation/history")]
SUPPORTER = {"first": "Hypatia", "email": "hypatia.moderated@example.org"}


@dataclass
class State:
    """A pipeline state whose org moderates every action (custom_action_confirm)."""

    url: str
    secrets: Path
    engine: Engine
    ids: list[int]

    def status(self, action_id: int) -> str:
        with self.engine.connect() as conn:
            return str(
                conn.execute(select(actions.c.status).where(actions.c.id == action_id)).scalar()
            )

    def decisions(self) -> dict[int, tuple[str, str]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(moderations)).all()
        return {int(r.action_id): (r.decision, r.decided_by) for r in rows}

    def delivered(self) -> list[int]:
        """Action ids of the deliver messages committed to the outbox."""
        with self.engine.connect() as conn:
            bodies = conn.execute(select(outbox.c.body)).scalars().all()
        found = [orjson.loads(b) for b in bodies]
        return sorted(int(m["actionId"]) for m in found if m.get("stage") == "deliver")


def build_state(url: str, tmp: Path, count: int) -> State:
    secrets = tmp / "pipeline-secrets.json"
    InstanceSecrets.generate().save(secrets)
    engine = open_engine(url)
    migrate(engine)
    admin.add_org(engine, org_id=ORG, name="your_org", title="Your Organisation",
                  custom_action_confirm=True, custom_action_deliver=True)  # fmt: skip
    admin.add_campaign(engine, campaign_id=CAMPAIGN, name="bees", title="Save the bees",
                       org_id=ORG)  # fmt: skip
    admin.add_page(engine, page_id=PAGE, name="example.org/bees/en", locale="en",
                   campaign_id=CAMPAIGN, org_id=ORG)  # fmt: skip
    processor = Processor(InstanceSecrets.load(secrets))
    ids = []
    for n in range(count):
        body = {
            "actionPageId": PAGE,
            "action": {"actionType": "comment", "customFields": {"comment": f"remark {n}"}},
            "contact": {"firstName": SUPPORTER["first"], "lastName": "of Alexandria",
                        "email": f"{n}.{SUPPORTER['email']}", "address": {"country": "EG"}},
            "privacy": {"optIn": True},
        }  # fmt: skip
        with engine.begin() as conn:
            stored = add_action_contact(
                conn, processor, ActionContactIn.model_validate(body), datetime.now(UTC)
            )
        ids.append(stored.action_id)
    return State(url, secrets, engine, ids)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Console:
    return make_console(tmp_path_factory.mktemp("console"))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    built = build_state(f"sqlite:///{tmp_path / 'pipeline.db'}", tmp_path, 3)
    yield built
    built.engine.dispose()


def with_pipeline(template: Console, tmp: Path, state: State, **extra: Any) -> Console:
    console = copy_console(template, tmp)
    changes: dict[str, Any] = {"pipeline_url": state.url, "pipeline_secrets": state.secrets}
    console.settings = dataclasses.replace(console.settings, **{**changes, **extra})
    return console


@pytest.fixture
def console(template: Console, tmp_path: Path, state: State) -> Console:
    return with_pipeline(template, tmp_path, state)


@pytest.fixture
def client(console: Console) -> Iterator[TestClient]:
    with console.client() as c:
        yield c


def decide(client: TestClient, token: str, action_id: int, verdict: str, **headers: str) -> Any:
    data = {"csrf": token, "action_id": str(action_id), "decision": verdict}
    return client.post("/moderation/decide", data=data, headers=headers)


def test_anonymous_and_viewer_are_refused_on_every_route(
    console: Console, client: TestClient, state: State
) -> None:
    token = csrf_of(client.get("/login").text)
    for method, path in ROUTES:
        data = {"csrf": token, "action_id": str(state.ids[0]), "decision": "accept"}
        reply = client.request(method, path, data=data if method == "POST" else None)
        expected = (303, "/login") if method == "GET" else (401, None)
        assert (reply.status_code, reply.headers.get("location")) == expected, path
    token = console.login(client, "vic")
    for method, path in ROUTES:
        data = {"csrf": token, "action_id": str(state.ids[0]), "decision": "accept"}
        reply = client.request(method, path, data=data if method == "POST" else None)
        assert reply.status_code == 403, path
        assert SUPPORTER["email"] not in reply.text and "remark" not in reply.text
    assert "/moderation" not in client.get("/").text  # no link for a viewer
    assert state.decisions() == {} and state.status(state.ids[0]) == "confirming"


def test_csrf_is_checked(console: Console, client: TestClient, state: State) -> None:
    token = console.login(client, "mo")
    target = state.ids[0]
    for forged in ({}, {"csrf": "forged"}):
        data = {"action_id": str(target), "decision": "accept", **forged}
        assert client.post("/moderation/decide", data=data).status_code == 403
    assert decide(client, "x", target, "accept").status_code == 403
    assert decide(client, "x", target, "accept", **{"X-CSRF-Token": "x"}).status_code == 403
    with console.client() as other:  # another session's token
        other_token = console.login(other, "mo")
    assert decide(client, other_token, target, "accept").status_code == 403
    assert state.decisions() == {} and state.status(target) == "confirming"
    assert decide(client, token, target, "accept").status_code == 200
    assert state.decisions() == {target: ("accept", "web:mo")}


def test_inbox_shows_the_waiting_actions_a_page_at_a_time(
    template: Console, tmp_path: Path, state: State
) -> None:
    console = with_pipeline(template, tmp_path, state, page_size=2)
    with console.client() as client:
        console.login(client, "mo")
        first = client.get("/moderation")
        assert first.status_code == 200
        assert 'id="waiting-total">3<' in first.text
        assert [f'id="action-{i}"' in first.text for i in state.ids] == [True, True, False]
        for shown in ("comment", "Save the bees", "example.org/bees/en", "remark 0",
                      SUPPORTER["first"], f"0.{SUPPORTER['email']}", "EG"):  # fmt: skip
            assert shown in first.text, shown
        assert "of Alexandria" not in first.text  # only the clear copies the pipeline keeps
        assert 'src="/static/moderation.js"' in first.text
        second = client.get("/moderation?page=2")
        assert [f'id="action-{i}"' in second.text for i in state.ids] == [False, False, True]
        assert "page 2 of 2" in second.text


def test_decisions_write_status_outbox_record_and_audit(
    console: Console, client: TestClient, state: State
) -> None:
    token = console.login(client, "mo")
    accepted, rejected, waiting = state.ids
    before = state.delivered()
    reply = decide(client, token, accepted, "accept", **{"HX-Request": "true"})
    assert reply.status_code == 200 and "Accepted by you" in reply.text
    assert reply.text.lstrip().startswith("<td")  # htmx gets the row's cell, not a page
    assert orjson.loads(reply.headers["HX-Trigger"]) == {"moderationWaiting": 2}
    reply = decide(client, token, rejected, "reject")  # without htmx: the whole inbox
    assert reply.status_code == 200 and "Rejected by you" in reply.text
    assert f'id="action-{waiting}"' in reply.text and f'id="action-{accepted}"' not in reply.text
    assert (state.status(accepted), state.status(rejected), state.status(waiting)) == (
        "delivered", "rejected", "confirming")  # fmt: skip
    assert state.decisions() == {accepted: ("accept", "web:mo"), rejected: ("reject", "web:mo")}
    assert before == [] and state.delivered() == [accepted]  # store-then-publish: outbox
    history = client.get("/moderation/history")
    assert history.status_code == 200 and "(2)" in history.text
    assert f'<td class="num">{accepted}</td><td>accept</td>' in history.text
    for bad in ({"action_id": "x", "decision": "accept"},
                {"action_id": str(waiting), "decision": "maybe"}):  # fmt: skip
        assert client.post("/moderation/decide", data={"csrf": token, **bad}).status_code == 400
    missing = decide(client, token, 10**9, "accept", **{"HX-Request": "true"})
    assert missing.status_code == 404 and "No action" in missing.text
    with console.client() as admin_client:
        console.login(admin_client, "ada")
        audit = admin_client.get("/audit").text
    assert f"moderate_accept</td><td>action:{accepted}" in audit
    assert f"moderate_reject</td><td>action:{rejected}" in audit


def test_without_secrets_the_inbox_is_read_only(
    template: Console, tmp_path: Path, state: State
) -> None:
    console = with_pipeline(template, tmp_path, state, pipeline_secrets=None)
    with console.client() as client:
        token = console.login(client, "mo")
        page = client.get("/moderation")
        assert "Read-only" in page.text and "/moderation/decide" not in page.text
        assert decide(client, token, state.ids[0], "accept").status_code == 403
    assert state.status(state.ids[0]) == "confirming"


def test_the_second_moderator_is_told_who_decided(
    console: Console, client: TestClient, state: State
) -> None:
    target = state.ids[0]
    token = console.login(client, "mo")
    with console.client() as other:
        other_token = console.login(other, "ada")
        assert decide(client, token, target, "accept").status_code == 200
        late = decide(other, other_token, target, "reject", **{"HX-Request": "true"})
        assert late.status_code == 409
        assert "Already decided by mo: accepted" in late.text
        page = decide(other, other_token, target, "reject")  # without htmx: a notice
        assert page.status_code == 409 and "Already decided by mo" in page.text
    assert state.decisions() == {target: ("accept", "web:mo")}
    assert state.status(target) == "delivered" and state.delivered() == [target]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_two_moderators_racing_one_decision_each(
    template: Console, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Two console processes (two apps, two engines) post at the same instant for each
    action, one accepting and one rejecting: exactly one wins, the other gets 409."""
    url = (f"sqlite:///{tmp_path / 'race.db'}" if backend == "sqlite"
           else request.getfixturevalue("pg_url"))  # fmt: skip
    state = build_state(url, tmp_path, 6)
    try:
        console = with_pipeline(template, tmp_path, state)
        clients = [console.client(), console.client()]
        tokens = [console.login(c, name) for c, name in zip(clients, ("mo", "ada"), strict=True)]
        gate = threading.Barrier(2)
        replies: dict[tuple[int, int], Any] = {}
        errors: list[BaseException] = []

        def run(side: int) -> None:
            verdict = "accept" if side == 0 else "reject"
            try:
                for action_id in state.ids:
                    gate.wait(10)
                    replies[side, action_id] = decide(
                        clients[side], tokens[side], action_id, verdict
                    )
            except BaseException as exc:  # reported below, with the other side released
                errors.append(exc)
                gate.abort()

        threads = [threading.Thread(target=run, args=(side,)) for side in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        for c in clients:
            c.close()
        assert not [e for e in errors if not isinstance(e, threading.BrokenBarrierError)], errors
        decisions = state.decisions()
        names = ("web:mo", "web:ada")
        for action_id in state.ids:
            codes = sorted(replies[side, action_id].status_code for side in (0, 1))
            assert codes == [200, 409], (action_id, codes)
            winner = 0 if replies[0, action_id].status_code == 200 else 1
            assert decisions[action_id] == (("accept", "reject")[winner], names[winner])
            loser_page = replies[1 - winner, action_id].text
            assert f"Already decided by {names[winner][4:]}" in loser_page
        accepted = sorted(a for a, (d, _) in decisions.items() if d == "accept")
        assert state.delivered() == accepted  # one deliver message per accepted action
        for action_id in state.ids:
            expected = "delivered" if action_id in accepted else "rejected"
            assert state.status(action_id) == expected
    finally:
        state.engine.dispose()


@pytest.mark.postgres
def test_a_decision_waits_for_the_one_in_flight_and_then_loses(
    tmp_path: Path, pg_url: str
) -> None:
    """Deterministic: the first decision's transaction is open when the second starts;
    the second blocks on the row (seen in pg_stat_activity), then finds it decided."""
    state = build_state(pg_url, tmp_path, 1)
    target = state.ids[0]
    name = f"moderation-race-{target}-{time.monotonic_ns()}"
    desk = ModerationDesk(f"{pg_url}&application_name={name}", secrets=state.secrets)
    processor = Processor(InstanceSecrets.load(state.secrets))
    result: list[Any] = []
    try:
        with state.engine.connect() as conn:
            first = conn.begin()
            assert processor.moderate(
                conn, target, accept=True, now=datetime.now(UTC), by="web:first"
            ) is not None
            second = threading.Thread(
                target=lambda: result.append(desk.decide(target, Verdict.REJECT, by="second"))
            )
            second.start()
            deadline = time.monotonic() + 20
            with state.engine.connect() as probe:
                while time.monotonic() < deadline:
                    waiting = probe.execute(text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND application_name = :name"
                    ), {"name": name}).scalar()  # fmt: skip
                    if waiting:
                        break
                    time.sleep(0.02)  # sleep-ok: polling pg_stat_activity with a deadline
                else:
                    raise AssertionError("the second decision never waited for the first")
            first.commit()
            second.join(20)
        [outcome] = result
        assert isinstance(outcome, Taken)
        assert outcome.decision is not None and outcome.decision.who == "first"
        assert state.decisions() == {target: ("accept", "web:first")}
        assert state.status(target) == "delivered" and state.delivered() == [target]
    finally:
        desk.engine.dispose()
        state.engine.dispose()
