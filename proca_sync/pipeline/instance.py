"""The pipeline instance's secrets: contactRef seed, instance key pair, webhook secret.

They live in one JSON file (created 0600, path from ``--secrets`` / ``PROCA_PIPELINE_SECRETS``)
and are never printed. The instance key is the sender (``signKey``) of every encrypted
record (crypto.md §1); the seed makes ``contactRef`` unguessable (messages.md §2.7.1).
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from proca_sync.crypto import KeyPair, Keystore, b64decode, b64encode
from proca_sync.errors import ConfigError

__all__ = ["InstanceSecrets"]


@dataclass(frozen=True)
class InstanceSecrets:
    seed: bytes = field(repr=False)
    instance_key: KeyPair = field(repr=False)
    webhook_secret: str = field(repr=False)
    instance_key_id: int = 1

    @classmethod
    def generate(cls) -> InstanceSecrets:
        return cls(
            seed=secrets.token_bytes(32),
            instance_key=KeyPair.generate(),
            webhook_secret=secrets.token_urlsafe(32),
        )

    def save(self, path: Path) -> None:
        """Write the file 0600 (refuses to overwrite an existing one)."""
        document = {
            "contactRefSeed": b64encode(self.seed),
            "instanceKey": {
                "public": self.instance_key.public,
                "private": self.instance_key.private,
            },
            "instanceKeyId": self.instance_key_id,
            "webhookSecret": self.webhook_secret,
        }
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(orjson.dumps(document, option=orjson.OPT_INDENT_2))

    @classmethod
    def load(cls, path: Path) -> InstanceSecrets:
        """Read the file; :class:`ConfigError` (never the content) when it is unusable."""
        try:
            document = orjson.loads(path.read_bytes())
            key = document["instanceKey"]
            pair = KeyPair(public=str(key["public"]), private=str(key["private"]))
            Keystore([pair])  # checks the pair
            seed = b64decode(str(document["contactRefSeed"]))
            webhook = str(document["webhookSecret"])
            key_id = int(document.get("instanceKeyId", 1))
        except OSError as exc:
            raise ConfigError(f"secrets file {path}: {exc.strerror}") from None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(f"secrets file {path}: not a pipeline secrets file") from None
        if len(seed) < 16 or not webhook:
            raise ConfigError(f"secrets file {path}: seed or webhook secret too short")
        return cls(seed=seed, instance_key=pair, webhook_secret=webhook, instance_key_id=key_id)
