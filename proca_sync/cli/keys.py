"""``proca-sync keys``: @proca/crypto key stores."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from proca_sync.cli.common import (
    app,
    err,
    fail,
    load_keystore,
    out,
)
from proca_sync.crypto import KeyPair, Keystore

keys_app = typer.Typer(help="Key stores (@proca/crypto format).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


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
        err.print(
            f"[yellow]warning:[/yellow] {path} is readable by others (mode {mode:o}); chmod 600 it"
        )
