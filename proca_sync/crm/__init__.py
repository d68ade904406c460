"""CRM backends behind one interface (:class:`~proca_sync.crm.base.Backend`).

``backend_from_url`` picks the backend from the URL scheme:

* ``sqlite:///file.db`` (default ``sqlite:///proca-crm.db``), ``postgresql://…`` — the
  embedded SQL CRM (:mod:`proca_sync.crm.sql`);
* ``http://…`` / ``https://…`` — a webhook receiving each record as JSON
  (:mod:`proca_sync.crm.webhook`);
* ``null:`` — accept and drop everything (benchmarks of the consumer itself).
"""

from __future__ import annotations

from typing import Any

from proca_sync.crm.base import ApplyResult, Backend, NullBackend
from proca_sync.errors import ConfigError

__all__ = ["CRM_SCHEMES", "ApplyResult", "Backend", "NullBackend", "backend_from_url"]


CRM_SCHEMES = "sqlite:///file.db, postgresql://user@host/db, http(s)://… (webhook), null:"
"""Every CRM URL form ``backend_from_url`` accepts, for help texts and errors."""


def backend_from_url(url: str, **webhook: Any) -> Backend:
    """Build (not open) the backend a URL names; ``webhook`` options go to
    :class:`~proca_sync.crm.webhook.WebhookBackend`. Raises :class:`ConfigError` for an
    unknown scheme, a bare path (``crm.db``) or a SQLite file whose folder is missing.
    """
    if ":" not in url:
        from proca_sync.crm.sql import check_store_url

        check_store_url(url, what="CRM")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "null":
        return NullBackend()
    if scheme in {"http", "https"}:
        from proca_sync.crm.webhook import WebhookBackend

        return WebhookBackend(url, **webhook)
    if scheme.startswith(("sqlite", "postgres")):
        from proca_sync.crm.sql import SqlBackend

        return SqlBackend(url)
    raise ConfigError(f"unknown CRM URL scheme {scheme!r}; write one of: {CRM_SCHEMES}")
