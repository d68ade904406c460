"""Minimal Python consumers that only drain the queue: the ceiling for an asyncio client.

``python -m bench.raw_consumers aiormq --url U --queue Q --n N [--prefetch 1000]``
prints one JSON line ``{"seconds": …, "acked": N}``: the time from the start of the
connection until the N-th message is acked.

* ``aiormq``: prefetch 1000, one ``basic.ack(multiple=True)`` per quarter of the prefetch
  (and for the last message) — the broker-side limit of a Python consumer.
* ``aio-pika``: what a straightforward aio-pika consumer does — prefetch 200, one ack per
  message, the body parsed as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic

__all__ = ["drain_aio_pika", "drain_aiormq"]


async def drain_aiormq(url: str, queue: str, n: int, prefetch: int = 1000) -> float:
    """Seconds from connecting until ``n`` messages are acked (batched, ``multiple``)."""
    started = time.perf_counter()
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=prefetch)
    every = max(1, prefetch // 4)
    done = asyncio.get_running_loop().create_future()
    count = 0

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        nonlocal count
        count += 1
        tag = message.delivery_tag
        if tag is not None and (count % every == 0 or count >= n):
            await channel.basic_ack(tag, multiple=True)
        if count >= n and not done.done():
            done.set_result(time.perf_counter())

    consume = await channel.basic_consume(queue, on_message, no_ack=False)
    finished: float = await done
    if isinstance(consume, Basic.ConsumeOk) and consume.consumer_tag:
        await channel.basic_cancel(consume.consumer_tag)
    await connection.close()
    return finished - started


async def drain_aio_pika(url: str, queue: str, n: int, prefetch: int = 200) -> float:
    """Seconds from connecting until ``n`` messages are acked, one ack per message."""
    started = time.perf_counter()
    connection = await aio_pika.connect_robust(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    source = await channel.get_queue(queue, ensure=True)
    done = asyncio.get_running_loop().create_future()
    count = 0

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal count
        orjson.loads(message.body)
        await message.ack()
        count += 1
        if count >= n and not done.done():
            done.set_result(time.perf_counter())

    tag = await source.consume(on_message)
    finished: float = await done
    await source.cancel(tag)
    await connection.close()
    return finished - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw_consumers")
    parser.add_argument("client", choices=["aiormq", "aio-pika"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--prefetch", type=int)
    args = parser.parse_args(argv)
    if args.client == "aiormq":
        seconds = asyncio.run(drain_aiormq(args.url, args.queue, args.n, args.prefetch or 1000))
    else:
        seconds = asyncio.run(drain_aio_pika(args.url, args.queue, args.n, args.prefetch or 200))
    sys.stdout.write(orjson.dumps({"seconds": seconds, "acked": args.n}).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
