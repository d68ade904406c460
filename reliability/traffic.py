"""The messages a scenario publishes: simulated Proca traffic, poison of every kind.

Good traffic comes from :func:`proca_sync.pipeline.simulate.plan_traffic` (supporter
journeys, most of them encrypted for the org's key, e-mail status events, campaign
updates, ignored events). Poison comes from the simulator's own kinds
(:data:`~proca_sync.pipeline.simulate.POISON_KINDS`) plus the builders below for the
classes it lacks (huge bodies, empty objects, deep nesting, wrong ``personalInfo`` types,
undecryptable plaintext, malformed v1 and events). Every poison kind has the reason it
must be parked with in :data:`EXPECTED_REASONS`; :func:`build_stream` checks the engine
agrees before anything is published, so a misclassification shows up as a failed build,
not as a vague mismatch later.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from nacl.public import Box, PrivateKey, PublicKey

from proca_sync.crm.base import NullBackend
from proca_sync.crypto import KeyPair, Keystore, b64decode, b64encode
from proca_sync.engine import Engine
from proca_sync.errors import PermanentError, Reason
from proca_sync.pipeline.simulate import POISON_KINDS, Planned, derive_keypair, plan_traffic
from proca_sync.pipeline.topology import deliver_exchange, event_exchange
from proca_sync.sync.model import body_digest
from proca_sync.sync.records import Ignored

__all__ = ["EXPECTED_REASONS", "EXTRA_POISON_KINDS", "Stream", "build_stream"]

EXTRA_POISON_KINDS: tuple[str, ...] = (
    "empty_object",
    "binary_garbage",
    "deep_nesting",
    "personal_info_not_object",
    "invalid_plaintext",
    "v1_missing_fields",
    "event_without_type",
    "email_status_without_supporter",
    "string_action_id",
    "huge_truncated",
)
"""Poison classes built here, beyond the simulator's."""

EXPECTED_REASONS: dict[str, Reason] = {
    "truncated_json": Reason.INVALID_JSON,
    "non_utf8": Reason.INVALID_JSON,
    "json_array": Reason.NOT_AN_OBJECT,
    "unknown_schema": Reason.UNKNOWN_SCHEMA,
    "missing_action": Reason.MISSING_FIELD,
    "wrong_types": Reason.INVALID_FIELD,
    "unknown_key": Reason.UNKNOWN_KEY,
    "tampered_mac": Reason.DECRYPT_FAILED,
    "missing_nonce": Reason.MALFORMED_CIPHERTEXT,
    "null_action_id": Reason.MISSING_FIELD,
    "empty_object": Reason.UNKNOWN_SCHEMA,
    "binary_garbage": Reason.INVALID_JSON,
    "deep_nesting": Reason.INVALID_JSON,
    "personal_info_not_object": Reason.INVALID_FIELD,
    "invalid_plaintext": Reason.INVALID_PLAINTEXT,
    "v1_missing_fields": Reason.MISSING_FIELD,
    "event_without_type": Reason.MISSING_FIELD,
    "email_status_without_supporter": Reason.MISSING_FIELD,
    "string_action_id": Reason.INVALID_FIELD,
    "huge_truncated": Reason.INVALID_JSON,
}
"""The reason code each poison kind must be parked with."""

HUGE_BYTES = 5 * 1024 * 1024


@dataclass
class Stream:
    """What one scenario publishes, in order, with what the engine makes of each body."""

    items: list[tuple[str, str, bytes]]
    kinds: list[str]
    keystore: Keystore
    keys_path: Path
    poison: dict[str, str] = field(default_factory=dict)
    """digest → reason code the message must be parked with."""
    records: int = 0
    ignored: int = 0

    @property
    def bodies(self) -> list[bytes]:
        return [body for _, _, body in self.items]

    @property
    def poison_count(self) -> int:
        return sum(1 for kind in self.kinds if kind.startswith("poison."))

    def summary(self) -> dict[str, int]:
        return dict(sorted(Counter(k.split(".")[0] for k in self.kinds).items()))

    def write_jsonl(self, path: Path) -> Path:
        """The exact bodies, one per line, as ``proca_sync replay FILE.jsonl`` reads them."""
        with path.open("wb") as handle:
            for body in self.bodies:
                if b"\n" in body or not body.strip():
                    raise ValueError("a body with a newline or blank cannot go into JSONL")
                handle.write(body + b"\n")
        return path


def _routed(org: int, planned: Planned) -> bool:
    """Messages bound for ``cus.N.deliver``; ``system.*`` ones are left out because they
    also reach the broker-wide ``system.deliver`` queue, which the suite must not fill."""
    if planned.routing_key.startswith("system."):
        return False
    return planned.exchange in {deliver_exchange(org), event_exchange(org)}


def _seal_raw(plaintext: bytes, recipient: str, sender: KeyPair, nonce: bytes) -> dict[str, Any]:
    box = Box(PrivateKey(b64decode(sender.private)), PublicKey(b64decode(recipient)))
    return {
        "payload": b64encode(box.encrypt(plaintext, nonce).ciphertext),
        "nonce": b64encode(nonce),
        "encryptKey": {"id": None, "public": recipient},
        "signKey": {"id": None, "public": sender.public},
    }


def extra_poison(
    rng: random.Random, template: dict[str, Any], org_key: KeyPair
) -> dict[str, bytes]:
    """One body per kind of :data:`EXTRA_POISON_KINDS`, derived from a valid action."""
    sender = derive_keypair(f"reliability-sender:{rng.random()}")
    nonce = rng.randbytes(24)
    bodies: dict[str, bytes] = {}
    bodies["empty_object"] = b"{}"
    garbage = bytes(rng.randrange(256) for _ in range(rng.randrange(16, 512)))
    bodies["binary_garbage"] = b"\xff" + garbage.replace(b"\n", b"\x00")
    bodies["deep_nesting"] = (
        b'{"schema": "proca:action:2", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    )
    bodies["personal_info_not_object"] = orjson.dumps({**template, "personalInfo": "sealed"})
    sealed = _seal_raw(b"not json at all", org_key.public, sender, nonce)
    bodies["invalid_plaintext"] = orjson.dumps({**template, "personalInfo": sealed})
    bodies["v1_missing_fields"] = orjson.dumps({"schema": "proca:action:1", "actionId": 1})
    bodies["event_without_type"] = orjson.dumps(
        {"schema": "proca:event:2", "timestamp": "2024-10-14T09:00:00Z"}
    )
    bodies["email_status_without_supporter"] = orjson.dumps(
        {"schema": "proca:event:2", "eventType": "email_status",
         "timestamp": "2024-10-14T09:00:00Z"}
    )  # fmt: skip
    bodies["string_action_id"] = orjson.dumps({**template, "actionId": "4700001"})
    return bodies


def huge_truncated(rng: random.Random, template: dict[str, Any]) -> bytes:
    """A 5 MB action whose JSON is cut off before the end."""
    action = {**template["action"], "customFields": {"blob": "x" * HUGE_BYTES}}
    whole = orjson.dumps({**template, "action": action})
    return whole[: len(whole) - rng.randrange(2, 64)]


def build_stream(
    org: int,
    directory: Path,
    *,
    actions: int,
    seed: int,
    poison_rounds: int = 0,
    extra_rounds: int = 0,
    huge: int = 0,
) -> Stream:
    """Simulated traffic for ``org`` with poison interleaved at random positions.

    ``poison_rounds`` × each simulator poison kind, ``extra_rounds`` × each extra kind
    (except the huge one) and ``huge`` 5 MB truncated bodies. The org's key store is
    written to ``directory/keys.json`` (mode 0600). Raises :class:`ValueError` when the
    engine would park a poison kind with another reason than :data:`EXPECTED_REASONS`.
    """
    pair = KeyPair.generate()
    keystore = Keystore([pair])
    keys_path = directory / "keys.json"
    keystore.save(keys_path)
    planned = plan_traffic(org, actions=actions, seed=seed, keys=pair, poison=poison_rounds)
    items: list[tuple[str, str, bytes]] = []
    kinds: list[str] = []
    template: dict[str, Any] | None = None
    for number, item in enumerate(planned):
        if not _routed(org, item):
            continue
        body = item.body
        if item.kind.startswith("poison."):
            body = _unique(body, number)
        items.append((item.exchange, item.routing_key, body))
        kinds.append(item.kind)
        if template is None and item.kind == "action":
            candidate = orjson.loads(item.body)
            if candidate.get("personalInfo") is None:
                template = candidate
    if template is None:
        template = orjson.loads(
            next(b for (_, _, b), k in zip(items, kinds, strict=True) if k == "action")
        )
        template["personalInfo"] = None
    rng = random.Random(seed ^ 0x5EED)
    route = next((x, k) for (x, k, _), kind in zip(items, kinds, strict=True) if kind == "action")
    extras: list[tuple[str, bytes]] = []
    for _ in range(extra_rounds):
        extras.extend(
            (f"poison.{name}", body) for name, body in extra_poison(rng, template, pair).items()
        )
    extras.extend(("poison.huge_truncated", huge_truncated(rng, template)) for _ in range(huge))
    for number, (kind, body) in enumerate(extras):
        at = rng.randrange(len(items) + 1)
        items.insert(at, (route[0], route[1], _unique(body, number)))
        kinds.insert(at, kind)
    stream = Stream(items, kinds, keystore, keys_path)
    _classify(stream)
    return stream


def _unique(body: bytes, number: int) -> bytes:
    """``body`` made distinct from every other poison body, its defect kept.

    The simulator derives most poison kinds from one template, so rounds repeat the same
    bytes, and the parking store keeps one row per distinct body: unique bodies make
    "every poison message parked" countable. A parsable object gets an extra key; any
    other body gets one spliced in after its first ``{`` (or, without one, a prefix).
    """
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if isinstance(document, dict):
        return orjson.dumps({**document, "reliabilityRound": number})
    if isinstance(document, list) and document and isinstance(document[0], dict):
        return orjson.dumps([{**document[0], "reliabilityRound": number}, *document[1:]])
    if body.startswith(b"{"):
        return b'{"reliabilityRound": %d, ' % number + body[1:]
    return b"%d" % number + body


def _classify(stream: Stream) -> None:
    """The engine's verdict on each body (pure; no CRM): the oracle for parking."""
    engine = Engine(backend=NullBackend(), keystore=stream.keystore)
    wrong: Counter[str] = Counter()
    for (_, _, body), kind in zip(stream.items, stream.kinds, strict=True):
        try:
            prepared = engine.prepare(body)
        except PermanentError as exc:
            stream.poison[body_digest(body)] = str(exc.reason)
            name = kind.removeprefix("poison.")
            if not kind.startswith("poison.") or EXPECTED_REASONS.get(name) != exc.reason:
                wrong[f"{kind}→{exc.reason}"] += 1
            continue
        if kind.startswith("poison."):
            wrong[f"{kind}→accepted"] += 1
        elif isinstance(prepared, Ignored):
            stream.ignored += 1
        else:
            stream.records += 1
    if wrong:
        raise ValueError(f"engine classification differs from the expected reasons: {dict(wrong)}")


ALL_POISON_KINDS: tuple[str, ...] = (*POISON_KINDS, *EXTRA_POISON_KINDS)
