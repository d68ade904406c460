"""``proca-sync replay``: messages from files through the engine into the CRM."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.table import Table

from proca_sync.cli.common import (
    CrmOption,
    EnvFileOption,
    ExitCode,
    KeysOption,
    ModeOption,
    SkipTestingOption,
    WebhookHeadersFileOption,
    WebhookSecretFileOption,
    WebhookTimeoutOption,
    app,
    configure_logging,
    crm_backend,
    err,
    fail,
    load_keystore,
    log,
    message_progress,
    out,
)
from proca_sync.cli.config import DEFAULT_ERASURE_KEY, ErasureKeyOption, attach_erasure_key
from proca_sync.crm.sql import DEFAULT_URL, SqlBackend
from proca_sync.engine import Engine, Summary
from proca_sync.errors import ConfigError, ProcaSyncError
from proca_sync.sync.model import Options
from proca_sync.sync.records import Mode

_LINE_SUFFIXES = {".jsonl", ".ndjson"}
_SUFFIXES = {".json", *_LINE_SUFFIXES}


def _expand(paths: list[str]) -> list[str]:
    files: list[str] = []
    for raw in paths:
        if raw == "-":
            files.append(raw)
            continue
        path = Path(raw)
        if path.is_dir():
            files.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix in _SUFFIXES)
        elif not path.exists():
            raise fail(f"{raw}: no such file")
        elif path.suffix not in _SUFFIXES:
            raise fail(f"{raw}: expected .json, .jsonl, .ndjson, a directory or -")
        else:
            files.append(raw)
    return files


PROGRESS_FROM = 1_000
"""Messages from which ``replay`` shows a progress bar on a terminal."""


def count_messages(paths: list[str]) -> int | None:
    """How many messages ``read_bodies(paths)`` will yield (None when reading stdin)."""
    if "-" in paths:
        return None
    total = 0
    for name in paths:
        if Path(name).suffix in _LINE_SUFFIXES:
            total += sum(1 for line in Path(name).read_bytes().split(b"\n") if line.strip())
        else:
            total += 1
    return total


def read_bodies(paths: list[str]) -> Iterator[tuple[str, bytes]]:
    """(where, body) for every message in the inputs; ``where`` is ``file:line``."""
    for name in paths:
        if name == "-":
            data = sys.stdin.buffer.read()
            yield from _split(data, "-", whole_first=True)
            continue
        data = Path(name).read_bytes()
        if Path(name).suffix in _LINE_SUFFIXES:
            yield from _split(data, name, whole_first=False)
        else:
            yield f"{name}", data


def _split(data: bytes, name: str, *, whole_first: bool) -> Iterator[tuple[str, bytes]]:
    if whole_first:
        try:
            if isinstance(orjson.loads(data), dict):
                yield name, data
                return
        except orjson.JSONDecodeError:
            pass
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            yield f"{name}:{number}", line


async def _replay(engine: Engine, inputs: Iterator[tuple[str, bytes]], batch: int) -> Summary:
    from proca_sync.errors import PermanentError
    from proca_sync.sync.records import Ignored, SyncRecord

    summary = Summary()
    pending: list[tuple[str, SyncRecord]] = []

    async def flush() -> None:
        results = await engine.apply([record for _, record in pending])
        for (where, record), result in zip(pending, results, strict=True):
            summary.count_result(result)
            if isinstance(result, PermanentError):
                log.warning(
                    "rejected %s key=%s reason=%s",
                    where,
                    record.key,
                    result.reason,
                    extra={"fields": {"where": where, "reason": str(result.reason)}},
                )
        pending.clear()

    try:
        await engine.backend.open()
        for where, body in inputs:
            try:
                prepared = engine.prepare(body)
            except PermanentError as exc:
                summary.rejected[str(exc.reason)] += 1
                log.warning(
                    "rejected %s reason=%s: %s",
                    where,
                    exc.reason,
                    exc.args[0] if exc.args else "",
                    extra={"fields": {"where": where, "reason": str(exc.reason)}},
                )
                continue
            if isinstance(prepared, Ignored):
                summary.ignored[str(prepared.reason)] += 1
                continue
            pending.append((where, prepared))
            if len(pending) >= batch:
                await flush()
        if pending:
            await flush()
    finally:
        await engine.backend.close()
    return summary


def print_summary(summary: Summary, title: str) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("outcome")
    table.add_column("messages", justify="right")
    table.add_row("synced", str(summary.synced))
    table.add_row("already applied", str(summary.duplicates))
    for reason, count in sorted(summary.ignored.items()):
        table.add_row(f"ignored: {reason}", str(count))
    for reason, count in sorted(summary.rejected.items()):
        table.add_row(f"[red]rejected: {reason}[/red]", str(count))
    table.add_row("[bold]total[/bold]", f"[bold]{summary.total}[/bold]")
    out.print(table)


@app.command()
def replay(
    paths: Annotated[
        list[str],
        typer.Argument(help="Message files (.json, .jsonl, .ndjson), directories, or - for stdin."),
    ],
    crm: CrmOption = DEFAULT_URL,
    env_file: EnvFileOption = None,
    keys: KeysOption = None,
    mode: ModeOption = Mode.ALL,
    skip_testing: SkipTestingOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    batch: Annotated[int, typer.Option(min=1, help="Records per CRM commit.")] = 500,
    erasure_key: ErasureKeyOption = DEFAULT_ERASURE_KEY,
    webhook_secret_file: WebhookSecretFileOption = None,
    webhook_headers_file: WebhookHeadersFileOption = None,
    webhook_timeout: WebhookTimeoutOption = None,
) -> None:
    """Run messages from files through the sync engine into the CRM.

    Exit 0 when every message was synced or ignored, 1 when some were rejected (the
    others are still synced), 2 on usage errors.
    """
    console = configure_logging()
    files = _expand(paths)
    if not files:
        err.print(
            "[yellow]warning:[/yellow] no .json, .jsonl or .ndjson file found in "
            + ", ".join(paths),
            soft_wrap=True,
        )
    keystore = load_keystore(keys, warn_readable=True)
    backend = crm_backend(
        crm,
        secret_file=webhook_secret_file,
        headers_file=webhook_headers_file,
        timeout=webhook_timeout,
    )
    if isinstance(backend, SqlBackend):  # so that erased people stay erased
        attach_erasure_key(backend, erasure_key, create=False)
    engine = Engine(
        backend=backend, keystore=keystore, options=Options(mode=mode, skip_testing=skip_testing)
    )
    total = count_messages(files) if console is not None else None
    try:
        if console is not None and total is not None and total >= PROGRESS_FROM:
            with message_progress(console) as progress:
                task = progress.add_task("replay", total=total)

                def advancing() -> Iterator[tuple[str, bytes]]:
                    for item in read_bodies(files):
                        yield item
                        progress.advance(task)

                summary = asyncio.run(_replay(engine, advancing(), batch))
        else:
            summary = asyncio.run(_replay(engine, read_bodies(files), batch))
    except ConfigError as exc:
        raise fail(f"CRM: {exc}") from None
    except ProcaSyncError as exc:
        raise fail(f"CRM: {exc}", ExitCode.REJECTED) from None
    if files and summary.total == 0:
        err.print("[yellow]warning:[/yellow] no message found in the input", soft_wrap=True)
    if as_json:
        out.print_json(orjson.dumps(summary.as_dict()).decode())
    else:
        print_summary(summary, "replay")
    raise typer.Exit(int(ExitCode.REJECTED if summary.rejected else ExitCode.OK))
