"""Turn ``latest.json`` into the targets verdict, ``BENCHMARKS.md`` and the PNG plots.

``python -m bench.report [bench/results/latest.json]`` regenerates the report without
re-running anything. The hand-written interpretation lives in ``bench/analysis.md`` and
is copied into the report as is.
"""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path
from typing import Any

import orjson

__all__ = ["evaluate", "main", "write"]

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ANALYSIS = BENCH / "analysis.md"

BASELINES = ("aiormq", "node-raw", "peer-clear", "peer-encrypted")
SHORT = {
    "aiormq": "raw aiormq",
    "aio-pika": "raw aio-pika",
    "node-raw": "raw Node",
    "peer-clear": "peer clear",
    "peer-encrypted": "peer encrypted",
}


def _rate(doc: dict[str, Any], name: str) -> float | None:
    case = doc["cases"].get(name) or {}
    if case.get("status") != "ok":
        return None
    rate = case.get("rate")
    return float(rate) if isinstance(rate, int | float) and rate > 0 else None


def _cores(doc: dict[str, Any], name: str, key: str = "consumer_cores") -> float | None:
    case = doc["cases"].get(name) or {}
    values = [r[key] for r in case.get("runs", []) if isinstance(r.get(key), int | float)]
    return statistics.median(values) if values else None


def _cpu_note(doc: dict[str, Any], name: str, who: str) -> str:
    cores = _cores(doc, name)
    broker = _cores(doc, name, "broker_cores")
    postgres = _cores(doc, name, "postgres_cores")
    if cores is None:
        return ""
    text = f"{who} used {cores:.2f} cores"
    if broker is not None:
        text += f", the broker {broker:.2f}"
    if postgres:
        text += f", PostgreSQL {postgres:.2f}"
    workers = re.search(r"-w(\d+)$", name)
    if workers:
        # K processes: together they can use the machine, shared with the broker and
        # the database; "saturated" is all the cores in use.
        used = cores + (broker or 0.0) + (postgres or 0.0)
        text += f" ({workers.group(1)} worker processes; {used:.2f} of the machine's cores in all)"
    elif cores >= 0.85:
        text += f" — {who} is CPU-bound (its work runs on one thread: 1.0 core = saturated)"
    return text


def _ratio_target(
    doc: dict[str, Any], name: str, description: str, num: str, den: str, threshold: float
) -> dict[str, Any]:
    a, b = _rate(doc, num), _rate(doc, den)
    value = None if a is None or b is None else a / b
    bound = "; ".join(note for note in (_cpu_note(doc, num, num), _cpu_note(doc, den, den)) if note)
    return {
        "name": name,
        "description": description,
        "value": None if value is None else round(value, 3),
        "threshold": threshold,
        "unit": "×",
        "met": None if value is None else value >= threshold,
        "margin": None if value is None else round(value / threshold, 3),
        "bound": bound,
    }


def evaluate(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its value, met/missed, margin and what bounds it."""
    targets = [
        _ratio_target(
            doc, "encrypted-sqlite-vs-peer",
            "encrypted end-to-end into SQLite ≥ 4× the peer's encrypted no-op rate",
            "proca-sqlite", "peer-encrypted", 4.0,
        ),
        _ratio_target(
            doc, "clear-null-vs-peer",
            "clear-text consumer overhead (--crm null:) ≥ 1.0× the peer's clear no-op rate",
            "proca-null", "peer-clear", 1.0,
        ),
    ]  # fmt: skip
    slow = doc["cases"].get("slow-crm") or {}
    for point in slow.get("points", []):
        c = point["concurrency"]
        runs = point.get("runs", [])
        cores = statistics.median(r["consumer_cores"] for r in runs) if runs else None
        crm_cores = (
            statistics.median(r["harness_cpu_seconds"] / r["wall_seconds"] for r in runs)
            if runs
            else None
        )
        efficiency = point["rate"] / point["ideal"]
        per_request = c / point["rate"] * 1000  # ms per request, as the consumer sees it
        if efficiency >= 0.8:
            bound = f"the CRM's latency ({c} request(s) in flight × 20 ms)"
        elif cores is not None and cores >= 0.8:
            bound = "CPU: the consumer's thread is saturated"
        else:
            bound = (
                f"per-request overhead: {per_request:.1f} ms per request in flight "
                f"instead of 20 ms (client, server and consumer work on top of the latency)"
            )
        if cores is not None:
            bound += f"; proca-sync {cores:.2f} cores, the CRM server {crm_cores:.2f} cores"
        targets.append({
            "name": f"slow-crm-c{c}",
            "description": f"slow CRM (20 ms), concurrency {c}: ≥ 0.8 × {c}/0.02 s "
                           f"= {point['target']:,.0f} msg/s, per-contact order kept",
            "value": round(point["rate"], 1),
            "threshold": point["target"],
            "unit": "msg/s",
            "met": point["rate"] >= point["target"] and bool(point["ordered"]),
            "margin": round(point["rate"] / point["target"], 3),
            "ordered": point["ordered"],
            "bound": bound,
        })  # fmt: skip
    targets.append(
        _ratio_target(
            doc, "postgres-vs-sqlite", "PostgreSQL ≥ 0.5× SQLite (encrypted, full engine)",
            "proca-postgres", "proca-sqlite", 0.5,
        )
    )  # fmt: skip
    # Issue 12 (scale-out): several workers into one PostgreSQL; the lighter hot path.
    targets += [
        _ratio_target(
            doc, "postgres-w2-vs-peer",
            "encrypted into PostgreSQL with --workers 2 ≥ 2× the peer's encrypted rate",
            "proca-postgres-w2", "peer-encrypted", 2.0,
        ),
        _ratio_target(
            doc, "null-vs-peer-0.6",
            "the consumer alone (--crm null:), one process, ≥ 0.6× the peer's clear rate",
            "proca-null", "peer-clear", 0.6,
        ),
    ]  # fmt: skip
    mem = doc["cases"].get("memory-1m") or {}
    if mem.get("status") == "ok":
        peak = mem.get("peak_mib")
        at_mark, end = mem.get("rss_at_mark_mib"), mem.get("rss_end_mib")
        targets.append({
            "name": "memory-peak",
            "description": f"{mem['n']:,} messages: peak RSS < 200 MB",
            "value": peak, "threshold": 200 * 1e6 / 2**20, "unit": "MiB",
            "met": peak is not None and peak < 200 * 1e6 / 2**20,
            "margin": None if not peak else round((200 * 1e6 / 2**20) / peak, 3),
            "bound": "",
        })  # fmt: skip
        growth = None if at_mark is None or end is None else end - at_mark
        allowed = None if at_mark is None else max(10.0, 0.05 * at_mark)
        targets.append({
            "name": "memory-flat",
            "description": f"RSS not growing after {mem.get('mark', 100_000):,} messages "
                           "(end − RSS at the mark ≤ max(10 MiB, 5 %))",
            "value": None if growth is None else round(growth, 1),
            "threshold": None if allowed is None else round(allowed, 1),
            "unit": "MiB",
            "met": None if growth is None or allowed is None else growth <= allowed,
            "margin": None,
            "bound": ""
            if mem.get("growth_bytes_per_message") is None
            else f"RSS grows {mem['growth_bytes_per_message']:.0f} bytes per message "
            "after the mark (see the analysis)",
        })  # fmt: skip
    return targets


# ---- the hand-written analysis ---------------------------------------------------------------


class _Missing(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "?"


def _us_per_message(doc: dict[str, Any], name: str) -> float | None:
    """Median CPU time of the consumer per message (µs), start-up included."""
    case = doc["cases"].get(name) or {}
    values = [r["consumer_cpu_seconds"] / r["n"] for r in case.get("runs", []) if r.get("n")]
    return statistics.median(values) * 1e6 if values else None


def analysis_values(doc: dict[str, Any]) -> dict[str, str]:
    """The figures ``bench/analysis.md`` quotes (``{name}`` placeholders), from this run."""
    values = _Missing(generated=str(doc.get("generated", "?")))

    def put(key: str, value: float | None, fmt: str) -> None:
        if value is not None:
            values[key] = format(value, fmt)

    rate = {name: _rate(doc, name) for name in doc["cases"]}
    put("aiormq", rate.get("aiormq"), ",.0f")
    put("aiormq_cores", _cores(doc, "aiormq"), ".2f")
    put("aiormq_us", _us_per_message(doc, "aiormq"), ".0f")
    put("aiopika", rate.get("aio-pika"), ",.0f")
    put("aiopika_us", _us_per_message(doc, "aio-pika"), ".0f")
    peer, peer_enc = rate.get("peer-clear"), rate.get("peer-encrypted")
    put("peer_clear", peer, ",.0f")
    put("peer_clear_cores", _cores(doc, "peer-clear"), ".2f")
    put("peer_clear_broker", _cores(doc, "peer-clear", "broker_cores"), ".2f")
    put("peer_clear_us", _us_per_message(doc, "peer-clear"), ".0f")
    put("budget_us", None if not peer else 1e6 / peer, ".0f")
    null, sqlite, pg = rate.get("proca-null"), rate.get("proca-sqlite"), rate.get("proca-postgres")
    put("null_rate", null, ",.0f")
    put("null_ratio", None if not (null and peer) else null / peer, ".2f")
    put("null_cores", _cores(doc, "proca-null"), ".2f")
    put("null_us", _us_per_message(doc, "proca-null"), ".0f")
    put("sqlite_rate", sqlite, ",.0f")
    put("sqlite_ratio", None if not (sqlite and peer_enc) else sqlite / peer_enc, ".2f")
    put("sqlite_us", _us_per_message(doc, "proca-sqlite"), ",.0f")
    put("sqlite_target", None if not peer_enc else 4 * peer_enc, ",.0f")
    put("sqlite_target_us", None if not peer_enc else 1e6 / (4 * peer_enc), ".0f")
    put("pg_rate", pg, ",.0f")
    put("pg_ratio", None if not (pg and sqlite) else pg / sqlite, ".2f")
    put("pg_cores", _cores(doc, "proca-postgres"), ".2f")
    put("pg_server_cores", _cores(doc, "proca-postgres", "postgres_cores"), ".2f")
    # Scale-out: {sqlite_w2_rate}, {pg_w3_ratio} (vs peer encrypted), {pg_w2_us}, …
    for db, one in (("sqlite", sqlite), ("pg", pg)):
        case = "proca-sqlite" if db == "sqlite" else "proca-postgres"
        for k in (2, 3):
            name = f"{case}-w{k}"
            value = rate.get(name)
            put(f"{db}_w{k}_rate", value, ",.0f")
            put(f"{db}_w{k}_ratio", None if not (value and peer_enc) else value / peer_enc, ".2f")
            put(f"{db}_w{k}_speedup", None if not (value and one) else value / one, ".2f")
            put(f"{db}_w{k}_us", _us_per_message(doc, name), ",.0f")
            put(f"{db}_w{k}_cores", _cores(doc, name), ".2f")
            put(f"{db}_w{k}_server", _cores(doc, name, "postgres_cores"), ".2f")
            put(f"{db}_w{k}_broker", _cores(doc, name, "broker_cores"), ".2f")
            put(f"{db}_w{k}_other", _cores(doc, name, "foreign_cores"), ".2f")
            # Timed from the first worker ready; the same runs from the supervisor's start
            # (spawning the interpreters, imports): {pg_w2_spawn_rate}, {pg_w2_start} s.
            runs = [r for r in (doc["cases"].get(name) or {}).get("runs", [])
                    if r.get("spawn_seconds")]  # fmt: skip
            if runs:
                spawn_rate = statistics.median(r["n"] / r["spawn_seconds"] for r in runs)
                put(f"{db}_w{k}_spawn_rate", spawn_rate, ",.0f")
                put(f"{db}_w{k}_spawn_ratio", spawn_rate / peer_enc if peer_enc else None, ".2f")
                put(f"{db}_w{k}_start",
                    statistics.median(r["spawn_seconds"] - r["seconds"] for r in runs), ".2f")
    # PostgreSQL's own CPU per message (its cores / the rate), and what one core of it
    # could take: the ceiling of K machines writing into one PostgreSQL.
    for suffix, name in (("", "proca-postgres"), ("_w2", "proca-postgres-w2"),
                         ("_w3", "proca-postgres-w3")):  # fmt: skip
        server, value = _cores(doc, name, "postgres_cores"), rate.get(name)
        if server and value:
            put(f"pg{suffix}_server_us", server / value * 1e6, ",.0f")
            put(f"pg{suffix}_per_core", value / server, ",.0f")
    put("pg_ratio_peer", None if not (pg and peer_enc) else pg / peer_enc, ".2f")
    put("pg_us", _us_per_message(doc, "proca-postgres"), ",.0f")
    put("pg_w2_target", None if not peer_enc else 2 * peer_enc, ",.0f")
    put("null_target", None if not peer else 0.6 * peer, ",.0f")
    put("null_target_us", None if not peer else 1e6 / (0.6 * peer), ".0f")
    put("null_short", None if not (null and peer) else max(0.0, 100 - null / peer / 0.6 * 100),
        ".0f")
    w2 = rate.get("proca-postgres-w2")
    put("pg_w2_short",
        None if not (w2 and peer_enc) else max(0.0, 100 - w2 / peer_enc / 2 * 100), ".0f")
    put("peer_enc", peer_enc, ",.0f")
    mem = doc["cases"].get("memory-1m") or {}
    put("growth", mem.get("growth_bytes_per_message"), ".0f")
    put("peak", mem.get("peak_mib"), ".0f")
    # Profile shares by area: {null_share_amqp}, {sqlite_share_crm}, … (percent).
    short = {"AMQP client": "amqp", "asyncio": "asyncio", "decode": "decode",
             "logging": "logging", "model": "model", "consumer": "consumer",
             "metrics": "metrics", "decrypt": "decrypt", "CRM backend": "crm"}  # fmt: skip
    for case, prefix in (("proca-null", "null"), ("proca-sqlite", "sqlite")):
        for area in (doc.get("profile") or {}).get(case, {}).get("areas", []):
            for start, key in short.items():
                if area["area"].startswith(start):
                    put(f"{prefix}_share_{key}", 100 * area["share"], ".0f")
    # Slow CRM points: {slow_rate_64}, {slow_eff_64}, {slow_cores_64}, {slow_server_64}.
    for point in (doc["cases"].get("slow-crm") or {}).get("points", []):
        c = point["concurrency"]
        put(f"slow_rate_{c}", point["rate"], ",.0f")
        put(f"slow_eff_{c}", 100 * point["efficiency"], ".0f")
        runs = point.get("runs") or []
        if runs:
            put(f"slow_cores_{c}", statistics.median(r["consumer_cores"] for r in runs), ".2f")
            put(f"slow_server_{c}", statistics.median(r["harness_cpu_seconds"] / r["wall_seconds"]
                                                      for r in runs), ".2f")  # fmt: skip
    return values


# ---- plots --------------------------------------------------------------------------------


def _plots(doc: dict[str, Any], out: Path) -> dict[str, str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    made: dict[str, str] = {}
    slow = doc["cases"].get("slow-crm") or {}
    points = slow.get("points") or []
    if slow.get("status") == "ok" and points:
        cs = [p["concurrency"] for p in points]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ax.plot(cs, [p["ideal"] for p in points], "k--", label="ideal: concurrency / 20 ms")
        ax.plot(cs, [p["target"] for p in points], ":", color="grey", label="target (0.8 × ideal)")
        ax.plot(cs, [p["rate"] for p in points], "o-", color="tab:blue", label="proca-sync")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrency (CRM requests in flight)")
        ax.set_ylabel("messages / s")
        ax.set_title("Slow CRM (20 ms per request): throughput vs concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "slow-crm.png", dpi=110)
        plt.close(fig)
        made["slow-crm"] = "slow-crm.png"
    mem = doc["cases"].get("memory-1m") or {}
    # While messages remain in the queue (after that: the last batches and the shutdown).
    samples = [s for s in mem.get("samples") or [] if s["ready"] > 0]
    if mem.get("status") == "ok" and samples:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        xs = [s["processed"] / 1000 for s in samples]
        ax.plot(xs, [s["rss_mib"] for s in samples], color="tab:blue", label="RSS")
        ax.plot(xs, [s["hwm_mib"] for s in samples], ":", color="tab:red", label="peak (VmHWM)")
        ax.axhline(200 * 1e6 / 2**20, color="grey", linestyle="--", label="200 MB")
        ax.axvline(mem.get("mark", 100_000) / 1000, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("messages taken from the queue (thousands)")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(f"proca-sync RSS while syncing {mem['n']:,} messages")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "memory-1m.png", dpi=110)
        plt.close(fig)
        made["memory-1m"] = "memory-1m.png"
    rated = [
        (name, case) for name, case in doc["cases"].items()
        if case.get("status") == "ok" and name not in {"slow-crm", "memory-1m"}
    ]  # fmt: skip
    if rated:
        fig, ax = plt.subplots(figsize=(7.2, 0.45 * len(rated) + 1.2))
        names = [name for name, _ in rated][::-1]
        rates = [case["rate"] for _, case in rated][::-1]
        colours = ["tab:orange" if n.startswith("proca") else "tab:grey" for n in names]
        ax.barh(names, rates, color=colours)
        for y, rate in enumerate(rates):
            ax.text(rate, y, f" {rate:,.0f}", va="center", fontsize=8)
        ax.set_xlabel("messages / s (median)")
        ax.set_title(f"Drain rate, {doc['settings']['n']:,} messages, same broker")
        ax.set_xlim(right=max(rates) * 1.18)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        made["throughput"] = "throughput.png"
    return made


# ---- markdown -------------------------------------------------------------------------------


def _fmt_rate(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _fmt_ratio(a: float | None, b: float | None) -> str:
    return "–" if a is None or b is None else f"{a / b:.2f}×"


def _status(case: dict[str, Any]) -> str:
    if case.get("status") == "ok":
        return ""
    return f" ({case.get('status')}: {str(case.get('error', ''))[:120]})"


def _link(markdown: Path, results_dir: Path, name: str) -> str:
    target = (results_dir / name).resolve()
    try:
        return str(target.relative_to(markdown.parent.resolve()))
    except ValueError:
        return str(target)


def _targets_table(doc: dict[str, Any]) -> list[str]:
    lines = ["| target | measured | threshold | verdict | bounded by |", "|---|---|---|---|---|"]
    for t in doc.get("targets") or evaluate(doc):
        value, threshold, unit = t["value"], t["threshold"], t["unit"]
        shown = (
            "not measured"
            if value is None
            else (f"{value:.2f}{unit}" if unit == "×" else f"{value:,.1f} {unit}")
        )
        limit = (
            "–"
            if threshold is None
            else (f"≥ {threshold:g}{unit}" if unit == "×" else f"{threshold:,.1f} {unit}")
        )
        if t["name"].startswith("memory"):
            sign = "<" if t["name"] == "memory-peak" else "≤"
            limit = "–" if threshold is None else f"{sign} {threshold:,.1f} MiB"
            if t["name"] == "memory-peak":
                limit += " (200 MB)"
        if t["met"] is None:
            verdict = "–"
        elif t["met"]:
            verdict = "**met**" + (f" ({t['margin']:.2f}× the bar)" if t.get("margin") else "")
        else:
            verdict = "**missed**" + (
                f" (at {t['margin']:.2f}× the bar, {100 * (1 - t['margin']):.0f} % short)"
                if t.get("margin")
                else ""
            )
            if t.get("ordered") is False:
                verdict += ", order broken"
        bound = t["bound"] or "–"
        lines.append(f"| {t['description']} | {shown} | {limit} | {verdict} | {bound} |")
    return lines


def _carried(doc: dict[str, Any]) -> list[str]:
    """Lines naming the cases carried over from an earlier run (``bench.run --merge``)."""
    earlier = doc.get("carried") or {}
    if not earlier:
        return []
    items = "; ".join(
        f"`{name}` ({entry['measured']}, `{entry['command']}`)"
        for name, entry in sorted(earlier.items())
    )
    return [f"Carried over from an earlier run (`--merge`; possibly another machine of this "
            f"kind: compare ratios across runs, not rates): {items}.", ""]


def render(doc: dict[str, Any], *, results_dir: Path, markdown: Path, plots: dict[str, str]) -> str:
    m, s, cases = doc["machine"], doc["settings"], doc["cases"]
    base = {name: _rate(doc, name) for name in BASELINES}
    out: list[str] = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench.run` (or `python -m bench.report`) from "
        "bench/results/latest.json; edit bench/analysis.md or bench/report.py instead. -->",
        "",
        f"Run of {doc['generated']}: {s['n']:,} messages per run, median of {s['repeat']} "
        f"run(s), every case against the same broker in the same run"
        + (" (**quick mode**: figures are indicative only)" if s.get("quick") else "")
        + ".",
        "",
        *_carried(doc),
        "**One command:** `bash bench/run.sh` (bootstraps the venv, RabbitMQ, PostgreSQL and "
        "the Node peer, then runs `python -m bench.run`). Options: `--quick`, `--n N`, "
        "`--repeat R`, `--only CASE…`, `--skip CASE…`, `--no-node`, `--no-profile`, "
        "`--memory-n N`, `--out DIR`, `--merge`.",
        "",
        "## Machine",
        "",
        f"- {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('ram_mib', 0):,} MiB RAM, "
        f"Linux {m.get('kernel')}",
        f"- Python {m.get('python')}, Node {m.get('node') or 'absent'}, RabbitMQ "
        f"{m.get('rabbitmq')}, {m.get('postgres') or 'PostgreSQL: unknown'}",
        f"- load average when the run started: {m.get('load_average_at_start')}; "
        f"the whole run took {doc.get('duration_seconds', 0) / 60:.1f} min",
        "",
        "## Drain rate",
        "",
        "Timed from the consumer's start (connect + subscribe included; with `--workers K`, "
        "the first worker's, once its interpreter has started and imported what it needs, "
        "as the Node peer's clock starts after its `require`s) until its N-th ack; "
        "the queue is checked empty afterwards. Ratios are to the baselines of this run. "
        "`cores` = CPU seconds / wall seconds of the consumer process (with `--workers K`: "
        "the supervisor and its K workers), of the broker, of PostgreSQL, and of everything "
        "else on the machine during the run (`other`: jobs sharing the machine — noise; 2 "
        "cores in all). `CPU µs/msg` = the consumer's CPU time per message (start-up "
        "included).",
        "",
        "| case | msgs/s | vs raw aiormq | vs raw Node | vs peer clear | vs peer encrypted "
        "| consumer cores | CPU µs/msg | broker cores | PostgreSQL cores | other cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, case in cases.items():
        if name in {"slow-crm", "memory-1m"}:
            continue
        rate = _rate(doc, name)
        ratios = ["–" if n == name else _fmt_ratio(rate, base[n]) for n in BASELINES]
        keys = ("consumer_cores", "broker_cores", "postgres_cores", "foreign_cores")
        loads = [_cores(doc, name, key) for key in keys]
        shown = " | ".join("–" if x is None else f"{x:.2f}" for x in loads)
        per_message = _us_per_message(doc, name)
        cpu = "–" if per_message is None else f"{per_message:,.0f}"
        shown = shown.replace(" | ", f" | {cpu} | ", 1)
        out.append(
            f"| {case.get('title', name)}{_status(case)} | {_fmt_rate(rate)} | "
            + " | ".join(ratios)
            + f" | {shown} |"
        )
    if "throughput" in plots:
        out += ["", f"![drain rates]({_link(markdown, results_dir, plots['throughput'])})"]
    out += ["", "## Targets", "", *_targets_table(doc), ""]

    slow = cases.get("slow-crm") or {}
    out += ["## Slow CRM", ""]
    if slow.get("status") == "ok":
        out += [
            "The webhook backend against `tests/support/crm_server.py` answering every POST "
            f"after {1000 * slow['latency_seconds']:.0f} ms. `--concurrency C --batch-size 1`: "
            "C records (of distinct contacts) in flight at once; 30 % of the messages come "
            "from a contact seen among the last 100, so lanes collide. Each point is sized to "
            "last ~10 s at its target (3 s in quick mode). Ordering is checked from the "
            "server's log: in every lane the action ids (= publish order) must arrive "
            "increasing.",
            "",
            "| concurrency | messages | msgs/s | ideal C/20 ms | efficiency | target | "
            "ordered | lanes with repeats | proca-sync cores | CRM server cores |",
            "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for p in slow["points"]:
            runs = p["runs"]
            cores = statistics.median(r["consumer_cores"] for r in runs)
            crm = statistics.median(r["harness_cpu_seconds"] / r["wall_seconds"] for r in runs)
            shared = runs[0]["order"]["lanes_with_repeats"]
            out.append(
                f"| {p['concurrency']} | {p['n']:,} | {p['rate']:,.0f} | {p['ideal']:,.0f} | "
                f"{100 * p['efficiency']:.0f} % | {p['target']:,.0f} | "
                f"{'yes' if p['ordered'] else '**no**'} | {shared:,} | {cores:.2f} | {crm:.2f} |"
            )
        if "slow-crm" in plots:
            out += ["", f"![slow CRM]({_link(markdown, results_dir, plots['slow-crm'])})"]
    else:
        out.append(f"Not measured{_status(slow)}.")
    out.append("")

    mem = cases.get("memory-1m") or {}
    out += ["## Memory over 1,000,000 messages", ""]
    if mem.get("status") == "ok":
        out += [
            f"{mem['n']:,} encrypted messages pre-filled, synced into a fresh SQLite CRM "
            f"(the full engine) at {mem['rate']:,.0f} msg/s; `/proc/PID/status` of the "
            "consumer sampled every second (VmRSS, VmHWM).",
            "",
            "| RSS at 100k | steady median (after 100k) | max after 100k | RSS at the end | "
            "peak (VmHWM) |",
            "|---:|---:|---:|---:|---:|",
            f"| {mem['rss_at_mark_mib']} MiB | {mem['rss_steady_median_mib']} MiB | "
            f"{mem['rss_steady_max_mib']} MiB | {mem['rss_end_mib']} MiB | "
            f"{mem['peak_mib']} MiB |",
        ]
        if "memory-1m" in plots:
            out += ["", f"![RSS]({_link(markdown, results_dir, plots['memory-1m'])})"]
    else:
        out.append(
            "Not part of this run (`--quick`, or `--skip memory-1m`)."
            if not mem
            else f"Not measured{_status(mem)}."
        )
    out.append("")

    prof = doc.get("profile") or {}
    out += ["## Where the time goes (py-spy)", ""]
    profiled = [(name, p) for name, p in prof.items() if isinstance(p, dict) and "self" in p]
    if not profiled:
        out.append(f"No profile in this run ({prof.get('reason') or prof.get('error') or '–'}).")
    for name, p in profiled:
        out += [
            f"### {name}",
            "",
            f"One extra run under `py-spy record --rate 200` "
            f"({p['samples']:,} samples, {p['rate_under_profiler']:,.0f} msg/s under the "
            f"profiler). Raw stacks: `{p.get('raw', '')}`.",
            "",
            "| area (innermost frame) | share |",
            "|---|---:|",
        ]
        out += [f"| {a['area']} | {100 * a['share']:.1f} % |" for a in p["areas"]]
        out += ["", "| function (self) | share | | function (inclusive) | share |",
                "|---|---:|---|---|---:|"]  # fmt: skip
        for own, inc in zip(p["self"], p["inclusive"], strict=False):
            out.append(
                f"| `{own['function']}` | {100 * own['share']:.1f} % | | "
                f"`{inc['function']}` | {100 * inc['share']:.1f} % |"
            )
        out.append("")

    if ANALYSIS.exists() and not s.get("quick"):
        out += [ANALYSIS.read_text().rstrip().format_map(analysis_values(doc)), ""]

    # The pipeline's intake benchmark (python -m bench.pipeline) and the web console's
    # (python -m bench.web --full --report) write their own sections.
    for own in ("pipeline.md", "web.md"):
        section_file = results_dir / own
        if section_file.exists():
            out += [section_file.read_text().rstrip(), ""]
    destinations = results_dir / "destinations.json"
    if destinations.exists():  # python -m bench.destinations
        from bench.destinations import markdown as destinations_markdown

        out += destinations_markdown(orjson.loads(destinations.read_bytes()))

    out += [
        "## Method",
        "",
        "- Every case drains its own fresh durable queue, pre-filled (not timed) with the "
        "case's messages, published persistent and **without a content type** like Proca "
        "(@proca/queue 5.3 drops `application/json` bodies). The Node peer declares "
        "nothing (the queue exists).",
        "- Messages: `proca:action:2` deliver messages (`register`, with consent), built by "
        "`proca_sync.pipeline.producers.build_action`; encrypted ones carry `personalInfo` "
        "sealed for the org key by the instance key (crypto.md §2). 30 % come from a contact "
        "seen among the last 100.",
        "- Timing: each consumer measures itself from its start (connect, QoS, subscribe) "
        "until the N-th ack: the raw consumers when they send it, the peer when "
        "@proca/queue's `count.ack` reaches N, proca-sync when its `Stats` counts the N-th "
        "settled message (a `Stats` subclass given to `Consumer(…, stats=…)`; no polling). "
        "Process start-up and interpreter/module loading are outside the figure for every "
        "case. After the run the harness checks that the queue is empty.",
        "- proca-sync runs through its public API (`bench/proca_driver.py`: "
        "`ConsumerSettings`, `backend_from_url`, `ParkingStore`, `Keystore`, `Consumer`) "
        "with its defaults (concurrency 4, batches of ≤ 500 — into the SQL CRM one at a "
        "time, formed when its writer is free — prefetch 1000) and its normal logging: JSON "
        "lines on stderr, a summary line a second (to a file).",
        "- CPU: `RUSAGE_CHILDREN` for the consumer process, `/proc/<beam.smp>/stat` for the "
        "broker, `RUSAGE_SELF` for the harness (which hosts the slow CRM's HTTP server).",
        "",
        "## Commands",
        "",
        f"- `{doc.get('command', 'python -m bench.run')}`",
    ]
    for name, command in (doc.get("commands") or {}).items():
        out.append(f"- {name}: `{command}`")
    return "\n".join(out) + "\n"


def write(doc: dict[str, Any], *, results_dir: Path, markdown: Path) -> None:
    plots = _plots(doc, results_dir)
    markdown.write_text(render(doc, results_dir=results_dir, markdown=markdown, plots=plots))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    latest = Path(args[0]) if args else BENCH / "results" / "latest.json"
    doc = orjson.loads(latest.read_bytes())
    doc["targets"] = evaluate(doc)
    results_dir = latest.parent
    default = results_dir.resolve() == BENCH / "results"
    markdown = ROOT / "BENCHMARKS.md" if default else results_dir / "BENCHMARKS.md"
    write(doc, results_dir=results_dir, markdown=markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
