"""``python -m bench.run``: every benchmark case in one run, against one broker.

    python -m bench.run [--quick] [--n N] [--repeat 3] [--only CASE …] [--skip CASE …]
                        [--no-node] [--no-profile] [--memory-n N] [--out DIR] [--merge]

Writes ``<out>/latest.json`` (machine, commands, every figure, the targets) and the PNG
plots, and regenerates ``BENCHMARKS.md`` (at the repository root for the default
``--out bench/results``, else inside ``<out>``). ``--quick`` (N = 2,000, one repeat, no
1M-message case, no profile, the slow CRM at concurrency 1 and 16) takes about a minute.
``--merge`` keeps, from the existing ``latest.json``, every case (and the profile) that
this run does not measure; the report names each carried-over case and its run. Carry
over only cases whose targets do not compare with the baselines (``slow-crm``,
``memory-1m``): a ratio holds only between cases of one run.

Exit status: 0 when every selected case ran (targets missed or not), 1 when a case
crashed, 2 for bad options. Needs RabbitMQ (``--amqp-url``), PostgreSQL for the
``proca-postgres`` case (``--pg-url``) and, for the Node cases, ``bench/node_modules``
(``npm ci --prefix bench``; ``--no-node`` skips them).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import shutil
import signal
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from bench import profile, report
from bench.broker import Broker
from bench.cases import BENCH, CASES, Context, RunError, _driver, run_consumer
from bench.system import load_average, machine_info

__all__ = ["main"]

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_OUT = BENCH / "results"
ROOT = BENCH.parent


def node_available() -> bool:
    modules = BENCH / "node_modules"
    return (
        shutil.which("node") is not None
        and (modules / "@proca" / "queue").is_dir()
        and (modules / "rabbitmq-client").is_dir()
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    names = [case.name for case in CASES]
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small N, one repeat, no 1M case")
    parser.add_argument("--n", type=int, help="messages per run (default 50,000; quick 2,000)")
    parser.add_argument("--repeat", type=int, help="runs per case, median kept (default 3)")
    parser.add_argument("--only", nargs="+", choices=names, metavar="CASE", help=", ".join(names))
    parser.add_argument("--skip", nargs="+", choices=names, metavar="CASE", default=[])
    parser.add_argument("--no-node", action="store_true", help="skip the Node cases")
    parser.add_argument("--no-profile", action="store_true", help="no py-spy profile runs")
    parser.add_argument("--memory-n", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP)
    parser.add_argument("--pg-url", default=DEFAULT_PG)
    parser.add_argument("--merge", action="store_true",
                        help="keep the other cases of the existing latest.json")
    args = parser.parse_args(argv)
    args.n = args.n or (2_000 if args.quick else 50_000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    if args.n < 100 or args.repeat < 1 or args.memory_n < 1000:
        parser.error("--n must be >= 100, --repeat >= 1, --memory-n >= 1000")
    return args


def _log(message: str) -> None:
    stamp = datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


async def _profile(ctx: Context, results: dict[str, Any]) -> dict[str, Any]:
    """One untimed py-spy run of the clear-text null-CRM case and of the SQLite case."""
    spy = profile.py_spy()
    if spy is None:
        return {"status": "skipped", "reason": "py-spy not installed (pip install py-spy)"}
    out: dict[str, Any] = {}
    for name, encrypted in (("proca-null", False), ("proca-sqlite", True)):
        if results.get(name, {}).get("status") != "ok":
            continue
        raw = ctx.work / f"profile-{name}.txt"
        extra = ["--keys", str(ctx.keys_file())] if encrypted else []
        crm = f"sqlite:///{ctx.fresh_file('crm-profile')}" if encrypted else "null:"

        def command(
            queue: str, crm_url: str = crm, extra: list[str] = extra, raw: Path = raw
        ) -> list[str]:
            driver = _driver(ctx, queue, ctx.n, crm_url, *extra)
            return [spy, "record", "--format", "raw", "--rate", "200",
                    "--output", str(raw), "--", *driver]  # fmt: skip

        _log(f"profile {name} (py-spy, not timed)")
        run, _ = await run_consumer(
            ctx, f"profile-{name}", ctx.bodies(encrypted=encrypted), ctx.n, command
        )
        summary = profile.summarise(raw)
        summary["rate_under_profiler"] = round(run.rate, 1)
        summary["command"] = "py-spy record --format raw --rate 200 -- " + (
            ctx.commands.get(name, "")
        )
        kept = ctx.out / f"profile-{name}.txt.gz"  # collapsed stacks, for flamegraph tools
        kept.write_bytes(gzip.compress(raw.read_bytes(), mtime=0))
        summary["raw"] = str(kept.relative_to(ROOT)) if kept.is_relative_to(ROOT) else str(kept)
        out[name] = summary
    return {"status": "ok", **out} if out else {"status": "skipped", "reason": "no case ran"}


async def run_all(args: argparse.Namespace) -> dict[str, Any]:
    # A directory per run: logs, key store, SQLite files. Several runs may share a machine
    # (the quick run is also a test); kept when a case failed, for its logs.
    (BENCH / ".work").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH / ".work"))
    args.out.mkdir(parents=True, exist_ok=True)
    selected = [c for c in CASES if (not args.only or c.name in args.only)]
    selected = [c for c in selected if c.name not in args.skip]
    if args.quick:
        selected = [c for c in selected if not c.full_only]
    node = node_available() and not args.no_node
    results: dict[str, Any] = {}
    started = time.perf_counter()
    async with Broker(args.amqp_url) as broker:
        info = machine_info()
        info["rabbitmq"] = await broker.server_version()
        ctx = Context(
            amqp_url=args.amqp_url, pg_url=args.pg_url, n=args.n, repeat=args.repeat,
            quick=args.quick, node=node, work=work, broker=broker, out=args.out,
            memory_n=args.memory_n, profile=not (args.quick or args.no_profile), log=_log,
        )  # fmt: skip
        for case in selected:
            entry: dict[str, Any] = {"title": case.title, "group": case.group}
            if case.needs_node and not node:
                reason = (
                    "--no-node"
                    if args.no_node
                    else "Node peer not installed (npm ci --prefix bench, or bench/run.sh)"
                )
                entry.update(status="skipped" if args.no_node else "error", error=reason)
                results[case.name] = entry
                _log(f"{case.name}: {entry['status']} ({reason})")
                continue
            _log(f"{case.name}: {case.title}")
            entry["load_average_before"] = load_average()
            case_started = time.perf_counter()
            try:
                entry.update(await case.run(ctx))
                entry["status"] = "ok"
                _log(f"{case.name}: {entry['rate']:,.0f} msg/s")
            except (RunError, OSError, RuntimeError, TimeoutError, ImportError) as exc:
                entry.update(status="error", error=str(exc))
                _log(f"{case.name}: FAILED {exc}")
            except Exception as exc:  # a bug in the harness itself: report, go on
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}")
                _log(f"{case.name}: FAILED\n{traceback.format_exc()}")
            entry["case_seconds"] = round(time.perf_counter() - case_started, 1)
            entry["measured"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            results[case.name] = entry
        prof: dict[str, Any] = {"status": "skipped", "reason": "--quick or --no-profile"}
        if ctx.profile:
            try:
                prof = await _profile(ctx, results)
            except (RunError, OSError, RuntimeError) as exc:
                prof = {"status": "error", "error": str(exc)}
    document: dict[str, Any] = {
        "generated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": info,
        "settings": {
            "n": args.n,
            "repeat": args.repeat,
            "quick": args.quick,
            "node": node,
            "memory_n": args.memory_n,
            "amqp_url": args.amqp_url,
            "pg_url": args.pg_url,
        },
        "command": " ".join(["python -m bench.run", *sys.argv[1:]]),
        "commands": ctx.commands,
        "duration_seconds": round(time.perf_counter() - started, 1),
        "cases": results,
        "profile": prof,
    }
    document["targets"] = report.evaluate(document)
    if not any(case.get("status") == "error" for case in results.values()):
        shutil.rmtree(work, ignore_errors=True)
    return document


def merge(previous: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """``fresh`` plus the cases of ``previous`` that it did not measure; those are listed
    in ``carried`` with the run they come from."""
    merged = dict(fresh)
    merged["cases"] = dict(fresh["cases"])
    carried = {
        name: entry
        for name, entry in (previous.get("carried") or {}).items()
        if name not in fresh["cases"]
    }
    for name, case in previous["cases"].items():
        if name in fresh["cases"]:
            continue
        merged["cases"][name] = {"measured": previous["generated"], **case}
        carried.setdefault(name, {"measured": case.get("measured", previous["generated"]),
                                  "command": previous["command"]})  # fmt: skip
    merged["carried"] = carried
    merged["commands"] = {**previous.get("commands", {}), **fresh.get("commands", {})}
    if previous.get("profile", {}).get("status") == "ok" and fresh["profile"]["status"] != "ok":
        merged["profile"] = {"measured": previous["generated"], **previous["profile"]}
    merged["targets"] = report.evaluate(merged)
    return merged


def _note_signal(signum: int, _frame: object) -> None:
    # A run takes an hour on a shared machine: say why it ended if someone stops it.
    _log(f"stopped by signal {signal.Signals(signum).name}")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _note_signal)
    args = parse_args(argv)
    latest = args.out / "latest.json"
    previous = orjson.loads(latest.read_bytes()) if args.merge and latest.exists() else None
    if args.merge and previous is None:
        _log(f"--merge: no {latest} to merge into")
        return 2
    document = asyncio.run(run_all(args))
    if previous is not None:
        document = merge(previous, document)
    latest.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    default = args.out.resolve() == DEFAULT_OUT
    markdown = ROOT / "BENCHMARKS.md" if default else args.out / "BENCHMARKS.md"
    report.write(document, results_dir=args.out, markdown=markdown)
    _log(f"results: {latest}; report: {markdown}")
    failed = [name for name, case in document["cases"].items() if case.get("status") == "error"]
    if failed:
        _log(f"failed cases: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
