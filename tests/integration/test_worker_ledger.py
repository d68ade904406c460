"""The e-mail sent-ledger on a real SQLite file and a real PostgreSQL schema: claims,
the ambiguous window, retries after a failure, marks carried by the next claim, repeats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from proca_sync.pipeline.workers.ledger import Claim, SentLedger, SentState


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SentLedger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    store = SentLedger(url)
    store.open_sync()
    yield store
    store.engine.dispose()


def test_claims_and_the_ambiguous_window(ledger: SentLedger) -> None:
    big = 2**40  # action ids are 64-bit
    assert ledger.claim_sync(big, "thank_you", "<m1>", 7) is Claim.CLAIMED
    # Found "sending" again: the process died inside the window → never resent.
    assert ledger.claim_sync(big, "thank_you", "<m1>", 7) is Claim.AMBIGUOUS
    assert ledger.states()[(big, "thank_you")] == "ambiguous"
    assert ledger.claim_sync(big, "thank_you", "<m1>", 7) is Claim.AMBIGUOUS

    # Another kind of the same action is its own row.
    assert ledger.claim_sync(big, "confirm", "<m2>", 7) is Claim.CLAIMED
    # The next claim marks the previous e-mail sent in the same commit.
    assert ledger.claim_sync(2, "thank_you", "<m3>", 7, [(big, "confirm")]) is Claim.CLAIMED
    assert ledger.claim_sync(big, "confirm", "<m2>", 7) is Claim.SENT

    # A sure failure (4xx) or a refusal (5xx, replayed later) may be claimed again.
    ledger.mark_sync(2, "thank_you", SentState.FAILED)
    assert ledger.claim_sync(2, "thank_you", "<m3>", 7) is Claim.CLAIMED
    ledger.mark_sync(2, "thank_you", SentState.REJECTED)
    assert ledger.claim_sync(2, "thank_you", "<m3>", 7) is Claim.CLAIMED
    ledger.finish_sync([(2, "thank_you")], [])
    assert ledger.claim_sync(2, "thank_you", "<m3>", 7) is Claim.SENT
    assert ledger.counts() == {"ambiguous": 1, "sent": 2}


def test_repeats_are_same_page_only(ledger: SentLedger) -> None:
    ledger.finish_sync([], [(10, "ref-a", 1), (20, "ref-b", 1)])
    ledger.finish_sync([], [(10, "ref-a", 1)])  # noted twice: once
    assert ledger.earlier_on_page_sync(11, "ref-a", 1)
    assert not ledger.earlier_on_page_sync(11, "ref-a", 2)   # another page
    assert not ledger.earlier_on_page_sync(9, "ref-a", 1)    # only earlier actions count
    assert not ledger.earlier_on_page_sync(11, "ref-c", 1)
