"""Consumer settings: broker URL and credentials, prefetch, retry mode."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest
from pydantic import ValidationError

from proca_sync.config import (
    ConsumerSettings,
    RetryMode,
    amqp_url_with_credentials,
    proca_org_of,
    redact_url,
)
from proca_sync.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param(None, "amqps://u:p@api.proca.app/proca_live", id="hosted-default"),
        pytest.param("rabbit.example.org/vh", "amqps://u:p@rabbit.example.org/vh", id="host-vhost"),
        pytest.param("amqp://127.0.0.1:5672/", "amqp://u:p@127.0.0.1:5672/", id="full-url"),
        pytest.param("amqp://me:pw@h/", "amqp://me:pw@h/", id="url-credentials-win"),
    ],
)
def test_credentials_inserted(url: str | None, expected: str) -> None:
    assert amqp_url_with_credentials(url, "u", "p") == expected


def test_special_characters_are_percent_encoded() -> None:
    password = "p@ss:w/rd?#%&"
    url = amqp_url_with_credentials("amqp://h:5672/v", "us@er", password)
    parts = urlsplit(url)
    assert parts.hostname == "h" and parts.port == 5672 and parts.path == "/v"
    assert unquote(parts.username or "") == "us@er"
    assert unquote(parts.password or "") == password


def test_other_scheme_is_refused() -> None:
    with pytest.raises(ConfigError, match="amqp"):
        amqp_url_with_credentials("http://h/", None, None)


def test_redaction() -> None:
    assert redact_url("amqps://u:secret@h/v") == "amqps://u:***@h/v"
    assert redact_url("amqps://h/v") == "amqps://h/v"


def test_settings_read_the_node_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROCA_URL", raising=False)
    monkeypatch.setenv("PROCA_USERNAME", "org_user")
    monkeypatch.setenv("PROCA_PASSWORD", "s3cr3t/+")
    monkeypatch.setenv("PROCA_QUEUE", "cus.320.deliver")
    settings = ConsumerSettings()
    assert settings.amqp_url() == "amqps://org_user:s3cr3t%2F%2B@api.proca.app/proca_live"
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in settings.redacted_url()


def test_tls_verification_cannot_be_switched_off() -> None:
    settings = ConsumerSettings(queue="q", url="amqps://h/v?no_verify_ssl=1")
    with pytest.raises(ConfigError, match="verification"):
        settings.amqp_url()


def test_amqps_gets_a_verifying_context() -> None:
    import ssl

    context = ConsumerSettings(queue="q", url="amqps://h/v").ssl_context()
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname


def test_missing_ca_file_is_a_config_error() -> None:
    settings = ConsumerSettings(queue="q", url="amqps://h/v", ca_file="/nonexistent/ca.pem")
    with pytest.raises(ConfigError, match="CA file"):
        settings.ssl_context()


def test_prefetch_must_cover_concurrency() -> None:
    with pytest.raises(ValidationError, match="prefetch"):
        ConsumerSettings(queue="q", concurrency=16, prefetch=8)
    # Default: room for a full batch forming while another is applied, and every worker.
    assert ConsumerSettings(queue="q", concurrency=16).effective_prefetch == 1000
    assert ConsumerSettings(queue="q", concurrency=16, batch_size=50).effective_prefetch == 200
    assert ConsumerSettings(queue="q", concurrency=300, batch_size=10).effective_prefetch == 600
    assert ConsumerSettings(queue="q", batch_size=400).effective_prefetch == 800


@pytest.mark.parametrize(
    ("queue", "mode", "org"),
    [
        pytest.param("cus.320.deliver", RetryMode.DLX, 320, id="proca-deliver"),
        pytest.param("cus.7.confirm.supporter", RetryMode.DLX, 7, id="proca-confirm"),
        pytest.param("wrk.7.webhook", RetryMode.DLX, 7, id="worker"),
        pytest.param("cus.320.other", RetryMode.LOCAL, None, id="not-a-proca-name"),
        pytest.param("my-queue", RetryMode.LOCAL, None, id="own-queue"),
        pytest.param("cus.0.deliver", RetryMode.LOCAL, None, id="org-zero"),
    ],
)
def test_auto_retry_mode(queue: str, mode: RetryMode, org: int | None) -> None:
    settings = ConsumerSettings(queue=queue)
    assert settings.effective_retry_mode is mode
    assert proca_org_of(queue) == org


def test_explicit_retry_mode_wins() -> None:
    assert ConsumerSettings(queue="my-queue", retry_mode="dlx").effective_retry_mode is RetryMode.DLX


def test_consumer_tag_names_the_host() -> None:
    import socket

    assert ConsumerSettings(queue="q").consumer_tag == f"{socket.gethostname()}.proca-sync"
