"""The event loop of the long-running commands (proca_sync.aio)."""

from __future__ import annotations

import asyncio

import pytest

from proca_sync import aio
from proca_sync.errors import ConfigError


async def _kind() -> str:
    return aio.loop_kind(asyncio.get_running_loop())


def test_uvloop_by_default_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("uvloop")
    monkeypatch.delenv(aio.ENV, raising=False)
    assert aio.run(_kind()) == "uvloop"
    monkeypatch.setenv(aio.ENV, "UVLOOP")
    assert aio.run(_kind()) == "uvloop"


def test_asyncio_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aio.ENV, "asyncio")
    assert aio.loop_factory() is None
    assert aio.run(_kind()) == "asyncio"


def test_another_value_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(aio.ENV, "trio")
    with pytest.raises(ConfigError, match="PROCA_EVENT_LOOP must be auto, uvloop or asyncio"):
        aio.loop_factory()
    coroutine = _kind()
    with pytest.raises(ConfigError):
        aio.run(coroutine)
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning


def test_run_returns_the_result_and_raises_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(aio.ENV, raising=False)

    async def fails() -> None:
        raise KeyError("x")

    assert aio.run(asyncio.sleep(0, result=7)) == 7
    with pytest.raises(KeyError):
        aio.run(fails())
