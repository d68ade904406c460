"""Run the proca-sync consumer through its public API and time it like the other consumers.

``python -m bench.proca_driver --url U --queue Q --n N --crm URL [--keys FILE] …`` builds
what ``proca-sync run`` builds (:class:`~proca_sync.config.ConsumerSettings`, the backend
from the CRM URL, a parking store, the key store), runs
:class:`~proca_sync.consumer.runner.Consumer` and prints one JSON line:

* ``seconds``: from the call to ``Consumer.run()`` (which opens the CRM and the parking
  store, connects and subscribes) until the consumer has settled its N-th message — the
  moment it counts the ack, as @proca/queue's ``count.ack`` does in the Node peer;
* ``exit_seconds``: until ``run()`` has returned after a graceful stop (acks flushed,
  connections closed), for reference;
* the consumer's own totals.

The instant of the N-th settlement comes from the consumer's :class:`Stats` (passed in
through the constructor, a subclass that notes the time): no polling, no patching.
Logging is configured as the CLI does it (JSON lines on stderr: one per batch at INFO),
because that is part of what the service costs. ``--workers K`` runs the supervisor of
``proca-sync run --workers K`` instead (:func:`drive_workers`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import orjson

from proca_sync import aio
from proca_sync.cli import configure_logging
from proca_sync.config import ConsumerSettings
from proca_sync.consumer.parking import ParkingStore
from proca_sync.consumer.policy import Outcome
from proca_sync.consumer.runner import Consumer
from proca_sync.consumer.status import Stats
from proca_sync.consumer.supervisor import Supervisor
from proca_sync.crm import backend_from_url
from proca_sync.crypto import Keystore

__all__ = ["CountingStats", "drive"]


class CountingStats(Stats):
    """The consumer's stats, plus the instant the ``target``-th message was settled."""

    def __init__(self, target: int) -> None:
        super().__init__()
        self.target = target
        self.reached = asyncio.Event()
        self.reached_at: float | None = None

    def settled(self, outcome: Outcome, label: str, count: int = 1) -> None:
        super().settled(outcome, label, count)
        if self.reached_at is None and self.settled_total >= self.target:
            self.reached_at = time.perf_counter()
            self.reached.set()


async def drive(settings: ConsumerSettings, n: int, *, log_each: bool = True) -> dict[str, object]:
    keystore = Keystore.load(settings.keys) if settings.keys is not None else None
    stats = CountingStats(n)
    consumer = Consumer(
        settings,
        backend=backend_from_url(settings.crm),
        parking=ParkingStore(settings.parked),
        keystore=keystore,
        stats=stats,
        log_each=log_each,
    )
    started = time.perf_counter()
    running = asyncio.create_task(consumer.run())
    reached = asyncio.create_task(stats.reached.wait())
    await asyncio.wait({running, reached}, return_when=asyncio.FIRST_COMPLETED)
    if not reached.done():  # run() ended before N messages: report, do not hang
        reached.cancel()
        await running
        raise RuntimeError(f"consumer stopped after {stats.settled_total} of {n} messages")
    consumer.request_stop("bench: all messages settled")
    await running
    exited = time.perf_counter()
    assert stats.reached_at is not None
    return {
        "seconds": stats.reached_at - started,
        "exit_seconds": exited - started,
        "acked": stats.settled_total,
        "outcomes": dict(stats.outcomes),
    }


async def drive_workers(settings: ConsumerSettings, n: int, workers: int) -> dict[str, object]:
    """``run --workers K`` (the supervisor, K processes), timed like the other consumers:
    from the moment the first worker is ready to consume (its interpreter started and
    its imports done, as the Node peer's clock starts after its ``require``s and a
    single process's at ``Consumer.run()``) until the workers' shared count of settled
    messages reaches N (polled every 2 ms); ``--max-messages N`` then stops them.
    ``spawn_seconds`` is the same from the supervisor's start, spawning included."""
    supervisor = Supervisor(
        settings.model_copy(update={"max_messages": n}), workers=workers, keys=settings.keys,
        log_level="INFO", setup_logging=configure_logging,
    )  # fmt: skip
    started = time.monotonic()
    running = asyncio.create_task(supervisor.run())
    reached_at: float | None = None
    while not running.done():
        if supervisor.settled >= n:
            reached_at = time.monotonic()
            break
        await asyncio.sleep(0.002)
    code, stats = await running
    exited = time.monotonic()
    ready = supervisor.first_ready
    if reached_at is None or code != 0 or ready is None:
        raise RuntimeError(f"workers stopped (exit {code}) after {supervisor.settled} of {n}")
    totals = stats.totals()
    return {
        "seconds": reached_at - ready,
        "spawn_seconds": reached_at - started,
        "exit_seconds": exited - started,
        "acked": supervisor.settled,
        "outcomes": {k: totals[k] for k in ("acked", "retried", "parked", "returned")},
        "workers": workers,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.proca_driver")
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--crm", required=True)
    parser.add_argument("--parked", required=True)
    parser.add_argument("--keys", type=Path)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--prefetch", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--quiet", action="store_true", help="no per-batch log lines")
    parser.add_argument("--workers", type=int, default=1, help="run --workers K")
    args = parser.parse_args(argv)
    options: dict[str, object] = {
        "url": args.url,
        "queue": args.queue,
        "crm": args.crm,
        "parked": args.parked,
        "keys": args.keys,
    }
    for name in ("concurrency", "prefetch", "batch_size"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    settings = ConsumerSettings(**options)  # type: ignore[arg-type]
    configure_logging("INFO")
    if args.workers > 1:
        result = aio.run(drive_workers(settings, args.n, args.workers))
    else:
        result = aio.run(drive(settings, args.n, log_each=not args.quiet))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
