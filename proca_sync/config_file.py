"""The TOML configuration file: ``run`` options and ``[destinations.NAME]`` tables.

Found by ``--config FILE``, else the ``PROCA_SYNC_CONFIG`` environment variable, else
``./proca-sync.toml`` when present. Top-level keys are options of ``proca-sync run``
(``crm = "postgresql://…"``, ``batch_size = 200``, ``push = ["brevo"]``; dashes or
underscores); each ``[destinations.NAME]`` table configures one destination (keys of
:class:`~proca_sync.destinations.base.DestinationConfig` and the connector's own).
Command-line options and environment variables win over the file. Secrets never go in
the file: destinations name an environment variable (``api_key_env``) or a file
(``api_key_file``) holding the key, and the broker password stays in ``PROCA_PASSWORD``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proca_sync.destinations import destination_from_config
from proca_sync.destinations.base import Destination
from proca_sync.errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "ConfigFile",
    "build_destinations",
    "find_config",
    "load_config",
]

CONFIG_ENV = "PROCA_SYNC_CONFIG"
DEFAULT_CONFIG_FILE = Path("proca-sync.toml")
_SECRET_KEYS = {"password", "api_key", "apikey", "token", "secret"}


@dataclass(frozen=True, slots=True)
class ConfigFile:
    path: Path | None
    options: dict[str, Any] = field(default_factory=dict)
    """Top-level keys, named as the ``run`` command's parameters (underscores)."""
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)


def find_config(path: Path | None) -> Path | None:
    """The file to read: ``path`` when given (the option or its variable), else the
    default file when it exists."""
    if path is not None:
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_config(path: Path | None) -> ConfigFile:
    """Read and check the file's shape; :class:`ConfigError` naming the problem (a key,
    never a value)."""
    if path is None:
        return ConfigFile(None)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: unreadable ({type(exc).__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    tables = data.pop("destinations", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"config file {path}: 'destinations' must be a table of tables")
    destinations: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"config file {path}: destinations.{name} must be a table")
        for key in table:
            if key.lower() in _SECRET_KEYS:
                raise ConfigError(
                    f"config file {path}: destinations.{name}.{key}: secrets do not go in "
                    "the file (use api_key_env or api_key_file)"
                )
        destinations[name] = dict(table)
    options: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in _SECRET_KEYS:
            raise ConfigError(f"config file {path}: {key}: secrets do not go in the file")
        if isinstance(value, dict):
            raise ConfigError(f"config file {path}: unknown table [{key}]")
        options[name] = value
    return ConfigFile(path, options, destinations)


def build_destinations(config: ConfigFile, names: Iterable[str]) -> list[Destination]:
    """The destinations ``names`` as configured; :class:`ConfigError` for a name the file
    does not define or an invalid table."""
    built = []
    for name in names:
        table: Mapping[str, Any] | None = config.destinations.get(name)
        if table is None:
            where = config.path or "the configuration (no config file found)"
            raise ConfigError(f"destination {name!r} is not defined in {where}")
        built.append(destination_from_config(name, table))
    return built
