"""The planned topology matches topology.md; names; reading x-death (messages.md §8)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from proca_sync.pipeline import topology as t
from proca_sync.pipeline.topology import Binding, OrgFlags, plan_topology, retry_count

N = 320

ALL_ON = OrgFlags(
    custom_supporter_confirm=True,
    custom_action_confirm=True,
    custom_action_deliver=True,
    custom_event_deliver=True,
    email_backend=True,
    supporter_confirm=True,
    push_backend="sqs",
    event_backend="webhook",
)


# ---- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        pytest.param(t.supporter_confirm_exchange, "org.320.confirm.supporter", id="x-sup"),
        pytest.param(t.action_confirm_exchange, "org.320.confirm.action", id="x-act"),
        pytest.param(t.deliver_exchange, "org.320.deliver", id="x-deliver"),
        pytest.param(t.event_exchange, "org.320.event", id="x-event"),
        pytest.param(t.fail_exchange, "org.320.fail", id="x-fail"),
        pytest.param(t.retry_exchange, "org.320.retry", id="x-retry"),
        pytest.param(t.fail_queue, "org.320.fail", id="q-fail"),
        pytest.param(t.supporter_confirm_queue, "cus.320.confirm.supporter", id="q-sup"),
        pytest.param(t.action_confirm_queue, "cus.320.confirm.action", id="q-act"),
        pytest.param(t.deliver_queue, "cus.320.deliver", id="q-deliver"),
        pytest.param(t.email_supporter_queue, "wrk.320.email.supporter", id="q-email"),
        pytest.param(t.sqs_queue, "wrk.320.sqs", id="q-sqs"),
        pytest.param(t.webhook_queue, "wrk.320.webhook", id="q-webhook"),
    ],
)
def test_names(function: Callable[[int], str], expected: str) -> None:
    assert function(N) == expected


@pytest.mark.parametrize("bad", [0, -1, True, "320", 3.0])
def test_org_id_must_be_a_positive_int(bad: Any) -> None:
    with pytest.raises(ValueError, match="org id"):
        t.deliver_queue(bad)


def test_routing_keys() -> None:
    assert t.action_routing_key("register", "fur_free_europe") == "register.fur_free_europe"
    assert t.action_routing_key("share-open", "x-1") == "share-open.x-1"
    assert t.EMAIL_STATUS_KEY == "supporter.email_status"
    assert t.system_routing_key("join_campaign") == "system.join_campaign"
    assert t.campaign_updated_key() == "system.campaign_updated"
    assert t.confirm_created_key("launch_page") == "confirm_created.launch_page"
    assert t.SYSTEM_QUEUE == "system.deliver"


@pytest.mark.parametrize(
    ("action_type", "campaign"),
    [("reg.ister", "x"), ("register", "a b"), ("", "x"), ("register", "")],
)
def test_routing_key_words_are_checked(action_type: str, campaign: str) -> None:
    with pytest.raises(ValueError, match=r"must match \[A-Za-z0-9_-\]\+"):
        t.action_routing_key(action_type, campaign)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        ("deliver", "org.320.deliver"),
        ("supporter_confirm", "org.320.confirm.supporter"),
        ("action_confirm", "org.320.confirm.action"),
        ("system", "org.320.event"),
    ],
)
def test_stage_exchange(stage: str, expected: str) -> None:
    assert t.stage_exchange(N, stage) == expected


def test_unknown_stage() -> None:
    with pytest.raises(ValueError, match="unknown stage"):
        t.stage_exchange(N, "confirm")


# ---- the plan ---------------------------------------------------------------------------


def test_exchanges_and_their_types() -> None:
    plan = plan_topology(N, OrgFlags())
    kinds = {x.name: x.kind for x in plan.exchanges}
    assert kinds == {
        "org.320.confirm.supporter": "topic",
        "org.320.confirm.action": "topic",
        "org.320.deliver": "topic",
        "org.320.event": "topic",
        "org.320.fail": "fanout",
        "org.320.retry": "direct",
    }
    assert all(x.durable for x in plan.exchanges)


def test_every_feature_on() -> None:
    plan = plan_topology(N, ALL_ON, retry_delay_ms=30_000)
    assert set(plan.queue_names) == {*t.org_queues(N), "org.320.fail", "system.deliver"}
    for name in t.org_queues(N):
        queue = plan.queue(name)
        assert queue.durable
        # Exactly these two arguments: no TTL, no length limit, no queue type.
        assert queue.arguments == {
            "x-dead-letter-exchange": "org.320.fail",
            "x-dead-letter-routing-key": name,
        }
    assert plan.queue("org.320.fail").arguments == {
        "x-dead-letter-exchange": "org.320.retry",
        "x-message-ttl": 30_000,
    }
    assert plan.queue("system.deliver").arguments == {}
    assert set(plan.bindings) == {
        Binding("org.320.confirm.supporter", "cus.320.confirm.supporter", "#"),
        Binding("org.320.confirm.action", "cus.320.confirm.action", "#"),
        Binding("org.320.deliver", "cus.320.deliver", "#"),
        Binding("org.320.event", "cus.320.deliver", "#"),
        Binding("org.320.confirm.supporter", "wrk.320.email.supporter", "#"),
        Binding("org.320.deliver", "wrk.320.email.supporter", "#"),
        Binding("org.320.deliver", "wrk.320.sqs", "#"),
        Binding("org.320.event", "wrk.320.webhook", "#"),
        *(Binding("org.320.retry", name, name) for name in t.org_queues(N)),
        Binding("org.320.fail", "org.320.fail", ""),
        Binding("org.320.event", "system.deliver", "system.*"),
    }
    # The two backend bindings that are off are removed.
    assert set(plan.unbindings) == {
        Binding("org.320.event", "wrk.320.sqs", "#"),
        Binding("org.320.deliver", "wrk.320.webhook", "#"),
    }


def test_nothing_on_still_has_the_fail_circuit_and_system_queue() -> None:
    plan = plan_topology(N, OrgFlags())
    assert plan.queue_names == ("org.320.fail", "system.deliver")
    assert set(plan.bindings) == {
        Binding("org.320.fail", "org.320.fail", ""),
        Binding("org.320.event", "system.deliver", "system.*"),
    }
    assert len(plan.unbindings) == 10
    assert {b.routing_key for b in plan.unbindings} == {"#"}


@pytest.mark.parametrize(
    ("flags", "queues", "stage_bindings"),
    [
        pytest.param(
            OrgFlags(custom_event_deliver=True),
            {"cus.320.deliver"},
            {("org.320.event", "cus.320.deliver")},
            id="events-only",
        ),
        pytest.param(
            OrgFlags(custom_action_deliver=True),
            {"cus.320.deliver"},
            {("org.320.deliver", "cus.320.deliver")},
            id="actions-only",
        ),
        pytest.param(
            OrgFlags(email_backend=True),
            {"wrk.320.email.supporter"},
            {("org.320.deliver", "wrk.320.email.supporter")},
            id="email-without-confirm",
        ),
        pytest.param(
            OrgFlags(supporter_confirm=True),
            set(),
            set(),
            id="confirm-without-email-backend",
        ),
        pytest.param(
            OrgFlags(email_backend=True, supporter_confirm=True),
            {"wrk.320.email.supporter"},
            {
                ("org.320.deliver", "wrk.320.email.supporter"),
                ("org.320.confirm.supporter", "wrk.320.email.supporter"),
            },
            id="email-with-confirm",
        ),
        pytest.param(
            OrgFlags(push_backend="webhook", event_backend="webhook"),
            {"wrk.320.webhook"},
            {("org.320.deliver", "wrk.320.webhook"), ("org.320.event", "wrk.320.webhook")},
            id="webhook-both",
        ),
        pytest.param(
            OrgFlags(event_backend="sqs"),
            {"wrk.320.sqs"},
            {("org.320.event", "wrk.320.sqs")},
            id="sqs-events",
        ),
    ],
)
def test_flags_choose_queues_and_bindings(
    flags: OrgFlags, queues: set[str], stage_bindings: set[tuple[str, str]]
) -> None:
    plan = plan_topology(N, flags)
    assert set(plan.queue_names) == queues | {"org.320.fail", "system.deliver"}
    retry = {b for b in plan.bindings if b.exchange == "org.320.retry"}
    assert retry == {Binding("org.320.retry", q, q) for q in queues}
    stage = {
        (b.exchange, b.queue)
        for b in plan.bindings
        if b.exchange not in {"org.320.retry", "org.320.fail"} and b.queue != "system.deliver"
    }
    assert stage == stage_bindings
    assert all(b.routing_key == "#" for b in plan.bindings if (b.exchange, b.queue) in stage)
    # Every stage binding is either made or removed, never both.
    assert not set(plan.bindings) & set(plan.unbindings)
    assert len(stage) + len(plan.unbindings) == 10


def test_switching_a_flag_off_unbinds_but_keeps_retry_binding_of_shared_queue() -> None:
    plan = plan_topology(N, OrgFlags(custom_event_deliver=True))
    assert Binding("org.320.deliver", "cus.320.deliver", "#") in plan.unbindings
    assert plan.bindings_of("cus.320.deliver") == (
        Binding("org.320.event", "cus.320.deliver", "#"),
        Binding("org.320.retry", "cus.320.deliver", "cus.320.deliver"),
    )


@pytest.mark.parametrize("delay", [300, 30_000, 1_800_000])
def test_retry_delay_is_an_explicit_ttl(delay: int) -> None:
    plan = plan_topology(N, OrgFlags(), retry_delay_ms=delay)
    assert plan.queue("org.320.fail").arguments["x-message-ttl"] == delay
    assert plan.retry_delay_ms == delay


@pytest.mark.parametrize("delay", [0, -5, True])
def test_retry_delay_must_be_positive(delay: Any) -> None:
    with pytest.raises(ValueError, match="retry delay"):
        plan_topology(N, OrgFlags(), retry_delay_ms=delay)


def test_plan_is_a_value() -> None:
    assert plan_topology(N, ALL_ON) == plan_topology(N, ALL_ON)
    assert hash(plan_topology(N, ALL_ON)) == hash(plan_topology(N, ALL_ON))
    assert plan_topology(N, ALL_ON) != plan_topology(321, ALL_ON)
    with pytest.raises(KeyError):
        plan_topology(N, OrgFlags()).queue("cus.320.deliver")


# ---- x-death ----------------------------------------------------------------------------

PRODUCTION_HEADER: dict[str, Any] = {
    "x-death": [
        {
            "count": 55613,
            "exchange": "org.320.deliver",
            "queue": "cus.320.deliver",
            "reason": "rejected",
            "routing-keys": ["register.fur_free_europe"],
            "time": datetime(2022, 9, 29, 11, 16, 53, tzinfo=UTC),
        },
        {
            "count": 55612,
            "exchange": "org.320.fail",
            "queue": "org.320.fail",
            "reason": "expired",
            "routing-keys": ["cus.320.deliver"],
            "time": datetime(2022, 9, 29, 11, 17, 23, tzinfo=UTC),
        },
    ],
    "x-first-death-exchange": "org.320.deliver",
    "x-first-death-queue": "cus.320.deliver",
    "x-first-death-reason": "rejected",
}


def _death(queue: Any, reason: Any, count: Any) -> dict[str, Any]:
    return {"queue": queue, "reason": reason, "count": count}


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(None, 0, id="no-headers"),
        pytest.param({}, 0, id="empty-headers"),
        pytest.param({"x-death": []}, 0, id="empty-x-death"),
        pytest.param({"x-death": "garbage"}, 0, id="x-death-not-a-list"),
        pytest.param({"x-death": b"garbage"}, 0, id="x-death-bytes"),
        pytest.param(PRODUCTION_HEADER, 55613, id="production-header"),
        pytest.param(
            {
                "x-death": [
                    _death("org.320.fail", "expired", 9),
                    _death("cus.320.deliver", "rejected", 4),
                ]
            },
            4,
            id="own-rejected-entry-wins-over-order-and-max",
        ),
        pytest.param(
            {
                "x-death": [
                    _death("cus.999.deliver", "rejected", 7),
                    _death("org.999.fail", "expired", 6),
                ]
            },
            7,
            id="other-queue-falls-back-to-max",
        ),
        pytest.param(
            {
                "x-death": [
                    _death("cus.320.deliver", "expired", 3),
                    _death("org.320.fail", "expired", 2),
                ]
            },
            3,
            id="own-queue-but-not-rejected-falls-back-to-max",
        ),
        pytest.param(
            {"x-death": [_death(b"cus.320.deliver", b"rejected", 2), _death("x", "expired", 5)]},
            2,
            id="bytes-values",
        ),
        pytest.param(
            {
                "x-death": [
                    "junk",
                    _death("x", "expired", "5"),
                    _death("x", "expired", True),
                    _death("x", "rejected", 1),
                ]
            },
            1,
            id="malformed-entries-ignored",
        ),
        pytest.param({"x-death": [_death("cus.320.deliver", "rejected", -1)]}, 0, id="negative"),
    ],
)
def test_retry_count(headers: dict[str, Any] | None, expected: int) -> None:
    assert retry_count(headers, "cus.320.deliver") == expected


def test_quorum_plan_makes_the_org_queues_quorum_queues() -> None:
    classic = plan_topology(N, ALL_ON)
    quorum = plan_topology(N, ALL_ON, quorum=True)
    assert quorum.bindings == classic.bindings and quorum.exchanges == classic.exchanges
    for queue in quorum.queues:
        before = classic.queue(queue.name).arguments
        if queue.name == t.SYSTEM_QUEUE:
            assert queue.arguments == before  # shared by every org: left as it is
            continue
        assert queue.arguments == {**before, **t.QUORUM_ARGUMENTS}, queue.name
        assert queue.arguments["x-dead-letter-strategy"] == "at-least-once"
