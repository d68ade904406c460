"""Pure parts of the delivery workers: §8's choice of e-mail, the template variables,
locale fallback, the webhook's headers and the SQS entries (processing.md §8, §11)."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import orjson
import pytest

from proca_sync.errors import DecodeError, PermanentError, Reason
from proca_sync.messages.decode import decode
from proca_sync.messages.schemas import ActionMessage
from proca_sync.pipeline.workers.email import (
    Choice,
    EmailKind,
    EmailSettings,
    PageEmailSettings,
    TemplateStore,
    camel,
    choose,
    locale_chain,
    message_id,
    template_variables,
)
from proca_sync.pipeline.workers.sqs import entry_for
from proca_sync.pipeline.workers.webhook import WebhookHandler, WebhookSettings, delivery_id
from tests.conftest import fixture_bytes
from tests.support.workers import email_case, write_templates

PAGE = "example.org/petition/en"


def message(body: bytes) -> ActionMessage:
    decoded = decode(body)
    assert isinstance(decoded, ActionMessage)
    return decoded


def settings(tmp_path: Path, **extra: object) -> EmailSettings:
    values: dict[str, object] = {"sender": "a@example.org", "templates": tmp_path}
    values.update(extra)
    return EmailSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "repeat", "extra", "expected"),
    [
        pytest.param(email_case(1, stage="supporter_confirm", confirm="c"), False, {},
                     Choice(EmailKind.CONFIRM, "c"), id="confirm-from-page"),
        pytest.param(email_case(1, stage="supporter_confirm"), False,
                     {"supporter_confirm_template": "org_c"},
                     Choice(EmailKind.CONFIRM, "org_c"), id="confirm-from-org"),
        pytest.param(email_case(1, stage="supporter_confirm"), False, {},
                     "no_confirm_template", id="confirm-without-template"),
        pytest.param(email_case(1, stage="supporter_confirm", confirm="c", with_consent=False),
                     False, {}, "no_consent_action", id="confirm-share-step"),
        pytest.param(email_case(1, stage="action_confirm", confirm="c"), False, {},
                     "stage", id="action-confirm-stage"),
        pytest.param(email_case(1), False, {}, Choice(EmailKind.THANK_YOU, "thanks"),
                     id="thank-you"),
        pytest.param(email_case(1, thank_you=None), False, {}, "no_thank_you_template",
                     id="no-thank-you-template"),
        pytest.param(email_case(1, with_consent=False), False, {}, "no_consent_action",
                     id="share-no-mail"),
        pytest.param(email_case(1, opt_in=False), False, {"doi_thank_you": True},
                     "no_opt_in", id="doi-thank-you-without-opt-in"),
        pytest.param(email_case(1, opt_in=None), False, {"doi_thank_you": True},
                     "no_opt_in", id="doi-thank-you-opt-in-null"),
        pytest.param(email_case(1, opt_in=True), False, {"doi_thank_you": True},
                     Choice(EmailKind.THANK_YOU, "thanks"), id="doi-thank-you-opted-in"),
        pytest.param(email_case(1, dupe_rank=1, confirm="c"), True,
                     {"pages": {PAGE: PageEmailSettings(duplicate_template="d")}},
                     Choice(EmailKind.DUPLICATE, "d"), id="repeat-duplicate-template"),
        pytest.param(email_case(1, dupe_rank=1, confirm="c"), True, {},
                     Choice(EmailKind.CONFIRM_REPEAT, "c"), id="repeat-confirm-again"),
        pytest.param(email_case(1, dupe_rank=1), True, {},
                     Choice(EmailKind.THANK_YOU, "thanks"), id="repeat-otherwise-thank-you"),
        pytest.param(email_case(1, dupe_rank=1), False,
                     {"pages": {PAGE: PageEmailSettings(duplicate_template="d")}},
                     Choice(EmailKind.THANK_YOU, "thanks"), id="cross-page-dupe-thank-you"),
    ],
)
def test_choice_follows_section_8(tmp_path: Path, body: bytes, repeat: bool,
                                  extra: dict[str, object], expected: Choice | str) -> None:
    assert choose(message(body), settings(tmp_path, **extra), repeat=repeat) == expected


def test_variables() -> None:
    body = email_case(7, custom={"comment": "hi", "email_provider": "x", "Other-Key": 1,
                                 "gone": None}, utm_content="spring-a b!c")
    values = template_variables(message(body), EmailKind.THANK_YOU, "https://p.example/")
    assert values["firstName"] == "Ada" and values["lastName"] == "Lovelace"
    assert values["email"] == "ada@example.org"
    assert values["createdAt"] == "2024-10-14 11:02:24Z"
    assert values["isActionType"] == {"register": True}
    assert values["comment"] == "hi" and values["emailProvider"] == "x"
    assert values["otherKey"] == 1 and "gone" not in values
    assert values["variant"] == {"spring_a": True, "bc": True}
    assert values["doiLink"] == values["confirmLink"]
    assert values["doiLink"].startswith("https://p.example/link/d/7/MDWJu2")
    assert values["isDupe"] is False and values["test"] is False
    assert values["privacy"]["optIn"] is True
    assert values["tracking"]["encodedContent"] == "spring-a%20b%21c"
    confirm = template_variables(message(body), EmailKind.CONFIRM, "https://p.example")
    assert confirm["confirmLink"].startswith("https://p.example/link/s/7/accept/")
    assert confirm["rejectLink"].startswith("https://p.example/link/s/7/reject/")


def test_camel_and_locale_chain() -> None:
    assert camel("email_provider") == "emailProvider"
    assert camel("Email-Provider") == "emailProvider"
    assert camel("comment") == "comment"
    assert locale_chain("de_AT", "en") == ["de_AT", "de", "en"]
    assert locale_chain(None, "en") == ["en"]
    assert locale_chain("../etc", "en") == ["en"]


def test_templates_fallback_and_missing(tmp_path: Path) -> None:
    store = TemplateStore(write_templates(tmp_path))
    values = template_variables(message(email_case(1, first_name="<b>")),
                                EmailKind.THANK_YOU, "https://x")
    german = store.render("thanks", "de_CH", "en", values)
    assert german.locale == "de" and german.subject == "Danke, <b>!"
    assert german.html is not None and "&lt;b&gt;" in german.html   # escaped in HTML only
    assert store.render("thanks", "pt", "en", values).locale == "en"
    with pytest.raises(PermanentError) as missing:
        store.render("nope", "en", "en", values)
    assert missing.value.reason is Reason.TEMPLATE_ERROR
    with pytest.raises(PermanentError):
        store.render("../thanks", "en", "en", values)


def test_message_id_is_stable() -> None:
    assert message_id(5, EmailKind.THANK_YOU, "ex.org") == "<proca.thank_you.5@ex.org>"
    assert message_id(5, EmailKind.THANK_YOU, "ex.org") != message_id(5, EmailKind.CONFIRM,
                                                                        "ex.org")


def test_webhook_headers() -> None:
    body = fixture_bytes("petition_optin.json")
    handler = WebhookHandler(WebhookSettings(url="http://127.0.0.1:1/h", user="u",
                                             password="p", secret="s"))
    headers = handler.headers(body)
    assert headers["X-Proca-Signature"] == "sha256=" + hmac.new(
        b"s", body, hashlib.sha256).hexdigest()
    assert headers["Authorization"] == "Basic dTpw"
    assert headers["X-Proca-Delivery"] == delivery_id(body)
    raw = WebhookHandler(WebhookSettings(url="http://127.0.0.1:1/h", password="tok"))
    assert raw.headers(body)["Authorization"] == "tok"
    assert "Authorization" not in WebhookHandler(
        WebhookSettings(url="http://127.0.0.1:1/h")).headers(body)


@pytest.mark.parametrize("name", ["petition_optin.json", "event.json", "share_twitter.json"])
def test_sqs_entry(name: str) -> None:
    body = fixture_bytes(name)
    doc = orjson.loads(body)
    entry = entry_for(3, body, fifo=False, event_delay=0)
    assert entry["MessageBody"].encode() == body
    attributes = {k: v["StringValue"] for k, v in entry["MessageAttributes"].items()}
    assert attributes["Schema"] == doc["schema"]
    if doc["schema"] == "proca:action:2":
        assert entry["Id"] == f"3_{doc['actionId']}"
        assert attributes["ActionType"] == doc["action"]["actionType"]
        assert attributes["CampaignName"] == doc["campaign"]["name"]
        assert attributes["Stage"] == doc["stage"]
    else:
        assert attributes["EventType"] == doc["eventType"]
    assert all(value for value in attributes.values())
    fifo = entry_for(0, body, fifo=True, event_delay=0)
    assert fifo["MessageGroupId"] and len(fifo["MessageDeduplicationId"]) == 64


def test_sqs_entry_refuses_garbage() -> None:
    with pytest.raises(DecodeError):
        entry_for(0, b"not json", fifo=False, event_delay=0)
    with pytest.raises(DecodeError):
        entry_for(0, b'{"schema": "other"}', fifo=False, event_delay=0)


def test_cli_refuses_secrets_in_the_config_file(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from proca_sync.cli import app

    config = tmp_path / "workers.toml"
    config.write_text('[worker.email]\nsender = "a@example.org"\nsmtp_password = "x"\n')
    result = CliRunner().invoke(app, ["worker", "email", "--org", "5", "--config", str(config)])
    assert result.exit_code == 2
    assert "smtp_password may not be written in the file" in result.output
    config.write_text('[worker.email]\nsender = "not-an-address"\n')
    result = CliRunner().invoke(app, ["worker", "email", "--org", "5", "--config", str(config),
                                      "--templates", str(tmp_path)])
    assert result.exit_code == 2
    assert "sender" in result.output


def test_cli_sqs_without_region_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from proca_sync.cli import app

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    result = CliRunner().invoke(app, [
        "worker", "sqs", "--org", "5", "--queue-url", "https://sqs.example/1/q",
        "--parked", f"sqlite:///{tmp_path / 'parked.db'}",
    ])
    assert result.exit_code == 2, result.output
    assert "no AWS region" in result.output


def test_one_config_file_for_run_and_the_workers(tmp_path: Path) -> None:
    from proca_sync.config_file import load_config
    from proca_sync.errors import ConfigError

    path = tmp_path / "proca-sync.toml"
    path.write_text('queue = "cus.5.deliver"\n[worker.email]\nsender = "a@example.org"\n')
    loaded = load_config(path)
    assert loaded.options == {"queue": "cus.5.deliver"}   # run ignores [worker.*]
    path.write_text('worker = "no"\n')
    with pytest.raises(ConfigError):
        load_config(path)


def test_worker_reads_its_table_from_the_shared_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from proca_sync.cli import app

    path = tmp_path / "proca-sync.toml"
    path.write_text('queue = "cus.5.deliver"\n[worker.email]\nsender = "bad address"\n')
    monkeypatch.setenv("PROCA_SYNC_CONFIG", str(path))
    result = CliRunner().invoke(app, ["worker", "email", "--org", "5",
                                      "--templates", str(tmp_path)])
    assert result.exit_code == 2
    assert "sender" in result.output      # the value came from the shared file's table
