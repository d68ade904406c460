"""Web console pages over a large CRM and parking store: ``python -m bench.web [--full]``.

Fills a SQLite CRM with N contacts (rows written straight into the schema's tables: the
pages read, they do not care how rows arrived) and a parking store with M parked
messages, signs in through the real app (in-process, Starlette's TestClient) and times
each page: the median of several requests, and its ratio to ``/login`` measured in the
same run (a page that reads nothing). Quick: 2,000 contacts / 10,000 parked (the parked
list at issue 16's size); ``--full``: 100,000 / 10,000. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from fastapi.testclient import TestClient
from sqlalchemy import insert

from bench.pipeline import splice
from proca_sync.consumer.parking import ParkingStore, ParkItem
from proca_sync.crm.sql import SqlBackend
from proca_sync.crm.sql.schema import contact_keys, contacts
from proca_sync.web.accounts import AccountStore, HashCost, Role
from proca_sync.web.app import WebSettings, create_app

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "bench password 123"
CHEAP = HashCost(time_cost=1, memory_kib=8192, parallelism=1)


def fill_crm(url: str, count: int) -> None:
    backend = SqlBackend(url)
    backend.open_sync()
    now = "2026-01-01T00:00:00Z"
    with backend.engine.begin() as conn:
        for start in range(0, count, 5000):
            rows = range(start, min(count, start + 5000))
            conn.execute(
                insert(contacts),
                [
                    {"id": i + 1, "admitted": True, "email": f"person{i}@example.org",
                     "first_name": f"First{i}", "last_name": "Bench", "fields": {},
                     "real": True, "opted_in": i % 2 == 0, "subscribed": i % 2 == 0,
                     "email_status_stamp": "", "updated_at": now}
                    for i in rows
                ],
            )  # fmt: skip
            conn.execute(
                insert(contact_keys),
                [{"kind": "email", "value": f"person{i}@example.org", "contact_id": i + 1}
                 for i in rows]
                + [{"kind": "ref", "value": f"ref-{i:08d}", "contact_id": i + 1} for i in rows],
            )  # fmt: skip
    backend.close_sync()


def fill_parked(url: str, count: int) -> None:
    store = ParkingStore(url)
    reasons = ["crm_rejected", "invalid_json", "decrypt_failed", "unknown_schema"]
    for start in range(0, count, 1000):
        store.park_sync(
            [
                ParkItem(orjson.dumps({"actionId": i, "schema": "proca:action:2",
                                       "stage": "deliver", "n": i}),
                         "cus.1.deliver", "", "cus.1.deliver", {"x-n": i},
                         reasons[i % len(reasons)], "bench", 1)
                for i in range(start, min(count, start + 1000))
            ]
        )  # fmt: skip
    store.engine.dispose()


def timed(client: TestClient, path: str, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        reply = client.get(path)
        samples.append(time.perf_counter() - started)
        assert reply.status_code == 200, (path, reply.status_code)
    return statistics.median(samples)


def run(contacts_n: int, parked_n: int, repeat: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-web-") as tmp:
        base = Path(tmp)
        crm, parked = f"sqlite:///{base / 'crm.db'}", f"sqlite:///{base / 'parked.db'}"
        started = time.perf_counter()
        fill_crm(crm, contacts_n)
        fill_parked(parked, parked_n)
        fill_seconds = time.perf_counter() - started
        accounts = AccountStore(f"sqlite:///{base / 'web.db'}", cost=CHEAP)
        accounts.open_sync()
        accounts.set_user("bench", Role.ADMIN, PASSWORD)
        settings = WebSettings(
            accounts_url=f"sqlite:///{base / 'web.db'}", secret=b"bench", crm_url=crm,
            parked_url=parked, hash_cost=CHEAP,
        )  # fmt: skip
        with TestClient(create_app(settings), follow_redirects=False) as client:
            page = client.get("/login").text
            token = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
            reply = client.post(
                "/login", data={"username": "bench", "password": PASSWORD, "csrf": token}
            )
            assert reply.status_code == 303
            last_parked = max(1, (parked_n + 49) // 50)
            # A quarter of them have each reason: the last page of one reason's list.
            last_reason = max(1, (parked_n // 4 + 49) // 50)
            last_contacts = max(1, (contacts_n + 49) // 50)
            paths = {
                "login (baseline)": "/login",
                "dashboard": "/",
                "parked page 1": "/parked",
                "parked last page": f"/parked?page={last_parked}",
                "parked by reason": "/parked?reason=invalid_json",
                "parked by reason, last page": f"/parked?reason=invalid_json&page={last_reason}",
                "parked by date": "/parked?since=2000-01-01&until=2999-12-31",
                "parked by reason and date": "/parked?reason=invalid_json&since=2000-01-01"
                "&until=2999-12-31",
                "contacts page 1": "/contacts",
                "contacts last page": f"/contacts?page={last_contacts}",
                "contact search e-mail": f"/contacts?q=person{contacts_n // 2}@example.org",
                "contact search ref": f"/contacts?q=ref-{contacts_n // 3:08d}",
                "contact detail": f"/contacts/{contacts_n // 2}",
            }
            medians = {name: timed(client, path, repeat) for name, path in paths.items()}
    baseline = medians["login (baseline)"]
    return {
        "contacts": contacts_n,
        "parked": parked_n,
        "fill_seconds": round(fill_seconds, 1),
        "pages_ms": {name: round(value * 1000, 1) for name, value in medians.items()},
        "ratio_to_login": {name: round(value / baseline, 1) for name, value in medians.items()},
    }


def section(result: dict[str, Any], *, command: str) -> str:
    """The BENCHMARKS.md section of one run."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Web console pages",
        "",
        f"`{command}` — {stamp}. **The machine was shared and busy** (about 8 engineers on 2 "
        "cores, the test suite running beside it): the figures are medians of "
        f"{result['repeat']} requests and say how the pages scale, not how fast a quiet host "
        "serves them.",
        "",
        f"{result['contacts']:,} contacts and {result['parked']:,} parked messages (SQLite), "
        "in-process (TestClient, no network), signed in as an admin; the ratio is to `/login` "
        "(a page that reads nothing) in the same run.",
        "",
        "| page | median ms | × /login |",
        "|---|---:|---:|",
    ]
    for name, value in result["pages_ms"].items():
        lines.append(f"| {name} | {value} | {result['ratio_to_login'][name]} |")
    lines += [
        "",
        "What bounds them: the parked list is read newest-parked first through the indexes "
        "`ix_parked_reason_at (reason, parked_at, id)` and `ix_parked_at (parked_at, id)`, "
        "whatever the filter (no sort step); each page still counts its matches (a walk of "
        "the index range: grows with the matches, ~10,000 at most here), lists the distinct "
        "reasons (a walk of the reason index) and pages with OFFSET (a deep page walks the "
        "index past the skipped rows). The contact list counts every admitted contact on "
        "each page and pages with OFFSET. Search by e-mail or ref and one contact's page are "
        "indexed lookups; differences between them here are the busy machine's noise.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="100,000 contacts, 10,000 parked")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--report", action="store_true",
        help="Write bench/results/web.md and its section of BENCHMARKS.md.",
    )  # fmt: skip
    args = parser.parse_args()
    sizes = (100_000, 10_000) if args.full else (2_000, 10_000)
    result = {**run(*sizes, args.repeat), "repeat": args.repeat}
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    if args.report:
        text = section(result, command="python -m bench.web" + (" --full" if args.full else ""))
        (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
        (ROOT / "bench" / "results" / "web.md").write_text(text)
        splice(ROOT / "BENCHMARKS.md", text)


if __name__ == "__main__":
    main()
