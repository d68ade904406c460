"""Scale-out scenarios: several consumer processes on one queue into one CRM.

* ``scale-postgres`` — three ``proca-sync run`` processes consume one queue into one
  PostgreSQL database holding both the CRM and the parking store; one of them, chosen
  by a seeded random generator, is SIGKILLed at each of several progress marks and
  started again. Then two processes drain the queue (``--exit-when-idle``).
* ``scale-sqlite`` — two processes into one SQLite CRM file and one parking file (one
  writer at a time), one of them SIGKILLed mid-stream and restarted.

Both end like every scenario: the CRM equals what ``replay`` makes of the published
bodies, nothing lost, nothing applied twice, nothing wrongly parked — and no database
clash ever reached the log as an error (a busy SQLite file or a PostgreSQL deadlock is
retried inside the backend, or retried as a transient failure by the consumer).

The scenarios import the shared steps of :mod:`reliability.scenarios` when they run
(that module lists them among its scenarios).
"""

from __future__ import annotations

import asyncio
import random
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from reliability.harness import ConsumerProcess, Context, eventually

if TYPE_CHECKING:
    from reliability.scenarios import ScenarioResult

__all__ = ["scenario_scale_postgres", "scenario_scale_sqlite"]

KILL_SEED = 4242


async def _kill_and_restart(
    ctx: Context,
    result: ScenarioResult,
    name: str,
    consumers: list[ConsumerProcess],
    start: Callable[[str], ConsumerProcess],
    progress: Callable[[], int],
    marks: list[int],
) -> list[ConsumerProcess]:
    """At each progress mark, SIGKILL one running consumer (seeded choice) and start a
    replacement; returns every process started (for cleanup)."""
    from reliability.scenarios import wait_progress

    rng = random.Random(KILL_SEED)
    started = list(consumers)
    for number, mark in enumerate(marks, start=1):
        await wait_progress(progress, mark, consumers[0], within=180,
                            what=f"{mark} applied before kill {number}")  # fmt: skip
        index = rng.randrange(len(consumers))
        victim = consumers[index]
        victim.kill()
        code = await victim.wait(30)
        result.check(f"kill {number} took effect", code == -signal.SIGKILL, f"exit {code}")
        replacement = await start(f"{name}: consumer {index + 1}.{number + 1}").start()
        consumers[index] = replacement
        started.append(replacement)
        # The one watched by wait_progress must be alive: rotate the list of running ones.
        consumers.sort(key=lambda c: not c.running)
    return started


def _consuming(consumer: ConsumerProcess) -> Callable[[], bool]:
    return lambda: bool(consumer.event("started"))


def _no_error_lines(result: ScenarioResult, consumers: list[ConsumerProcess]) -> None:
    """No consumer logged an error (a clash between writers is not one)."""
    errors = [
        e for c in consumers for e in c.events if e.get("level") in {"error", "critical"}
    ]  # fmt: skip
    result.check("no error logged by any consumer", not errors,
                 "; ".join(f"{e.get('event')}: {e.get('error', e.get('msg'))}"
                           for e in errors[:5]))  # fmt: skip


async def scenario_scale_postgres(ctx: Context, result: ScenarioResult) -> None:
    from reliability.pgprivate import PrivatePostgres
    from reliability.scenarios import (
        cleanup,
        drain,
        finish_sql,
        pg_applied,
        setup,
        sized,
    )

    kills = sized(ctx, 2, 8)
    with PrivatePostgres() as pg:
        s = await setup(ctx, "scale-postgres", actions=sized(ctx, 300, 4000), seed=401,
                        crm=pg.url)  # fmt: skip
        s.parked = pg.url  # the parking store in the same database
        progress = pg_applied(pg.url)
        args = s.consumer_args("--concurrency", "2", "--prefetch", "20", "--batch-size", "10")

        def start(label: str, *extra: str) -> ConsumerProcess:
            return ConsumerProcess(ctx, label, url=ctx.amqp_url, queue=s.org.queue,
                                   args=[*args, *extra])  # fmt: skip

        consumers = [await start(f"scale-postgres: consumer {i + 1}").start() for i in range(3)]
        started = list(consumers)
        try:
            records = s.stream.records
            marks = [int(records * (0.1 + 0.6 * n / max(1, kills - 1))) for n in range(kills)]
            started = await _kill_and_restart(ctx, result, "scale-postgres", consumers, start,
                                              progress, marks)  # fmt: skip
            result.note(f"{kills} SIGKILLs of one of three consumers (seed {KILL_SEED}) at "
                        f"{', '.join(map(str, marks))} applied")  # fmt: skip
            # The survivors stop gracefully (once consuming: a process still starting has
            # no handler yet); two fresh processes drain the rest together.
            for consumer in consumers:
                await eventually(_consuming(consumer), within=60,
                                 what=f"{consumer.label} consuming")  # fmt: skip
            for consumer in consumers:
                consumer.terminate()
            codes = [await c.wait(60) for c in consumers]
            result.check("SIGTERM stops each consumer with exit 0", codes == [0] * len(codes),
                         str(codes))  # fmt: skip
            final = [await start(f"scale-postgres: drain {i + 1}", "--exit-when-idle").start()
                     for i in range(2)]  # fmt: skip
            started += final
            for consumer in final:
                await drain(consumer, result, within=sized(ctx, 120, 400))
            _no_error_lines(result, started)
            await finish_sql(ctx, result, s)
        finally:
            await cleanup(s.org, *started)


async def scenario_scale_sqlite(ctx: Context, result: ScenarioResult) -> None:
    from reliability.scenarios import (
        cleanup,
        drain,
        finish_sql,
        setup,
        sized,
        sqlite_applied,
    )

    s = await setup(ctx, "scale-sqlite", actions=sized(ctx, 300, 3000), seed=402)
    crm_file = s.directory / "crm.db"
    args = s.consumer_args("--concurrency", "2", "--prefetch", "20", "--batch-size", "10",
                           "--exit-when-idle")  # fmt: skip

    def start(label: str) -> ConsumerProcess:
        return ConsumerProcess(ctx, label, url=ctx.amqp_url, queue=s.org.queue, args=args)

    consumers = [await start(f"scale-sqlite: consumer {i + 1}").start() for i in range(2)]
    started = list(consumers)
    try:
        mark = int(s.stream.records * 0.3)
        started = await _kill_and_restart(ctx, result, "scale-sqlite", consumers, start,
                                          lambda: sqlite_applied(crm_file), [mark])  # fmt: skip
        result.note(f"one of two consumers SIGKILLed at {mark} applied and restarted")
        await asyncio.gather(*(drain(c, result, within=sized(ctx, 120, 400))
                               for c in consumers))  # fmt: skip
        _no_error_lines(result, started)
        await finish_sql(ctx, result, s)
    finally:
        await cleanup(s.org, *started)
