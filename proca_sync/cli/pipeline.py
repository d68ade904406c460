"""``proca-sync pipeline …``: the Proca-compatible processing pipeline.

``init`` writes the instance secrets file (0600); ``serve`` runs the intake service with
its outbox publisher; ``org``, ``campaign``, ``page`` and ``key`` create and list the
state. The broker URL comes from ``--broker`` / ``PROCA_PIPELINE_BROKER`` with user and
password from ``PROCA_USERNAME`` / ``PROCA_PASSWORD`` when the URL has none. Exit codes:
0 ok, 1 the service failed, 2 configuration (missing secrets, bad URL, unknown ids).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlsplit, urlunsplit

import typer
from rich.table import Table
from sqlalchemy.exc import IntegrityError

from proca_sync.cli.common import ExitCode, app, configure_logging, die, out, quiet_amqp_logs
from proca_sync.errors import ConfigError

pipeline_app = typer.Typer(
    help="Run and manage the Proca-compatible pipeline.", no_args_is_help=True
)
org_app = typer.Typer(help="Organisations and their flags.", no_args_is_help=True)
campaign_app = typer.Typer(help="Campaigns (changes emit campaign_updated).", no_args_is_help=True)
page_app = typer.Typer(help="Action pages.", no_args_is_help=True)
key_app = typer.Typer(help="Encryption keys and management API keys.", no_args_is_help=True)
pipeline_app.add_typer(org_app, name="org")
pipeline_app.add_typer(campaign_app, name="campaign")
pipeline_app.add_typer(page_app, name="page")
pipeline_app.add_typer(key_app, name="key")
app.add_typer(pipeline_app, name="pipeline")

DEFAULT_DB = "sqlite:///proca-pipeline.db"
DbOption = Annotated[
    str, typer.Option("--db", envvar="PROCA_PIPELINE_DB", help="State database URL.")
]
SecretsOption = Annotated[
    Path,
    typer.Option(
        "--secrets", envvar="PROCA_PIPELINE_SECRETS", help="Instance secrets file (pipeline init)."
    ),
]


def _engine(url: str) -> Any:
    from proca_sync.pipeline.state import migrate, open_engine

    try:
        engine = open_engine(url)
        migrate(engine)
    except Exception as exc:  # a bad URL or an unreachable database: refuse, exit 2
        raise die(f"state database: {type(exc).__name__}", ExitCode.USAGE) from None
    return engine


def broker_url(url: str) -> str:
    """``url`` with PROCA_USERNAME / PROCA_PASSWORD filled in when it has no user."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ConfigError("the broker URL must start with amqp:// or amqps://")
    user, password = os.environ.get("PROCA_USERNAME"), os.environ.get("PROCA_PASSWORD")
    if parts.username or not user:
        return url
    credentials = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit(parts._replace(netloc=f"{credentials}@{parts.netloc}"))


@pipeline_app.command("init")
def init(secrets: SecretsOption = Path("proca-pipeline-secrets.json")) -> None:
    """Create the instance secrets file (contactRef seed, instance key, webhook secret)."""
    from proca_sync.pipeline.instance import InstanceSecrets

    if secrets.exists():
        raise die(f"{secrets} exists; the pipeline keeps its secrets", ExitCode.USAGE)
    InstanceSecrets.generate().save(secrets)
    out.print(f"wrote {secrets} (0600)")


@pipeline_app.command("serve")
def serve(
    db: DbOption = DEFAULT_DB,
    secrets: SecretsOption = Path("proca-pipeline-secrets.json"),
    broker: Annotated[
        str | None,
        typer.Option("--broker", envvar="PROCA_PIPELINE_BROKER", help="amqp(s):// URL."),
    ] = None,
    host: Annotated[str, typer.Option("--host", envvar="PROCA_PIPELINE_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", envvar="PROCA_PIPELINE_PORT")] = 8040,
    rate: Annotated[
        float,
        typer.Option("--rate", min=0, help="Intake requests/s per client address (0: off)."),
    ] = 20.0,
    burst: Annotated[int, typer.Option("--burst", min=1)] = 100,
    retry_delay_ms: Annotated[
        int, typer.Option("--retry-delay-ms", min=1, help="x-message-ttl of org.N.fail.")
    ] = 30_000,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Serve the intake, links and management API; publish the outbox to the broker."""
    import uvicorn

    from proca_sync.pipeline.app import PipelineConfig, create_app
    from proca_sync.pipeline.instance import InstanceSecrets

    configure_logging(log_level)
    quiet_amqp_logs(log_level)
    try:
        instance = InstanceSecrets.load(secrets)
        amqp = broker_url(broker) if broker else None
    except ConfigError as exc:
        raise die(str(exc), ExitCode.USAGE) from None
    engine = _engine(db)
    config = PipelineConfig(
        database=db,
        secrets=instance,
        amqp_url=amqp,
        rate=rate,
        burst=burst,
        retry_delay_ms=retry_delay_ms,
    )
    application = create_app(config, engine=engine)
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


def _table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(table)


def _guard(work: Any) -> None:
    try:
        work()
    except ConfigError as exc:
        raise die(str(exc), ExitCode.USAGE) from None
    except IntegrityError:
        raise die(
            "that id or name exists already, or a referenced id does not", ExitCode.USAGE
        ) from None


# ---- orgs ----------------------------------------------------------------------------------

Flag = Annotated[bool | None, typer.Option()]


def _flags(**values: bool | None) -> dict[str, bool]:
    return {name: value for name, value in values.items() if value is not None}


@org_app.command("add")
def org_add(
    org_id: Annotated[int, typer.Argument(min=1)],
    name: Annotated[str, typer.Option("--name")],
    title: Annotated[str, typer.Option("--title")],
    db: DbOption = DEFAULT_DB,
    custom_supporter_confirm: Flag = None,
    custom_action_confirm: Flag = None,
    custom_action_deliver: Flag = None,
    custom_event_deliver: Flag = None,
    supporter_confirm: Flag = None,
    email_backend: Flag = None,
    high_security: Flag = None,
) -> None:
    """Create an org (flags as in topology.md §2: --custom-action-deliver, …)."""
    from proca_sync.pipeline.admin import add_org

    flags = _flags(
        custom_supporter_confirm=custom_supporter_confirm,
        custom_action_confirm=custom_action_confirm,
        custom_action_deliver=custom_action_deliver,
        custom_event_deliver=custom_event_deliver,
        supporter_confirm=supporter_confirm,
        email_backend=email_backend,
        high_security=high_security,
    )
    engine = _engine(db)
    _guard(lambda: add_org(engine, org_id=org_id, name=name, title=title, **flags))
    out.print(f"org {org_id} created")


@org_app.command("set")
def org_set(
    org_id: Annotated[int, typer.Argument(min=1)],
    db: DbOption = DEFAULT_DB,
    custom_supporter_confirm: Flag = None,
    custom_action_confirm: Flag = None,
    custom_action_deliver: Flag = None,
    custom_event_deliver: Flag = None,
    supporter_confirm: Flag = None,
    email_backend: Flag = None,
    high_security: Flag = None,
) -> None:
    """Change org flags (a running pipeline re-declares the topology within seconds)."""
    from proca_sync.pipeline.admin import set_org_flags

    flags = _flags(
        custom_supporter_confirm=custom_supporter_confirm,
        custom_action_confirm=custom_action_confirm,
        custom_action_deliver=custom_action_deliver,
        custom_event_deliver=custom_event_deliver,
        supporter_confirm=supporter_confirm,
        email_backend=email_backend,
        high_security=high_security,
    )
    engine = _engine(db)
    _guard(lambda: set_org_flags(engine, org_id, **flags))
    out.print(f"org {org_id} updated")


@org_app.command("list")
def org_list(db: DbOption = DEFAULT_DB) -> None:
    """Orgs and their flags."""
    from proca_sync.pipeline.admin import ORG_FLAGS, list_rows

    _table(list_rows(_engine(db), "orgs"), ["id", "name", "title", *ORG_FLAGS], "orgs")


# ---- campaigns -----------------------------------------------------------------------------


@campaign_app.command("add")
def campaign_add(
    campaign_id: Annotated[int, typer.Argument(min=1)],
    name: Annotated[str, typer.Option("--name")],
    title: Annotated[str, typer.Option("--title")],
    org: Annotated[int, typer.Option("--org", min=1)],
    db: DbOption = DEFAULT_DB,
    external_id: Annotated[int | None, typer.Option("--external-id")] = None,
    supporter_confirm: Flag = None,
    action_confirm: Flag = None,
    force_delivery: Annotated[bool, typer.Option("--force-delivery")] = False,
) -> None:
    """Create a campaign (queues campaign_updated to its org)."""
    from proca_sync.pipeline.admin import add_campaign

    engine = _engine(db)
    _guard(
        lambda: add_campaign(
            engine,
            campaign_id=campaign_id,
            name=name,
            title=title,
            org_id=org,
            external_id=external_id,
            supporter_confirm=supporter_confirm,
            action_confirm=action_confirm,
            force_delivery=force_delivery,
        )
    )
    out.print(f"campaign {campaign_id} created")


@campaign_app.command("update")
def campaign_update(
    campaign_id: Annotated[int, typer.Argument(min=1)],
    db: DbOption = DEFAULT_DB,
    title: Annotated[str | None, typer.Option("--title")] = None,
    external_id: Annotated[int | None, typer.Option("--external-id")] = None,
    supporter_confirm: Flag = None,
    action_confirm: Flag = None,
) -> None:
    """Change a campaign (queues campaign_updated)."""
    from proca_sync.pipeline.admin import update_campaign

    values: dict[str, Any] = {}
    if title is not None:
        values["title"] = title
    if external_id is not None:
        values["external_id"] = external_id
    if supporter_confirm is not None:
        values["supporter_confirm"] = supporter_confirm
    if action_confirm is not None:
        values["action_confirm"] = action_confirm
    engine = _engine(db)
    _guard(lambda: update_campaign(engine, campaign_id, **values))
    out.print(f"campaign {campaign_id} updated")


@campaign_app.command("list")
def campaign_list(db: DbOption = DEFAULT_DB) -> None:
    """Campaigns and their confirmation settings."""
    from proca_sync.pipeline.admin import list_rows

    columns = [
        "id",
        "name",
        "title",
        "org_id",
        "supporter_confirm",
        "action_confirm",
        "force_delivery",
    ]
    _table(list_rows(_engine(db), "campaigns"), columns, "campaigns")


# ---- pages ---------------------------------------------------------------------------------


@page_app.command("add")
def page_add(
    page_id: Annotated[int, typer.Argument(min=1)],
    name: Annotated[str, typer.Option("--name")],
    campaign: Annotated[int, typer.Option("--campaign", min=1)],
    org: Annotated[int, typer.Option("--org", min=1)],
    db: DbOption = DEFAULT_DB,
    locale: Annotated[str, typer.Option("--locale")] = "en",
    delivery: Annotated[bool, typer.Option("--delivery/--no-delivery")] = True,
    thank_you_template: Annotated[str | None, typer.Option("--thank-you-template")] = None,
    location: Annotated[str | None, typer.Option("--location")] = None,
) -> None:
    """Create an action page of ``--org`` in ``--campaign`` (a partner page when they differ)."""
    from proca_sync.pipeline.admin import add_page

    engine = _engine(db)
    _guard(
        lambda: add_page(
            engine,
            page_id=page_id,
            name=name,
            locale=locale,
            campaign_id=campaign,
            org_id=org,
            delivery=delivery,
            thank_you_template=thank_you_template,
            location=location,
        )
    )
    out.print(f"page {page_id} created")


@page_app.command("list")
def page_list(db: DbOption = DEFAULT_DB) -> None:
    """Action pages."""
    from proca_sync.pipeline.admin import list_rows

    columns = ["id", "name", "locale", "campaign_id", "org_id", "delivery"]
    _table(list_rows(_engine(db), "pages"), columns, "pages")


# ---- keys ----------------------------------------------------------------------------------


@key_app.command("add")
def key_add(
    org: Annotated[int, typer.Option("--org", min=1)],
    public: Annotated[str, typer.Option("--public", help="The org's public key (base64url).")],
    db: DbOption = DEFAULT_DB,
) -> None:
    """Encrypt the org's personal data for this public key from now on."""
    from proca_sync.pipeline.admin import add_org_key

    engine = _engine(db)
    _guard(lambda: out.print(f"key {add_org_key(engine, org, public)} active for org {org}"))


@key_app.command("list")
def key_list(db: DbOption = DEFAULT_DB) -> None:
    """Public keys per org."""
    from proca_sync.pipeline.admin import list_rows

    _table(list_rows(_engine(db), "keys"), ["id", "org_id", "public", "active"], "keys")


@key_app.command("api")
def key_api(
    org: Annotated[int, typer.Option("--org", min=1)],
    out_file: Annotated[Path, typer.Option("--out", help="File to write the new key to (0600).")],
    db: DbOption = DEFAULT_DB,
) -> None:
    """Create a management API key for the org; it is written to --out, never printed."""
    from proca_sync.pipeline.admin import new_api_key

    engine = _engine(db)

    def work() -> None:
        key = new_api_key(engine, org)
        fd = os.open(out_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")

    try:
        _guard(work)
    except FileExistsError:
        raise die(f"{out_file} exists", ExitCode.USAGE) from None
    out.print(f"API key for org {org} written to {out_file}")
