"""Every exchange, queue and routing-key name of the Proca topology (spec: topology.md).

This is the only module that spells a name: everything else asks it. It has three layers:

* pure names: :func:`deliver_queue`, :func:`action_routing_key`, … (one org id in, a
  string out);
* a pure plan: :func:`plan_topology` turns an org id and its :class:`OrgFlags` into a
  :class:`Topology` value (exchanges, queues with their exact arguments, bindings to make
  and bindings to remove), so the shape can be tested without a broker;
* broker I/O: :func:`declare_topology` applies a plan (idempotently, like the Proca server
  does at start-up), :func:`inspect_topology` reads queue depths back.

Plus :func:`retry_count`, the reading of the ``x-death`` header (messages.md §8).

A consumer of someone else's Proca must never call :func:`declare_topology`: the server
owns that topology (topology.md §7). It is for our own pipeline and for test brokers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from proca_sync.errors import ConfigError

__all__ = [
    "DEFAULT_RETRY_DELAY_MS",
    "EMAIL_STATUS_KEY",
    "SYSTEM_BINDING_KEY",
    "SYSTEM_QUEUE",
    "Backend",
    "Binding",
    "Exchange",
    "ExchangeKind",
    "OrgFlags",
    "Queue",
    "QueueState",
    "Topology",
    "TopologyError",
    "TopologyReport",
    "action_confirm_exchange",
    "action_confirm_queue",
    "action_routing_key",
    "campaign_updated_key",
    "confirm_created_key",
    "declare_test_org",
    "declare_topology",
    "deliver_exchange",
    "deliver_queue",
    "email_supporter_queue",
    "event_exchange",
    "fail_exchange",
    "fail_queue",
    "inspect_topology",
    "org_queues",
    "plan_topology",
    "retry_count",
    "retry_exchange",
    "sqs_queue",
    "stage_exchange",
    "supporter_confirm_exchange",
    "supporter_confirm_queue",
    "system_routing_key",
    "webhook_queue",
]

DEFAULT_RETRY_DELAY_MS = 30_000
"""What the hosted Proca's broker policy sets for ``org.N.fail`` (topology.md §3.1)."""

SYSTEM_QUEUE = "system.deliver"
"""The one instance-wide queue collecting ``system.*`` messages of every org."""

SYSTEM_BINDING_KEY = "system.*"
EMAIL_STATUS_KEY = "supporter.email_status"
ALL_KEYS = "#"

_WORD = re.compile(r"[A-Za-z0-9_-]+")

ExchangeKind = Literal["topic", "fanout", "direct"]
Backend = Literal["sqs", "webhook"]
StageName = Literal["deliver", "supporter_confirm", "action_confirm", "system"]


# ---- names ------------------------------------------------------------------------------


def _org(org: int) -> int:
    if isinstance(org, bool) or not isinstance(org, int) or org <= 0:
        raise ValueError(f"org id must be a positive integer, not {org!r}")
    return org


def _word(value: str, what: str) -> str:
    if not _WORD.fullmatch(value):
        raise ValueError(f"{what} must match [A-Za-z0-9_-]+, not {value!r}")
    return value


def supporter_confirm_exchange(org: int) -> str:
    return f"org.{_org(org)}.confirm.supporter"


def action_confirm_exchange(org: int) -> str:
    return f"org.{_org(org)}.confirm.action"


def deliver_exchange(org: int) -> str:
    return f"org.{_org(org)}.deliver"


def event_exchange(org: int) -> str:
    return f"org.{_org(org)}.event"


def fail_exchange(org: int) -> str:
    return f"org.{_org(org)}.fail"


def retry_exchange(org: int) -> str:
    return f"org.{_org(org)}.retry"


def fail_queue(org: int) -> str:
    """The queue holding dead letters until they expire; same name as its exchange."""
    return fail_exchange(org)


def supporter_confirm_queue(org: int) -> str:
    return f"cus.{_org(org)}.confirm.supporter"


def action_confirm_queue(org: int) -> str:
    return f"cus.{_org(org)}.confirm.action"


def deliver_queue(org: int) -> str:
    """The custom delivery queue a CRM sync reads (actions and, if enabled, events)."""
    return f"cus.{_org(org)}.deliver"


def email_supporter_queue(org: int) -> str:
    return f"wrk.{_org(org)}.email.supporter"


def sqs_queue(org: int) -> str:
    return f"wrk.{_org(org)}.sqs"


def webhook_queue(org: int) -> str:
    return f"wrk.{_org(org)}.webhook"


def org_queues(org: int) -> tuple[str, ...]:
    """Every ``cus.N.*`` / ``wrk.N.*`` queue the server may create for ``org``."""
    return (
        supporter_confirm_queue(org),
        action_confirm_queue(org),
        deliver_queue(org),
        email_supporter_queue(org),
        sqs_queue(org),
        webhook_queue(org),
    )


def stage_exchange(org: int, stage: StageName | str) -> str:
    """The exchange a message of ``stage`` is published to (messages.md §2.2)."""
    match str(stage):
        case "deliver":
            return deliver_exchange(org)
        case "supporter_confirm":
            return supporter_confirm_exchange(org)
        case "action_confirm":
            return action_confirm_exchange(org)
        case "system":
            return event_exchange(org)
    raise ValueError(f"unknown stage {stage!r}")


def action_routing_key(action_type: str, campaign: str) -> str:
    """``<actionType>.<campaignName>`` — action type first (messages.md §7)."""
    return f"{_word(action_type, 'action type')}.{_word(campaign, 'campaign name')}"


def system_routing_key(name: str) -> str:
    """``system.<name>``: ``join_campaign``, ``new_org``, ``new_user``, ``campaign_updated``."""
    return f"system.{_word(name, 'system message name')}"


def campaign_updated_key() -> str:
    return system_routing_key("campaign_updated")


def confirm_created_key(operation: str) -> str:
    """``confirm_created.<operation>``, e.g. ``confirm_created.launch_page``."""
    return f"confirm_created.{_word(operation, 'confirm operation')}"


# ---- value objects ----------------------------------------------------------------------


@dataclass(frozen=True)
class Exchange:
    name: str
    kind: ExchangeKind
    durable: bool = True


@dataclass(frozen=True)
class Queue:
    """A queue with its declare arguments (kept as sorted pairs so the value is hashable)."""

    name: str
    argument_pairs: tuple[tuple[str, str | int], ...] = ()
    durable: bool = True

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.argument_pairs)

    @classmethod
    def with_arguments(cls, name: str, arguments: Mapping[str, str | int]) -> Queue:
        return cls(name, tuple(sorted(arguments.items())))


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


@dataclass(frozen=True)
class OrgFlags:
    """The org settings that shape its queues (topology.md §2.1, §2.2; API names in docs).

    ``supporter_confirm`` stands for "the org or any of its campaigns has supporter
    confirmation on"; ``email_backend`` for "the org has an e-mail backend".
    """

    custom_supporter_confirm: bool = False
    custom_action_confirm: bool = False
    custom_action_deliver: bool = False
    custom_event_deliver: bool = False
    email_backend: bool = False
    supporter_confirm: bool = False
    push_backend: Backend | None = None
    event_backend: Backend | None = None


@dataclass(frozen=True)
class Topology:
    """The planned state of one org's topology.

    ``bindings`` are made, ``unbindings`` (features switched off) removed; queues are only
    ever declared, never deleted, so a disabled queue keeps its messages and its retry
    binding (topology.md §2.6).
    """

    org: int
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]
    unbindings: tuple[Binding, ...] = ()
    retry_delay_ms: int = DEFAULT_RETRY_DELAY_MS

    def queue(self, name: str) -> Queue:
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)

    @property
    def queue_names(self) -> tuple[str, ...]:
        return tuple(queue.name for queue in self.queues)

    def bindings_of(self, queue: str) -> tuple[Binding, ...]:
        return tuple(b for b in self.bindings if b.queue == queue)


@dataclass(frozen=True)
class QueueState:
    """What a passive declare tells about a queue (``exists=False``: counts are 0)."""

    name: str
    exists: bool
    messages: int = 0
    consumers: int = 0


@dataclass(frozen=True)
class TopologyReport:
    org: int
    queues: tuple[QueueState, ...]
    bindings: tuple[Binding, ...]

    def state(self, name: str) -> QueueState:
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)


class TopologyError(ConfigError):
    """The broker refused the topology (existing entity with other arguments, no rights)."""


# ---- the plan ---------------------------------------------------------------------------


QUORUM_ARGUMENTS: dict[str, str | int] = {
    "x-queue-type": "quorum",
    # Dead-lettering of a quorum queue is at most once unless asked otherwise; the
    # retry circuit must not drop a message when a node fails mid-way. At-least-once
    # dead-lettering requires the reject-publish overflow mode.
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}
"""Declare arguments of an org's queues on a RabbitMQ cluster (``topology declare
--quorum``): replicated Raft queues that survive a node's loss (RabbitMQ ≥ 3.10 for
message TTL and at-least-once dead-lettering)."""


def _dead_lettered(org: int, name: str, quorum: bool = False) -> Queue:
    arguments: dict[str, str | int] = {
        "x-dead-letter-exchange": fail_exchange(org),
        "x-dead-letter-routing-key": name,
    }
    if quorum:
        arguments.update(QUORUM_ARGUMENTS)
    return Queue.with_arguments(name, arguments)


def plan_topology(
    org: int,
    flags: OrgFlags,
    *,
    retry_delay_ms: int = DEFAULT_RETRY_DELAY_MS,
    quorum: bool = False,
) -> Topology:
    """What the Proca server declares for ``org`` with ``flags`` (pure, no I/O).

    Unlike the server, the fail queue gets an explicit ``x-message-ttl`` of
    ``retry_delay_ms`` so the retry circuit works without a broker policy. With
    ``quorum`` the org's queues (its fail queue included) are quorum queues
    (:data:`QUORUM_ARGUMENTS`); the shared ``system.deliver`` queue stays as it is.
    Raises :class:`ValueError` for a non-positive org id or delay.
    """
    _org(org)
    if isinstance(retry_delay_ms, bool) or retry_delay_ms <= 0:
        raise ValueError(f"retry delay must be a positive number of ms, not {retry_delay_ms!r}")

    sup_x = supporter_confirm_exchange(org)
    act_x = action_confirm_exchange(org)
    del_x = deliver_exchange(org)
    evt_x = event_exchange(org)
    # (stage exchange, queue, enabled) — each row is one "#" binding of topology.md §2.
    rules: list[tuple[str, str, bool]] = [
        (sup_x, supporter_confirm_queue(org), flags.custom_supporter_confirm),
        (act_x, action_confirm_queue(org), flags.custom_action_confirm),
        (del_x, deliver_queue(org), flags.custom_action_deliver),
        (evt_x, deliver_queue(org), flags.custom_event_deliver),
        (sup_x, email_supporter_queue(org), flags.email_backend and flags.supporter_confirm),
        (del_x, email_supporter_queue(org), flags.email_backend),
        (del_x, sqs_queue(org), flags.push_backend == "sqs"),
        (evt_x, sqs_queue(org), flags.event_backend == "sqs"),
        (del_x, webhook_queue(org), flags.push_backend == "webhook"),
        (evt_x, webhook_queue(org), flags.event_backend == "webhook"),
    ]

    exchanges = (
        Exchange(sup_x, "topic"),
        Exchange(act_x, "topic"),
        Exchange(del_x, "topic"),
        Exchange(evt_x, "topic"),
        Exchange(fail_exchange(org), "fanout"),
        Exchange(retry_exchange(org), "direct"),
    )
    enabled_queues = [
        name for name in org_queues(org) if any(q == name and on for _, q, on in rules)
    ]
    queues = [_dead_lettered(org, name, quorum) for name in enabled_queues]
    fail_arguments: dict[str, str | int] = {
        "x-dead-letter-exchange": retry_exchange(org),
        "x-message-ttl": retry_delay_ms,
    }
    if quorum:
        fail_arguments.update(QUORUM_ARGUMENTS)
    queues.append(Queue.with_arguments(fail_queue(org), fail_arguments))
    queues.append(Queue(SYSTEM_QUEUE))

    bindings = [Binding(x, q, ALL_KEYS) for x, q, on in rules if on]
    bindings += [Binding(retry_exchange(org), name, name) for name in enabled_queues]
    bindings.append(Binding(fail_exchange(org), fail_queue(org), ""))
    bindings.append(Binding(evt_x, SYSTEM_QUEUE, SYSTEM_BINDING_KEY))
    unbindings = [Binding(x, q, ALL_KEYS) for x, q, on in rules if not on]
    return Topology(
        org=org,
        exchanges=exchanges,
        queues=tuple(queues),
        bindings=tuple(bindings),
        unbindings=tuple(unbindings),
        retry_delay_ms=retry_delay_ms,
    )


# ---- broker I/O -------------------------------------------------------------------------


def _mismatch(what: str, exc: BaseException, topology: Topology) -> TopologyError:
    hint = ""
    if what == fail_queue(topology.org):
        hint = (
            f" — the fail queue probably exists with another x-message-ttl (or none, when a"
            f" broker policy sets the delay); keep its current delay or delete {what!r}"
            f" (its waiting messages are lost) before declaring with"
            f" {topology.retry_delay_ms} ms"
        )
    return TopologyError(f"{what} exists with other settings: {exc}{hint}")


async def declare_topology(channel: AbstractChannel, topology: Topology) -> None:
    """Make the broker match ``topology``: declare, bind, then unbind what is switched off.

    Idempotent: running it again with the same plan changes nothing. Queues are never
    deleted or purged. Raises :class:`TopologyError` when an exchange or queue exists with
    other arguments (the broker answers 406 PRECONDITION_FAILED and closes ``channel``) or
    when the user may not configure it (403).
    """
    for exchange in topology.exchanges:
        try:
            await channel.declare_exchange(
                exchange.name, aio_pika.ExchangeType(exchange.kind), durable=exchange.durable
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise _mismatch(exchange.name, exc, topology) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise TopologyError(f"not allowed to declare {exchange.name}: {exc}") from None
    declared: dict[str, AbstractQueue] = {}
    for queue in topology.queues:
        try:
            declared[queue.name] = await channel.declare_queue(
                queue.name, durable=queue.durable, arguments=queue.arguments or None
            )
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise _mismatch(queue.name, exc, topology) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise TopologyError(f"not allowed to declare {queue.name}: {exc}") from None
    for binding in topology.bindings:
        # Binding through the declared queue object lets a robust channel restore it.
        queue_ref = declared.get(binding.queue) or await channel.get_queue(
            binding.queue, ensure=False
        )
        await queue_ref.bind(binding.exchange, binding.routing_key)
    for binding in topology.unbindings:
        # Unbinding what is not bound (or a queue never created) is a no-op for RabbitMQ.
        queue_ref = declared.get(binding.queue) or await channel.get_queue(
            binding.queue, ensure=False
        )
        await queue_ref.unbind(binding.exchange, binding.routing_key)


async def declare_test_org(
    channel: AbstractChannel,
    org: int,
    *,
    retry_delay_ms: int = DEFAULT_RETRY_DELAY_MS,
    flags: OrgFlags | None = None,
    quorum: bool = False,
) -> Topology:
    """Declare an org with custom action and event delivery on (a sync's usual setup)."""
    topology = plan_topology(
        org,
        flags or OrgFlags(custom_action_deliver=True, custom_event_deliver=True),
        retry_delay_ms=retry_delay_ms,
        quorum=quorum,
    )
    await declare_topology(channel, topology)
    return topology


async def _probe(connection: AbstractConnection, names: Iterable[str]) -> list[QueueState]:
    states: list[QueueState] = []
    channel: AbstractChannel | None = None
    try:
        for name in names:
            if channel is None or channel.is_closed:
                channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                states.append(QueueState(name, exists=False))
                channel = None  # the broker closed it
                continue
            result = queue.declaration_result
            states.append(
                QueueState(
                    name,
                    exists=True,
                    messages=int(result.message_count or 0),
                    consumers=int(result.consumer_count or 0),
                )
            )
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()
    return states


async def inspect_topology(
    connection: AbstractConnection,
    org: int,
    flags: OrgFlags | None = None,
    *,
    retry_delay_ms: int = DEFAULT_RETRY_DELAY_MS,
) -> TopologyReport:
    """Queue depths of every queue the org may have, and the bindings ``flags`` plan.

    Uses passive declares only (changes nothing); a missing queue closes the probing
    channel, so probes run on channels of their own, never on a caller's channel.
    """
    names = [*org_queues(org), fail_queue(org), SYSTEM_QUEUE]
    states = await _probe(connection, names)
    plan = plan_topology(org, flags or OrgFlags(), retry_delay_ms=retry_delay_ms)
    return TopologyReport(org=org, queues=tuple(states), bindings=plan.bindings)


# ---- x-death ----------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def retry_count(headers: Mapping[str, Any] | None, queue: str) -> int:
    """How many fail→retry cycles a message went through for ``queue`` (messages.md §8).

    The ``count`` of the ``x-death`` entry for ``queue`` with reason ``rejected``; if there
    is none, the largest ``count`` of any entry; 0 without a (usable) header. Never raises.
    """
    if not headers:
        return 0
    deaths = headers.get("x-death")
    if not isinstance(deaths, Sequence) or isinstance(deaths, str | bytes):
        return 0
    counts: list[int] = []
    for entry in deaths:
        if not isinstance(entry, Mapping):
            continue
        count = entry.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            continue
        if _text(entry.get("queue")) == queue and _text(entry.get("reason")) == "rejected":
            return count
        counts.append(count)
    return max(counts, default=0)
