"""The scenarios: each publishes a stream, runs the real consumer, injects faults and
ends with the comparison against ``replay`` (:mod:`reliability.oracle`).

Faults are triggered by observable progress (rows in the CRM's idempotency table, keys
stored by the HTTP CRM), never by guessed delays; a fault's own duration (the broker or
PostgreSQL down for N seconds) is the only deliberate wait. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from reliability import cluster as _cluster
from reliability import scale as _scale
from reliability.harness import (
    ROOT,
    ConsumerProcess,
    Context,
    Org,
    ScenarioFailure,
    child_env,
    eventually,
    rabbitmqctl,
)
from reliability.oracle import (
    Verdict,
    applied_keys,
    expected_sql,
    export,
    parked_rows,
    replay,
    verdict_sql,
    verdict_webhook,
)
from reliability.pgprivate import PrivatePostgres
from reliability.proxy import TcpProxy
from reliability.tls import RabbitTlsListener, TlsError, TlsTerminatingProxy, make_certificates
from reliability.traffic import Stream, build_stream

__all__ = ["SCENARIOS", "Check", "Scenario", "ScenarioResult"]

T = TypeVar("T")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class ScenarioResult:
    name: str
    title: str
    verdict: Verdict | None = None
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration: float = 0.0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)

    def note(self, text: str) -> None:
        """A line for the report, stamped with the seconds since the scenario started."""
        self.notes.append(f"[{time.monotonic() - self.started:5.1f} s] {text}")

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, bool(ok), detail))
        return bool(ok)

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and all(c.ok for c in self.checks)
            and (self.verdict is None or self.verdict.ok)
        )


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    summary: str
    run: Callable[[Context, ScenarioResult], Awaitable[None]]
    in_quick: bool = True
    """Part of a quick run without ``--only`` (the scale-out ones run in their own test,
    ``tests/integration/test_scale_out.py``, to keep each test within its budget)."""


# ---- shared steps ----------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    directory: Path
    org: Org
    stream: Stream
    crm: str
    parked: str

    def consumer_args(self, *extra: str) -> list[str]:
        return ["--crm", self.crm, "--parked", self.parked,
                "--keys", str(self.stream.keys_path), *extra]  # fmt: skip


async def setup(
    ctx: Context,
    name: str,
    *,
    actions: int,
    seed: int,
    poison_rounds: int = 1,
    extra_rounds: int = 1,
    huge: int = 0,
    crm: str | None = None,
    publish: bool = True,
) -> Setup:
    """A fresh org, its stream (published unless ``publish`` is false), file URLs."""
    directory = ctx.scratch(name)
    org = await Org.create(ctx.amqp_url)
    stream = build_stream(
        org.id, directory, actions=actions, seed=seed, poison_rounds=poison_rounds,
        extra_rounds=extra_rounds, huge=huge,
    )  # fmt: skip
    ctx.keystores.append(stream.keys_path)
    s = Setup(
        name, directory, org, stream,
        crm or f"sqlite:///{directory / 'crm.db'}", f"sqlite:///{directory / 'parked.db'}",
    )  # fmt: skip
    if publish:
        await publish_stream(ctx, s)
    return s


async def publish_stream(
    ctx: Context, s: Setup, items: list[tuple[str, str, bytes]] | None = None
) -> None:
    chosen = s.stream.items if items is None else items
    unroutable = await s.org.publish(chosen)
    if unroutable:
        raise ScenarioFailure(f"{unroutable} message(s) were unroutable")
    ctx.published.extend(body for _, _, body in chosen)


def sqlite_applied(path: Path) -> int:
    """Rows in a SQLite CRM's idempotency table (a read-only look; 0 before the schema)."""
    if not path.exists():
        return 0
    try:
        with contextlib.closing(
            sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        ) as conn:
            return int(conn.execute("SELECT count(*) FROM applied_messages").fetchone()[0])
    except sqlite3.Error:
        return 0


def wal_mark(wal: Path) -> tuple[int, int]:
    """(size, modification time in ns) of a SQLite write-ahead log; (0, 0) when absent."""
    try:
        stat = wal.stat()
    except FileNotFoundError:
        return (0, 0)
    return (stat.st_size, stat.st_mtime_ns)


async def wait_progress(
    progress: Callable[[], int],
    target: int,
    consumer: ConsumerProcess,
    *,
    within: float,
    what: str,
) -> None:
    """Wait until ``progress() >= target``; fail early if the consumer exits."""

    def reached() -> bool:
        if not consumer.running:
            raise ScenarioFailure(f"the consumer exited early while waiting for {what}:\n"
                                  f"{consumer.tail()}")  # fmt: skip
        return progress() >= target

    await eventually(reached, within=within, what=what, interval=0.005)


async def drain(consumer: ConsumerProcess, result: ScenarioResult, *, within: float) -> None:
    code = await consumer.wait(within)
    stopped = consumer.event("stopped")
    reason = stopped[-1].get("reason") if stopped else None
    result.check(
        f"{consumer.label} drained and exited 0", code == 0 and reason == "idle",
        f"exit {code}, stop reason {reason}" + ("" if code == 0 else f"\n{consumer.tail()}"),
    )  # fmt: skip


async def finish_sql(ctx: Context, result: ScenarioResult, s: Setup) -> None:
    """Compare the consumer's SQL CRM and parking store with replay; queue leftovers."""
    depth, fail_depth = await s.org.depths()
    result.check("queue and retry circuit empty", depth == 0 and fail_depth == 0,
                 f"{s.org.queue}: {depth}, {s.org.fail}: {fail_depth}")  # fmt: skip
    expected, actual = await asyncio.gather(
        expected_sql(ctx, s.name, s.stream, s.directory),
        export(ctx, f"{s.name}: crm export (consumer)", s.crm),
    )
    parked = parked_rows(s.parked)
    result.verdict = verdict_sql(s.stream, expected, actual, applied_keys(s.crm), parked)
    await parked_cli(ctx, result, s, parked)


async def parked_cli(
    ctx: Context, result: ScenarioResult, s: Setup, parked: dict[str, tuple[str, int]]
) -> None:
    """``parked list --json`` agrees with the store (and its output is scanned)."""
    listing = await ctx.cli(f"{s.name}: parked list", "parked", "list", "--parked", s.parked,
                            "--json", "--limit", "1000000")  # fmt: skip
    rows = listing.json_lines() if listing.code == 0 else []
    result.check(
        "`parked list` shows every parked message",
        listing.code == 0
        and Counter(r["reason"] for r in rows) == Counter(reason for reason, _ in parked.values()),
        f"{len(rows)} listed, {len(parked)} in the store",
    )


async def show_parked(
    ctx: Context, result: ScenarioResult, s: Setup, *, per_reason: int, limit: int
) -> None:
    """``parked show ID`` (without ``--body``) for some parked messages of each reason:
    its output is scanned for personal data like every other."""
    from proca_sync.consumer.parking import ParkingStore

    store = ParkingStore(s.parked)
    try:
        rows = store.entries(limit=10_000_000)
    finally:
        store.engine.dispose()
    chosen: list[int] = []
    seen: Counter[str] = Counter()
    for row in rows:
        if seen[row.reason] < per_reason and len(chosen) < limit:
            seen[row.reason] += 1
            chosen.append(row.id)
    codes = [
        (await ctx.cli(f"{s.name}: parked show {i}", "parked", "show", str(i),
                       "--parked", s.parked)).code
        for i in chosen
    ]  # fmt: skip
    result.check("`parked show` works on parked poison", all(c == 0 for c in codes),
                 f"{len(codes)} shown ({', '.join(sorted(seen))})")  # fmt: skip


async def cleanup(org: Org | None, *consumers: ConsumerProcess) -> None:
    for consumer in consumers:
        await consumer.stop()
    if org is not None:
        with contextlib.suppress(Exception):
            await org.delete()


def sized(ctx: Context, quick: T, full: T) -> T:
    return quick if ctx.quick else full


# ---- 1. crashes ------------------------------------------------------------------------------


KILLS = 10


async def scenario_crash(ctx: Context, result: ScenarioResult) -> None:
    s = await setup(ctx, "crash", actions=sized(ctx, 450, 3000), seed=101,
                    poison_rounds=sized(ctx, 1, 3), extra_rounds=1)  # fmt: skip
    crm_file = s.directory / "crm.db"
    wal = s.directory / "crm.db-wal"
    # Small batches and prefetch: many commits, so kills land in and around them.
    args = s.consumer_args("--concurrency", "2", "--prefetch", "10", "--batch-size", "5")
    rng = random.Random()
    consumers: list[ConsumerProcess] = []
    kinds: Counter[str] = Counter()
    try:
        for number in range(KILLS):
            consumer = await ConsumerProcess(
                ctx, f"crash: consumer #{number + 1}", url=ctx.amqp_url, queue=s.org.queue,
                args=args,
            ).start()  # fmt: skip
            consumers.append(consumer)
            # Spread the kills over 5-80 % of the stream, so each one lands mid-stream.
            target = int(s.stream.records * (0.05 + 0.75 * number / (KILLS - 1)))
            await wait_progress(
                lambda: sqlite_applied(crm_file),
                target,
                consumer,
                within=120,
                what=f"{target} applied before kill {number + 1}",
            )
            if number % 2 == 0:
                # During a commit: the moment the CRM's write-ahead log is written. (Its
                # size alone is not enough: after a checkpoint SQLite rewrites the WAL
                # from the start without growing it; the modification time moves.)
                mark = wal_mark(wal)
                # A fast consumer may have applied the whole stream before this one
                # started (the previous kill came at a random moment): then no commit
                # is left to kill during, and this kill lands on an idle consumer.
                applied_all = [False]
                checked = [0.0]

                def wal_written(
                    mark: tuple[int, int] = mark,
                    checked: list[float] = checked,
                    applied_all: list[bool] = applied_all,
                ) -> bool:
                    if wal_mark(wal) != mark:
                        return True
                    if time.monotonic() - checked[0] > 0.2:  # a count now and then
                        checked[0] = time.monotonic()
                        applied_all[0] = sqlite_applied(crm_file) >= s.stream.records
                    return applied_all[0]

                await eventually(wal_written, within=30, interval=0.0005, what="a WAL write")
                if wal_mark(wal) != mark:
                    kinds["during a commit (WAL written)"] += 1
                else:
                    kinds["after the stream was applied"] += 1
            else:
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # a random moment
                kinds["at a random moment"] += 1
            consumer.kill()
            code = await consumer.wait(30)
            result.check(f"kill {number + 1} took effect", code == -signal.SIGKILL, f"exit {code}")
        result.note(
            f"{KILLS} SIGKILLs: "
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
            + f"; applied before the final drain: {sqlite_applied(crm_file)}"
            f" of {s.stream.records} records"
        )
        final = await ConsumerProcess(
            ctx,
            "crash: final drain",
            url=ctx.amqp_url,
            queue=s.org.queue,
            args=[*args, "--exit-when-idle"],
        ).start()
        consumers.append(final)
        await drain(final, result, within=sized(ctx, 90, 300))
        await finish_sql(ctx, result, s)
    finally:
        await cleanup(s.org, *consumers)


# ---- 2. broker faults ------------------------------------------------------------------------


def broker_up() -> bool:
    try:
        rabbitmqctl("await_startup", "--timeout", "5", timeout=30)
    except ScenarioFailure:
        return False
    return True


async def scenario_broker_restart(ctx: Context, result: ScenarioResult) -> None:
    s = await setup(ctx, "broker-restart", actions=sized(ctx, 700, 5000), seed=201)
    crm_file = s.directory / "crm.db"
    args = s.consumer_args("--concurrency", "1", "--prefetch", "10", "--batch-size", "5",
                           "--exit-when-idle", "--metrics-port", "0")  # fmt: skip
    consumer = ConsumerProcess(ctx, "broker-restart: consumer", url=ctx.amqp_url,
                               queue=s.org.queue, args=args)  # fmt: skip
    stopped = False
    down_for = sized(ctx, 2.0, 8.0)
    try:
        await consumer.start()
        for number, share in enumerate((0.15, 0.5), start=1):
            target = int(s.stream.records * share)
            await wait_progress(lambda: sqlite_applied(crm_file), target, consumer,
                                within=120, what=f"{target} applied")  # fmt: skip
            before = sqlite_applied(crm_file)
            stopped = True
            await asyncio.to_thread(rabbitmqctl, "stop_app")
            await asyncio.sleep(down_for)  # the outage itself
            await asyncio.to_thread(rabbitmqctl, "start_app")
            stopped = False
            await asyncio.to_thread(rabbitmqctl, "await_startup")

            def reconnected(n: int = number) -> bool:
                return len(consumer.event("reconnected")) >= n

            took = await eventually(reconnected, within=90, what=f"reconnect {number}")
            result.note(
                f"restart {number}: stop_app at {before} applied, start_app after {down_for:g} s,"
                f" consumer reconnected {took:.1f} s after start_app"
            )
            result.check(f"consumer alive through restart {number}", consumer.running)
        await drain(consumer, result, within=sized(ctx, 90, 300))
        result.check("connection loss logged", len(consumer.event("connection_lost")) >= 2,
                     f"{len(consumer.event('connection_lost'))} connection_lost lines")  # fmt: skip
        await finish_sql(ctx, result, s)
    finally:
        if stopped or not broker_up():
            with contextlib.suppress(ScenarioFailure):
                rabbitmqctl("start_app")
                rabbitmqctl("await_startup")
        await cleanup(s.org, consumer)


async def scenario_proxy(ctx: Context, result: ScenarioResult) -> None:
    s = await setup(ctx, "network", actions=sized(ctx, 700, 5000), seed=202)
    crm_file = s.directory / "crm.db"
    proxy = TcpProxy("127.0.0.1", 5672)
    port = await proxy.start()
    url = ctx.amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{port}")
    if url == ctx.amqp_url:
        raise ScenarioFailure("the broker URL is not on 127.0.0.1:5672; cannot proxy it")
    consumer = ConsumerProcess(
        ctx, "network: consumer", url=url, queue=s.org.queue,
        args=s.consumer_args("--concurrency", "1", "--prefetch", "10", "--batch-size", "5",
                             "--exit-when-idle"),
    )  # fmt: skip
    records = s.stream.records

    def applied() -> int:
        return sqlite_applied(crm_file)

    try:
        await consumer.start()
        await wait_progress(applied, int(records * 0.15), consumer, within=120, what="15 %")
        cut = proxy.drop(refuse_for=2.0)
        await eventually(lambda: len(consumer.event("reconnected")) >= 1, within=60,
                         what="reconnect after the drop")  # fmt: skip
        result.note(f"drop: {cut} connection(s) reset, new ones refused for 2 s")

        await wait_progress(applied, int(records * 0.35), consumer, within=120, what="35 %")
        stall = sized(ctx, 3.0, 8.0)
        frozen = applied()
        proxy.stall(stall)
        await asyncio.sleep(stall)  # the stall itself
        await wait_progress(
            applied, frozen + 20, consumer, within=60, what="progress after the stall"
        )
        result.note(f"stall: all traffic held {stall:g} s (at {frozen} applied)")

        await wait_progress(applied, int(records * 0.55), consumer, within=120, what="55 %")
        slow_from = applied()
        proxy.slow(0.05)
        slow_for = sized(ctx, 2.0, 10.0)
        await asyncio.sleep(slow_for)  # the slow period itself
        proxy.slow(0.0)
        result.note(f"slow: +50 ms per chunk for {slow_for:g} s "
                            f"({applied() - slow_from} applied meanwhile)")  # fmt: skip

        await wait_progress(applied, int(records * 0.75), consumer, within=120, what="75 %")
        cut = proxy.drop()
        await eventually(lambda: len(consumer.event("reconnected")) >= 2, within=60,
                         what="reconnect after the second drop")  # fmt: skip
        result.note(f"drop: {cut} connection(s) reset, reconnect allowed at once")
        await drain(consumer, result, within=sized(ctx, 90, 300))
        result.check(
            "two reconnects",
            len(consumer.event("reconnected")) >= 2,
            f"{len(consumer.event('reconnected'))} reconnected lines; "
            f"proxy accepted {proxy.stats.accepted}, refused {proxy.stats.refused}",
        )
        await finish_sql(ctx, result, s)
    finally:
        await proxy.close()
        await cleanup(s.org, consumer)


# ---- 3. CRM faults ---------------------------------------------------------------------------


def pg_applied(url: str) -> Callable[[], int]:
    import psycopg

    last = [0]

    def count() -> int:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                row = conn.execute("SELECT count(*) FROM applied_messages").fetchone()
                last[0] = int(row[0]) if row else 0
        except psycopg.Error:
            pass  # down, or no schema yet: keep the last value
        return last[0]

    return count


async def scenario_postgres(ctx: Context, result: ScenarioResult) -> None:
    outage = sized(ctx, 8.0, 30.0)
    pg = PrivatePostgres()
    with pg:
        s = await setup(ctx, "postgres-outage", actions=sized(ctx, 700, 4000), seed=301, crm=pg.url)
        progress = pg_applied(pg.url)
        consumer = ConsumerProcess(
            ctx, "postgres-outage: consumer", url=ctx.amqp_url, queue=s.org.queue,
            args=s.consumer_args("--concurrency", "2", "--batch-size", "10", "--max-retries",
                                 "10", "--exit-when-idle", "--metrics-port", "0"),
        )  # fmt: skip
        try:
            await consumer.start()
            await wait_progress(progress, int(s.stream.records * 0.3), consumer, within=120,
                                what="30 % applied")  # fmt: skip
            at = progress()
            await asyncio.to_thread(pg.stop, "immediate")
            down_at = time.monotonic()
            await eventually(lambda: bool(consumer.event("breaker", state="open")), within=60,
                             what="the breaker to open")  # fmt: skip
            opened_after = time.monotonic() - down_at
            # The outage itself: PostgreSQL stays down this long.
            await asyncio.sleep(max(0.0, outage - (time.monotonic() - down_at)))
            result.check("consumer alive through the outage", consumer.running)
            await asyncio.to_thread(pg.start)
            await eventually(lambda: bool(consumer.event("breaker", state="closed")), within=90,
                             what="the breaker to close")  # fmt: skip
            result.note(
                f"PostgreSQL crashed (pg_ctl -m immediate) at {at} applied, down {outage:g} s "
                f"(10 retry cycles of 0.5 s would last ~5 s); breaker opened {opened_after:.1f} s "
                "after the crash and closed after the restart"
            )
            await drain(consumer, result, within=sized(ctx, 90, 300))
            await finish_sql(ctx, result, s)
            assert result.verdict is not None
            transient = {r: n for r, n in result.verdict.parked.items()
                         if r in {"retries_exhausted", "parking_failed"}}  # fmt: skip
            result.check("nothing parked because of the outage", not transient, str(transient))
        finally:
            await cleanup(s.org, consumer)


async def scenario_webhook(ctx: Context, result: ScenarioResult) -> None:
    from tests.support.crm_server import CrmServer

    s = await setup(ctx, "http-crm", actions=sized(ctx, 500, 4000), seed=302)
    batch, concurrency = 20, 4
    with CrmServer() as crm, CrmServer() as reference:
        quiet_server(crm)
        quiet_server(reference)
        consumer = ConsumerProcess(
            ctx, "http-crm: consumer", url=ctx.amqp_url, queue=s.org.queue,
            args=["--crm", f"{crm.url}?timeout=1", "--parked", s.parked,
                  "--keys", str(s.stream.keys_path), "--batch-size", str(batch),
                  "--concurrency", str(concurrency), "--max-retries", "10", "--exit-when-idle"],
        )  # fmt: skip
        try:
            records = s.stream.records

            def stored() -> int:
                return len(crm.applied_keys())

            await consumer.start()
            phases: list[tuple[float, str, Callable[[], None]]] = [
                (0.1, "HTTP 500 for 3 s",
                 lambda: crm.fail_with(500, until=time.monotonic() + 3)),
                (0.3, "HTTP 429 with Retry-After: 2 for 3 s",
                 lambda: crm.fail_with(429, until=time.monotonic() + 3, retry_after=2)),
                (0.5, "requests stalled 2.5 s (client timeout 1 s) for 3 s",
                 lambda: crm.stall(2.5, until=time.monotonic() + 3)),
                (0.7, "the next 6 connections reset without an answer",
                 lambda: crm.reset_connections(6)),
            ]  # fmt: skip
            windows: list[tuple[str, float]] = []
            for share, label, inject in phases:
                await wait_progress(stored, int(records * share), consumer, within=120,
                                    what=f"{int(share * 100)} % stored")  # fmt: skip
                windows.append((label, time.monotonic()))
                inject()
                result.note(f"at {stored()} stored: {label}")
            await drain(consumer, result, within=sized(ctx, 90, 300))

            received = crm.received()
            opened = len(consumer.event("breaker", state="open"))
            result.check("breaker opened (500s and 429)", opened >= 2, f"opened {opened} times")
            too_many = [r for r in received if r.status == 429]
            bound = concurrency * batch * 2
            result.check("429 + Retry-After: few requests while told to wait",
                         len(too_many) <= bound,
                         f"{len(too_many)} requests answered 429 (bound {bound})")  # fmt: skip
            statuses = Counter(r.status for r in received)
            result.note(
                "answers: "
                + ", ".join(f"{'reset' if k == 0 else k}×{n}" for k, n in sorted(statuses.items()))
                + " (409 = a redelivery the CRM recognised)"
            )
            stopped = consumer.event("stopped")
            retried = stopped[-1].get("retried", 0) if stopped else 0
            result.check(
                "transient failures went through the retry circuit",
                isinstance(retried, int) and retried > 0,
                f"{retried} retried",
            )

            # The test server's listen backlog is small: few connections at a time, and
            # again if one was dropped (the CRM answers 409 to what it already holds).
            summary = await replay(ctx, "http-crm", s.stream, s.directory, reference.url,
                                   batch=4, attempts=5)  # fmt: skip
            result.note(f"replay into a second local CRM: {summary.get('synced')} synced")
            answered_ok = Counter(r.key for r in received if r.status == 200 and r.key)
            parked = parked_rows(s.parked)
            result.verdict = verdict_webhook(s.stream, reference.stored(), crm.stored(),
                                             answered_ok, parked)  # fmt: skip
            depth, fail_depth = await s.org.depths()
            result.check("queue and retry circuit empty", depth == 0 and fail_depth == 0,
                         f"{depth}, {fail_depth}")  # fmt: skip
            await parked_cli(ctx, result, s, parked)
        finally:
            await cleanup(s.org, consumer)


def quiet_server(server: Any) -> None:
    """Silence the test CRM's per-request tracebacks: answering a client that gave up (a
    timeout, which this scenario provokes) is a BrokenPipeError it prints to stderr."""
    inner = getattr(server, "_server", None)
    if inner is not None:
        inner.handle_error = lambda *_args: None


# ---- 4. bad input at volume ---------------------------------------------------------------


async def scenario_poison(ctx: Context, result: ScenarioResult) -> None:
    # Simulator poison: 10 kinds per round; extra kinds: 9 per round, plus huge bodies.
    rounds, extra, huge, actions = (30, 22, 2, 405) if ctx.quick else (600, 444, 4, 8100)
    s = await setup(ctx, "poison", actions=actions, seed=401, poison_rounds=rounds,
                    extra_rounds=extra, huge=huge)  # fmt: skip
    poison = s.stream.poison_count
    good = len(s.stream.items) - poison
    result.note(f"{poison} poison messages ({len(s.stream.poison)} distinct bodies, "
                        f"{huge} of 5 MB) interleaved with {good} good ones")  # fmt: skip
    consumer = ConsumerProcess(ctx, "poison: consumer", url=ctx.amqp_url, queue=s.org.queue,
                               args=s.consumer_args("--exit-when-idle"))  # fmt: skip
    # Property-based fuzzing of decode/decrypt lives in the unit tests: run that file,
    # alongside the consumer.
    fuzz = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "tests/unit/test_fuzz_decode.py", "-q",
        "-p", "no:cacheprovider", cwd=ROOT, env=child_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        await consumer.start()
        await drain(consumer, result, within=sized(ctx, 180, 600))
        await finish_sql(ctx, result, s)
        assert result.verdict is not None
        result.check("every poison message parked", sum(result.verdict.parked.values()) == poison,
                     f"{sum(result.verdict.parked.values())} parked of {poison}")  # fmt: skip
        await show_parked(ctx, result, s, per_reason=1, limit=sized(ctx, 4, 20))
        kinds = Counter(
            k.removeprefix("poison.") for k in s.stream.kinds if k.startswith("poison.")
        )
        result.note("poison kinds: " + ", ".join(f"{k}×{n}" for k, n in sorted(kinds.items())))
    finally:
        await cleanup(s.org, consumer)
        if fuzz.returncode is None and sys.exc_info()[0] is not None:
            fuzz.kill()
    await fuzz_result(ctx, result, fuzz)


async def fuzz_result(
    ctx: Context, result: ScenarioResult, proc: asyncio.subprocess.Process
) -> None:
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
    text = out.decode("utf-8", "replace")
    ctx.capture.add("poison: pytest tests/unit/test_fuzz_decode.py", text)
    last = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    result.check("hypothesis fuzzing of decode/decrypt (tests/unit/test_fuzz_decode.py)",
                 proc.returncode == 0, last.strip("= "))  # fmt: skip


# ---- 5. privacy and TLS ------------------------------------------------------------------


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")


def process_table() -> str:
    """Every process's command line, as ``ps`` would show them."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                lines.append(cmdline(int(entry.name)))
    return "\n".join(lines)


async def scenario_privacy(ctx: Context, result: ScenarioResult) -> None:
    user = f"reliability-{secrets.token_hex(4)}"
    # Special characters on purpose: the consumer must percent-encode them.
    password = f"pw-{secrets.token_urlsafe(12)}%:@/#?"
    ctx.secrets.append(password)
    s = await setup(ctx, "privacy", actions=sized(ctx, 150, 1000), seed=501, publish=False)
    consumers: list[ConsumerProcess] = []
    listener: RabbitTlsListener | None = None
    tls_proxy: TlsTerminatingProxy | None = None
    listeners: list[RabbitTlsListener] = []
    proxies: list[TlsTerminatingProxy] = []
    certificates = None
    try:
        await asyncio.to_thread(_add_user, user, password)
        thirds = len(s.stream.items) // 3
        parts = [s.stream.items[:thirds], s.stream.items[thirds:2 * thirds],
                 s.stream.items[2 * thirds:]]  # fmt: skip
        url = "amqp://127.0.0.1:5672/"
        common = s.consumer_args("--exit-when-idle")

        # a) the password only in the environment
        await publish_stream(ctx, s, parts[0])
        creds = {"PROCA_USERNAME": user, "PROCA_PASSWORD": password}
        peeked = await ctx.cli("privacy: peek", "peek", "--queue", s.org.queue, "--url", url,
                               "--count", "100", "--json", env=creds)  # fmt: skip
        status = await ctx.cli("privacy: queue status", "queue", "status", "--queue",
                               s.org.queue, "--url", url, "--json", env=creds)  # fmt: skip
        result.check("`peek` and `queue status` work with the password in the environment",
                     peeked.code == 0 and status.code == 0 and len(peeked.json_lines()) > 0,
                     f"peek exit {peeked.code} ({len(peeked.stdout.splitlines())} summaries), "
                     f"status exit {status.code}")  # fmt: skip
        env_run = ConsumerProcess(
            ctx,
            "privacy: consumer (PROCA_PASSWORD)",
            url=url,
            queue=s.org.queue,
            args=common,
            credentials_in_env=False,
            env={"PROCA_USERNAME": user, "PROCA_PASSWORD": password},
        )
        consumers.append(env_run)
        await env_run.start()
        # The command line is fixed at exec: reading it while the process runs is proof.
        line = cmdline(env_run.pid)
        table = process_table()
        result.check("password absent from /proc/<pid>/cmdline (PROCA_PASSWORD)",
                     bool(line) and password not in line and "--queue" in line,
                     f"pid {env_run.pid}: {len(line)} bytes read")  # fmt: skip
        result.check("password absent from every process's command line", password not in table)
        await drain(env_run, result, within=120)

        # b) the password only in an --env-file (mode 0600)
        await publish_stream(ctx, s, parts[1])
        env_file = s.directory / "consumer.env"
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"PROCA_USERNAME={user}\nPROCA_PASSWORD='{password}'\n")
        file_run = ConsumerProcess(ctx, "privacy: consumer (--env-file)", url=url,
                                   queue=s.org.queue, args=[*common, "--env-file", str(env_file)],
                                   credentials_in_env=False)  # fmt: skip
        consumers.append(file_run)
        await file_run.start()
        line = cmdline(file_run.pid)
        result.check("password absent from /proc/<pid>/cmdline (--env-file)",
                     bool(line) and password not in line, f"pid {file_run.pid}")  # fmt: skip
        await drain(file_run, result, within=120)

        # c) a wrong password: refused, exit 2, and the attempt's password is not echoed
        wrong = f"wrong-{secrets.token_urlsafe(8)}"
        ctx.secrets.append(wrong)
        refused = ConsumerProcess(
            ctx,
            "privacy: consumer (wrong password)",
            url=url,
            queue=s.org.queue,
            args=common,
            credentials_in_env=False,
            env={"PROCA_USERNAME": user, "PROCA_PASSWORD": wrong},
        )
        consumers.append(refused)
        await refused.start()
        code = await refused.wait(60)
        said = " ".join(refused.stderr)
        result.check("wrong password: exit 2 with a clear message",
                     code == 2 and "refused the user name or password" in said,
                     f"exit {code}")  # fmt: skip

        # d) key files are 0600 (the suite's stores and one made by `keys generate`)
        generated = s.directory / "generated-keys.json"
        made = await ctx.cli("privacy: keys generate", "keys", "generate", "--out", str(generated))
        modes = {str(p): oct(p.stat().st_mode & 0o777) for p in [*ctx.keystores, generated]
                 if p.exists()}  # fmt: skip
        result.check("key files are 0600",
                     made.code == 0 and all(m == "0o600" for m in modes.values()),
                     f"{len(modes)} key file(s): {sorted(set(modes.values()))}")  # fmt: skip

        # e) amqps: refused without the CA, works with --ca-file
        certificates = await asyncio.to_thread(make_certificates)
        # A second certificate from the same (trusted) CA, for another host name only.
        other_cert, other_key = await asyncio.to_thread(
            certificates.issue, "other-host", "DNS:broker.other.example"
        )
        kind = "a RabbitMQ TLS listener started at run time (rabbit_networking:start_ssl_listener)"
        try:
            listener = RabbitTlsListener(certificates)
            other_listener = RabbitTlsListener(certificates, cert=other_cert, key=other_key)
            listeners.append(other_listener)
            await asyncio.gather(
                asyncio.to_thread(listener.start), asyncio.to_thread(other_listener.start)
            )
            tls_port, other_port = listener.port, other_listener.port
        except TlsError as exc:
            listener = None
            tls_proxy = TlsTerminatingProxy(certificates, ("127.0.0.1", 5672))
            await tls_proxy.start()
            tls_port = tls_proxy.port
            other_proxy = TlsTerminatingProxy(certificates, ("127.0.0.1", 5672),
                                              cert=other_cert, key=other_key)  # fmt: skip
            proxies.append(other_proxy)
            await other_proxy.start()
            other_port = other_proxy.port
            kind = f"an asyncio TLS-terminating proxy to 5672 (broker listener failed: {exc})"
        result.note(f"TLS: {kind}, port {tls_port}, CA and certificates made with openssl")
        tls_url = f"amqps://127.0.0.1:{tls_port}/"
        guest = {"PROCA_USERNAME": "guest", "PROCA_PASSWORD": "guest"}
        # Three connections that must be refused, run side by side.
        refusals = [
            ConsumerProcess(ctx, "privacy: consumer (amqps, no CA)", url=tls_url,
                            queue=s.org.queue, args=common, env=guest, credentials_in_env=False),
            ConsumerProcess(ctx, "privacy: consumer (amqps, no_verify_ssl)",
                            url=f"{tls_url}?no_verify_ssl=1", queue=s.org.queue, args=common,
                            env=guest, credentials_in_env=False),
            ConsumerProcess(ctx, "privacy: consumer (amqps, other host's cert)",
                            url=f"amqps://127.0.0.1:{other_port}/", queue=s.org.queue,
                            args=[*common, "--ca-file", str(certificates.ca)], env=guest,
                            credentials_in_env=False),
        ]  # fmt: skip
        consumers.extend(refusals)
        for process in refusals:
            await process.start()
        codes = await asyncio.gather(*(process.wait(60) for process in refusals))
        told = [" ".join(process.stderr) for process in refusals]
        result.check("amqps with an untrusted certificate: refused (exit 2, clear message)",
                     codes[0] == 2 and "certificate verify failed" in told[0],
                     f"exit {codes[0]}: {told[0].strip()[:160]}")  # fmt: skip
        result.check("verification cannot be switched off (no_verify_ssl refused)",
                     codes[1] == 2, f"exit {codes[1]}: {told[1].strip()[:160]}")  # fmt: skip
        result.check("amqps with a trusted CA but another host's certificate: refused",
                     codes[2] == 2 and "certificate verify failed" in told[2],
                     f"exit {codes[2]}: {told[2].strip()[:160]}")  # fmt: skip
        await publish_stream(ctx, s, parts[2])
        trusted = ConsumerProcess(ctx, "privacy: consumer (amqps, --ca-file)", url=tls_url,
                                  queue=s.org.queue,
                                  args=[*common, "--ca-file", str(certificates.ca)], env=guest,
                                  credentials_in_env=False)  # fmt: skip
        consumers.append(trusted)
        await trusted.start()
        await drain(trusted, result, within=120)
        await finish_sql(ctx, result, s)
    finally:
        if listener is not None:
            with contextlib.suppress(TlsError):
                await asyncio.to_thread(listener.stop)
            with contextlib.suppress(TlsError):
                result.check("TLS listener stopped afterwards", not listener.active())
        for extra in listeners:
            with contextlib.suppress(TlsError):
                await asyncio.to_thread(extra.stop)
        for proxy in [*proxies, *([tls_proxy] if tls_proxy is not None else [])]:
            await proxy.stop()
        if certificates is not None:
            import shutil

            shutil.rmtree(certificates.directory, ignore_errors=True)
        with contextlib.suppress(ScenarioFailure):
            await asyncio.to_thread(rabbitmqctl, "delete_user", user)
        await cleanup(s.org, *consumers)


def _add_user(user: str, password: str) -> None:
    """A broker user whose password goes through stdin, never an argument."""
    import shutil

    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        raise ScenarioFailure("rabbitmqctl is not installed")
    added = subprocess.run(  # noqa: S603 - fixed program
        [ctl, "add_user", user], input=password + "\n", capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    if added.returncode != 0:
        raise ScenarioFailure(f"add_user failed: {added.stderr.strip()[:200]}")
    rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "crash",
        "SIGKILL ×10, during commits and at random moments",
        "The consumer is killed ten times mid-stream — half of the kills the instant the "
        "SQLite CRM's write-ahead log is written (a commit in progress), half at random "
        "moments — restarted each time, and finally left to drain.",
        scenario_crash,
    ),
    Scenario(
        "broker-restart",
        "Broker application restarted twice",
        "`rabbitmqctl stop_app` / `start_app` twice mid-stream; the consumer must "
        "reconnect by itself (the broker is always restarted, even when the scenario "
        "fails).",
        scenario_broker_restart,
    ),
    Scenario(
        "network",
        "TCP proxy: drop, stall, slow",
        "The consumer talks to the broker through a local TCP proxy that resets every "
        "connection (refusing new ones for 2 s), holds all traffic for a few seconds, "
        "adds 50 ms per chunk, and resets everything again.",
        scenario_proxy,
    ),
    Scenario(
        "postgres-outage",
        "PostgreSQL CRM crashed and down mid-stream",
        "A PostgreSQL owned by the run (initdb in a temporary directory, its own port) "
        "is the CRM; it is crashed (`pg_ctl -m immediate`) mid-stream, kept down, "
        "then restarted. With 10 retry cycles of 0.5 s, the outage outlasts the retry "
        "budget: only the circuit breaker keeps messages from being parked.",
        scenario_postgres,
    ),
    Scenario(
        "http-crm",
        "HTTP CRM: 500s, 429 + Retry-After, timeouts, resets",
        "The webhook backend against the local HTTP CRM server, which answers 500, then "
        "429 with Retry-After, then stalls past the client's timeout, then resets "
        "connections.",
        scenario_webhook,
    ),
    Scenario(
        "poison",
        "Poison at volume, every malformation class",
        "Poison messages of every class (the simulator's ten, plus empty objects, binary "
        "garbage, deep nesting, wrong personalInfo types, undecryptable plaintext, "
        "malformed v1 and events, string ids, 5 MB truncated bodies) interleaved with as "
        "many good ones; then the hypothesis fuzzing of decode/decrypt.",
        scenario_poison,
    ),
    Scenario(
        "privacy",
        "Passwords, key files, amqps",
        "The password only in PROCA_PASSWORD or an --env-file (0600), checked absent "
        "from /proc/<pid>/cmdline; a wrong password; key files 0600; amqps refused with "
        "an untrusted certificate and working with --ca-file.",
        scenario_privacy,
    ),
    Scenario(
        "scale-postgres",
        "Three consumers into one PostgreSQL, one SIGKILLed repeatedly",
        "Three `run` processes on one queue into one PostgreSQL database (CRM and parking "
        "store); at several progress marks one of them, chosen by a seeded generator, is "
        "SIGKILLed and replaced; then two processes drain the queue together.",
        _scale.scenario_scale_postgres,
        in_quick=False,
    ),
    Scenario(
        "scale-sqlite",
        "Two consumers into one SQLite file",
        "Two `run` processes on one queue into one SQLite CRM and parking file (one writer "
        "at a time), one SIGKILLed mid-stream and restarted; both drain the queue.",
        _scale.scenario_scale_sqlite,
        in_quick=False,
    ),
    Scenario(
        "cluster",
        "3-node RabbitMQ cluster, quorum queues, a node stopped",
        "Three RabbitMQ nodes started on loopback (own names, ports and data directories) "
        "and clustered; the org's queues are quorum queues (`topology declare --quorum`); "
        "two consumers (on nodes 1 and 2) run while node 1 is stopped mid-stream and "
        "started again.",
        _cluster.scenario_cluster,
        in_quick=False,
    ),
)


def by_name(names: list[str] | None, *, quick: bool = False) -> list[Scenario]:
    if not names:
        return [s for s in SCENARIOS if s.in_quick or not quick]
    known = {s.name: s for s in SCENARIOS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]
