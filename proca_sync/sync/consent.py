"""Consent and e-mail status: the subscription rules of sync.md §5–§7.

Pure functions. The stored state keeps three facts per contact — whether any
consent-bearing action opted in, the newest e-mail status, and whether the address was
confirmed by double opt-in — and the subscription is derived from them, never stored
independently, so it cannot drift from its inputs.
"""

from __future__ import annotations

__all__ = [
    "NEGATIVE_STATUSES",
    "is_subscribed",
    "status_stamp",
]

DOUBLE_OPT_IN = "double_opt_in"
NEGATIVE_STATUSES = frozenset({"bounce", "blocked", "spam", "unsub", "inactive"})
_NEUTRAL = frozenset({None, "active"})

# When two statuses carry the same change time, the stronger one wins, so the result
# does not depend on arrival order: an objection beats a confirmation beats nothing.
_SEVERITY = {None: 0, "active": 0, DOUBLE_OPT_IN: 1}


def _severity(status: str | None) -> int:
    if status in _SEVERITY:
        return _SEVERITY[status]
    return 3 if status in NEGATIVE_STATUSES else 2


def status_stamp(status: str | None, changed_at_key: str) -> str:
    """Sortable stamp of a status fact: change time, then severity, then the value."""
    return f"{changed_at_key}|{_severity(status)}|{status or ''}"


def is_subscribed(*, opted_in: bool, email_status: str | None) -> bool:
    """May this contact be mailed?

    * ``bounce``, ``blocked``, ``spam``, ``unsub``, ``inactive`` and unknown statuses:
      no, whatever the consent (the person objects or the address is bad);
    * ``double_opt_in``: yes — the supporter confirmed the address by clicking the
      double-opt-in link, which is itself a consent (sync.md §5, DOI policy);
    * no status (or ``active``): yes exactly when a consent-bearing action opted in.
    """
    if email_status in _NEUTRAL:
        return opted_in
    return email_status == DOUBLE_OPT_IN
