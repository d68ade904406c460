"""A PostgreSQL instance owned by the run: ``initdb`` in a temporary directory, its own port.

The server binaries of the Debian packages (``/usr/lib/postgresql/<version>/bin``) run as
an unprivileged user: when the suite runs as root, every command goes through
``runuser -u postgres``. Authentication is ``trust`` on loopback only; the instance lives
as long as the scenario and is removed with its directory. :meth:`PrivatePostgres.stop`
with ``mode="immediate"`` is a crash (no checkpoint; recovery on the next start).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgresUnavailableError", "PrivatePostgres", "find_bin_dir"]


class PostgresUnavailableError(RuntimeError):
    """No PostgreSQL server binaries, or no unprivileged user to run them as."""


def find_bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` (or $PG_BIN)."""
    env = os.environ.get("PG_BIN")
    candidates = (
        [Path(env)]
        if env
        else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
    )
    for candidate in candidates:
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    raise PostgresUnavailableError("no PostgreSQL server binaries (initdb, pg_ctl) found")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivatePostgres:
    """``with PrivatePostgres() as pg: pg.url`` — started on entry, removed on exit."""

    def __init__(self, *, user: str = "postgres") -> None:
        self.bin = find_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="reliability-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise PostgresUnavailableError("running as root and runuser is missing")
            try:
                shutil.chown(self.root, user=user)
            except (LookupError, PermissionError) as exc:
                raise PostgresUnavailableError(
                    f"cannot hand the directory to {user}: {exc}"
                ) from None
            self._as = ["runuser", "-u", user, "--"]
        self.running = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 120) -> None:
        result = subprocess.run(  # noqa: S603 - our own binaries and arguments
            [*self._as, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        if result.returncode != 0:
            raise PostgresUnavailableError(
                f"{Path(args[0]).name} failed: {(result.stderr or result.stdout).strip()[:400]}"
            )

    def init(self) -> None:
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "--auth=trust", "-U", "postgres",
            "-E", "UTF8", "--no-sync",
        )  # fmt: skip

    def start(self) -> None:
        """Start (again) on the same port; returns once it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options,
            "-l", str(self.log), "-w", "-t", "60", "start",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop it (``immediate``: like a crash, no shutdown checkpoint)."""
        if self.running:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
            self.running = False

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivatePostgres:
        try:
            self.init()
            self.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.destroy()
