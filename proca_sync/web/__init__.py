"""The web console (``proca-sync web``): dashboard, parked messages, destinations,
contacts, behind local accounts. Needs the ``web`` extra."""

from __future__ import annotations

__all__: list[str] = []
