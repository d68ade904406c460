"""The e-mail worker against a real RabbitMQ and a real SMTP server (aiosmtpd): the right
e-mail for each case of processing.md §8, personalised, in the right locale, at most once;
SMTP 5xx parked, 4xx retried; SMTP AUTH."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proca_sync.config import ConsumerSettings
from proca_sync.consumer.parking import ParkingStore
from proca_sync.pipeline.topology import OrgFlags, email_supporter_queue
from proca_sync.pipeline.workers.base import WorkerRunner
from proca_sync.pipeline.workers.email import EmailHandler, EmailSettings, PageEmailSettings
from proca_sync.pipeline.workers.ledger import SentLedger
from tests.integration.conftest import ConsumerOrg, _delete_org, eventually
from tests.support.workers import (
    SmtpSink,
    declare_worker_org,
    email_case,
    self_signed,
    write_templates,
)

pytestmark = pytest.mark.rabbitmq

R2 = "R2" + "x" * 41
R3 = "R3" + "x" * 41
R4 = "R4" + "x" * 41


@pytest.fixture
async def email_org(amqp_url: str) -> AsyncIterator[ConsumerOrg]:
    org = random.randint(10_000_000, 2_000_000_000)
    topology = await declare_worker_org(
        amqp_url, org, OrgFlags(email_backend=True, supporter_confirm=True)
    )
    try:
        yield ConsumerOrg(org, amqp_url, topology)
    finally:
        await _delete_org(amqp_url, topology)


def settings_for(tmp_path: Path, sink: SmtpSink, **extra: Any) -> EmailSettings:
    values: dict[str, Any] = {
        "sender": "campaigns@example.org",
        "sender_name": "Example Org",
        "smtp_host": "127.0.0.1",
        "smtp_port": sink.port,
        "smtp_security": "none",
        "templates": write_templates(tmp_path / "templates"),
        "ledger": f"sqlite:///{tmp_path / 'ledger.db'}",
        "link_base": "https://proca.example",
        "rate": 0,
        "pages": {"example.org/petition/en": PageEmailSettings(duplicate_template="dupe")},
    }
    values.update(extra)
    return EmailSettings(**values)


class Running:
    def __init__(self, org: ConsumerOrg, settings: EmailSettings, tmp_path: Path) -> None:
        self.parking = ParkingStore(f"sqlite:///{tmp_path / 'parked.db'}")
        consumer = ConsumerSettings(
            url=org.url, queue=email_supporter_queue(org.org),
            parked=self.parking.url, max_retries=5, concurrency=1, status_interval=0.2,
        )
        self.handler = EmailHandler(settings, org=org.org)
        self.runner = WorkerRunner(consumer, self.handler, parking=self.parking)
        self.task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> Running:
        self.task = asyncio.create_task(self.runner.run())
        await eventually(lambda: self.runner.stats.connected is True or self.task.done(),
                         within=15, what="worker connected")
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.runner.request_stop("test")
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout=30)


async def test_each_case_of_section_8(email_org: ConsumerOrg, tmp_path: Path) -> None:
    bodies = [
        email_case(101, stage="supporter_confirm", confirm="confirm", thank_you=None),
        email_case(102, stage="supporter_confirm", confirm="confirm", locale="fr",
                   first_name="Zoé"),
        email_case(103, stage="supporter_confirm", confirm=None),            # no template
        email_case(104, locale="de_AT", first_name="Jörg",                   # → de
                   custom={"comment": "hi", "email_provider": "x"}),
        email_case(105, locale="pt", custom={"comment": "c", "email_provider": "gmail"},
                   utm_content="spring-a other"),                           # → en
        email_case(106, with_consent=False),                                 # share: none
        email_case(107, thank_you=None),                                     # no template
        email_case(110, ref=R2),                                             # first → thanks
        email_case(111, ref=R2, dupe_rank=1),                                # repeat → dupe
        email_case(120, ref=R3, page="other/page", page_id=20, confirm="confirm"),
        email_case(121, ref=R3, page="other/page", page_id=20, confirm="confirm",
                   dupe_rank=1),                                             # → confirm again
        email_case(130, ref=R4),
        email_case(131, ref=R4, page="third/page", page_id=30, dupe_rank=1),  # cross-page
        email_case(104, locale="de_AT", first_name="Jörg",                   # redelivery
                   custom={"comment": "hi", "email_provider": "x"}),
    ]
    with SmtpSink() as sink:
        settings = settings_for(tmp_path, sink)
        async with Running(email_org, settings, tmp_path) as running:
            await email_org.publish(bodies, queue=email_supporter_queue(email_org.org))
            await eventually(lambda: running.runner.stats.settled_total == len(bodies),
                             within=30, what="all messages settled")
        mails = sink.handler.by_kind()

    assert sorted(mails) == sorted([
        (101, "confirm"), (102, "confirm"), (104, "thank_you"), (105, "thank_you"),
        (110, "thank_you"), (111, "duplicate"), (120, "thank_you"), (121, "confirm_repeat"),
        (130, "thank_you"), (131, "thank_you"),
    ])
    assert all(len(found) == 1 for found in mails.values()), "an e-mail was sent twice"

    confirm = mails[(101, "confirm")][0]
    assert confirm["Subject"] == "Please confirm, Ada"
    assert confirm["From"] == "Example Org <campaigns@example.org>"
    assert confirm["To"] == "ada@example.org"
    assert confirm["Message-ID"] == "<proca.confirm.101@example.org>"
    text = confirm.get_body(("plain",)).get_content()
    assert "https://proca.example/link/s/101/accept/MDWJu2fbogTgTHgLTLl" in text
    assert "https://proca.example/link/s/101/reject/MDWJu2fbogTgTHgLTLl" in text
    assert "/link/s/101/accept/" in confirm.get_body(("html",)).get_content()

    assert mails[(102, "confirm")][0]["Subject"] == "Confirmez, Zoé"
    german = mails[(104, "thank_you")][0]
    assert german["Subject"] == "Danke, Jörg!"
    assert german["Content-Language"] == "de"
    assert "/link/d/104/MDWJu2fbogTgTHgLTLl" in german.get_body(("plain",)).get_content()

    english = mails[(105, "thank_you")][0]
    body = english.get_body(("plain",)).get_content()
    assert english["Subject"] == "Thank you, Ada!"
    assert "Dear Ada Lovelace" in body
    assert "on Petition X" in body
    assert "comment=c provider=gmail" in body      # custom fields, camel-cased
    assert "variant-a" in body                      # variant.spring_a from utm_content
    assert " dupe" not in body
    assert "<a href=\"https://proca.example/link/d/105/" in (
        english.get_body(("html",)).get_content())

    assert "isDupe=yes" in mails[(111, "duplicate")][0].get_body(("plain",)).get_content()
    assert mails[(121, "confirm_repeat")][0]["Subject"] == "Please confirm, Ada"
    cross = mails[(131, "thank_you")][0].get_body(("plain",)).get_content()
    assert " dupe" in cross                         # isDupe on a cross-page duplicate

    labels = running.runner.stats.labels
    assert labels["duplicate"] == 1
    assert labels["skipped:no_confirm_template"] == 1
    assert labels["skipped:no_consent_action"] == 1
    assert labels["skipped:no_thank_you_template"] == 1


async def test_doi_thank_you_needs_opt_in(email_org: ConsumerOrg, tmp_path: Path) -> None:
    bodies = [email_case(201, opt_in=False), email_case(202, opt_in=None),
              email_case(203, opt_in=True)]
    with SmtpSink() as sink:
        async with Running(email_org, settings_for(tmp_path, sink, doi_thank_you=True),
                           tmp_path) as running:
            await email_org.publish(bodies, queue=email_supporter_queue(email_org.org))
            await eventually(lambda: running.runner.stats.settled_total == 3,
                             within=30, what="settled")
        assert sorted(sink.handler.by_kind()) == [(203, "thank_you")]


async def test_smtp_rejection_parked_deferral_retried(
    email_org: ConsumerOrg, tmp_path: Path
) -> None:
    bodies = [email_case(301, email_to="reject@example.org"),
              email_case(302, email_to="defer@example.org"),
              email_case(303)]
    with SmtpSink() as sink:
        async with Running(email_org, settings_for(tmp_path, sink), tmp_path) as running:
            await email_org.publish(bodies, queue=email_supporter_queue(email_org.org))
            await eventually(lambda: sorted(sink.handler.by_kind()) == [
                (302, "thank_you"), (303, "thank_you")], within=30, what="two e-mails")
            await eventually(lambda: running.parking.count() == 1, within=15, what="parked")
        parked = running.parking.entries()
        assert [p.reason for p in parked] == ["smtp_rejected"]
        assert sink.handler.deferred == 2                  # 451 twice, then accepted
        assert running.runner.stats.labels["sent:thank_you"] == 2
        states = SentLedger(f"sqlite:///{tmp_path / 'ledger.db'}").states()
        assert states[(301, "thank_you")] == "rejected"
        assert states[(302, "thank_you")] == "sent"


async def test_smtp_starttls_and_auth(email_org: ConsumerOrg, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with SmtpSink(user="mailer", password="s3cret", tls=(cert, key)) as sink:
        settings = settings_for(tmp_path, sink, smtp_security="starttls", smtp_ca_file=cert,
                                smtp_username="mailer", smtp_password="s3cret")
        async with Running(email_org, settings, tmp_path) as running:
            await email_org.publish([email_case(401)],
                                    queue=email_supporter_queue(email_org.org))
            await eventually(lambda: sink.handler.count() == 1, within=20, what="one e-mail")
        assert running.runner.stats.labels["sent:thank_you"] == 1
