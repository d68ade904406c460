"""Operator tools on a queue: ``queue status``, ``peek`` and ``dump``.

* :func:`summarize` describes a body without personal data (schema, stage or event type,
  action id and type, campaign, whether ``personalInfo`` is encrypted) — for ``peek`` and
  ``parked show``.
* :func:`peek` reads the next messages with ``basic.get`` and gives them back untouched
  (nack with requeue; they return with ``redelivered=true``).
* :func:`dump` moves messages into files ``proca-sync replay`` accepts: each chunk is
  written and fsync'd before it is acked, so a crash loses nothing (it may leave a
  message both on disk and in the queue; replaying it twice is harmless).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import aiormq.exceptions
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage, AbstractQueue

from proca_sync.config import proca_org_of
from proca_sync.consumer.intake import IntakeError, queue_state
from proca_sync.consumer.policy import attempts_of
from proca_sync.errors import DecodeError
from proca_sync.messages.decode import decode
from proca_sync.pipeline.topology import QueueState, fail_queue

__all__ = [
    "BodySummary",
    "DumpReport",
    "Peeked",
    "dump",
    "peek",
    "queue_status",
    "summarize",
]

_LABEL = re.compile(r"[a-z][a-z0-9_]*(:[a-z0-9_]+){1,3}")
_WORD = re.compile(r"[A-Za-z0-9_-]{1,128}")
_DUMP_CHUNK = 500


def _word(value: Any) -> str | None:
    """``value`` if it is a short identifier-like string (never free text: it might be
    personal data)."""
    return value if isinstance(value, str) and _WORD.fullmatch(value) else None


@dataclass(frozen=True, slots=True)
class BodySummary:
    """What a message is, without its personal data."""

    schema: str | None
    kind: str | None
    """``stage`` of an action (``deliver``, ``system``…) or ``eventType`` of an event."""
    action_id: int | None
    action_type: str | None
    campaign: str | None
    encrypted: bool | None
    problem: str | None = None
    """The reason code the consumer would park it with, when it cannot be decoded."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "kind": self.kind,
            "actionId": self.action_id,
            "actionType": self.action_type,
            "campaign": self.campaign,
            "encrypted": self.encrypted,
            "problem": self.problem,
        }


def summarize(body: bytes) -> BodySummary:
    """Describe ``body`` (any bytes) by ids and labels only. Never raises."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return BodySummary(None, None, None, None, None, None, problem="invalid_json")
    if not isinstance(document, dict):
        return BodySummary(None, None, None, None, None, None, problem="not_an_object")
    schema = document.get("schema")
    schema = schema if isinstance(schema, str) and _LABEL.fullmatch(schema) else None
    kind = _word(document.get("eventType")) or _word(document.get("stage"))
    action_id = document.get("actionId")
    if not isinstance(action_id, int) or isinstance(action_id, bool):
        action_id = None
    action = document.get("action")
    action_type = _word(action.get("actionType")) if isinstance(action, Mapping) else None
    campaign = document.get("campaign")
    campaign_name = _word(campaign.get("name")) if isinstance(campaign, Mapping) else None
    problem = None
    try:
        decode(body)
    except DecodeError as exc:
        problem = str(exc.reason)
    return BodySummary(
        schema, kind, action_id, action_type, campaign_name, _encrypted(document), problem
    )


def _encrypted(document: Mapping[str, Any]) -> bool | None:
    if "personalInfo" in document:
        return document["personalInfo"] is not None
    supporter = document.get("supporter")
    if isinstance(supporter, Mapping) and "personalInfo" in supporter:
        return supporter["personalInfo"] is not None
    contact = document.get("contact")
    if isinstance(contact, Mapping) and "nonce" in contact:  # action v1
        return bool(contact.get("nonce"))
    return None


# ---- broker tools ------------------------------------------------------------------------


async def queue_status(connection: AbstractConnection, queue: str) -> list[QueueState]:
    """Depth and consumers of ``queue`` and, for a Proca ``cus.N.*`` queue, ``org.N.fail``
    (passive declares on throw-away channels: nothing changes)."""
    names = [queue]
    org = proca_org_of(queue)
    if org is not None:
        names.append(fail_queue(org))
    states = []
    for name in names:
        channel = await connection.channel()
        try:
            states.append(await queue_state(await channel.get_underlay_channel(), name))
        finally:
            if not channel.is_closed:
                await channel.close()
    return states


async def _open_queue(
    connection: AbstractConnection, name: str
) -> tuple[AbstractChannel, AbstractQueue]:
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise IntakeError(f"queue {name!r} does not exist") from None
    except aiormq.exceptions.ChannelAccessRefused:
        raise IntakeError(f"access to queue {name!r} refused") from None
    return channel, queue


@dataclass(frozen=True, slots=True)
class Peeked:
    summary: BodySummary
    redelivered: bool
    exchange: str
    routing_key: str
    attempts: int
    size: int


async def peek(connection: AbstractConnection, queue: str, count: int) -> list[Peeked]:
    """Summaries of the next ``count`` messages, which all go back to the queue."""
    channel, source = await _open_queue(connection, queue)
    messages: list[AbstractIncomingMessage] = []
    try:
        while len(messages) < count:
            message = await source.get(no_ack=False, fail=False, timeout=10)
            if message is None:
                break
            messages.append(message)
        return [
            Peeked(
                summary=summarize(m.body),
                redelivered=bool(m.redelivered),
                exchange=m.exchange or "",
                routing_key=m.routing_key or "",
                attempts=attempts_of(m.headers, queue),
                size=len(m.body),
            )
            for m in messages
        ]
    finally:
        if messages and not channel.is_closed:
            await messages[-1].nack(multiple=True, requeue=True)
        if not channel.is_closed:
            await channel.close()


@dataclass
class DumpReport:
    files: list[Path] = field(default_factory=list)
    messages: int = 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_private(path: Path, *, append: bool) -> BinaryIO:
    """Open ``path`` for writing bytes; created 0600 whatever the umask (personal data)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "ab" if append else "wb")
    except BaseException:
        os.close(fd)
        raise


class _DumpFiles:
    """The files of one dump (blocking I/O: called through a thread)."""

    def __init__(self, out_dir: Path, queue: str) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        self.out_dir = out_dir
        self.base = f"{queue}-{stamp}"
        self.lines_path = out_dir / f"{self.base}.jsonl"
        self.report = DumpReport()

    def write(self, bodies: list[bytes]) -> None:
        """Append ``bodies`` and fsync everything before returning."""
        with _open_private(self.lines_path, append=True) as lines:
            for position, body in enumerate(bodies, start=self.report.messages):
                if body.strip() and b"\n" not in body and b"\r" not in body:
                    lines.write(body + b"\n")
                    continue
                single = self.out_dir / f"{self.base}-{position:06d}.json"
                with _open_private(single, append=False) as handle:
                    handle.write(body)
                    handle.flush()
                    os.fsync(handle.fileno())
                self.report.files.append(single)
            lines.flush()
            os.fsync(lines.fileno())
        _fsync_dir(self.out_dir)
        self.report.messages += len(bodies)

    def finish(self) -> DumpReport:
        if self.lines_path.exists() and self.lines_path.stat().st_size:
            self.report.files.insert(0, self.lines_path)
        elif self.lines_path.exists():
            self.lines_path.unlink()
            _fsync_dir(self.out_dir)
        return self.report


async def dump(
    connection: AbstractConnection,
    queue: str,
    out_dir: Path,
    *,
    count: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> DumpReport:
    """Move up to ``count`` messages (all, when ``None``) into files under ``out_dir``;
    ``on_chunk(n)`` is called after each chunk of ``n`` messages is written and acked.

    Bodies that are one line go to ``<queue>-<time>.jsonl``, one per line; any other body
    (pretty-printed JSON, blank, …) to its own ``<queue>-<time>-<n>.json``, bytes
    unchanged. A chunk is acked only after its files are written and fsync'd. The files
    hold personal data: they are created 0600, whatever the umask.
    """
    files = await asyncio.to_thread(_DumpFiles, out_dir, queue)
    channel, source = await _open_queue(connection, queue)
    try:
        while count is None or files.report.messages < count:
            left = None if count is None else count - files.report.messages
            limit = _DUMP_CHUNK if left is None else min(_DUMP_CHUNK, left)
            chunk: list[AbstractIncomingMessage] = []
            while len(chunk) < limit:
                message = await source.get(no_ack=False, fail=False, timeout=10)
                if message is None:
                    break
                chunk.append(message)
            if not chunk:
                break
            await asyncio.to_thread(files.write, [m.body for m in chunk])
            await chunk[-1].ack(multiple=True)
            if on_chunk is not None:
                on_chunk(len(chunk))
            if len(chunk) < limit:
                break
    finally:
        if not channel.is_closed:
            await channel.close()
    return await asyncio.to_thread(files.finish)
