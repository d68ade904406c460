"""``bench.run --merge``: a run carries over the cases it did not measure, and says so."""

from __future__ import annotations

from typing import Any

from bench.run import merge


def doc(generated: str, command: str, cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "generated": generated,
        "command": command,
        "commands": {name: f"{command} {name}" for name in cases},
        "machine": {},
        "settings": {"n": 100, "repeat": 1},
        "cases": cases,
        "profile": {"status": "skipped"},
    }


def test_fresh_cases_win_and_the_rest_is_carried_with_its_run() -> None:
    old = doc("2026-01-01T00:00:00Z", "python -m bench.run",
              {"memory-1m": {"status": "error", "rate": 1.0}, "slow-crm": {"status": "error"}})
    new = doc("2026-02-01T00:00:00Z", "python -m bench.run --skip memory-1m --merge",
              {"slow-crm": {"status": "error", "rate": 9.0}})
    merged = merge(old, new)
    assert merged["generated"] == new["generated"]
    assert merged["cases"]["slow-crm"] == {"status": "error", "rate": 9.0}
    assert merged["cases"]["memory-1m"]["measured"] == old["generated"]
    assert merged["carried"] == {
        "memory-1m": {"measured": old["generated"], "command": old["command"]}
    }
    assert merged["commands"]["slow-crm"].endswith("--merge slow-crm")

    # Carried again by a later run: it keeps the run it was measured in.
    newer = doc("2026-03-01T00:00:00Z", "python -m bench.run --only slow-crm --merge",
                {"slow-crm": {"status": "error", "rate": 10.0}})
    again = merge(merged, newer)
    assert again["carried"]["memory-1m"]["measured"] == old["generated"]
    assert again["cases"]["memory-1m"]["measured"] == old["generated"]
    assert "slow-crm" not in again["carried"]
