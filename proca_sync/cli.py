"""The ``proca-sync`` command line. It only wires options into constructors.

Exit codes: 0 success; 1 some messages were rejected (``replay``) or the run ended
abnormally; 2 usage or configuration error (bad option, unreadable key store, bad URL).
No command prints personal data except ``crm show`` / ``crm contacts`` / ``crm export``,
whose purpose is to show the CRM to its owner.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from proca_sync.crm import backend_from_url
from proca_sync.crm.sql import DEFAULT_URL, SqlBackend
from proca_sync.crypto import KeyPair, Keystore
from proca_sync.engine import Engine, Summary
from proca_sync.errors import ConfigError, ProcaSyncError
from proca_sync.pipeline.commands import simulate, topology_app
from proca_sync.sync.model import Options
from proca_sync.sync.records import Mode

__all__ = ["ExitCode", "app", "main"]


class ExitCode(IntEnum):
    OK = 0
    REJECTED = 1
    USAGE = 2


app = typer.Typer(
    name="proca-sync",
    help="Sync Proca actions and events into a CRM; run a Proca-compatible queue pipeline.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
keys_app = typer.Typer(help="Key stores (@proca/crypto format).", no_args_is_help=True)
crm_app = typer.Typer(help="Look into the embedded CRM.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(crm_app, name="crm")

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

CrmOption = Annotated[
    str, typer.Option("--crm", envvar="PROCA_CRM", help="CRM database URL (sqlite:/// or postgresql://).")
]
KeysOption = Annotated[
    Path | None,
    typer.Option("--keys", envvar="PROCA_KEYS", help="Key store file for encrypted personal data."),
]
ModeOption = Annotated[Mode, typer.Option("--mode", envvar="PROCA_MODE", help="Which messages reach the CRM.")]
SkipTestingOption = Annotated[
    bool, typer.Option("--skip-testing", envvar="PROCA_SKIP_TESTING", help="Drop actions flagged testing.")
]

log = logging.getLogger("proca_sync")


def configure_logging(level: str = "INFO") -> None:
    """One line per event on stderr: JSON off a terminal, plain text on one."""
    handler = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(_JsonFormatter())
    root = logging.getLogger("proca_sync")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        return orjson.dumps(entry).decode()


def fail(message: str, code: ExitCode = ExitCode.USAGE) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(int(code))


def load_keystore(path: Path | None) -> Keystore | None:
    if path is None:
        return None
    try:
        return Keystore.load(path)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def open_crm(url: str) -> SqlBackend:
    """The embedded CRM at ``url``, opened (its schema created if new)."""
    try:
        backend = SqlBackend(url)
        backend.open_sync()
    except ProcaSyncError as exc:
        raise fail(f"CRM {url.split('://', 1)[0]}: {exc}") from None
    return backend


# ---- replay -------------------------------------------------------------------------------

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
                    "rejected %s key=%s reason=%s", where, record.key, result.reason,
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
                    "rejected %s reason=%s: %s", where, exc.reason, exc.args[0] if exc.args else "",
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
    paths: Annotated[list[str], typer.Argument(help="Message files (.json, .jsonl, .ndjson), directories, or - for stdin.")],
    crm: CrmOption = DEFAULT_URL,
    keys: KeysOption = None,
    mode: ModeOption = Mode.ALL,
    skip_testing: SkipTestingOption = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    batch: Annotated[int, typer.Option(min=1, help="Records per CRM commit.")] = 500,
) -> None:
    """Run messages from files through the sync engine into the CRM.

    Exit 0 when every message was synced or ignored, 1 when some were rejected (the
    others are still synced), 2 on usage errors.
    """
    configure_logging()
    files = _expand(paths)
    keystore = load_keystore(keys)
    try:
        backend = backend_from_url(crm)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    engine = Engine(backend=backend, keystore=keystore, options=Options(mode=mode, skip_testing=skip_testing))
    try:
        summary = asyncio.run(_replay(engine, read_bodies(files), batch))
    except ProcaSyncError as exc:
        raise fail(f"CRM: {exc}", ExitCode.REJECTED) from None
    if as_json:
        out.print_json(orjson.dumps(summary.as_dict()).decode())
    else:
        print_summary(summary, "replay")
    raise typer.Exit(int(ExitCode.REJECTED if summary.rejected else ExitCode.OK))


# ---- keys ---------------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(
    out_file: Annotated[Path, typer.Option("--out", help="Key store file to create (mode 0600).")],
    add: Annotated[bool, typer.Option("--add", help="Add a key to an existing store.")] = False,
) -> None:
    """Generate a key pair and write it as an @proca/crypto key store. Prints the public key."""
    store = Keystore()
    if out_file.exists():
        if not add:
            raise fail(f"{out_file} exists; use --add to add a key to it")
        store = load_keystore(out_file) or Keystore()
    pair = KeyPair.generate()
    store.add(pair)
    store.save(out_file)
    out.print(f"public key: {pair.public}")
    out.print(f"written: {out_file} ({len(store)} key{'s' if len(store) != 1 else ''}, mode 0600)")


@keys_app.command("check")
def keys_check(path: Annotated[Path, typer.Argument(help="Key store file.")]) -> None:
    """Load a key store, verify every private key derives its public key, list the keys."""
    store = load_keystore(path)
    assert store is not None
    mode = path.stat().st_mode & 0o777
    for pair in store:
        out.print(f"ok  {pair.public}")
    out.print(f"{len(store)} key(s) valid")
    if mode & 0o077:
        err.print(f"[yellow]warning:[/yellow] {path} is readable by others (mode {mode:o}); chmod 600 it")


# ---- crm ----------------------------------------------------------------------------------


@crm_app.command("export")
def crm_export(crm: CrmOption = DEFAULT_URL) -> None:
    """Print the whole CRM as JSON (contacts with their actions, campaigns)."""
    try:
        with open_crm(crm) as backend:
            data = backend.export()
    except ProcaSyncError as exc:
        raise fail(f"CRM: {exc}") from None
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


@crm_app.command("contacts")
def crm_contacts(
    crm: CrmOption = DEFAULT_URL,
    limit: Annotated[int, typer.Option(min=1, help="Rows to show.")] = 50,
) -> None:
    """A table of the CRM's contacts."""
    with open_crm(crm) as backend:
        data = backend.export()
    table = Table(title=f"contacts ({len(data['contacts'])})")
    for column in ("email", "name", "country", "postcode", "subscribed", "status", "actions"):
        table.add_column(column)
    for contact in data["contacts"][:limit]:
        name = " ".join(p for p in (contact["firstName"], contact["lastName"]) if p)
        table.add_row(
            contact["email"] or "-",
            name or "-",
            contact["country"] or "-",
            contact["postcode"] or "-",
            "yes" if contact["subscribed"] else "no",
            contact["emailStatus"] or "-",
            str(len(contact["actions"])),
        )
    out.print(table)
    if len(data["contacts"]) > limit:
        out.print(f"… {len(data['contacts']) - limit} more (--limit)")


@crm_app.command("show")
def crm_show(email: Annotated[str, typer.Argument(help="E-mail of the contact.")], crm: CrmOption = DEFAULT_URL) -> None:
    """One contact with its consent, e-mail status history and actions."""
    with open_crm(crm) as backend:
        contact = backend.find_contact(email)
    if contact is None:
        raise fail("no contact with that e-mail", ExitCode.REJECTED)
    table = Table(show_header=False, title="contact")
    for key in ("email", "firstName", "lastName", "postcode", "country", "subscribed", "optIn", "optInAt", "emailStatus", "emailStatusChanged", "testing"):
        table.add_row(key, str(contact[key]))
    table.add_row("contactRefs", ", ".join(contact["contactRefs"]))
    out.print(table)
    actions = Table(title="actions")
    for column in ("actionId", "type", "campaign", "createdAt", "consent", "testing"):
        actions.add_column(column)
    for action in contact["actions"]:
        actions.add_row(
            str(action["actionId"]), action["actionType"], action["campaign"], action["createdAt"],
            "yes" if action["withConsent"] else "no", "yes" if action["testing"] else "no",
        )
    out.print(actions)
    history = Table(title="e-mail status history")
    history.add_column("status")
    history.add_column("changed")
    for entry in contact["emailStatusHistory"]:
        history.add_row(str(entry["status"]), str(entry["changedAt"]))
    out.print(history)


# ---- pipeline: topology and traffic ------------------------------------------------------

app.add_typer(topology_app, name="topology", help="Declare and inspect an org's Proca queues.")
app.command("simulate")(simulate)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("PYTHONIOENCODING", "utf-8")
    app()


if __name__ == "__main__":
    main()
