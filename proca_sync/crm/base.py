"""The backend interface every CRM implements.

A backend receives :class:`~proca_sync.sync.records.SyncRecord` batches and makes them
durable. The contract, shared by the SQL CRM, the no-op backend and every future SaaS
connector (one contract test suite runs against each):

* ``apply(records)`` returns one :data:`ApplyResult` per record, in order. It returns
  only after what it reports as applied is committed: the consumer acks on that basis.
  A record the CRM refuses for good yields a
  :class:`~proca_sync.errors.PermanentError` in its slot; the others still apply.
* When the CRM cannot be reached (down, timeout, 5xx, 429, database locked) ``apply``
  raises :class:`~proca_sync.errors.TransientError` and nothing of the batch counts as
  applied; the whole batch may be offered again.
* Applying a record twice changes nothing (``"duplicate"`` may be reported).
* ``ping()`` raises :class:`~proca_sync.errors.TransientError` while the CRM is not
  usable; the circuit breaker probes with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from proca_sync.errors import PermanentError
from proca_sync.sync.records import SyncRecord

__all__ = ["ApplyResult", "Backend", "NullBackend"]

ApplyResult = Literal["applied", "duplicate"] | PermanentError


@runtime_checkable
class Backend(Protocol):
    """A CRM as proca-sync sees it.

    A backend may also set ``max_batches`` (an int): how many batches it can apply at
    once. The consumer then runs no more than that many, and forms each when the backend
    is free to take it (a backend without it gets ``--concurrency`` batches at once)."""

    name: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def apply(self, records: Sequence[SyncRecord]) -> Sequence[ApplyResult]: ...


class NullBackend:
    """Accepts everything and stores nothing: measures the consumer's own cost."""

    name = "null"

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def apply(self, records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        return ["applied"] * len(records)
