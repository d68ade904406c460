"""Backfill benchmark of the destinations: the pusher against a per-message pusher.

For every vendor emulator of ``tests.support.emulators.DRIVERS`` (and the toy HTTP
destination, which validates the harness), set to 100 ms latency and the vendor's
documented rate limit: fill a SQLite ledger with N contacts (one action each, written
straight through the SQL writer: not timed), then

* **pusher**: ``Pusher.run()`` of the connector from an empty destination — batches at
  the connector's ``max_batch``, its own concurrency, the configured rate — in a process
  of its own, on the event loop ``proca-sync push`` uses (the emulator, like a real API,
  is not in the pusher's process: its thread would take the pusher's interpreter lock);
* **per-message** (the Node framework's way, in the same run): the same connector handed
  one contact and its action per call, one call in flight, on a sample of the contacts
  (``--baseline`` of them: at 100 ms a request it manages a few contacts per second, so
  the whole backfill would take hours); its contacts/s is what it would sustain.

Printed per destination: contacts/s of each, the ratio, requests/s against the configured
rate (the share of the rate limit used), and the 429s received. ``--out`` writes JSON.

    python -m bench.destinations                 # 100,000 contacts per destination
    python -m bench.destinations --quick         # 5,000 contacts (a smoke run)
    python -m bench.destinations --only brevo --concurrency 8   # 8 pushes in flight
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from proca_sync import aio
from proca_sync.crm.sql import SqlBackend
from proca_sync.destinations import destination_from_config
from proca_sync.destinations.base import Batch, Destination
from proca_sync.destinations.http import request_rate
from proca_sync.destinations.pusher import Pusher
from proca_sync.destinations.state import LedgerState
from proca_sync.sync.records import ActionRecord, ConsentFact, ContactFacts, SyncRecord
from tests.support.emulators import DRIVERS
from tests.support.emulators.base import Driver, Emulator
from tests.support.emulators.toy import ToyDriver

LATENCY = 0.1
# Action Network has no batch endpoint and allows 4 requests a second: about one contact
# a second whatever a pusher does, so 100,000 contacts would take more than a day. Its
# figures come from a sample (contacts, per-message sample); the rate is what they show.
# ActiveCampaign and HubSpot run the whole backfill (about 5.5 and 7.5 minutes at their
# rate limits) but their per-message samples are 60 contacts (0.7 and 2.3 contacts/s:
# 300 would add 7 and 2 minutes for no better figure).
SAMPLED = {
    "actionnetwork": (300, 60),
    "activecampaign": (100_000, 60),
    "hubspot": (100_000, 60),
}
CONCURRENT = frozenset({"brevo", "mailchimp"})
"""Connectors whose pushes in flight are a setting (``concurrency``)."""
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def pusher_process(url: str, table: dict[str, Any]) -> dict[str, Any]:
    """:func:`pusher_run` in a child process (``--pusher-child``); its result."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.destinations", "--pusher-child", url,
         orjson.dumps(table).decode()],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"pusher process failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = orjson.loads(done.stdout.strip().splitlines()[-1])
    return result


def fill(url: str, contacts: int) -> None:
    """``contacts`` admitted contacts with one consent-bearing action each."""
    with SqlBackend(url) as backend:
        batch: list[SyncRecord] = []
        for n in range(contacts):
            email = f"backfill{n}@example.org"
            created = f"2024-05-{1 + n % 28:02d}T10:00:00Z"
            batch.append(
                SyncRecord(
                    key=f"bench:{n}",
                    kind="action",
                    contact=ContactFacts(
                        refs=frozenset({f"ref{n:040d}"}),
                        emails=frozenset({email}),
                        fields={"email": email, "firstName": f"First{n}", "country": "DE"},
                        stamp=f"2024-05-{1 + n % 28:02d}T10:00:00.000000Z|1|{n + 1:020d}",
                        admit=True,
                        real=True,
                        # Supporters who opted in: the lists' members, what a backfill
                        # into a mailing tool moves (Brevo's bulk import needs a list;
                        # others go one by one, at its 10 requests/s).
                        consent=ConsentFact(n + 1, True, created),
                    ),
                    action=ActionRecord(
                        action_id=n + 1,
                        action_type="register",
                        campaign="backfill",
                        created_at=created,
                        testing=False,
                        data={},
                        version="v1",
                    ),
                )
            )
            if len(batch) == 1_000:
                backend.apply_sync(batch)
                batch = []
        if batch:
            backend.apply_sync(batch)


def _rate_of(destination: Destination, table: dict[str, Any]) -> float | None:
    if table.get("rate"):
        return float(table["rate"])
    return request_rate(destination)


async def pusher_run(url: str, table: dict[str, Any]) -> dict[str, Any]:
    backend = SqlBackend(url)
    destination = destination_from_config("bench", table)
    pusher = Pusher(backend, destination)
    started = time.perf_counter()
    cpu = time.process_time()
    try:
        result = await pusher.run()
    finally:
        pusher.close()
        await backend.close()
    seconds = time.perf_counter() - started
    # The pusher process's CPU time over the wall time: near 1.0 its one thread is
    # saturated, and the bound is the pusher's CPU, not the API.
    cpu = time.process_time() - cpu
    rate = _rate_of(destination, table)
    return {
        "contacts": result.stats.contacts,
        "seconds": round(seconds, 3),
        "contacts_per_s": round(result.stats.contacts / seconds, 2),
        "requests": result.stats.requests,
        "requests_per_s": round(result.stats.requests / seconds, 3),
        "rate": rate,
        "rate_share": None if not rate else round(result.stats.requests / seconds / rate, 3),
        "max_batch": destination.max_batch,
        "cpu_share": round(cpu / seconds, 3),
        "concurrency": pusher.concurrency,
        "window": pusher.window,
        "caught_up": result.caught_up,
        "parked": result.parked,
    }


async def per_message_run(url: str, table: dict[str, Any], sample: int) -> dict[str, Any]:
    """One contact and its action per push, one push in flight (what Node does)."""
    with SqlBackend(url) as backend:
        state = LedgerState(backend, "baseline")
        state.register()
        plan = state.plan(limit=sample * 2, include_testing=False, erasure=False)
    assert plan is not None
    destination = destination_from_config("baseline", table)
    await destination.open()
    requests = 0
    started = time.perf_counter()
    try:
        for contact in plan.contacts[:sample]:
            actions = plan.actions.get(contact.contact_id, [])
            names = {a.campaign for a in actions}
            report = await destination.push(
                Batch(
                    contacts=[contact],
                    actions=actions,
                    campaigns={n: plan.campaigns[n] for n in names if n in plan.campaigns},
                )
            )
            requests += report.requests
    finally:
        await destination.close()
    seconds = time.perf_counter() - started
    count = min(sample, len(plan.contacts))
    return {
        "contacts": count,
        "seconds": round(seconds, 3),
        "contacts_per_s": round(count / seconds, 3),
        "requests": requests,
    }


def targets(only: list[str] | None) -> list[tuple[str, Driver]]:
    found: list[tuple[str, Driver]] = [("toy", ToyDriver())]
    for kind in sorted(DRIVERS):
        found.append((kind, importlib.import_module(DRIVERS[kind]).DRIVER))
    return [t for t in found if only is None or t[0] in only]


def bench_one(
    kind: str,
    driver: Driver,
    contacts: int,
    sample: int,
    work: Path,
    concurrency: int | None = None,
) -> dict[str, Any]:
    url = f"sqlite:///{work / (kind.replace(':', '_') + '.db')}"
    fill(url, contacts)
    if driver.key_env:
        os.environ[driver.key_env] = driver.key
    results: dict[str, Any] = {"destination": kind, "latency": LATENCY}
    for phase in ("pusher", "per_message"):
        emulator: Emulator = driver.make(latency=LATENCY, rate_limited=True)
        with emulator.running():
            table = driver.config(emulator)
            if phase == "pusher" and concurrency is not None:
                table["concurrency"] = concurrency  # the connector's default otherwise
            if phase == "pusher":
                # The emulator's thread runs in this process, the pusher in another.
                served = emulator.call(time.thread_time)
                results[phase] = pusher_process(url, table)
                served = emulator.call(time.thread_time) - served
                results[phase]["emulator_cpu_share"] = round(
                    served / results[phase]["seconds"], 3
                )
            else:
                results[phase] = asyncio.run(per_message_run(url, table, sample))
            results[phase]["throttled"] = emulator.call(emulator.throttled_count)
            results[phase]["hits"] = hits = emulator.call(lambda e=emulator: len(e.hits))
            results[phase]["peak_in_flight"] = emulator.call(
                lambda e=emulator: e.peak_in_flight
            )
            # Requests in flight on average (connection-seconds over the wall time).
            busy = emulator.call(lambda e=emulator: e.connection_seconds)
            results[phase]["connections"] = round(busy / results[phase]["seconds"], 2)
            # The emulator's count is the truth (retries included).
            seconds = results[phase]["seconds"]
            results[phase]["requests_per_s"] = round(hits / seconds, 3)
            rate = results[phase].get("rate")
            if rate:
                results[phase]["rate_share"] = round(hits / seconds / rate, 3)
    base = results["per_message"]["contacts_per_s"]
    results["ratio"] = round(results["pusher"]["contacts_per_s"] / base, 1) if base else None
    hits = results["pusher"]["hits"]
    results["throttled_share"] = round(results["pusher"]["throttled"] / hits, 4) if hits else 0
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.destinations")
    parser.add_argument("--quick", action="store_true", help="5,000 contacts, 100 sampled")
    parser.add_argument("--contacts", type=int, help="contacts to backfill (default 100,000)")
    parser.add_argument("--baseline", type=int, help="contacts the per-message run pushes")
    parser.add_argument("--only", nargs="+", help="destination types")
    parser.add_argument(
        "--concurrency",
        type=int,
        help="pushes in flight, for the connectors with a concurrency setting "
        "(brevo, mailchimp; default: the connector's)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "destinations.json")
    parser.add_argument("--pusher-child", nargs=2, metavar=("URL", "TABLE"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.pusher_child:
        url, table = args.pusher_child
        result = aio.run(pusher_run(url, orjson.loads(table)))
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return 0
    contacts = args.contacts or (5_000 if args.quick else 100_000)
    sample = args.baseline or (100 if args.quick else 300)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dest-") as tmp:
        for kind, driver in targets(args.only):
            size, baseline = contacts, sample
            if kind in SAMPLED:
                size, baseline = min(contacts, SAMPLED[kind][0]), min(sample, SAMPLED[kind][1])
            print(f"… {kind}: {size} contacts", file=sys.stderr, flush=True)
            settable = kind in CONCURRENT and args.concurrency is not None
            row = bench_one(
                kind, driver, size, baseline, Path(tmp), args.concurrency if settable else None
            )
            row["contacts"], row["sample"] = size, baseline
            rows.append(row)
            p, b = row["pusher"], row["per_message"]
            print(
                f"{kind}: pusher {p['contacts_per_s']} contacts/s "
                f"({p['requests_per_s']} req/s, {p['rate_share']} of rate {p['rate']}, "
                f"batch {p['max_batch']}, {p['concurrency']} in flight, "
                f"pusher CPU {p['cpu_share']:.0%} of a core (emulator "
                f"{p['emulator_cpu_share']:.0%}, another process), {p['connections']} connections "
                f"busy on average (peak {p['peak_in_flight']}), "
                f"429s {p['throttled']}); per-message "
                f"{b['contacts_per_s']} contacts/s; ratio {row['ratio']}×",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(
        orjson.dumps({"contacts": contacts, "sample": sample, "rows": rows},
                     option=orjson.OPT_INDENT_2)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def markdown(doc: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md section of a ``destinations.json`` (see bench/report.py)."""
    out = [
        "## Destinations: backfill",
        "",
        f"`python -m bench.destinations`: {doc['contacts']:,} contacts (one action each) "
        "backfilled from a SQLite ledger into each emulator at "
        f"{int(LATENCY * 1000)} ms latency and its documented rate limit, against a "
        "per-message pusher (one contact and its action per call, one call in flight — "
        f"the Node framework's way) measured in the same run on {doc['sample']} contacts. "
        "Requests per second are the emulator's count (retries included). Targets: ≥ 50× "
        "the per-message figure; ≥ 80 % of the rate limit used; 429s ≤ 1 % of requests.",
        "",
        "| destination | contacts | pusher contacts/s | per-message contacts/s | ratio | "
        "requests/s | limit | share used | batch × in flight | 429s | bounded by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in doc["rows"]:
        p, b = row["pusher"], row["per_message"]
        # A limit that is not a request rate (Mailchimp's 10 connections): the row names
        # it and the share of it used (connections busy on average).
        limit = row.get("limit", p["rate"])
        share = row.get("limit_share", p.get("rate_share"))
        out.append(
            f"| {row['destination']} | {row.get('contacts', doc['contacts']):,} "
            f"| {p['contacts_per_s']:,.1f} | {b['contacts_per_s']:.2f} "
            f"| {row['ratio']}× | {p['requests_per_s']:.1f} | {limit or '–'} | "
            f"{'–' if share is None else f'{share:.0%}'} | "
            f"{p['max_batch']} × {p.get('concurrency', 1)} | "
            f"{p['throttled']} | {row.get('bound', '–')} |"
        )
    if doc.get("note"):
        out += ["", doc["note"]]
    return [*out, ""]
