"""Shared fixtures of the integration tests: the RabbitMQ broker on loopback.

A test that needs the broker skips when it is absent locally and fails when ``CI`` is
set (``require_service`` in ``tests/conftest.py``). ``PROCA_TEST_AMQP_URL`` points the
tests at another broker or vhost.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection

from tests.conftest import require_service

AMQP_URL = os.environ.get("PROCA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@pytest.fixture
def amqp_url() -> str:
    """The test broker's URL; skips (or fails under CI) when nothing listens there."""
    parts = urlsplit(AMQP_URL)
    require_service("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    return AMQP_URL


@pytest.fixture
async def amqp_connection(amqp_url: str) -> AsyncIterator[AbstractConnection]:
    """One plain connection per test, closed afterwards."""
    connection = await aio_pika.connect(amqp_url)
    try:
        yield connection
    finally:
        await connection.close()
