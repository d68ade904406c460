"""``python -m reliability [--quick|--full] [--only NAME...] [--report RELIABILITY.md]``.

Exit 0 when every scenario passed and the privacy scan found nothing; 1 otherwise;
2 for usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from reliability.harness import Context, ScenarioFailure
from reliability.report import console_summary, render
from reliability.scan import ScanReport, collect_terms, scan
from reliability.scenarios import SCENARIOS, ScenarioResult, by_name


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small streams, short outages (CI)")
    mode.add_argument("--full", action="store_true", help="full sizes (local, < 20 min)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    parser.add_argument("--report", type=Path, help="write the Markdown report here")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--show-hits",
        action="store_true",
        help="print the lines the privacy scan flags (local debugging only: "
        "they hold personal data)",
    )
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    quick = not args.full
    chosen = by_name(args.only, quick=quick)
    workdir = Path(tempfile.mkdtemp(prefix="reliability-"))
    ctx = Context(quick=quick, workdir=workdir)
    results: list[ScenarioResult] = []
    started = time.monotonic()
    try:
        for scenario in chosen:
            result = ScenarioResult(scenario.name, scenario.title)
            print(f"… {scenario.name}: {scenario.title}", flush=True)
            began = time.monotonic()
            try:
                await scenario.run(ctx, result)
            except Exception as exc:  # a scenario's failure must not stop the others
                result.error = f"{type(exc).__name__}: {exc}"
                if not isinstance(exc, ScenarioFailure):
                    traceback.print_exc()  # unexpected: where it came from matters
            result.duration = time.monotonic() - began
            results.append(result)
            print(console_summary([result], _empty_scan()).splitlines()[0], flush=True)
        terms = collect_terms(ctx.published, ctx.keystores, ctx.secrets)
        privacy = scan(ctx.capture.outputs, terms, show=args.show_hits)
        total = time.monotonic() - started
        print("\n" + console_summary(results, privacy), flush=True)
        print(f"total {total:.0f} s ({'quick' if quick else 'full'} mode)")
        if args.report is not None:
            args.report.write_text(render(results, privacy, terms, quick=quick, total=total))
            print(f"report written to {args.report}")
        return 0 if all(r.ok for r in results) and not privacy.hits else 1
    finally:
        if args.keep:
            print(f"scratch directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _empty_scan() -> ScanReport:
    return ScanReport(lines=0, outputs=0, excluded=[], hits=[])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # The suite's own short-lived connections may see the broker restarts it causes;
    # aio-pika would log each with a traceback. The consumers' logs are what counts.
    for name in ("aio_pika", "aiormq"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:16} {scenario.title}")
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
