"""Where proca-sync spends its time: one extra (untimed) run under py-spy.

``py-spy record --format raw`` samples the consumer process (all threads, idle time
excluded) and writes collapsed stacks (``frame;frame;… count``). From them:

* **self**: the share of samples whose innermost Python frame is that function (time in
  C extensions — orjson, pydantic-core, libsodium — is charged to the calling function);
* **inclusive**: the share of samples with that function anywhere on the stack;
* **by area**: self time grouped by the package of the innermost frame.

Stacks inside the import machinery (start-up, lazy imports) and stacks that are only
waiting (a thread-pool worker blocked on its queue, the event loop in ``epoll``: py-spy
does not always see them as idle) are counted apart and left out of the shares. The
inclusive table leaves out the frames every stack goes through (runpy, the event loop's
``run_forever``/``_run_once``/``Handle._run``, thread bootstrap).
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["AREAS", "py_spy", "summarise"]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

AREAS: tuple[tuple[str, str], ...] = (
    ("proca_sync/messages/", "decode + validate (proca_sync.messages, pydantic)"),
    ("proca_sync/crypto", "decrypt (proca_sync.crypto, PyNaCl)"),
    ("nacl/", "decrypt (proca_sync.crypto, PyNaCl)"),
    ("proca_sync/sync/", "model records (proca_sync.sync)"),
    ("proca_sync/engine", "engine glue"),
    ("proca_sync/crm/", "CRM backend"),
    ("sqlalchemy/", "CRM backend"),
    ("psycopg", "CRM backend"),
    ("sqlite3/", "CRM backend"),
    ("aiohttp", "CRM backend"),
    ("yarl", "CRM backend"),
    ("multidict", "CRM backend"),
    ("proca_sync/consumer/status", "metrics (prometheus_client, stats)"),
    ("prometheus_client/", "metrics (prometheus_client, stats)"),
    ("proca_sync/consumer/", "consumer (lanes, policy, settlement)"),
    ("proca_sync/cli", "logging (JSON lines: a summary a second, parked and retried messages)"),
    ("logging/", "logging (JSON lines: a summary a second, parked and retried messages)"),
    ("aio_pika/", "AMQP client (aio-pika, aiormq, pamqp)"),
    ("aiormq/", "AMQP client (aio-pika, aiormq, pamqp)"),
    ("pamqp/", "AMQP client (aio-pika, aiormq, pamqp)"),
    ("pydantic", "decode + validate (proca_sync.messages, pydantic)"),
    ("asyncio/", "asyncio event loop"),
    ("selectors", "asyncio event loop"),
)


_WAITING = (
    "_worker (concurrent/futures/thread.py)",
    "select (selectors.py)",
    "wait (threading.py)",
)
_PLUMBING = (
    "runpy", "asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py",
    "threading.py", "bench/proca_driver.py", "concurrent/futures/thread.py",
)  # fmt: skip


def py_spy() -> str | None:
    return shutil.which("py-spy")


def _frame_name(frame: str) -> tuple[str, str]:
    """(``function (short/file.py)``, file) for one collapsed-stack frame."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip(), ""
    path = match.group("file")
    for marker in ("site-packages/", "/lib/python3.11/", "/lib/python3.12/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})", path


def _area(path: str) -> str:
    for marker, area in AREAS:
        if marker in path:
            return area
    return "other"


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top functions (self and inclusive) and self time by area from a raw py-spy file."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    importing = 0
    waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        # py-spy may prefix the process and thread as pseudo-frames without a file.
        frames = [f for f in frames if f[1]]
        if not frames:
            continue
        if any("importlib._bootstrap" in path for _, path in frames):
            importing += count
            continue
        leaf_name, leaf_path = frames[-1]
        if leaf_name.endswith(_WAITING):
            waiting += count
            continue
        total += count
        own[leaf_name] += count
        areas[_area(leaf_path)] += count
        kept = {name for name, path in frames if not any(p in path for p in _PLUMBING)}
        for name in kept:
            inclusive[name] += count

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "samples": count, "share": round(count / total, 4)}
            for name, count in counter.most_common(top)
        ]

    return {
        "samples": total,
        "import_samples": importing,
        "waiting_samples": waiting,
        "self": table(own),
        "inclusive": table(inclusive),
        "areas": [
            {"area": name, "samples": count, "share": round(count / total, 4)}
            for name, count in areas.most_common()
        ]
        if total
        else [],
    }
