"""Helpers of the delivery workers' tests: a real SMTP server (aiosmtpd) that records what
it accepts, a templates folder, e-mail-case messages and an org with worker queues."""

from __future__ import annotations

import copy
import email
import email.policy
import os
import signal
import socket
import threading
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aio_pika
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from proca_sync.pipeline.topology import OrgFlags, Topology, declare_topology, plan_topology
from tests.support.builders import action, dumps

REF = "MDWJu2fbogTgTHgLTLl-OFvRII63xZE76i7w3qHfbbE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class SinkHandler:
    """Accepts every message, except recipients starting ``reject`` (550) and, the first
    ``defer_times`` times, ``defer`` (451)."""

    messages: list[EmailMessage] = field(default_factory=list)
    defer_times: int = 2
    deferred: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    kill_pid: int | None = None
    """SIGKILL this process when message number ``kill_at`` arrives, before answering it:
    the sender dies inside the window where the server has the message and the sender
    has not recorded it."""
    kill_at: int = 0

    async def handle_RCPT(self, server: SmtpServer, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address.startswith("reject"):
            return "550 5.1.1 mailbox unavailable"
        if address.startswith("defer"):
            with self.lock:
                if self.deferred < self.defer_times:
                    self.deferred += 1
                    return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SmtpServer, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content
        assert isinstance(raw, bytes)
        parsed = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        with self.lock:
            self.messages.append(parsed)
            if self.kill_pid is not None and len(self.messages) >= self.kill_at:
                os.kill(self.kill_pid, signal.SIGKILL)
                self.kill_pid = None
        return "250 Message accepted"

    def by_kind(self) -> dict[tuple[int, str], list[EmailMessage]]:
        with self.lock:
            found: dict[tuple[int, str], list[EmailMessage]] = {}
            for mail in self.messages:
                key = (int(str(mail["X-Proca-Action-Id"])), str(mail["X-Proca-Email-Kind"]))
                found.setdefault(key, []).append(mail)
            return found

    def count(self) -> int:
        with self.lock:
            return len(self.messages)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files in ``folder``)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "smtp.crt", folder / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


class SmtpSink:
    """aiosmtpd on a free loopback port (its own thread); optional AUTH (LOGIN/PLAIN),
    which then needs STARTTLS with ``tls`` = (certificate, key)."""

    def __init__(self, *, user: str | None = None, password: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.handler = SinkHandler()
        self.port = free_port()
        kwargs: dict[str, Any] = {}
        if user is not None:
            def authenticate(server: SmtpServer, session: Session, envelope: Envelope,
                             mechanism: str, auth_data: Any) -> AuthResult:
                ok = (isinstance(auth_data, LoginPassword)
                      and auth_data.login == user.encode()
                      and auth_data.password == (password or "").encode())
                return AuthResult(success=ok)

            kwargs.update(authenticator=authenticate, auth_required=True)
        if tls is not None:
            import ssl

            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(tls[0]), str(tls[1]))
            kwargs.update(tls_context=context, require_starttls=True)
        self.controller = Controller(self.handler, hostname="127.0.0.1", port=self.port,
                                     **kwargs)

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.controller.stop()


TEMPLATES = {
    "thanks": {
        "en": ("Thank you, {{firstName}}!",
               "Dear {{firstName}} {{lastName}}, thanks for {{actionType}} on {{campaign.title}}."
               " comment={{comment}} provider={{emailProvider}}"
               "{{#variant.spring_a}} variant-a{{/variant.spring_a}}"
               "{{#isDupe}} dupe{{/isDupe}} doi={{doiLink}}",
               "<p>Dear {{firstName}}, thanks! <a href=\"{{doiLink}}\">confirm</a></p>"),
        "de": ("Danke, {{firstName}}!",
               "Liebe/r {{firstName}}, danke. doi={{doiLink}}",
               "<p>Danke {{firstName}}</p>"),
    },
    "confirm": {
        "en": ("Please confirm, {{firstName}}",
               "Confirm: {{confirmLink}} Reject: {{rejectLink}}",
               "<p><a href=\"{{confirmLink}}\">yes</a> <a href=\"{{rejectLink}}\">no</a></p>"),
        "fr": ("Confirmez, {{firstName}}",
               "Confirmer : {{confirmLink}} Refuser : {{rejectLink}}",
               "<p>{{confirmLink}}</p>"),
    },
    "dupe": {
        "en": ("You already signed, {{firstName}}",
               "You already took part. isDupe={{#isDupe}}yes{{/isDupe}}",
               "<p>already</p>"),
    },
}


def write_templates(root: Path) -> Path:
    for name, locales in TEMPLATES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for locale, (subject, text, markup) in locales.items():
            (folder / f"{locale}.subject").write_text(subject, encoding="utf-8")
            (folder / f"{locale}.txt").write_text(text, encoding="utf-8")
            (folder / f"{locale}.html").write_text(markup, encoding="utf-8")
    return root


def email_case(
    action_id: int,
    *,
    stage: str = "deliver",
    email_to: str = "ada@example.org",
    first_name: str = "Ada",
    ref: str = REF,
    page: str = "example.org/petition/en",
    page_id: int = 10,
    locale: str = "en",
    thank_you: str | None = "thanks",
    confirm: str | None = None,
    dupe_rank: int = 0,
    with_consent: bool = True,
    opt_in: bool | None = True,
    custom: dict[str, Any] | None = None,
    utm_content: str = "",
) -> bytes:
    """An action message for the e-mail worker."""
    message = copy.deepcopy(action(
        action_id, ref=ref, email=email_to, created="2024-10-14T11:02:24Z",
        first_name=first_name, record={"lastName": "Lovelace"}, with_consent=with_consent,
        opt_in=opt_in, custom=custom,
    ))
    message["stage"] = stage
    message["actionPageId"] = page_id
    message["actionPage"].update({
        "name": page, "locale": locale, "thankYouTemplate": thank_you,
        "supporterConfirmTemplate": confirm,
    })
    message["contact"]["dupeRank"] = dupe_rank
    message["tracking"]["content"] = utm_content
    return dumps(message)


async def declare_worker_org(url: str, org: int, flags: OrgFlags) -> Topology:
    connection = await aio_pika.connect(url)
    try:
        topology = plan_topology(org, flags, retry_delay_ms=300)
        await declare_topology(await connection.channel(), topology)
    finally:
        await connection.close()
    return topology
