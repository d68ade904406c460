"""What every scenario needs: captured processes, a fresh org on the broker, polling.

Every byte a process of the suite prints — the consumer's log lines, every CLI call's
stdout and stderr — is kept in a :class:`Capture`, so that the privacy scanner can read
all of it at the end. The only output kept out of the scan is ``crm export``'s, whose
purpose is to show the CRM (personal data included) to its owner; it is captured with
``scan=False`` and never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq.abc
import orjson

from proca_sync.pipeline.topology import (
    SYSTEM_QUEUE,
    Topology,
    declare_test_org,
    deliver_queue,
    fail_queue,
)

__all__ = [
    "AMQP_URL",
    "ROOT",
    "Capture",
    "CliResult",
    "ConsumerProcess",
    "Context",
    "Org",
    "Output",
    "ScenarioFailure",
    "eventually",
    "rabbitmqctl",
    "split_credentials",
]

ROOT = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("PROCA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


class ScenarioFailure(Exception):
    """A scenario could not reach an observable state in time (or a step failed)."""


@dataclass
class Output:
    """Text one process printed (``label`` says which process and stream)."""

    label: str
    lines: list[str]
    scan: bool = True


@dataclass
class Capture:
    """Every output of the run, for the privacy scanner."""

    outputs: list[Output] = field(default_factory=list)

    def add(self, label: str, text: str | list[str], *, scan: bool = True) -> Output:
        lines = text if isinstance(text, list) else text.splitlines()
        output = Output(label, lines, scan)
        self.outputs.append(output)
        return output

    @property
    def line_count(self) -> int:
        return sum(len(o.lines) for o in self.outputs if o.scan)


@dataclass
class Context:
    """Shared by the scenarios of one run."""

    quick: bool
    workdir: Path
    capture: Capture = field(default_factory=Capture)
    amqp_url: str = AMQP_URL
    published: list[bytes] = field(default_factory=list)
    """Every body published by any scenario (the scanner takes its personal data)."""
    keystores: list[Path] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    """Passwords used by the run: they must appear in no output either."""

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def cli(
        self,
        label: str,
        *args: str,
        scan: bool = True,
        env: dict[str, str] | None = None,
        within: float = 600,
    ) -> CliResult:
        """``python -m proca_sync ARGS`` to completion; its output is captured."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proca_sync", *args,
            cwd=ROOT, env=child_env(env), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=within)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ScenarioFailure(f"`proca_sync {args[0]}` did not finish in {within} s") from None
        stdout = out.decode("utf-8", "replace")
        stderr = err.decode("utf-8", "replace")
        self.capture.add(f"{label} (stdout)", stdout, scan=scan)
        self.capture.add(f"{label} (stderr)", stderr)
        assert proc.returncode is not None
        return CliResult(proc.returncode, stdout, stderr)


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return orjson.loads(self.stdout)

    def json_lines(self) -> list[Any]:
        return [orjson.loads(line) for line in self.stdout.splitlines() if line.strip()]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without any ``PROCA_*`` variable, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **(extra or {})}


def split_credentials(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without user and password, and the ``PROCA_*`` variables carrying them."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    env = {}
    if parts.username:
        env["PROCA_USERNAME"] = parts.username
    if parts.password:
        env["PROCA_PASSWORD"] = parts.password
    return urlunsplit(parts._replace(netloc=host)), env


async def eventually(
    check: Callable[[], Awaitable[bool] | bool],
    *,
    within: float,
    what: str,
    interval: float = 0.05,
) -> float:
    """Poll ``check`` until it holds; the seconds it took. :class:`ScenarioFailure` after
    ``within`` seconds."""
    started = time.monotonic()
    deadline = started + within
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise ScenarioFailure(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(interval)


def rabbitmqctl(*args: str, timeout: float = 120) -> str:
    """Run ``rabbitmqctl ARGS``; its stdout. Raises :class:`ScenarioFailure`."""
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise ScenarioFailure("rabbitmqctl is not installed")
    result = subprocess.run(  # noqa: S603 - fixed program, our own arguments
        [ctl, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise ScenarioFailure(f"rabbitmqctl {args[0]} failed: {result.stderr.strip()[:300]}")
    return result.stdout


# ---- the org of one scenario ----------------------------------------------------------------


@dataclass
class Org:
    """A fresh Proca org (random id) with custom delivery on; :meth:`delete` removes it."""

    id: int
    url: str
    topology: Topology

    @classmethod
    async def create(cls, url: str, *, retry_delay_ms: int = 500) -> Org:
        org = random.randint(10_000_000, 2_000_000_000)
        connection = await aio_pika.connect(url)
        try:
            topology = await declare_test_org(
                await connection.channel(), org, retry_delay_ms=retry_delay_ms
            )
        finally:
            await connection.close()
        return cls(org, url, topology)

    @property
    def queue(self) -> str:
        return deliver_queue(self.id)

    @property
    def fail(self) -> str:
        return fail_queue(self.id)

    async def delete(self) -> None:
        """Delete the org's queues and exchanges (never the shared ``system.deliver``)."""
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel()
            for queue in self.topology.queues:
                if queue.name != SYSTEM_QUEUE:
                    await channel.queue_delete(queue.name, if_unused=False, if_empty=False)
            for exchange in self.topology.exchanges:
                await channel.exchange_delete(exchange.name)
        finally:
            await connection.close()

    async def depths(self) -> tuple[int, int]:
        """Ready messages in the deliver queue and in the fail queue."""
        connection = await aio_pika.connect(self.url)
        try:
            result = []
            for name in (self.queue, self.fail):
                channel = await connection.channel()
                queue = await channel.declare_queue(name, passive=True)
                result.append(int(queue.declaration_result.message_count or 0))
                await channel.close()
            return result[0], result[1]
        finally:
            await connection.close()

    async def publish(self, bodies: Sequence[tuple[str, str, bytes]], *, window: int = 200) -> int:
        """Publish ``(exchange, routing key, body)`` triples persistent and ``mandatory``,
        each confirmed by the broker; ``window`` publishes are in flight at a time.
        Returns how many the broker reported unroutable."""
        connection = await aio_pika.connect(self.url)
        unroutable = 0
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

            async def one(exchange: str, key: str, body: bytes) -> bool:
                target = exchanges.get(exchange)
                if target is None:
                    target = (
                        channel.default_exchange
                        if exchange == ""
                        else await channel.get_exchange(exchange, ensure=False)
                    )
                    exchanges[exchange] = target
                message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                result = await target.publish(message, key, mandatory=True)
                return not isinstance(result, aiormq.abc.DeliveredMessage)

            for start in range(0, len(bodies), window):
                chunk = bodies[start : start + window]
                results = await asyncio.gather(*(one(*item) for item in chunk))
                unroutable += sum(1 for ok in results if not ok)
        finally:
            await connection.close()
        return unroutable


# ---- the consumer as a child process ------------------------------------------------------


class ConsumerProcess:
    """``python -m proca_sync run --url URL --queue QUEUE ARGS`` with the password only in
    the environment; stdout and stderr lines are collected (and captured for the scan)."""

    def __init__(
        self,
        ctx: Context,
        label: str,
        *,
        url: str,
        queue: str,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        credentials_in_env: bool = True,
    ) -> None:
        plain, credentials = split_credentials(url) if credentials_in_env else (url, {})
        self.ctx = ctx
        self.label = label
        self.argv = [sys.executable, "-m", "proca_sync", "run", "--url", plain,
                     "--queue", queue, *args]  # fmt: skip
        self.env = child_env({**credentials, **(env or {})})
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = ctx.capture.add(f"{label} (stderr)", []).lines
        self.stdout = ctx.capture.add(f"{label} (stdout)", []).lines
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> ConsumerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stderr is not None
        assert self.proc.stdout is not None
        self._readers = [
            asyncio.create_task(_collect(self.proc.stderr, self.stderr)),
            asyncio.create_task(_collect(self.proc.stdout, self.stdout)),
        ]
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in list(self.stderr):
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if isinstance(entry, dict):
                    found.append(entry)
        return found

    def event(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e for e in self.events
            if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
        ]  # fmt: skip

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    async def wait(self, within: float) -> int:
        """The exit code; kills the process and fails when it runs longer than ``within``."""
        assert self.proc is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout=within)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            tail = "\n".join(self.stderr[-15:])
            raise ScenarioFailure(
                f"{self.label} did not exit within {within:g} s:\n{tail}"
            ) from None
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    async def stop(self) -> None:
        """SIGKILL if still running (cleanup path)."""
        if self.running:
            self.kill()
            assert self.proc is not None
            await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.stderr[-lines:])


async def _collect(stream: asyncio.StreamReader, into: list[str]) -> None:
    while True:
        raw = await stream.readline()
        if not raw:
            return
        into.append(raw.decode("utf-8", "replace").rstrip("\n"))
