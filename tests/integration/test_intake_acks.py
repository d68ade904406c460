"""Acks of one flush go out as one write (``send_acks``): each frame in it still acks
exactly its own delivery, a multiple ack its prefix, and nothing else."""

from __future__ import annotations

import aiormq
import pytest

from proca_sync.consumer.intake import send_acks
from tests.integration.conftest import ConsumerOrg, eventually

pytestmark = pytest.mark.rabbitmq


async def test_one_write_of_single_and_multiple_acks(consumer_org: ConsumerOrg) -> None:
    await consumer_org.publish([b'{"n": %d}' % n for n in range(1, 11)])
    connection = await aiormq.connect(consumer_org.url)
    try:
        channel = await connection.channel()
        await channel.basic_qos(prefetch_count=100)
        tags: list[int] = []

        async def received(message: aiormq.abc.DeliveredMessage) -> None:
            assert message.delivery_tag is not None
            tags.append(message.delivery_tag)

        await channel.basic_consume(consumer_org.queue, received, no_ack=False)
        await eventually(lambda: len(tags) == 10, within=10, what="ten deliveries")
        # Tags 1–3 by a multiple ack, then 5, 7 and 10 one each: 4, 6, 8 and 9 stay unacked.
        await send_acks(channel, [(3, True), (5, False), (7, False), (10, False)])
        await channel.close()  # the unacked go back to the queue
    finally:
        await connection.close()
    assert await consumer_org.depths(consumer_org.queue) == [4]


async def test_a_closed_channel_raises_the_error_flush_catches(consumer_org: ConsumerOrg) -> None:
    connection = await aiormq.connect(consumer_org.url)
    try:
        channel = await connection.channel()
        await channel.close()
        with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
            await send_acks(channel, [(1, False), (2, False)])
    finally:
        await connection.close()
