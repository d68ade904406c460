"""The event loop the long-running commands run on.

``run(main)`` is :func:`asyncio.run` on uvloop's loop when uvloop is installed (it is a
dependency on Linux and macOS): the consumer's clear-text path spends about a fifth less
CPU per message there (BENCHMARKS.md), all of it in the loop's own scheduling and socket
code. ``PROCA_EVENT_LOOP=asyncio`` keeps the standard loop (``uvloop`` insists on uvloop
and fails at start if it is missing); any other value is a configuration error.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from proca_sync.errors import ConfigError

T = TypeVar("T")

ENV = "PROCA_EVENT_LOOP"


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or ``None`` for asyncio's default (see the module doc)."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in {"auto", "uvloop", "asyncio"}:
        raise ConfigError(f"{ENV} must be auto, uvloop or asyncio, not {choice!r}")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(f"{ENV}=uvloop but uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: the kind of a running loop (logged at start)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new loop (as :func:`asyncio.run` does)."""
    try:
        factory = loop_factory()
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
