"""``proca-sync web``: serve the web console; ``proca-sync web user add``: its accounts.

The console binds to 127.0.0.1 unless ``--host`` says otherwise. Passwords come from a
prompt, ``PROCA_WEB_PASSWORD`` or ``--password-file`` — never from argv. The session
signing secret comes from ``PROCA_WEB_SECRET`` or ``--secret-file``; without either a
random one is made at start (sessions then end when the server restarts).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated

import typer

from proca_sync.cli.common import (
    EnvFileOption,
    KeysOption,
    LogLevel,
    LogLevelOption,
    app,
    configure_logging,
    die,
    err,
    out,
    require_existing_store,
)
from proca_sync.cli.config import ConfigOption, ErasureKeyOption
from proca_sync.crm.sql import check_store_url
from proca_sync.crm.sql.changelog import DEFAULT_ERASURE_KEY_FILE
from proca_sync.errors import ConfigError

DEFAULT_USERS_URL = "sqlite:///proca-web.db"

web_app = typer.Typer(
    help="The web console: dashboard, parked messages, destinations, contacts, moderation.",
    invoke_without_command=True,
)
user_app = typer.Typer(help="Console accounts.", no_args_is_help=True)
web_app.add_typer(user_app, name="user")
app.add_typer(web_app, name="web")

UsersOption = Annotated[
    str,
    typer.Option(
        "--users",
        envvar="PROCA_WEB_USERS",
        metavar="URL",
        help="Account store: sqlite:///file.db or postgresql://user@host/db.",
    ),
]


def _read_secret(path: Path | None, env: str, what: str) -> str | None:
    if path is not None:
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise die(f"{what} {path}: {exc.strerror or 'unreadable'}", 2) from None
    return os.environ.get(env) or None


@web_app.callback()
def web_serve(
    ctx: typer.Context,
    config: ConfigOption = None,
    env_file: EnvFileOption = None,
    crm: Annotated[
        str | None,
        typer.Option("--crm", envvar="PROCA_CRM", metavar="URL", help="The embedded SQL CRM."),
    ] = None,
    parked: Annotated[
        str | None,
        typer.Option(
            "--parked", envvar="PROCA_PARKED", metavar="URL", help="The parking store."
        ),
    ] = None,
    pipeline: Annotated[
        str | None,
        typer.Option(
            "--pipeline",
            envvar="PROCA_PIPELINE_DB",
            metavar="URL",
            help="The pipeline's state store: the moderation inbox.",
        ),
    ] = None,
    pipeline_secrets: Annotated[
        Path | None,
        typer.Option(
            "--pipeline-secrets",
            envvar="PROCA_PIPELINE_SECRETS",
            help="The pipeline's secrets file: needed to accept or reject in the inbox.",
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            envvar="PROCA_METRICS_URL",
            metavar="URL",
            help="Running consumers' metrics, e.g. http://127.0.0.1:9100/metrics "
            "(several: comma-separated, summed).",
        ),
    ] = None,
    sample_seconds: Annotated[
        float,
        typer.Option(
            "--sample-seconds",
            envvar="PROCA_WEB_SAMPLE_SECONDS",
            min=0.1,
            help="How often the dashboard's history reads the consumers and destinations.",
        ),
    ] = 5.0,
    users: UsersOption = DEFAULT_USERS_URL,
    keys: KeysOption = None,
    erasure_key: ErasureKeyOption = DEFAULT_ERASURE_KEY_FILE,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            envvar="PROCA_WEB_SECRET_FILE",
            help="File holding the secret that signs session cookies (or PROCA_WEB_SECRET).",
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", envvar="PROCA_WEB_HOST", help="Address to listen on.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", envvar="PROCA_WEB_PORT", min=0, max=65535)
    ] = 8080,
    log_level: LogLevelOption = LogLevel.INFO,
) -> None:
    """Serve the console (log in with an account made by `proca-sync web user add`)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        import uvicorn

        from proca_sync.web.app import WebSettings, create_app
    except ImportError:
        raise die("the web console needs the web extra: pip install 'proca-sync[web]'", 2) from None
    # The console reads these: a mistyped path must not create an empty store.
    for url, what, option in ((crm, "CRM", "--crm"), (parked, "parking store", "--parked"),
                              (pipeline, "pipeline store", "--pipeline")):  # fmt: skip
        if url is not None:
            require_existing_store(url, what=what, option=option)
    try:
        check_store_url(users, what="web account store")
        if pipeline_secrets is not None:  # unusable secrets: refuse now, not at a decision
            from proca_sync.pipeline.instance import InstanceSecrets

            InstanceSecrets.load(pipeline_secrets)
    except ConfigError as exc:
        raise die(str(exc), 2) from None
    secret = _read_secret(secret_file, "PROCA_WEB_SECRET", "secret file")
    if secret is None:
        err.print("note: no PROCA_WEB_SECRET: sessions end when the server restarts")
        secret = secrets.token_urlsafe(32)
    configure_logging(log_level.value)
    settings = WebSettings(
        accounts_url=users,
        secret=secret.encode(),
        parked_url=parked,
        crm_url=crm,
        metrics_url=metrics,
        sample_seconds=sample_seconds,
        pipeline_url=pipeline,
        pipeline_secrets=pipeline_secrets,
        keys=keys,
        erasure_key=erasure_key,
    )
    try:
        web = create_app(settings)
    except ConfigError as exc:
        raise die(str(exc), 2) from None
    if host not in {"127.0.0.1", "::1", "localhost"}:
        err.print(f"warning: listening on {host}: serve it behind https")
    out.print(f"console on http://{host}:{port}/")
    # No access log: query strings (a contact search) may hold an e-mail.
    uvicorn.run(web, host=host, port=port, access_log=False, log_config=None, proxy_headers=True)


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="User name (a-z, 0-9, '.', '_', '-').")],
    role: Annotated[
        str, typer.Option("--role", help="admin, moderator or viewer.", case_sensitive=False)
    ] = "viewer",
    users: UsersOption = DEFAULT_USERS_URL,
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file",
            envvar="PROCA_WEB_PASSWORD_FILE",
            help="File holding the password (or PROCA_WEB_PASSWORD; else a prompt).",
        ),
    ] = None,
) -> None:
    """Create a console account, or set an existing one's role and password."""
    try:
        from proca_sync.web.accounts import AccountStore, Role
    except ImportError:
        raise die("the web console needs the web extra: pip install 'proca-sync[web]'", 2) from None
    try:
        chosen = Role(role.lower())
    except ValueError:
        raise die("--role is admin, moderator or viewer", 2) from None
    password = _read_secret(password_file, "PROCA_WEB_PASSWORD", "password file")
    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        check_store_url(users, what="web account store")
        store = AccountStore(users)
        store.open_sync()
        created = store.set_user(name, chosen, password)
    except ConfigError as exc:
        raise die(str(exc), 2) from None
    store.close()
    out.print(f"{'created' if created else 'updated'} {name} ({chosen.value})")
