"""The web console's guards, over real stores: login, roles, CSRF, cookies, rate limit,
audit, and personal data kept from viewers and from log lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from proca_sync.cli import app as cli_app
from proca_sync.consumer.policy import Outcome
from proca_sync.web.accounts import AccountStore, Role
from tests.support.web import (
    PARKED_BODY,
    PASSWORD,
    PERSONAL,
    Console,
    MetricsEndpoint,
    copy_console,
    csrf_of,
    make_console,
    serve_metrics,
)

# Every route and the lowest role that may use it. A new route must be added here (the
# completeness test fails otherwise), so that it is checked for anonymous and wrong-role
# requests below.
ROUTES: dict[tuple[str, str], Role] = {
    ("GET", "/"): Role.VIEWER,
    ("GET", "/dashboard/live"): Role.VIEWER,
    ("GET", "/dashboard/history"): Role.VIEWER,
    ("GET", "/parked"): Role.VIEWER,
    ("GET", "/parked/{parked_id}"): Role.VIEWER,
    ("POST", "/parked/{parked_id}/reveal"): Role.ADMIN,
    ("POST", "/parked/retry"): Role.MODERATOR,
    ("POST", "/parked/drop"): Role.ADMIN,
    ("GET", "/contacts"): Role.MODERATOR,
    ("GET", "/contacts/{contact_id}"): Role.MODERATOR,
    ("GET", "/contacts/{contact_id}/forget"): Role.ADMIN,
    ("POST", "/contacts/{contact_id}/forget"): Role.ADMIN,
    ("GET", "/destinations"): Role.VIEWER,
    ("POST", "/destinations/{name}/retry"): Role.MODERATOR,
    ("GET", "/moderation"): Role.MODERATOR,
    ("POST", "/moderation/decide"): Role.MODERATOR,
    ("GET", "/moderation/history"): Role.MODERATOR,
    ("GET", "/audit"): Role.ADMIN,
}
PUBLIC = {("GET", "/login"), ("POST", "/login"), ("POST", "/logout")}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Console:
    return make_console(tmp_path_factory.mktemp("console"))


@pytest.fixture
def console(template: Console, tmp_path: Path) -> Console:
    return copy_console(template, tmp_path)


@pytest.fixture
def client(console: Console) -> Iterator[TestClient]:
    with console.client() as c:
        yield c


def concrete(path: str, console: Console) -> str:
    return (
        path.replace("{parked_id}", str(console.parked_ids[0]))
        .replace("{contact_id}", "1")
        .replace("{name}", "brevo")
    )


def test_every_route_has_a_declared_role(console: Console) -> None:
    declared = set(ROUTES) | PUBLIC
    found = {
        (method, route.path)
        for route in console.client().app.routes  # type: ignore[attr-defined]
        if isinstance(route, APIRoute)
        for method in route.methods
    }
    assert found == declared


def test_anonymous_is_refused_everywhere(console: Console, client: TestClient) -> None:
    token = csrf_of(client.get("/login").text)  # a valid token: the login is what refuses
    for (method, path), _role in ROUTES.items():
        url = concrete(path, console)
        reply = client.request(method, url, data={"csrf": token, "ids": "1"} if method == "POST" else None)
        if method == "GET":
            assert (reply.status_code, reply.headers.get("location")) == (303, "/login"), url
        else:
            assert reply.status_code == 401, url
        assert "PASSWORD" not in reply.text
    # htmx asks for a redirect instead of swapping the login page into the dashboard.
    reply = client.get("/dashboard/live", headers={"HX-Request": "true"})
    assert (reply.status_code, reply.headers["HX-Redirect"]) == (401, "/login")
    assert console.parking().count() == 2  # nothing was dropped or retried


@pytest.mark.parametrize("name", ["vic", "mo"])
def test_a_wrong_role_is_refused(console: Console, client: TestClient, name: str) -> None:
    token = console.login(client, name)
    have = {"vic": Role.VIEWER, "mo": Role.MODERATOR}[name]
    refused = 0
    for (method, path), needed in ROUTES.items():
        if have.allows(needed):
            continue
        url = concrete(path, console)
        data = {"csrf": token, "ids": str(console.parked_ids[0]), "confirm": "1"}
        reply = client.request(method, url, data=data if method == "POST" else None)
        assert reply.status_code == 403, (name, url)
        refused += 1
    assert refused >= (6 if name == "vic" else 4)
    assert console.parking().count() == 2
    assert console.crm().find_contact("another.test@example.org") is not None  # not erased


def test_csrf_is_checked_on_every_post(console: Console, client: TestClient) -> None:
    token = console.login(client, "ada")
    target = str(console.parked_ids[1])
    for data in ({"ids": target}, {"ids": target, "csrf": "forged"}):
        reply = client.post("/parked/drop", data=data)
        assert reply.status_code == 403
    assert client.post("/parked/drop", data={"ids": target}, headers={"X-CSRF-Token": "x"}).status_code == 403
    # The login form too: a cross-site page cannot sign a victim in as someone else.
    assert client.post("/login", data={"username": "ada", "password": PASSWORD}).status_code == 403
    assert console.parking().count() == 2
    reply = client.post("/parked/drop", data={"ids": target, "csrf": token})
    assert reply.status_code == 303
    assert console.parking().get(int(target)) is None
    # A token from another session is worth nothing here.
    with console.client() as other:
        other_token = console.login(other, "ada")
    assert other_token != token
    first = str(console.parked_ids[0])
    assert client.post("/parked/drop", data={"ids": first, "csrf": other_token}).status_code == 403
    assert console.parking().get(int(first)) is not None


def test_every_post_route_is_csrf_guarded(console: Console, client: TestClient) -> None:
    token = console.login(client, "ada")
    for (method, path), _role in ROUTES.items():
        if method == "POST":
            reply = client.post(concrete(path, console), data={"csrf": token + "x", "ids": "1"})
            assert reply.status_code == 403, path
    assert console.parking().count() == 2


def test_a_viewer_never_sees_personal_data(console: Console, client: TestClient) -> None:
    console.login(client, "vic")
    pages = ["/", "/parked", "/destinations", "/dashboard/live", "/contacts", "/contacts/1",
             "/audit", *(f"/parked/{i}" for i in console.parked_ids)]  # fmt: skip
    for page in pages:
        text = client.get(page).text
        for value in PERSONAL:
            assert value not in text, page
    token = csrf_of(client.get("/parked").text)
    reply = client.post(f"/parked/{console.parked_ids[0]}/reveal", data={"csrf": token})
    assert reply.status_code == 403
    assert PERSONAL[0] not in reply.text


def test_an_admin_reveals_the_payload_and_it_is_audited(
    console: Console, client: TestClient
) -> None:
    token = console.login(client, "ada")
    parked_id = console.parked_ids[0]
    assert PERSONAL[0] not in client.get(f"/parked/{parked_id}").text
    reply = client.post(f"/parked/{parked_id}/reveal", data={"csrf": token})
    assert reply.status_code == 200
    assert PERSONAL[0] in reply.text
    assert reply.headers["Cache-Control"] == "no-store"
    audit = console.accounts().audit_log()
    assert [(e.user, e.action, e.target) for e in audit] == [
        ("ada", "reveal_payload", f"parked:{parked_id}")
    ]
    assert "reveal_payload" in client.get("/audit").text


def test_no_personal_data_in_server_logs(
    console: Console, client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    token = csrf_of(client.get("/login").text)
    client.post("/login", data={"username": PERSONAL[0], "password": PERSONAL[1], "csrf": token})
    token = console.login(client, "ada")
    client.get("/contacts", params={"q": PERSONAL[0]})
    client.get("/contacts/1")
    client.post(f"/parked/{console.parked_ids[0]}/reveal", data={"csrf": token})
    client.post("/parked/retry", data={"csrf": token, "ids": str(console.parked_ids[0])})
    client.post("/contacts/1/forget", data={"csrf": token, "confirm": "1"})
    assert "contact erased" in caplog.text  # the flow did run and log
    assert "payload revealed" in caplog.text
    for value in PERSONAL:
        assert value not in caplog.text
        assert value.lower() not in caplog.text.lower()


def test_login_is_rate_limited(console: Console, client: TestClient) -> None:
    for _ in range(5):
        token = csrf_of(client.get("/login").text)
        reply = client.post("/login", data={"username": "ada", "password": "wrong", "csrf": token})
        assert reply.status_code == 401
    token = csrf_of(client.get("/login").text)
    reply = client.post("/login", data={"username": "ada", "password": PASSWORD, "csrf": token})
    assert reply.status_code == 429
    assert client.get("/").status_code == 303  # still not signed in


def test_session_cookie_flags(console: Console) -> None:
    for base, secure in (("http://testserver", False), ("https://testserver", True)):
        with console.client(base_url=base) as client:
            token = csrf_of(client.get("/login").text)
            reply = client.post(
                "/login", data={"username": "vic", "password": PASSWORD, "csrf": token}
            )
            (cookie,) = [
                c.lower() for c in reply.headers.get_list("set-cookie")
                if c.startswith("proca_session=")
            ]
            assert "httponly" in cookie
            assert "samesite=strict" in cookie
            assert ("secure" in cookie.split("; ")) is secure
            assert "content-security-policy" in reply.headers
    # A tampered cookie is no session.
    with console.client() as client:
        console.login(client, "vic")
        value = client.cookies["proca_session"]
    payload, stamp, signature = value.rsplit(".", 2)
    # The first character of the signature: every bit of it counts (the last one's low
    # bits are base64 padding that decoders ignore, so changing them forged nothing).
    forged = f"{payload}.{stamp}.{'A' if signature[0] != 'A' else 'Q'}{signature[1:]}"
    for cookie, expected in ((value, 200), (forged, 303)):
        with console.client() as fresh:
            assert fresh.get("/", headers={"cookie": f"proca_session={cookie}"}).status_code == expected


def test_a_removed_user_loses_access(console: Console, client: TestClient) -> None:
    console.login(client, "mo")
    assert client.get("/contacts").status_code == 200
    store = console.accounts()
    store.set_user("mo", Role.VIEWER, PASSWORD)  # demoted: takes effect at once
    assert client.get("/contacts").status_code == 403


def test_retry_syncs_a_parked_message(console: Console, client: TestClient) -> None:
    token = console.login(client, "mo")
    parked_id = console.parked_ids[0]
    reply = client.post("/parked/retry", data={"csrf": token, "ids": str(parked_id)})
    assert reply.status_code == 200
    assert "synced" in reply.text
    assert console.parking().get(parked_id) is None
    assert console.crm().find_contact(PERSONAL[0]) is not None


def test_forget_asks_for_confirmation(console: Console, client: TestClient) -> None:
    token = console.login(client, "ada")
    found = client.get("/contacts", params={"q": "Another.Test@example.org"})
    assert 'href="/contacts/1"' in found.text
    page = client.get("/contacts/1")
    assert page.status_code == 200
    assert client.get("/contacts/1/forget").status_code == 200
    reply = client.post("/contacts/1/forget", data={"csrf": token, "confirm": "2"})
    assert reply.status_code == 400
    assert client.get("/contacts/1").status_code == 200
    reply = client.post("/contacts/1/forget", data={"csrf": token, "confirm": "1"})
    assert reply.status_code == 200
    assert client.get("/contacts/1").status_code == 404  # gone
    assert console.crm().find_contact("another.test@example.org") is None
    audit = console.accounts().audit_log()
    assert ("ada", "forget", "contact:1") in [(e.user, e.action, e.target) for e in audit]


def test_parked_list_filters_and_pages(console: Console, client: TestClient) -> None:
    console.login(client, "vic")
    both = client.get("/parked").text
    assert both.count('name="ids"') == 2
    only = client.get("/parked", params={"reason": "invalid_json"}).text
    assert only.count('name="ids"') == 1
    assert client.get("/parked", params={"since": "2999-01-01"}).text.count('name="ids"') == 0
    assert PARKED_BODY[:10].decode() not in only


@pytest.fixture
def metrics() -> Iterator[MetricsEndpoint]:
    yield from serve_metrics()


def test_dashboard_reads_the_consumer_metrics(
    template: Console, tmp_path: Path, metrics: MetricsEndpoint
) -> None:
    console = copy_console(template, tmp_path, metrics_url=metrics.url)

    def live_until(client: TestClient, marker: str) -> str:
        deadline = time.monotonic() + 10
        while True:
            text = client.get("/dashboard/live").text
            if marker in text or time.monotonic() > deadline:
                return text
            time.sleep(0.05)  # sleep-ok: poll interval inside a deadline loop

    with console.client() as client:
        console.login(client, "vic")
        assert 'id="acked">0<' in live_until(client, 'id="acked">0<')
        metrics.settle(Outcome.ACK, 3)
        metrics.settle(Outcome.PARK, 1)
        text = live_until(client, 'id="acked">3<')
        assert 'id="acked">3<' in text
        assert 'id="parked">1<' in text
        page = client.get("/").text
        assert 'hx-get="/dashboard/live"' in page
        assert 'src="/static/uplot.min.js"' in page and 'id="chart-rate"' in page
        history = client.get("/dashboard/history").json()
        assert set(history) == {"t", "rate", "acked", "retried", "parked", "depth", "lag"}
        assert max(r or 0 for r in history["rate"]) > 0
        assert max(r or 0 for r in history["parked"]) > 0
        seen = len(history["t"])
    # A restarted console still draws what it sampled before (its own store keeps it).
    with console.client() as client:
        console.login(client, "vic")
        again = client.get("/dashboard/history").json()
        assert len(again["t"]) >= seen
        assert max(r or 0 for r in again["rate"]) > 0


def test_user_add_reads_the_password_from_the_environment(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'web.db'}"
    runner = CliRunner()
    result = runner.invoke(
        cli_app, ["web", "user", "add", "eve", "--role", "moderator", "--users", url],
        env={"PROCA_WEB_PASSWORD": PASSWORD},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert PASSWORD not in result.output
    store = AccountStore(url)
    user = store.authenticate("eve", PASSWORD)
    assert user is not None and user.role is Role.MODERATOR
    assert store.authenticate("eve", "wrong password") is None
    assert (tmp_path / "web.db").stat().st_mode & 0o077 == 0
    short = runner.invoke(
        cli_app, ["web", "user", "add", "eve", "--users", url], env={"PROCA_WEB_PASSWORD": "short"}
    )
    assert short.exit_code == 2


def test_an_unusable_store_is_a_clear_503(console: Console, client: TestClient) -> None:
    (console.tmp / "crm.db").write_bytes(b"this is not a SQLite database" * 100)
    console.login(client, "ada")
    reply = client.get("/contacts")
    assert reply.status_code == 503
    assert "unavailable" in reply.text
    assert client.get("/parked").status_code == 200  # the rest of the console still works


def test_web_refuses_a_missing_store_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    result = CliRunner().invoke(
        cli_app, ["web", "--crm", f"sqlite:///{missing}", "--users", f"sqlite:///{tmp_path / 'w.db'}"]
    )
    assert result.exit_code == 2
    assert not missing.exists()


def test_an_invalid_parameter_is_a_400_that_does_not_echo_it(
    console: Console, client: TestClient
) -> None:
    assert client.get(f"/parked/{PERSONAL[0]}").status_code == 303  # anonymous first
    console.login(client, "vic")
    for path in (f"/parked/{PERSONAL[0]}", f"/parked?page={PERSONAL[0]}"):
        reply = client.get(path)
        assert reply.status_code == 400
        assert PERSONAL[0] not in reply.text


def test_an_anonymous_visit_never_overwrites_the_session(
    console: Console, client: TestClient
) -> None:
    console.login(client, "vic")
    # Arriving from another site: the browser sends no SameSite=Strict cookie.
    with console.client() as bare:
        reply = bare.get("/parked")
        assert reply.status_code == 303
        names = [c.split("=", 1)[0] for c in reply.headers.get_list("set-cookie")]
        assert "proca_session" not in names
    # Signed out: the session cookie goes, and the old one no longer opens anything.
    token = csrf_of(client.get("/").text)
    reply = client.post("/logout", data={"csrf": token})
    assert any(c.startswith('proca_session=""') or "max-age=0" in c.lower()
               for c in reply.headers.get_list("set-cookie"))
    assert client.get("/").status_code == 303
