"""Destinations: the CRMs people use (Brevo, Mailchimp, CiviCRM, HubSpot, ActiveCampaign,
Action Network, files), kept in sync from the embedded CRM through its change log.

``base`` holds the connector interface and the views a connector is handed, ``http`` the
rate-limited client the SaaS connectors share. Each connector is one module named after
its product; :data:`TYPES` maps a ``type`` key of the configuration file to it, imported
only when configured (each may need an optional extra).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from proca_sync.destinations.base import Destination, DestinationConfig
from proca_sync.errors import ConfigError

__all__ = ["TYPES", "destination_from_config"]

TYPES: dict[str, str] = {
    # type key → "module:Class"; each connector adds its line.
    "csv": "proca_sync.destinations.files:CsvDestination",
    "jsonl": "proca_sync.destinations.files:JsonlDestination",
}


def destination_class(type_: str) -> Any:
    """The connector class for a ``type`` key; :class:`ConfigError` when unknown."""
    try:
        target = TYPES[type_]
    except KeyError:
        known = ", ".join(sorted(TYPES)) or "none"
        raise ConfigError(f"unknown destination type {type_!r} (known: {known})") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def destination_from_config(name: str, table: Mapping[str, Any]) -> Destination:
    """Build the destination ``[destinations.NAME]`` describes; :class:`ConfigError` when
    the table is invalid (the message names the key, never a value)."""
    type_ = table.get("type")
    if not isinstance(type_, str):
        raise ConfigError(f"destination {name!r}: missing 'type'")
    cls = destination_class(type_)
    config_model: type[DestinationConfig] = cls.Config
    try:
        config = config_model.model_validate(dict(table))
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "table"
        raise ConfigError(f"destination {name!r}: {where}: {first['msg']}") from None
    destination: Destination = cls(name, config)
    return destination
