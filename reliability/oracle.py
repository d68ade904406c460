"""What the CRM must hold: ``proca_sync replay`` of the published bodies, and the comparison.

The expected state of a scenario is what ``python -m proca_sync replay FILE.jsonl`` makes
of the exact bodies that were published, in a CRM of its own (a fresh SQLite file, or a
fresh local HTTP CRM for the webhook backend). The consumer's CRM is then compared with
it:

* **lost** — messages whose effect is missing: applied-message keys (SQL) or record keys
  (webhook) that replay applied and the consumer's CRM lacks, plus poison messages that
  were neither synced nor parked;
* **applied twice** — facts present more often than replay produced them: action rows per
  ``actionId``, consent and e-mail-status facts, contacts (SQL), or a record key the
  webhook CRM answered ``200`` more than once (its ``Idempotency-Key`` seen twice);
* **wrongly parked** — parked messages that are not poison, or parked with another reason
  than the engine gives them.

Besides the counts, the two ``crm export`` documents must be equal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from proca_sync.consumer.parking import ParkingStore
from proca_sync.crm.sql import SqlBackend, applied_messages
from reliability.harness import Context, ScenarioFailure
from reliability.traffic import Stream

__all__ = [
    "Verdict",
    "applied_keys",
    "expected_sql",
    "parked_rows",
    "verdict_sql",
    "verdict_webhook",
]


@dataclass
class Verdict:
    """The counts every scenario reports."""

    sent: int
    synced: int
    expected_synced: int
    parked: dict[str, int]
    lost: int
    applied_twice: int
    wrongly_parked: int
    state_equal: bool
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.applied_twice == 0
            and self.wrongly_parked == 0
            and self.state_equal
            and self.synced == self.expected_synced
        )


def applied_keys(url: str) -> set[str]:
    """The message keys a SQL CRM has committed (its idempotency table)."""
    backend = SqlBackend(url)
    try:
        with backend.engine.connect() as conn:
            return {str(k) for k in conn.execute(select(applied_messages.c.key)).scalars()}
    finally:
        backend.engine.dispose()


def parked_rows(url: str) -> dict[str, tuple[str, int]]:
    """digest → (reason, times parked) of every row of a parking store."""
    store = ParkingStore(url)
    try:
        rows = store.entries(limit=10_000_000)
    finally:
        store.engine.dispose()
    return {row.digest: (row.reason, row.times_parked) for row in rows}


async def export(ctx: Context, label: str, url: str) -> dict[str, Any]:
    """``proca_sync crm export`` (its output is the CRM's personal data: not scanned)."""
    result = await ctx.cli(label, "crm", "export", "--crm", url, scan=False)
    if result.code != 0:
        raise ScenarioFailure(f"crm export failed ({result.code}): {result.stderr.strip()[:300]}")
    data: dict[str, Any] = result.json()
    return data


async def replay(
    ctx: Context,
    label: str,
    stream: Stream,
    directory: Path,
    crm: str,
    *,
    batch: int = 500,
    attempts: int = 1,
) -> dict[str, Any]:
    """Replay the published bodies into ``crm``; the replay summary.

    ``replay`` stops at the first transient CRM error (exit 1, no summary); with
    ``attempts`` > 1 it is run again — safe, since a CRM applies a record only once.
    """
    jsonl = stream.write_jsonl(directory / "published.jsonl")
    for attempt in range(1, attempts + 1):
        result = await ctx.cli(
            f"{label}: replay", "replay", str(jsonl), "--crm", crm,
            "--keys", str(stream.keys_path), "--json", "--batch", str(batch),
        )  # fmt: skip
        if result.code in (0, 1) and result.stdout.strip():
            summary: dict[str, Any] = result.json()
            return summary
        if attempt == attempts:
            break
    raise ScenarioFailure(f"replay failed ({result.code}): {result.stderr.strip()[-300:]}")


@dataclass
class Expected:
    summary: dict[str, Any]
    export: dict[str, Any]
    keys: set[str]


async def expected_sql(ctx: Context, label: str, stream: Stream, directory: Path) -> Expected:
    """The state replay reaches in a fresh SQLite CRM."""
    crm = f"sqlite:///{directory / 'expected.db'}"
    summary = await replay(ctx, label, stream, directory, crm)
    return Expected(summary, await export(ctx, f"{label}: crm export (expected)", crm),
                    applied_keys(crm))  # fmt: skip


def _facts(data: Mapping[str, Any]) -> Counter[tuple[Any, ...]]:
    """Every fact of an export as a multiset: contacts, actions, consents, statuses."""
    facts: Counter[tuple[Any, ...]] = Counter()
    for contact in data["contacts"]:
        who = min(contact["contactRefs"] or contact["emails"] or [""])
        facts[("contact", who)] += 1
        for action in contact["actions"]:
            facts[("action", action["actionId"])] += 1
        for consent in contact["consents"]:
            facts[("consent", who, consent["actionId"], consent["optIn"], consent["givenAt"])] += 1
        for status in contact["emailStatusHistory"]:
            facts[("status", who, status["status"], status["changedAt"])] += 1
    for campaign in data["campaigns"]:
        facts[("campaign", campaign["name"])] += 1
    return facts


def _parking(
    stream: Stream, parked: Mapping[str, tuple[str, int]]
) -> tuple[dict[str, int], int, int, list[str]]:
    """(parked by reason, wrongly parked, poison not parked, details)."""
    by_reason = dict(sorted(Counter(reason for reason, _ in parked.values()).items()))
    details: list[str] = []
    wrong = 0
    for digest, (reason, _) in parked.items():
        expected = stream.poison.get(digest)
        if expected != reason:
            wrong += 1
            if len(details) < 5:
                details.append(f"parked {digest} as {reason}, expected {expected or 'synced'}")
    missing = [d for d in stream.poison if d not in parked]
    if missing:
        details.append(f"{len(missing)} poison message(s) not parked, e.g. {missing[:3]}")
    return by_reason, wrong, len(missing), details


def verdict_sql(
    stream: Stream,
    expected: Expected,
    actual_export: Mapping[str, Any],
    actual_keys: set[str],
    parked: Mapping[str, tuple[str, int]],
) -> Verdict:
    """Compare a SQL CRM and parking store with what replay reached."""
    details: list[str] = []
    lost_keys = expected.keys - actual_keys
    extra_keys = actual_keys - expected.keys
    want, have = _facts(expected.export), _facts(actual_export)
    missing_facts = want - have
    extra_facts = have - want
    if lost_keys:
        details.append(f"{len(lost_keys)} message(s) not applied, e.g. {sorted(lost_keys)[:3]}")
    if extra_keys:
        details.append(
            f"{len(extra_keys)} unexpected message key(s), e.g. {sorted(extra_keys)[:3]}"
        )
    if missing_facts:
        details.append(f"missing facts: {list(missing_facts)[:3]}")
    if extra_facts:
        details.append(f"facts beyond replay's: {list(extra_facts)[:3]}")
    by_reason, wrong, unparked, parking_details = _parking(stream, parked)
    details.extend(parking_details)
    lost_actions = sum(n for (kind, *_), n in missing_facts.items() if kind == "action")
    if lost_actions:
        details.append(f"{lost_actions} action(s) missing")
    equal = dict(actual_export) == expected.export
    if not equal and not (missing_facts or extra_facts):
        details.append("exports differ in field values")
    return Verdict(
        sent=len(stream.items),
        synced=len(actual_keys),
        expected_synced=len(expected.keys),
        parked=by_reason,
        lost=len(lost_keys) + unparked + sum(missing_facts.values()),
        applied_twice=sum(extra_facts.values()) + len(extra_keys),
        wrongly_parked=wrong,
        state_equal=equal,
        details=details,
    )


def verdict_webhook(
    stream: Stream,
    expected_stored: Mapping[str, dict[str, Any]],
    actual_stored: Mapping[str, dict[str, Any]],
    answered_ok: Counter[str],
    parked: Mapping[str, tuple[str, int]],
) -> Verdict:
    """Compare a webhook CRM (what it stored, and how often it answered 200 per key)."""
    details: list[str] = []
    lost = [k for k in expected_stored if k not in actual_stored]
    extra = [k for k in actual_stored if k not in expected_stored]
    twice = {k: n for k, n in answered_ok.items() if n > 1}
    differing = [
        k for k, payload in expected_stored.items()
        if k in actual_stored and actual_stored[k] != payload
    ]  # fmt: skip
    if lost:
        details.append(f"{len(lost)} record(s) never stored, e.g. {lost[:3]}")
    if extra:
        details.append(f"{len(extra)} record(s) replay did not produce, e.g. {extra[:3]}")
    if twice:
        details.append(f"{len(twice)} key(s) answered 200 more than once, e.g. {list(twice)[:3]}")
    if differing:
        details.append(f"{len(differing)} record(s) stored with other content")
    by_reason, wrong, unparked, parking_details = _parking(stream, parked)
    details.extend(parking_details)
    return Verdict(
        sent=len(stream.items),
        synced=len(actual_stored),
        expected_synced=len(expected_stored),
        parked=by_reason,
        lost=len(lost) + unparked,
        applied_twice=sum(n - 1 for n in twice.values()) + len(extra),
        wrongly_parked=wrong,
        state_equal=not (lost or extra or differing),
        details=details,
    )
