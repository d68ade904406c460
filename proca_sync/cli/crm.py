"""``proca-sync crm``: look into the embedded CRM."""

from __future__ import annotations

import sys
from typing import Annotated

import orjson
import typer
from rich.table import Table

from proca_sync.cli.common import (
    CrmOption,
    ExitCode,
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
def crm_show(
    email: Annotated[str, typer.Argument(help="E-mail of the contact.")],
    crm: CrmOption = DEFAULT_URL,
) -> None:
    """One contact with its consent, e-mail status history and actions."""
    with open_crm(crm) as backend:
        contact = backend.find_contact(email)
    if contact is None:
        raise fail("no contact with that e-mail", ExitCode.REJECTED)
    table = Table(show_header=False, title="contact")
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
        actions.add_column(column)
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
    config: ConfigOption = None,
    crm: CrmOption = DEFAULT_URL,
    erasure_key: ErasureKeyOption = DEFAULT_ERASURE_KEY,
) -> None:
    """Erase a contact (right to erasure): its data, actions, consent and status history.

    Keeps a tombstone without personal data (a keyed hash) so that an older redelivered
    message does not bring the person back; the next `push` erases them from every
    destination that supports it. Exit 1 when no contact matches.
    """
    if (email is None) == (ref is None):
        raise fail("give an e-mail or --ref")
    with open_crm(crm) as backend:
        attach_erasure_key(backend, erasure_key, create=True)
        try:
            tombstone = backend.forget_sync(email=email, ref=ref)
        except ProcaSyncError as exc:
            raise fail(f"CRM: {exc}", ExitCode.REJECTED) from None
    if tombstone is None:
        raise fail("no contact matches", ExitCode.REJECTED)
    out.print(f"erased: tombstone {tombstone}; `proca-sync push` propagates it to destinations")
