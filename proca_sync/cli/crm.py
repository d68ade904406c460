"""``proca-sync crm``: look into the embedded CRM (read-only: a missing SQLite file is an
error, never created)."""

from __future__ import annotations

import csv
import io
import sys
from enum import StrEnum
from typing import Annotated, Any

import orjson
import typer
from rich import box
from rich.table import Table

from proca_sync.cli.common import (
    EnvFileOption,
    ExitCode,
    SqlCrmOption,
    app,
    fail,
    open_crm,
    out,
)
from proca_sync.cli.config import (
    DEFAULT_ERASURE_KEY,
    ConfigOption,
    ErasureKeyOption,
    attach_erasure_key,
)
from proca_sync.crm.sql import DEFAULT_URL
from proca_sync.errors import ProcaSyncError

crm_app = typer.Typer(help="Look into the embedded CRM.", no_args_is_help=True)
app.add_typer(crm_app, name="crm")


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"
    CSV = "csv"


_CSV_FIELDS = (
    "email",
    "firstName",
    "lastName",
    "country",
    "postcode",
    "subscribed",
    "emailStatus",
    "actions",
)


def _export(crm: str) -> dict[str, Any]:
    try:
        with open_crm(crm, read_only=True) as backend:
            data: dict[str, Any] = backend.export()
    except ProcaSyncError as exc:
        raise fail(f"CRM: {exc}", ExitCode.REJECTED) from None
    return data


@crm_app.command("export")
def crm_export(crm: SqlCrmOption = DEFAULT_URL, env_file: EnvFileOption = None) -> None:
    """Print the whole CRM as JSON (contacts with their actions, campaigns)."""
    data = _export(crm)
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _matches(contact: dict[str, Any], search: str | None, subscribed: bool | None) -> bool:
    if subscribed is not None and bool(contact["subscribed"]) != subscribed:
        return False
    if not search:
        return True
    needle = search.casefold()
    haystack = (
        contact["email"],
        contact["firstName"],
        contact["lastName"],
        contact["postcode"],
        *contact.get("contactRefs", ()),
    )
    return any(needle in str(value).casefold() for value in haystack if value)


def _flat(contact: dict[str, Any]) -> dict[str, Any]:
    row = {name: contact.get(name) for name in _CSV_FIELDS}
    row["actions"] = len(contact["actions"])
    return row


@crm_app.command("contacts")
def crm_contacts(
    crm: SqlCrmOption = DEFAULT_URL,
    env_file: EnvFileOption = None,
    search: Annotated[
        str | None,
        typer.Option(
            "--search", metavar="TEXT", help="Only contacts whose e-mail, name, postcode or "
            "contact ref contains TEXT (case-insensitive).",
        ),
    ] = None,
    subscribed: Annotated[
        bool | None,
        typer.Option(
            "--subscribed/--unsubscribed", show_default=False,
            help="Only subscribed, or only unsubscribed, contacts (default: both).",
        ),
    ] = None,
    output: Annotated[
        Format,
        typer.Option("--format", help="table (for people), json or csv (for tools)."),
    ] = Format.TABLE,
    limit: Annotated[
        int | None,
        typer.Option(min=1, help="At most this many rows (default: 50 in a table, all else)."),
    ] = None,
) -> None:
    """The CRM's contacts: a table, or every matching contact as JSON or CSV."""
    data = _export(crm)
    chosen = [c for c in data["contacts"] if _matches(c, search, subscribed)]
    shown = chosen[: limit or (50 if output is Format.TABLE else len(chosen))]
    if output is Format.JSON:
        sys.stdout.write(orjson.dumps(shown, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if output is Format.CSV:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(_flat(contact) for contact in shown)
        sys.stdout.write(buffer.getvalue())
        return
    title = f"contacts ({len(chosen)} of {len(data['contacts'])})" if (
        search or subscribed is not None
    ) else f"contacts ({len(chosen)})"
    # Fits 80 columns: light borders, and every column may fold (a value goes on over
    # lines, never cut: an e-mail is what a person copies from here). Postcodes are in
    # `crm show` and the json/csv formats.
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, collapse_padding=True)
    table.add_column("email", overflow="fold")
    table.add_column("name", overflow="fold")
    table.add_column("country", overflow="fold")
    table.add_column("sub", overflow="fold")
    table.add_column("status", overflow="fold")
    table.add_column("actions", overflow="fold", justify="right")
    for contact in shown:
        name = " ".join(p for p in (contact["firstName"], contact["lastName"]) if p)
        table.add_row(
            contact["email"] or "-",
            name or "-",
            contact["country"] or "-",
            "yes" if contact["subscribed"] else "no",
            contact["emailStatus"] or "-",
            str(len(contact["actions"])),
        )
    out.print(table)
    if len(chosen) > len(shown):
        out.print(f"… {len(chosen) - len(shown)} more (--limit N, or --format json|csv)")


@crm_app.command("show")
def crm_show(
    email: Annotated[str, typer.Argument(help="E-mail of the contact.")],
    crm: SqlCrmOption = DEFAULT_URL,
    env_file: EnvFileOption = None,
) -> None:
    """One contact with its consent, e-mail status history and actions."""
    with open_crm(crm, read_only=True) as backend:
        contact = backend.find_contact(email)
    if contact is None:
        raise fail("no contact with that e-mail", ExitCode.REJECTED)
    table = Table(show_header=False, title="contact")
    table.add_column("field", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key in (
        "email",
        "firstName",
        "lastName",
        "postcode",
        "country",
        "subscribed",
        "optIn",
        "optInAt",
        "emailStatus",
        "emailStatusChanged",
        "testing",
    ):
        table.add_row(key, str(contact[key]))
    table.add_row("contactRefs", ", ".join(contact["contactRefs"]))
    out.print(table)
    actions = Table(title="actions")
    for column in ("actionId", "type", "campaign", "createdAt", "consent", "testing"):
        actions.add_column(column, overflow="fold")
    for action in contact["actions"]:
        actions.add_row(
            str(action["actionId"]),
            action["actionType"],
            action["campaign"],
            action["createdAt"],
            "yes" if action["withConsent"] else "no",
            "yes" if action["testing"] else "no",
        )
    out.print(actions)
    history = Table(title="e-mail status history")
    history.add_column("status")
    history.add_column("changed")
    for entry in contact["emailStatusHistory"]:
        history.add_row(str(entry["status"]), str(entry["changedAt"]))
    out.print(history)


@crm_app.command("forget")
def crm_forget(
    email: Annotated[str | None, typer.Argument(help="E-mail of the contact to erase.")] = None,
    ref: Annotated[str | None, typer.Option("--ref", help="Contact ref instead.")] = None,
    env_file: EnvFileOption = None,
    config: ConfigOption = None,
    crm: SqlCrmOption = DEFAULT_URL,
    erasure_key: ErasureKeyOption = DEFAULT_ERASURE_KEY,
) -> None:
    """Erase a contact (right to erasure): its data, actions, consent and status history.

    Keeps a tombstone without personal data (a keyed hash) so that an older redelivered
    message does not bring the person back; the next `push` erases them from every
    destination that supports it. Exit 1 when no contact matches.
    """
    if (email is None) == (ref is None):
        raise fail("give an e-mail or --ref")
    with open_crm(crm, read_only=True) as backend:
        attach_erasure_key(backend, erasure_key, create=True)
        try:
            tombstone = backend.forget_sync(email=email, ref=ref)
        except ProcaSyncError as exc:
            raise fail(f"CRM: {exc}", ExitCode.REJECTED) from None
    if tombstone is None:
        raise fail("no contact matches", ExitCode.REJECTED)
    out.print(f"erased: tombstone {tombstone}; `proca-sync push` propagates it to destinations")
