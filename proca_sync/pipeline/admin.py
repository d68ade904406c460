"""Creating and inspecting the pipeline's orgs, campaigns, pages and keys (the CLI's and
the tests' way in). Campaign changes queue a ``campaign_updated`` event (store before
publish, like every other message). Nothing here returns personal data."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from proca_sync.crypto import b64decode
from proca_sync.errors import ConfigError
from proca_sync.pipeline.app import api_key_digest
from proca_sync.pipeline.processing import Processor
from proca_sync.pipeline.state import api_keys, campaigns, org_keys, orgs, pages

__all__ = [
    "ORG_FLAGS",
    "add_campaign",
    "add_org",
    "add_org_key",
    "add_page",
    "list_rows",
    "new_api_key",
    "set_org_flags",
    "update_campaign",
]

ORG_FLAGS = (
    "custom_supporter_confirm",
    "custom_action_confirm",
    "custom_action_deliver",
    "custom_event_deliver",
    "supporter_confirm",
    "email_backend",
    "high_security",
)


def _now() -> datetime:
    return datetime.now(UTC)


def add_org(engine: Engine, *, org_id: int, name: str, title: str, **flags: bool) -> None:
    unknown = set(flags) - set(ORG_FLAGS)
    if unknown:
        raise ConfigError(f"unknown org flags: {sorted(unknown)}")
    values = {flag: bool(flags.get(flag, False)) for flag in ORG_FLAGS}
    with engine.begin() as conn:
        conn.execute(
            insert(orgs).values(id=org_id, name=name, title=title, updated_at=_now(), **values)
        )


def set_org_flags(engine: Engine, org_id: int, **flags: bool) -> None:
    unknown = set(flags) - set(ORG_FLAGS)
    if unknown:
        raise ConfigError(f"unknown org flags: {sorted(unknown)}")
    with engine.begin() as conn:
        done = conn.execute(
            update(orgs).where(orgs.c.id == org_id).values(updated_at=_now(), **flags)
        ).rowcount
    if not done:
        raise ConfigError(f"no org {org_id}")


def add_campaign(
    engine: Engine,
    *,
    campaign_id: int,
    name: str,
    title: str,
    org_id: int,
    external_id: int | None = None,
    supporter_confirm: bool | None = None,
    action_confirm: bool | None = None,
    force_delivery: bool = False,
    config: dict[str, Any] | None = None,
) -> None:
    """Create a campaign and queue its ``campaign_updated`` event (an upsert in Proca)."""
    now = _now()
    with engine.begin() as conn:
        conn.execute(
            insert(campaigns).values(
                id=campaign_id,
                name=name,
                title=title,
                org_id=org_id,
                external_id=external_id,
                contact_schema="basic",
                supporter_confirm=supporter_confirm,
                action_confirm=action_confirm,
                force_delivery=force_delivery,
                config=config or {},
                updated_at=now,
            )
        )
        Processor.campaign_updated(conn, campaign_id, now)


def update_campaign(engine: Engine, campaign_id: int, **values: Any) -> None:
    """Change campaign columns and queue ``campaign_updated`` to the owner."""
    now = _now()
    with engine.begin() as conn:
        done = conn.execute(
            update(campaigns).where(campaigns.c.id == campaign_id).values(updated_at=now, **values)
        ).rowcount
        if not done:
            raise ConfigError(f"no campaign {campaign_id}")
        Processor.campaign_updated(conn, campaign_id, now)


def add_page(
    engine: Engine,
    *,
    page_id: int,
    name: str,
    locale: str,
    campaign_id: int,
    org_id: int,
    delivery: bool = True,
    thank_you_template: str | None = None,
    supporter_confirm_template: str | None = None,
    location: str | None = None,
) -> None:
    with engine.begin() as conn:
        conn.execute(
            insert(pages).values(
                id=page_id,
                name=name,
                locale=locale,
                campaign_id=campaign_id,
                org_id=org_id,
                delivery=delivery,
                thank_you_template=thank_you_template,
                supporter_confirm_template=supporter_confirm_template,
                location=location,
            )
        )


def add_org_key(engine: Engine, org_id: int, public: str) -> int:
    """Register the public key the org's data is encrypted for; it replaces older ones."""
    try:
        if len(b64decode(public)) != 32:
            raise ValueError
    except ValueError:
        raise ConfigError("the public key must be 32 bytes in base64url") from None
    with engine.begin() as conn:
        conn.execute(update(org_keys).where(org_keys.c.org_id == org_id).values(active=False))
        key_id = conn.execute(
            insert(org_keys).values(
                org_id=org_id, public=public.rstrip("="), active=True, created_at=_now()
            )
        ).inserted_primary_key[0]  # type: ignore[index]
    return int(key_id)


def new_api_key(engine: Engine, org_id: int) -> str:
    """A new management API key for ``org_id``; only its digest is stored."""
    key = "psk_" + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        if conn.execute(select(orgs.c.id).where(orgs.c.id == org_id)).first() is None:
            raise ConfigError(f"no org {org_id}")
        conn.execute(
            insert(api_keys).values(org_id=org_id, digest=api_key_digest(key), created_at=_now())
        )
    return key


def list_rows(engine: Engine, what: str) -> list[dict[str, Any]]:
    """Rows of ``orgs``, ``campaigns``, ``pages`` or ``keys`` (public keys only)."""
    table = {"orgs": orgs, "campaigns": campaigns, "pages": pages, "keys": org_keys}[what]
    with engine.connect() as conn:
        rows = conn.execute(select(table).order_by(table.c.id)).mappings().all()
    return [dict(row) for row in rows]
