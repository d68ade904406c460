"""CRM backends behind one interface (:class:`~proca_sync.crm.base.Backend`).

``backend_from_url`` picks the backend from the URL scheme:

* ``sqlite:///file.db`` (default ``sqlite:///proca-crm.db``), ``postgresql://…`` — the
  embedded SQL CRM (:mod:`proca_sync.crm.sql`);
* ``http://…`` / ``https://…`` — a webhook receiving each record as JSON
  (:mod:`proca_sync.crm.webhook`);
* ``null:`` — accept and drop everything (benchmarks of the consumer itself).
"""

from __future__ import annotations

from proca_sync.crm.base import ApplyResult, Backend, NullBackend
from proca_sync.errors import ConfigError

__all__ = ["ApplyResult", "Backend", "NullBackend", "backend_from_url"]


def backend_from_url(url: str) -> Backend:
    """Build (not open) the backend a URL names. Raises :class:`ConfigError`."""
    scheme = url.split(":", 1)[0].lower()
    if scheme == "null":
        return NullBackend()
    if scheme in {"http", "https"}:
        from proca_sync.crm.webhook import WebhookBackend

        return WebhookBackend(url)
    if scheme.startswith(("sqlite", "postgres")):
        from proca_sync.crm.sql import SqlBackend

        return SqlBackend(url)
    raise ConfigError(f"unknown CRM URL scheme {scheme!r} (sqlite, postgresql, http(s), null)")
