"""Confirmation links and a helper for an organisation's own confirmation consumer.

An org that turns on ``custom_supporter_confirm`` or ``custom_action_confirm`` gets the
actions waiting for a decision in ``cus.N.confirm.supporter`` / ``cus.N.confirm.action``
(topology.md §2.1). It decides however it likes (an SMS, a moderation app, a volunteer)
and tells the pipeline through the supporter links or the management API::

    from proca_sync.pipeline.confirm import ManagementClient, consume_confirmations

    async def decide(message: ActionMessage) -> bool | None:
        # True: accept, False: reject, None: no decision now (it stays waiting)
        return "spam" not in str(message.action.custom_fields.get("comment", ""))

    async with ManagementClient("https://pipeline.example.org", api_key) as client:
        await consume_confirmations(
            "amqps://user@broker/vhost", action_confirm_queue(org), decide, client
        )

:func:`consume_confirmations` reads the queue passively (it declares nothing), decodes
every body with our wire models, calls ``decide`` and then the API, and acks only after
the API answered. A transient API failure rejects the message into the org's retry
circuit; an undecodable body is rejected too (the circuit keeps it, topology.md §3).
Repeating a decision is harmless: accepting an accepted supporter is a no-op, and
moderating an action that is no longer waiting answers 409, which counts as done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aio_pika
import aiohttp

from proca_sync.errors import DecodeError, PermanentError, TransientError
from proca_sync.messages.decode import decode
from proca_sync.messages.schemas import ActionMessage, Stage

__all__ = [
    "ManagementClient",
    "SupporterLinks",
    "consume_confirmations",
    "supporter_links",
]

log = logging.getLogger("proca_sync.pipeline.confirm")

Decision = Callable[[ActionMessage], Awaitable[bool | None]]


@dataclass(frozen=True)
class SupporterLinks:
    accept: str
    reject: str
    double_opt_in: str


def supporter_links(base_url: str, action_id: int, contact_ref: str) -> SupporterLinks:
    """The links of processing.md §7 (verb before ref) under ``base_url``."""
    base = base_url.rstrip("/")
    return SupporterLinks(
        accept=f"{base}/link/s/{action_id}/accept/{contact_ref}",
        reject=f"{base}/link/s/{action_id}/reject/{contact_ref}",
        double_opt_in=f"{base}/link/d/{action_id}/{contact_ref}",
    )


class ManagementClient:
    """The pipeline's management API for one org (``X-Api-Key``).

    Raises :class:`TransientError` on 5xx, 429 and connection failures and
    :class:`PermanentError` on other 4xx; 409 (already decided) is not an error.
    """

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 10.0) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"X-Api-Key": api_key}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"ManagementClient({self._base!r})"

    async def __aenter__(self) -> ManagementClient:
        self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(self, method: str, path: str) -> dict[str, Any] | None:
        if self._session is None:
            raise RuntimeError("use ManagementClient as an async context manager")
        try:
            async with self._session.request(method, self._base + path) as response:
                if response.status == 409:
                    return None
                if response.status >= 500 or response.status == 429:
                    raise TransientError(f"{method} {path}: HTTP {response.status}")
                if response.status >= 400:
                    raise PermanentError(f"{method} {path}: HTTP {response.status}")
                body: dict[str, Any] = await response.json()
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"{method} {path}: {type(exc).__name__}") from None

    async def accept_action(self, action_id: int) -> dict[str, Any] | None:
        return await self._call("POST", f"/api/actions/{action_id}/accept")

    async def reject_action(self, action_id: int) -> dict[str, Any] | None:
        return await self._call("POST", f"/api/actions/{action_id}/reject")

    async def accept_supporter(self, action_id: int) -> dict[str, Any] | None:
        return await self._call("POST", f"/api/supporters/{action_id}/accept")

    async def reject_supporter(self, action_id: int) -> dict[str, Any] | None:
        return await self._call("POST", f"/api/supporters/{action_id}/reject")

    async def status(self, action_id: int) -> dict[str, Any] | None:
        return await self._call("GET", f"/api/actions/{action_id}/status")


async def apply_decision(client: ManagementClient, message: ActionMessage, accept: bool) -> None:
    """Send ``accept`` for the message's stage (supporter or action confirmation)."""
    assert message.action_id is not None
    if message.stage is Stage.SUPPORTER_CONFIRM:
        call = client.accept_supporter if accept else client.reject_supporter
    else:
        call = client.accept_action if accept else client.reject_action
    await call(message.action_id)


async def consume_confirmations(
    amqp_url: str,
    queue: str,
    decide: Decision,
    client: ManagementClient,
    *,
    stop: asyncio.Event | None = None,
    max_messages: int | None = None,
    prefetch: int = 10,
) -> int:
    """Decide every message of ``queue`` (a ``cus.N.confirm.*`` queue) until ``stop`` is
    set or ``max_messages`` were handled; returns how many were acked."""
    stop = stop or asyncio.Event()
    handled = 0
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        source = await channel.get_queue(queue, ensure=True)  # passive: declares nothing
        async with source.iterator() as messages:
            async for incoming in messages:
                try:
                    message = decode(incoming.body)
                    if not isinstance(message, ActionMessage) or message.stage not in (
                        Stage.SUPPORTER_CONFIRM,
                        Stage.ACTION_CONFIRM,
                    ):
                        raise DecodeError("not a confirmation message")
                    verdict = await decide(message)
                    if verdict is not None:
                        await apply_decision(client, message, verdict)
                except (TransientError, PermanentError) as exc:
                    log.warning(
                        "confirmation not applied (%s); rejected into the retry circuit",
                        type(exc).__name__,
                    )
                    await incoming.reject(requeue=False)
                else:
                    await incoming.ack()
                    handled += 1
                if stop.is_set() or (max_messages is not None and handled >= max_messages):
                    break
    finally:
        await connection.close()
    return handled
