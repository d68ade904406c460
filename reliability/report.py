"""RELIABILITY.md: the results of one run, and how to run it again. No personal data:
counts, reason codes, check names, durations and commands only."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime

from reliability.scan import ScanReport, Terms
from reliability.scenarios import SCENARIOS, ScenarioResult

__all__ = ["console_summary", "render"]

FINDINGS = """\
## Findings while building the suite

- **Untrusted broker certificate reported as a refusal by the broker** (consumer bug,
  minor): `proca_sync run` exits 2 with `error: broker amqps://…/ refused the connection:
  [Errno 1] [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: …`. aiormq wraps
  the `ssl.SSLError` in `AMQPConnectionError`, which `consumer/intake.py::connect` catches
  first, so its `TLS with … failed` branch is unreachable. The certificate is refused as it
  must be; only the wording blames the broker. Shown by the strict-xfail test
  `tests/integration/test_reliability_quick.py::test_untrusted_certificate_is_reported_as_a_tls_failure`.
- **A failing CRM probe is silent** (observability): while the breaker is open, failed
  `ping`s log nothing; with a CRM that keeps failing probes (e.g. resetting connections)
  the log goes quiet for minutes (probe delay capped at 10 s) and only `/healthz` and the
  metrics show `breaker: open`. A line per failed probe (or every N) would help operators.
- **`replay` into a webhook stops at the first transient error** (exit 1, no summary) and
  sends a whole `--batch` concurrently (up to 64 connections): the suite replays into its
  reference HTTP CRM with `--batch 4` and runs it again on failure.
- **The broker-restart scenario disconnects every client of the broker**, not only the
  consumer under test: run the suite on a broker nobody else is using at that moment.
"""

QUICK = "python -m reliability --quick --report RELIABILITY.md"
FULL = "python -m reliability --full --report RELIABILITY.md"


def _parked(parked: dict[str, int]) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(parked.items())) or "0"


def _versions() -> str:
    parts = [f"Python {platform.python_version()}"]
    for command in (["rabbitmqctl", "version"], ["psql", "--version"]):
        try:
            out = subprocess.run(command, capture_output=True, text=True, timeout=60,  # noqa: S603
                                 check=False).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            continue
        if out:
            parts.append(("RabbitMQ " if command[0] == "rabbitmqctl" else "") + out.splitlines()[0])
    return ", ".join(parts)


def console_summary(results: list[ScenarioResult], privacy: ScanReport) -> str:
    rows = []
    for r in results:
        v = r.verdict
        counts = (
            f"sent {v.sent}, synced {v.synced}/{v.expected_synced}, parked {{{_parked(v.parked)}}},"
            f" lost {v.lost}, applied twice {v.applied_twice}, wrongly parked {v.wrongly_parked}"
            if v is not None
            else "no counts"
        )
        rows.append(f"{'PASS' if r.ok else 'FAIL'}  {r.name:16} {r.duration:6.1f} s  {counts}")
        for check in r.checks:
            if not check.ok:
                rows.append(f"      ✗ {check.name}: {check.detail}")
        if v is not None:
            rows.extend(f"      · {d}" for d in v.details)
        if r.error:
            rows.append(f"      error: {r.error}")
    hits = len(privacy.hits)
    rows.append(f"{'PASS' if hits == 0 else 'FAIL'}  privacy scan      {privacy.lines} lines of "
                f"{privacy.outputs} outputs, {hits} hit(s) {privacy.by_kind() or ''}")  # fmt: skip
    return "\n".join(rows)


def render(
    results: list[ScenarioResult],
    privacy: ScanReport,
    terms: Terms,
    *,
    quick: bool,
    total: float,
) -> str:
    mode = "quick" if quick else "full"
    ok = all(r.ok for r in results) and not privacy.hits
    out: list[str] = []
    add = out.append
    add("# Reliability and security report\n")
    add("A fault-injection suite drives the real consumer (`python -m proca_sync run`, a child "
        "process) against the local RabbitMQ and a real CRM, injects faults, and compares the "
        "CRM it reaches with the state `python -m proca_sync replay` reaches from the exact "
        "bodies that were published (a CRM of its own; both read with `crm export`). Faults "
        "are triggered by observable progress, never by guessed delays. Every scenario uses a "
        "fresh random org (retry delay 500 ms) whose queues and exchanges are deleted "
        "afterwards.\n")  # fmt: skip
    add("## How to run\n")
    add("| what | command | budget |\n|---|---|---|")
    add(f"| quick (CI; `tests/integration/test_reliability_quick.py`) | `{QUICK}` | < 5 min |")
    add(f"| full (local) | `{FULL}` | < 20 min |")
    add("| scale-out, quick (CI; `tests/integration/test_scale_out.py`) | `python -m "
        "reliability --quick --only scale-postgres scale-sqlite` | < 4 min |")
    add("| one scenario | `python -m reliability --full --only crash` (any names below) | |")
    add("| the list | `python -m reliability --list` | |\n")
    add("A quick run without `--only` leaves out the scale-out scenarios (several consumer "
        "processes on one queue: `scale-postgres`, `scale-sqlite`), which CI runs in a test "
        "of their own; a full run includes them, and the `cluster` scenario (three RabbitMQ "
        "nodes started by the suite itself, quorum queues, a node stopped mid-stream).\n")
    add("The run exits non-zero when anything is lost, applied twice, wrongly parked or "
        "leaked, or when a check fails. Needs RabbitMQ on 127.0.0.1:5672 (guest/guest, "
        "`rabbitmqctl` usable: run as root or as the broker's user), the PostgreSQL server "
        "binaries (`/usr/lib/postgresql/*/bin`, run through `runuser -u postgres` when root) "
        "and `openssl`.\n")  # fmt: skip
    add("Counts: **sent** = messages published; **synced** = messages whose effect the CRM "
        "committed (rows of its idempotency table, or records the HTTP CRM stored) / what "
        "replay committed; **parked** = parking-store rows by reason (every poison body is "
        "distinct); **lost** = messages replay applied that the CRM lacks, facts (contacts, "
        "actions, consents, e-mail statuses) missing, and poison neither synced nor parked; "
        "**applied twice** = facts present more often than replay made them, or an HTTP "
        "`Idempotency-Key` answered 200 more than once; **wrongly parked** = parked messages "
        "that are not poison or carry another reason than the engine gives. The two `crm "
        "export` documents must also be equal.\n")  # fmt: skip
    add(f"## Results ({mode} mode, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{total / 60:.1f} min): {'all passed' if ok else 'FAILED'}\n")  # fmt: skip
    add(f"Environment: {_versions()}, {os.cpu_count()} CPU cores.\n")
    add("| scenario | sent | synced | parked (by reason) | lost | applied twice | wrongly parked "
        "| state = replay | duration | result |")  # fmt: skip
    add("|---|---:|---:|---|---:|---:|---:|---|---:|---|")
    for r in results:
        v = r.verdict
        if v is None:
            add(f"| {r.name} | – | – | – | – | – | – | – | {r.duration:.0f} s | "
                f"{'pass' if r.ok else '**FAIL**'} |")  # fmt: skip
            continue
        add(f"| {r.name} | {v.sent} | {v.synced} / {v.expected_synced} | {_parked(v.parked)} | "
            f"{v.lost} | {v.applied_twice} | {v.wrongly_parked} | "
            f"{'yes' if v.state_equal else '**no**'} | {r.duration:.0f} s | "
            f"{'pass' if r.ok else '**FAIL**'} |")  # fmt: skip
    add(f"| privacy scan | {privacy.lines} lines | | | | | | | | "
        f"{'pass' if not privacy.hits else '**FAIL**'} |\n")  # fmt: skip
    described = {s.name: s for s in SCENARIOS}
    for r in results:
        scenario = described[r.name]
        add(f"### {r.name}: {scenario.title}\n")
        add(scenario.summary + "\n")
        add(f"Rerun: `python -m reliability --{mode} --only {r.name}` ({r.duration:.0f} s "
            "this run).\n")  # fmt: skip
        for note in r.notes:
            add(f"- {note}")
        if r.notes:
            add("")
        for check in r.checks:
            detail = f" — {check.detail}" if check.detail else ""
            add(f"- [{'x' if check.ok else ' '}] {check.name}{detail}")
        if r.verdict is not None:
            for detail in r.verdict.details:
                add(f"- ✗ {detail}")
        if r.error:
            add(f"- ✗ error: {r.error}")
        add("")
    add("### privacy scan: no personal data or password in any output\n")
    counts = ", ".join(f"{n} {k}" for k, n in terms.counts().items())
    add(f"Every line printed by every process of the run — the consumers' logs (stderr and "
        f"stdout, killed ones included), every CLI call (`replay`, `parked list`, `parked "
        f"show`, `peek`, `queue status`, `keys generate`), the fuzzing run — was scanned "
        f"for the personal data of every published body, including the plaintext of "
        f"{terms.decrypted} encrypted records decrypted with the scenarios' key stores "
        f"({counts}), and for the run's passwords.\n")  # fmt: skip
    add(f"- {privacy.lines} lines in {privacy.outputs} outputs: "
        f"**{len(privacy.hits)} hit(s)** {privacy.by_kind() or ''}")  # fmt: skip
    add(f"- not scanned: {len(privacy.excluded)} `crm export` outputs — that command exists to "
        "show the CRM, personal data included, to its owner (cli.py says so); the suite "
        "never prints them.")  # fmt: skip
    add("- hits are reported by output, line number and kind only, never by value.\n")
    add("### fuzzing\n")
    add("Property-based fuzzing (hypothesis) of decoding and decryption — any bytes, mutated "
        "samples, garbage `personalInfo` only ever raise `DecodeError` / `DecryptError` — "
        "lives in `tests/unit/test_fuzz_decode.py`; the `poison` scenario runs that file with "
        "pytest instead of duplicating it.\n")  # fmt: skip
    add(FINDINGS)
    return "\n".join(out) + "\n"
