"""TLS for the amqps checks: a self-made CA, a server certificate, a TLS listener.

Certificates are made with the ``openssl`` command line (no Python dependency): a CA
and a server certificate for ``localhost`` / ``127.0.0.1`` signed by it. The listener is
preferably a real RabbitMQ TLS listener started at run time on the running node
(``rabbitmqctl eval`` → ``rabbit_networking:start_ssl_listener``) and stopped afterwards;
when that is impossible (no rabbitmqctl, not allowed) :class:`TlsTerminatingProxy`
terminates TLS in this process and forwards the plain bytes to the broker's 5672.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from reliability.pgprivate import free_port

__all__ = [
    "Certificates",
    "RabbitTlsListener",
    "TlsError",
    "TlsTerminatingProxy",
    "make_certificates",
]


class TlsError(RuntimeError):
    pass


@dataclass(frozen=True)
class Certificates:
    directory: Path
    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    owner: str | None = None

    def issue(self, stem: str, san: str) -> tuple[Path, Path]:
        """Another server certificate signed by the CA (``san``: an openssl
        subjectAltName value); its (certificate, key) paths."""
        cert, key = self.directory / f"{stem}.pem", self.directory / f"{stem}.key"
        csr, ext = self.directory / f"{stem}.csr", self.directory / f"{stem}.ext"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", "/CN=proca-sync reliability server")  # fmt: skip
        ext.write_text(
            f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
            "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n"
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(self.ca),
            "-CAkey",
            str(self.ca_key),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            "2",
            "-extfile",
            str(ext),
        )
        cert.chmod(0o644)
        key.chmod(0o600)
        if self.owner and os.geteuid() == 0:
            with contextlib.suppress(LookupError, PermissionError):
                shutil.chown(key, user=self.owner)
        return cert, key


def _openssl(*args: str) -> None:
    result = subprocess.run(  # noqa: S603 - openssl with our own arguments
        ["openssl", *args],  # noqa: S607 - the system openssl, found on PATH
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed: {result.stderr.strip()[:300]}")


def make_certificates(owner: str | None = "rabbitmq") -> Certificates:
    """A CA and a server certificate (SAN ``localhost``, ``127.0.0.1``) in a new directory.

    The directory and certificates are world-readable, server keys are mode 0600 and,
    when running as root, owned by ``owner`` (the broker's user must read them).
    """
    if shutil.which("openssl") is None:
        raise TlsError("the openssl command is missing")
    directory = Path(tempfile.mkdtemp(prefix="reliability-tls-"))
    directory.chmod(0o755)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
             "-out", str(ca), "-days", "2", "-subj", "/CN=proca-sync reliability test CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    ca.chmod(0o644)
    ca_key.chmod(0o600)
    partial = Certificates(directory, ca, ca_key, ca, ca_key, owner)
    cert, key = partial.issue("server", "DNS:localhost,IP:127.0.0.1")
    return Certificates(directory, ca, ca_key, cert, key, owner)


class RabbitTlsListener:
    """An ``amqp/ssl`` listener on ``127.0.0.1:port`` of the running RabbitMQ node."""

    def __init__(
        self,
        certificates: Certificates,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.certificates = certificates
        self.cert = cert or certificates.cert
        self.key = key or certificates.key
        self.port = port or free_port()
        self.started = False

    def _eval(self, expression: str) -> str:
        ctl = shutil.which("rabbitmqctl")
        if ctl is None:
            raise TlsError("rabbitmqctl is missing")
        result = subprocess.run(  # noqa: S603 - rabbitmqctl with our own expression
            [ctl, "eval", expression], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise TlsError(f"rabbitmqctl eval failed: {result.stderr.strip()[:300]}")
        return result.stdout.strip()

    def start(self) -> None:
        c = self.certificates
        options = (
            f'[{{certfile, "{self.cert}"}}, {{keyfile, "{self.key}"}}, {{cacertfile, "{c.ca}"}}, '
            "{verify, verify_none}, {fail_if_no_peer_cert, false}]"
        )
        out = self._eval(
            "rabbit_networking:ensure_ssl(), "
            f'rabbit_networking:start_ssl_listener({{"127.0.0.1", {self.port}}}, {options}, 1).'
        )
        if out != "ok":
            raise TlsError(f"the broker did not start a TLS listener: {out[:300]}")
        self.started = True

    def stop(self) -> None:
        if self.started:
            self._eval(f'rabbit_networking:stop_tcp_listener({{"127.0.0.1", {self.port}}}).')
            self.started = False

    def active(self) -> bool:
        return f"{self.port}" in self._eval("rabbit_networking:active_listeners().")


class TlsTerminatingProxy:
    """Fallback: TLS on ``127.0.0.1:port`` with the test certificate, plain to the broker."""

    def __init__(
        self,
        certificates: Certificates,
        target: tuple[str, int],
        *,
        cert: Path | None = None,
        key: Path | None = None,
    ) -> None:
        self.certificates = certificates
        self.cert = cert or certificates.cert
        self.key = key or certificates.key
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert, self.key)
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while chunk := await src.read(65536):
                    dst.write(chunk)
                    await dst.drain()
            with contextlib.suppress(Exception):
                dst.close()

        for coro in (pump(reader, up_writer), pump(up_reader, writer)):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
