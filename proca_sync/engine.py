"""The path every message takes, shared by ``replay`` and the queue consumer.

``prepare`` is the pure half — decode, upgrade, decrypt, model — and raises only
:class:`~proca_sync.errors.PermanentError`. ``Engine.apply`` hands the resulting records
to the backend, batching them in one commit. The consumer adds acks, retries and parking
around exactly these two calls, so a stream replayed from files and the same stream
consumed from RabbitMQ reach the same CRM state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from proca_sync.crm.base import ApplyResult, Backend
from proca_sync.crypto import Keystore, decrypt_message
from proca_sync.errors import PermanentError
from proca_sync.messages.decode import decode
from proca_sync.sync.model import Options, body_digest, model_message
from proca_sync.sync.records import Ignored, SyncRecord

__all__ = ["Engine", "Summary"]


@dataclass
class Summary:
    """Per-outcome totals. Holds ids and reason codes only, never message content."""

    synced: int = 0
    duplicates: int = 0
    ignored: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return (
            self.synced + self.duplicates + sum(self.ignored.values()) + sum(self.rejected.values())
        )

    def count_result(self, result: ApplyResult) -> None:
        if result == "applied":
            self.synced += 1
        elif result == "duplicate":
            self.duplicates += 1
        elif isinstance(result, PermanentError):
            self.rejected[str(result.reason)] += 1

    def as_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "synced": self.synced,
            "duplicates": self.duplicates,
            "ignored": dict(sorted(self.ignored.items())),
            "rejected": dict(sorted(self.rejected.items())),
        }


class Engine:
    """Decode → decrypt → model; then apply to a backend."""

    def __init__(
        self, *, backend: Backend, keystore: Keystore | None = None, options: Options | None = None
    ) -> None:
        self.backend = backend
        self.keystore = keystore
        self.options = options or Options()

    def prepare(self, body: bytes) -> SyncRecord | Ignored:
        """Turn one raw body into the record to apply, or the reason to ignore it.

        Pure and deterministic. Raises :class:`PermanentError` (decode or decrypt
        failure, with its reason code); never anything else for any input bytes.
        """
        message = decrypt_message(decode(body), self.keystore)
        return model_message(message, self.options, digest=body_digest(body))

    async def apply(self, records: Sequence[SyncRecord]) -> Sequence[ApplyResult]:
        """Apply records in one backend batch. Raises :class:`TransientError` for retry."""
        return await self.backend.apply(records)

    async def run(self, bodies: Iterable[bytes], *, batch_size: int = 500) -> Summary:
        """Process bodies in order, committing in batches; for replay and parked retries."""
        summary = Summary()
        batch: list[SyncRecord] = []
        for body in bodies:
            try:
                prepared = self.prepare(body)
            except PermanentError as exc:
                summary.rejected[str(exc.reason)] += 1
                continue
            if isinstance(prepared, Ignored):
                summary.ignored[str(prepared.reason)] += 1
                continue
            batch.append(prepared)
            if len(batch) >= batch_size:
                for result in await self.apply(batch):
                    summary.count_result(result)
                batch = []
        if batch:
            for result in await self.apply(batch):
                summary.count_result(result)
        return summary
