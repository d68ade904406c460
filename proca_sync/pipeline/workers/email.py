"""The e-mail worker (``wrk.N.email.supporter``): confirmation, thank-you and duplicate
e-mails as Proca's built-in worker sends them (processing.md §8), without its faults.

Choice (:func:`choose`, pure), for action messages whose ``privacy.withConsent`` is true:

* stage ``supporter_confirm`` → the **confirmation** e-mail, when a confirmation template
  is known (the message's ``actionPage.supporterConfirmTemplate``, else the configured
  page, else the org's);
* stage ``deliver``: a ``repeat`` action with a page ``duplicate_template`` → the
  **duplicate** e-mail; a ``repeat`` without one but with a confirmation template → the
  confirmation e-mail **again** (its own kind, ``confirm_repeat``); otherwise the
  **thank-you** e-mail when the page has a thank-you template and, with ``doi_thank_you``
  on, the supporter opted in (``privacy.optIn``); otherwise nothing (ack).

Templates (:class:`TemplateStore`) are mustache (pystache), one folder per template
name with ``<locale>.subject``, ``<locale>.html`` and/or ``<locale>.txt``; the page
locale is tried as given (``de_AT``), then its language (``de``), then the default
locale. Variables are §8's (:func:`template_variables`).

Exactly-once towards the supporter, across crashes and redeliveries: the
:class:`~proca_sync.pipeline.workers.ledger.SentLedger` records ``sending`` before the
SMTP transaction and ``sent`` after it; the ``Message-ID`` is stable per (action, kind).
A ``sending`` row seen again (the process died in between) is **not** resent: it is
logged (``email_ambiguous``) and counted under the label ``ambiguous``. A failure after
the message data went out without an answer from the server is resolved the same way.

Errors: SMTP 5xx → :class:`~proca_sync.errors.PermanentError` (``smtp_rejected``, parked);
4xx, refused or dropped connections before the data → :class:`TransientError` (retried);
missing template or a template that does not render → ``template_error`` (parked).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import logging
import re
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime, formataddr
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import aiosmtplib
import pystache
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from proca_sync.errors import (
    ConfigError,
    PermanentError,
    Reason,
    TransientError,
)
from proca_sync.messages.decode import decode
from proca_sync.messages.schemas import ActionMessage, Stage
from proca_sync.pipeline.workers.base import Done, Result
from proca_sync.pipeline.workers.ledger import DEFAULT_LEDGER_URL, Claim, SentLedger, SentState

__all__ = [
    "Choice",
    "EmailHandler",
    "EmailKind",
    "EmailSettings",
    "PageEmailSettings",
    "Rendered",
    "SmtpSender",
    "TemplateStore",
    "choose",
    "message_id",
    "template_variables",
]

log = logging.getLogger("proca_sync.worker")


class EmailKind(StrEnum):
    CONFIRM = "confirm"
    CONFIRM_REPEAT = "confirm_repeat"
    DUPLICATE = "duplicate"
    THANK_YOU = "thank_you"


# ---- settings ---------------------------------------------------------------------------


class PageEmailSettings(BaseModel):
    """Per action page (keyed by page name): what the message cannot carry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    duplicate_template: str | None = None
    thank_you_template: str | None = None
    supporter_confirm_template: str | None = None


class EmailSettings(BaseModel):
    """The org's e-mail settings: ``[worker.email]`` of the TOML file, CLI options, env.

    The SMTP password never comes from the file: ``PROCA_SMTP_PASSWORD`` or
    ``smtp_password_file``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sender: str = Field(min_length=3)
    """The org's ``email_from`` address."""
    sender_name: str | None = None
    smtp_host: str = "127.0.0.1"
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = Field(default=None, repr=False)
    smtp_password_file: Path | None = None
    smtp_timeout: float = Field(default=30.0, gt=0)
    smtp_ca_file: Path | None = None
    templates: Path
    default_locale: str = "en"
    link_base: str = "https://api.proca.app"
    """Public base URL of the Proca server the confirmation and DOI links point to."""
    doi_thank_you: bool = False
    supporter_confirm_template: str | None = None
    """The org's ``supporter_confirm_template`` (when the message names none)."""
    pages: dict[str, PageEmailSettings] = Field(default_factory=dict)
    ledger: str = DEFAULT_LEDGER_URL
    rate: float = Field(default=10.0, ge=0)
    """E-mails per second for this org (0: no limit)."""
    burst: int = Field(default=10, ge=1)
    message_id_domain: str | None = None

    @field_validator("sender")
    @classmethod
    def _address(cls, value: str) -> str:
        if "@" not in value or any(c.isspace() for c in value):
            raise ValueError("sender must be an e-mail address")
        return value

    @property
    def port(self) -> int:
        if self.smtp_port is not None:
            return self.smtp_port
        return {"tls": 465, "starttls": 587}.get(self.smtp_security, 25)

    @property
    def domain(self) -> str:
        return self.message_id_domain or self.sender.rsplit("@", 1)[1]

    def password(self) -> str | None:
        """The SMTP password: the env value, else the file's first line. ConfigError."""
        if self.smtp_password is not None:
            return self.smtp_password.get_secret_value()
        if self.smtp_password_file is None:
            return None
        try:
            return self.smtp_password_file.read_text(encoding="utf-8").splitlines()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            raise ConfigError(f"cannot read the SMTP password file {self.smtp_password_file}"
                              ) from None


# ---- choice -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Choice:
    kind: EmailKind
    template: str


def choose(message: ActionMessage, settings: EmailSettings, *, repeat: bool) -> Choice | str:
    """Which e-mail §8 sends for ``message``, or why none (a short skip reason)."""
    if not message.privacy.with_consent:
        return "no_consent_action"
    page = message.action_page
    page_settings = settings.pages.get(page.name) if page is not None else None
    page_settings = page_settings or PageEmailSettings()
    confirm = (
        (page.supporter_confirm_template if page is not None else None)
        or page_settings.supporter_confirm_template
        or settings.supporter_confirm_template
    )
    if message.stage is Stage.SUPPORTER_CONFIRM:
        return Choice(EmailKind.CONFIRM, confirm) if confirm else "no_confirm_template"
    if message.stage is not Stage.DELIVER:
        return "stage"
    if repeat:
        if page_settings.duplicate_template:
            return Choice(EmailKind.DUPLICATE, page_settings.duplicate_template)
        if confirm:
            return Choice(EmailKind.CONFIRM_REPEAT, confirm)
    thank_you = (
        page.thank_you_template if page is not None else None
    ) or page_settings.thank_you_template
    if not thank_you:
        return "no_thank_you_template"
    if settings.doi_thank_you and message.privacy.opt_in is not True:
        return "no_opt_in"
    return Choice(EmailKind.THANK_YOU, thank_you)


def message_id(action_id: int, kind: EmailKind, domain: str) -> str:
    """The ``Message-ID`` of one (action, kind): the same on every attempt."""
    return f"<proca.{kind.value}.{action_id}@{domain}>"


# ---- variables --------------------------------------------------------------------------

_WORD_SPLIT = re.compile(r"[_\-\s]+")
_NOT_VARIANT = re.compile(r"[^A-Za-z0-9_]")


def camel(key: str) -> str:
    """``email_provider`` / ``Email-Provider`` → ``emailProvider`` (hosted templates)."""
    parts = [p for p in _WORD_SPLIT.split(key) if p]
    if not parts:
        return key
    first = parts[0][:1].lower() + parts[0][1:]
    return first + "".join(p[:1].upper() + p[1:] for p in parts[1:])


def template_variables(message: ActionMessage, kind: EmailKind, link_base: str) -> dict[str, Any]:
    """The merge variables of processing.md §8 for one message (personal data inside)."""
    contact = message.contact.record()
    action = message.action
    ref = message.contact.contact_ref or ""
    action_id = message.action_id or 0
    tracking = message.tracking
    content = (tracking.content if tracking is not None else None) or ""
    location = (tracking.location if tracking is not None else None) or ""
    variants = {}
    for token in content.split():
        name = _NOT_VARIANT.sub("", token.replace("-", "_"))
        if name:
            variants[name] = True
    values: dict[str, Any] = {
        camel(key): value for key, value in action.custom_fields.items() if value is not None
    }
    base = link_base.rstrip("/")
    links: dict[str, str]
    if kind in (EmailKind.CONFIRM, EmailKind.CONFIRM_REPEAT):
        accept = f"{base}/link/s/{action_id}/accept/{ref}"
        links = {"confirmLink": accept, "doiLink": accept,
                 "rejectLink": f"{base}/link/s/{action_id}/reject/{ref}"}
    else:
        doi = f"{base}/link/d/{action_id}/{ref}"
        links = {"doiLink": doi, "confirmLink": doi}
    page = message.action_page
    values.update({
        "firstName": contact.get("firstName") or "",
        "lastName": contact.get("lastName") or "",
        "email": contact.get("email") or "",
        "ref": ref,
        "actionId": action_id,
        "actionType": action.action_type,
        "createdAt": action.created_at.replace("T", " "),
        "isActionType": {action.action_type: True},
        "org": {
            "name": message.org.name if message.org else None,
            "title": message.org.title if message.org else None,
        },
        "campaign": {
            "name": message.campaign.name if message.campaign else None,
            "title": message.campaign.title if message.campaign else None,
        },
        "actionPage": {
            "name": page.name if page else None,
            "locale": page.locale if page else None,
        },
        "tracking": {
            "source": tracking.source if tracking else None,
            "medium": tracking.medium if tracking else None,
            "campaign": tracking.campaign if tracking else None,
            "content": content,
            "location": location,
            "encodedLocation": quote(location, safe=""),
            "encodedContent": quote(content, safe=""),
        },
        "variant": variants,
        "privacy": message.privacy.model_dump(mode="json"),
        "isDupe": (message.contact.dupe_rank or 0) > 0,
        "test": action.testing,
        **links,
    })
    return values


# ---- templates --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rendered:
    subject: str
    text: str | None
    html: str | None
    locale: str


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]*")


def locale_chain(locale: str | None, default: str) -> list[str]:
    """``de_AT`` → ``["de_AT", "de", default]`` (without repeats)."""
    chain: list[str] = []
    if locale:
        chain.append(locale)
        language = re.split(r"[_-]", locale, maxsplit=1)[0]
        chain.append(language)
    chain.append(default)
    return list(dict.fromkeys(c for c in chain if c and _SAFE_NAME.fullmatch(c)))


class TemplateStore:
    """Mustache templates from a directory, parsed once and cached."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise ConfigError(f"templates directory {root} does not exist")
        self.root = root
        self._cache: dict[tuple[str, str], tuple[Any, Any, Any] | None] = {}
        self._html = pystache.Renderer(missing_tags="ignore", escape=html.escape)
        self._plain = pystache.Renderer(missing_tags="ignore", escape=lambda s: s)

    def _load(self, name: str, locale: str) -> tuple[Any, Any, Any] | None:
        key = (name, locale)
        if key in self._cache:
            return self._cache[key]
        folder = self.root / name
        parts: list[Any] = []
        for suffix in ("subject", "txt", "html"):
            path = folder / f"{locale}.{suffix}"
            try:
                source = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                parts.append(None)
                continue
            except (OSError, UnicodeDecodeError):
                raise PermanentError(f"template {name}/{locale}.{suffix} unreadable",
                                     reason=Reason.TEMPLATE_ERROR) from None
            try:
                parts.append(pystache.parse(source))
            except Exception as exc:  # pystache raises its own ParsingError and others
                raise PermanentError(
                    f"template {name}/{locale}.{suffix} does not parse ({type(exc).__name__})",
                    reason=Reason.TEMPLATE_ERROR,
                ) from None
        found = None if parts[0] is None or (parts[1] is None and parts[2] is None) else (
            parts[0], parts[1], parts[2]
        )
        self._cache[key] = found
        return found

    def render(self, name: str, locale: str | None, default_locale: str,
               variables: Mapping[str, Any]) -> Rendered:
        """Render ``name`` in the first locale of the chain that has it. PermanentError
        (``template_error``) when no locale has it or it does not render."""
        if not _SAFE_NAME.fullmatch(name):
            raise PermanentError("template name is not a plain name",
                                 reason=Reason.TEMPLATE_ERROR)
        for candidate in locale_chain(locale, default_locale):
            loaded = self._load(name, candidate)
            if loaded is None:
                continue
            subject, text, markup = loaded
            try:
                return Rendered(
                    subject=" ".join(self._plain.render(subject, variables).split()),
                    text=self._plain.render(text, variables) if text is not None else None,
                    html=self._html.render(markup, variables) if markup is not None else None,
                    locale=candidate,
                )
            except Exception as exc:
                raise PermanentError(
                    f"template {name}/{candidate} does not render ({type(exc).__name__})",
                    reason=Reason.TEMPLATE_ERROR,
                ) from None
        raise PermanentError(f"template {name} missing for locale {locale}",
                             reason=Reason.TEMPLATE_ERROR)


# ---- SMTP -------------------------------------------------------------------------------


class SmtpAmbiguousError(Exception):
    """The data went out and no answer came back: the server may have taken it."""


class SmtpSender:
    """One SMTP connection, reused; every failure classified before or after the data."""

    def __init__(self, settings: EmailSettings) -> None:
        self.settings = settings
        self._password = settings.password()
        self._smtp: aiosmtplib.SMTP | None = None
        self._lock = asyncio.Lock()  # one SMTP transaction at a time on the connection
        self._tls: ssl.SSLContext | None = None
        if settings.smtp_security != "none":
            try:
                self._tls = ssl.create_default_context(
                    cafile=str(settings.smtp_ca_file) if settings.smtp_ca_file else None
                )
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the SMTP CA file: {exc}") from None

    async def _connection(self) -> aiosmtplib.SMTP:
        if self._smtp is not None and self._smtp.is_connected:
            return self._smtp
        s = self.settings
        smtp = aiosmtplib.SMTP(
            hostname=s.smtp_host, port=s.port, timeout=s.smtp_timeout,
            use_tls=s.smtp_security == "tls", start_tls=s.smtp_security == "starttls",
            tls_context=self._tls,
            username=s.smtp_username, password=self._password if s.smtp_username else None,
        )
        try:
            await smtp.connect()
        except aiosmtplib.SMTPAuthenticationError as exc:
            raise TransientError(f"SMTP authentication refused ({exc.code})") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise TransientError(f"SMTP server refused the session ({exc.code})") from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientError(f"SMTP server unreachable ({type(exc).__name__})") from None
        self._smtp = smtp
        return smtp

    async def close(self) -> None:
        if self._smtp is not None and self._smtp.is_connected:
            try:
                await self._smtp.quit()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                self._smtp.close()
        self._smtp = None

    async def send(self, sender: str, recipient: str, data: bytes) -> None:
        """Send one message. Raises PermanentError (5xx), TransientError (4xx, no
        connection, dropped before the data) or :class:`SmtpAmbiguousError`."""
        async with self._lock:
            await self._send(sender, recipient, data)

    async def _send(self, sender: str, recipient: str, data: bytes) -> None:
        for attempt in (1, 2):
            smtp = await self._connection()
            try:
                await smtp.mail(sender)
                await smtp.rcpt(recipient)
            except aiosmtplib.SMTPResponseException as exc:
                await self._reset(smtp)
                raise _classify(exc.code, "envelope") from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                # A reused connection the server dropped meanwhile: one fresh try.
                self._drop()
                if attempt == 1:
                    continue
                raise TransientError(f"SMTP connection lost ({type(exc).__name__})") from None
            try:
                await smtp.data(data)
            except aiosmtplib.SMTPResponseException as exc:
                await self._reset(smtp)
                raise _classify(exc.code, "data") from None
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                self._drop()
                raise SmtpAmbiguousError(type(exc).__name__) from None
            return

    async def _reset(self, smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.rset()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self._drop()

    def _drop(self) -> None:
        if self._smtp is not None:
            self._smtp.close()
        self._smtp = None


def _classify(code: int, stage: str) -> PermanentError | TransientError:
    if 500 <= code < 600:
        return PermanentError(f"SMTP server refused the {stage} ({code})",
                              reason=Reason.SMTP_REJECTED)
    return TransientError(f"SMTP server deferred the {stage} ({code})")


# ---- rate limit -------------------------------------------------------------------------


class RateLimiter:
    """A token bucket: ``rate`` sends per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    async def acquire(self) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            await asyncio.sleep((1 - self._tokens) / self.rate)  # sleep-ok: the rate limit


# ---- the handler ------------------------------------------------------------------------


_UTF8 = Charset("utf-8")
_UTF8.header_encoding = QP
_UTF8.body_encoding = QP
_WIRE = compat32.clone(linesep="\r\n")


def build_message(settings: EmailSettings, recipient: str, rendered: Rendered,
                  mid: str, action_id: int, kind: EmailKind) -> bytes:
    """The message bytes (CRLF line ends): text and HTML alternatives, UTF-8 quoted-printable.

    Built with the ``email.mime`` classes: several times cheaper than ``EmailMessage``
    with the default policy, which cost ~5 ms per message here."""
    parts = [MIMEText(body, subtype, _UTF8) for body, subtype in  # type: ignore[arg-type]
             ((rendered.text, "plain"), (rendered.html, "html")) if body is not None]
    mail: Message = parts[0] if len(parts) == 1 else MIMEMultipart("alternative", None, parts)
    mail["From"] = formataddr((settings.sender_name or "", settings.sender), charset="utf-8")
    mail["To"] = recipient
    mail["Subject"] = Header(rendered.subject, _UTF8).encode()
    mail["Message-ID"] = mid
    mail["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    mail["Content-Language"] = rendered.locale.replace("_", "-")
    mail["X-Proca-Action-Id"] = str(action_id)
    mail["X-Proca-Email-Kind"] = kind.value
    return mail.as_bytes(policy=_WIRE)


@dataclass
class _Batch:
    """What one batch writes to the ledger at its end, in one commit."""

    sent: list[tuple[int, str]] = field(default_factory=list)
    seen: list[tuple[int, str, int]] = field(default_factory=list)


class EmailHandler:
    """Sends the e-mail each message calls for, at most once per (action, kind)."""

    name = "email"
    batch_size = 5
    batch_wait = 0.0

    def __init__(self, settings: EmailSettings, *, org: int | None = None) -> None:
        self.settings = settings
        self.org = org
        self.templates = TemplateStore(settings.templates)
        self.ledger = SentLedger(settings.ledger)
        self.smtp = SmtpSender(settings)
        self.limiter = RateLimiter(settings.rate, settings.burst)
        self.ambiguous = 0

    async def open(self) -> None:
        await self.ledger.open()

    async def close(self) -> None:
        await self.smtp.close()
        await self.ledger.close()

    async def handle(self, bodies: Sequence[bytes]) -> Sequence[Result]:
        """Each body in order. An e-mail is marked sent by the next claim's commit, the
        batch's last one by a commit at its end (also noting the delivered actions for
        the repeat check)."""
        batch = _Batch()
        results: list[Result] = []
        for body in bodies:
            try:
                results.append(await self._one(body, batch))
            except (PermanentError, TransientError) as exc:
                results.append(exc)
        try:
            await self.ledger.finish(batch.sent, batch.seen)
        except TransientError as exc:
            # Not recorded: retry them; a sent one is found "sending" and not resent.
            results = [exc if isinstance(r, Done) else r for r in results]
        return results

    async def _one(self, body: bytes, batch: _Batch) -> Result:
        message = decode(body)
        if not isinstance(message, ActionMessage) or message.action_id is None:
            return Done("skipped:not_an_action")
        if message.stage not in (Stage.SUPPORTER_CONFIRM, Stage.DELIVER):
            return Done("skipped:stage", message.action_id)
        action_id = message.action_id
        repeat = False
        ref = message.contact.contact_ref
        page_id = message.action_page_id
        if (message.stage is Stage.DELIVER and message.privacy.with_consent
                and ref and page_id is not None):
            if (message.contact.dupe_rank or 0) > 0:
                repeat = any(
                    r == ref and p == page_id and a < action_id for a, r, p in batch.seen
                ) or await self.ledger.earlier_on_page(action_id, ref, page_id)
            batch.seen.append((action_id, ref, page_id))
        choice = choose(message, self.settings, repeat=repeat)
        if isinstance(choice, str):
            return Done(f"skipped:{choice}", action_id)
        recipient = message.contact.email
        if not recipient:
            return Done("skipped:no_email", action_id)
        variables = template_variables(message, choice.kind, self.settings.link_base)
        locale = message.action_page.locale if message.action_page else None
        rendered = self.templates.render(
            choice.template, locale, self.settings.default_locale, variables
        )
        mid = message_id(action_id, choice.kind, self.settings.domain)
        claim = await self.ledger.claim(
            action_id, choice.kind.value, mid, message.org_id, sent=batch.sent
        )
        batch.sent = []  # committed with the claim
        if claim is Claim.SENT:
            return Done("duplicate", action_id)
        if claim is Claim.AMBIGUOUS:
            return self._ambiguous(action_id, choice.kind, "found_sending")
        data = build_message(self.settings, recipient, rendered, mid, action_id, choice.kind)
        await self.limiter.acquire()
        try:
            await self.smtp.send(self.settings.sender, recipient, data)
        except SmtpAmbiguousError:
            await self.ledger.mark(action_id, choice.kind.value, SentState.AMBIGUOUS)
            return self._ambiguous(action_id, choice.kind, "no_answer_to_data")
        except PermanentError:
            await self.ledger.mark(action_id, choice.kind.value, SentState.REJECTED)
            raise
        except TransientError:
            await self.ledger.mark(action_id, choice.kind.value, SentState.FAILED)
            raise
        batch.sent.append((action_id, choice.kind.value))
        return Done(f"sent:{choice.kind.value}", action_id)

    def _ambiguous(self, action_id: int, kind: EmailKind, why: str) -> Done:
        self.ambiguous += 1
        log.warning(
            "e-mail %s of action %d may or may not have been sent (%s); not resending",
            kind.value, action_id, why,
            extra={"fields": {"event": "email_ambiguous", "action_id": action_id,
                              "kind": kind.value, "why": why}},
        )
        return Done("ambiguous", action_id)
