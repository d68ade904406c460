"""The one outcome policy: what happens to a delivery after its handling.

Pure: a :func:`decide` call looks at the handling result, the attempts already spent and
the breaker, and returns a :class:`Decision`; the runner carries it out. Nothing else in
proca-sync maps an error class to ack / retry / park (STYLE.md).

==========================================  ==========================================
result                                      outcome
==========================================  ==========================================
``"applied"`` (CRM committed)               ``ACK``
``"duplicate"`` (already in the CRM)        ``ACK``
:class:`~proca_sync.sync.records.Ignored`   ``ACK``
:class:`~proca_sync.errors.PermanentError`  ``PARK`` with its reason, then ack
:class:`~proca_sync.errors.TransientError`  ``HOLD`` while the breaker is open (no retry
or any other exception                      spent); ``RETRY`` while attempts < max;
                                            else ``PARK`` (``retries_exhausted``)
==========================================  ==========================================

``attempts`` counts earlier fail→retry cycles (:func:`attempts_of`): 0 on the first
delivery, so a message is tried ``max_retries + 1`` times before it is parked. The
runner decides the breaker's half-open probe (one message) as if the breaker were
closed: when the CRM answers its ping but that message still fails, it spends a retry,
so a message that always fails cannot hold the breaker open for ever.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from proca_sync.crm.base import ApplyResult
from proca_sync.errors import PermanentError, Reason, TransientError
from proca_sync.pipeline.topology import retry_count
from proca_sync.sync.records import Ignored

__all__ = ["ATTEMPTS_HEADER", "Decision", "Outcome", "attempts_of", "decide", "describe"]

ATTEMPTS_HEADER = "x-proca-sync-attempts"
"""Header a local retry (``--retry-mode local``) sets on the republished copy."""


class Outcome(StrEnum):
    """What the runner does with a delivery."""

    ACK = "ack"
    """Done (applied, duplicate or ignored): acknowledge."""
    RETRY = "retry"
    """Try again later: reject without requeue (dead-letter circuit) or local requeue."""
    PARK = "park"
    """Store body, headers and reason durably, then acknowledge."""
    HOLD = "hold"
    """Keep it unacked at the head of its lane until the circuit breaker closes."""


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Outcome
    label: str
    """What to count and log: ``applied``, ``duplicate``, ``ignored:<why>``, a reason code,
    or the error class for retries."""
    reason: Reason | None = None
    detail: str = ""


def describe(error: BaseException) -> str:
    """An error as text for logs and the parking store: class and message, no payload.

    Our errors never carry personal data; for foreign exceptions only the class is kept,
    since their message may quote a payload.
    """
    if isinstance(error, TransientError | PermanentError):
        return f"{type(error).__name__}: {error}"
    return type(error).__name__


def decide(
    result: ApplyResult | Ignored | BaseException,
    *,
    attempts: int,
    max_retries: int,
    breaker_closed: bool = True,
) -> Decision:
    """The outcome of one handled delivery (see the module table). Never raises."""
    if isinstance(result, Ignored):
        return Decision(Outcome.ACK, f"ignored:{result.reason}")
    if isinstance(result, PermanentError):
        return Decision(Outcome.PARK, str(result.reason), result.reason, describe(result))
    if isinstance(result, BaseException):
        if not breaker_closed:
            return Decision(Outcome.HOLD, "held", detail=describe(result))
        if attempts >= max_retries:
            return Decision(
                Outcome.PARK,
                str(Reason.RETRIES_EXHAUSTED),
                Reason.RETRIES_EXHAUSTED,
                f"after {attempts + 1} attempt(s): {describe(result)}",
            )
        return Decision(Outcome.RETRY, type(result).__name__, detail=describe(result))
    if result == "duplicate":
        return Decision(Outcome.ACK, "duplicate")
    return Decision(Outcome.ACK, "applied")


def attempts_of(headers: Mapping[str, Any] | None, queue: str) -> int:
    """Earlier failed attempts of a delivery from ``queue``.

    The larger of the dead-letter count (``x-death``: the entry of this queue with reason
    ``rejected``, else the largest count) and our local-retry header. 0 on a first
    delivery. Never raises.
    """
    local = 0
    if headers:
        value = headers.get(ATTEMPTS_HEADER)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            local = value
    return max(retry_count(headers, queue), local)
