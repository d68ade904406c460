"""The console in Debian's Chromium (Selenium, no browser download) against the real
``proca-sync web`` process: a login and the parked list; the dashboard following a real
``proca-sync run`` on RabbitMQ; a parked message retried; a contact forgotten. With
PROCA_WEB_SCREENSHOTS=DIR it also saves each page as DIR/web-*.png (how docs/web-*.png
are made)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from proca_sync.consumer.policy import Outcome
from proca_sync.destinations.state import LedgerState
from proca_sync.pipeline.topology import Topology, declare_test_org, deliver_queue
from tests.conftest import require_service
from tests.integration.conftest import AMQP_URL, ConsumerOrg, _delete_org, split_credentials
from tests.support.builders import action, dumps
from tests.support.web import (
    PASSWORD,
    PERSONAL,
    Console,
    MetricsEndpoint,
    make_console,
    serve_metrics,
)

pytestmark = pytest.mark.slow


async def declare(url: str, org: int) -> Topology:
    """A fresh Proca org on the test broker (as tests/integration's consumer_org)."""
    connection = await aio_pika.connect(url)
    try:
        return await declare_test_org(await connection.channel(), org, retry_delay_ms=500)
    finally:
        await connection.close()


async def delete_org(url: str, topology: Topology) -> None:
    await _delete_org(url, topology)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage", "--window-size=1280,900",
]  # fmt: skip


def require_chromium() -> None:
    """Skip when Chromium or its driver is absent on a developer machine; fail in CI."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if not missing:
        return
    message = f"{', '.join(missing)} absent (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[bytes], within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"proca-sync web exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)  # sleep-ok: polling a port with a deadline
    raise AssertionError(f"proca-sync web is not listening on {port} after {within} s")


@pytest.fixture
def metrics() -> Iterator[MetricsEndpoint]:
    yield from serve_metrics()


@contextlib.contextmanager
def web_process(console: Console, tmp_path: Path, metrics_url: str) -> Iterator[str]:
    """``proca-sync web`` over the console's stores, with an admin ``rosa`` made by the CLI;
    yields its base URL; its output goes to tmp_path/web.log."""
    cli = [sys.executable, "-m", "proca_sync"]
    env = {**os.environ, "PROCA_WEB_PASSWORD": PASSWORD, "PROCA_WEB_SECRET": "browser test"}
    subprocess.run(
        [*cli, "web", "user", "add", "rosa", "--role", "admin",
         "--users", console.settings.accounts_url],
        env=env, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    port = free_port()
    log = (tmp_path / "web.log").open("wb")
    process = subprocess.Popen(
        [*cli, "web", "--users", console.settings.accounts_url, "--crm", console.crm_url,
         "--parked", console.parked_url, "--erasure-key", str(tmp_path / "erasure.key"),
         "--metrics", metrics_url, "--port", str(port), "--sample-seconds", "0.5"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(15)
        log.close()


@pytest.fixture
def served(tmp_path: Path, metrics: MetricsEndpoint) -> Iterator[tuple[Console, str]]:
    console = make_console(tmp_path)
    with web_process(console, tmp_path, metrics.url) as base:
        yield console, base


@dataclass
class Browser:
    """A Chromium driven by Selenium, signed in as nobody yet."""

    driver: Any
    base: str
    wait: Any

    def sign_in(self, name: str) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        self.driver.get(self.base + "/login")
        self.driver.find_element(By.ID, "username").send_keys(name)
        self.driver.find_element(By.ID, "password").send_keys(PASSWORD)
        self.driver.find_element(By.ID, "sign-in").click()
        self.wait.until(ec.url_to_be(self.base + "/"))

    def shot(self, name: str) -> None:
        """Save the whole page as $PROCA_WEB_SCREENSHOTS/web-NAME.png when that is set."""
        shots = os.environ.get("PROCA_WEB_SCREENSHOTS")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            height = self.driver.execute_script("return document.body.scrollHeight")
            self.driver.set_window_size(1280, max(900, min(2000, int(height) + 40)))
            self.driver.save_screenshot(str(Path(shots) / f"web-{name}.png"))
            self.driver.set_window_size(1280, 900)


@contextlib.contextmanager
def chromium(base: str, tmp_path: Path) -> Iterator[Browser]:
    require_chromium()
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP reports, JS errors
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        # htmx swaps the figures in place: an element found a moment ago may be gone.
        wait = WebDriverWait(driver, 20, ignored_exceptions=[StaleElementReferenceException])
        yield Browser(driver, base, wait)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def assert_clean_log(tmp_path: Path) -> None:
    server_log = (tmp_path / "web.log").read_text(errors="replace")
    assert "console on http://127.0.0.1" in server_log
    for value in PERSONAL:
        assert value not in server_log


def test_log_in_and_see_the_parked_list(
    served: tuple[Console, str], metrics: MetricsEndpoint, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    console, base = served
    with chromium(base, tmp_path) as browser:
        driver, wait = browser.driver, browser.wait
        driver.get(base + "/parked")
        wait.until(ec.url_to_be(base + "/login"))  # anonymous: sent to the login form
        browser.shot("login")
        browser.sign_in("rosa")
        wait.until(ec.text_to_be_present_in_element((By.ID, "acked"), "0"))
        # The consumer's figures move: htmx refreshes them without reloading the page.
        metrics.settle(Outcome.ACK, 41)
        metrics.settle(Outcome.RETRY, 2)
        metrics.settle(Outcome.PARK, 2)
        marker = driver.find_element(By.TAG_NAME, "h1")
        wait.until(ec.text_to_be_present_in_element((By.ID, "acked"), "41"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "parked"), "2"))
        assert marker.is_displayed()  # the same document: no reload
        driver.get(base + "/parked")
        rows = wait.until(
            ec.presence_of_all_elements_located((By.CSS_SELECTOR, "#parked-list tbody tr"))
        )
        texts = [row.text for row in rows]
        assert len(texts) == 2
        assert any("crm_rejected" in t for t in texts)
        assert any("invalid_json" in t for t in texts)
        assert "1732850" in " ".join(texts)  # the action id, from the body's summary
        browser.shot("parked")
        if os.environ.get("PROCA_WEB_SCREENSHOTS"):
            driver.get(f"{base}/parked/{console.parked_ids[0]}")
            browser.shot("parked-message")
            driver.get(base + "/destinations")
            browser.shot("destinations")
            driver.get(base + "/contacts")
            browser.shot("contacts")
            driver.get(base + "/contacts/1")
            browser.shot("contact")
            driver.get(base + "/audit")
            browser.shot("audit")
    assert_clean_log(tmp_path)


@pytest.mark.rabbitmq
def test_the_dashboard_follows_a_running_consumer(tmp_path: Path) -> None:
    """A real `proca-sync run` consumes a real RabbitMQ queue into the console's CRM; the
    dashboard's figures and charts follow it without a reload."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    require_chromium()
    amqp_url = AMQP_URL
    parts = urlsplit(amqp_url)
    require_service("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    console = make_console(tmp_path)
    crm = console.crm()
    LedgerState(crm, "brevo").register()  # nobody pushes: its lag grows as contacts arrive
    crm.close_sync()
    org = random.randint(10_000_000, 2_000_000_000)
    topology = asyncio.run(declare(amqp_url, org))
    metrics_port = free_port()
    url, credentials = split_credentials(amqp_url)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    consumer_log = (tmp_path / "consumer.log").open("wb")
    consumer = subprocess.Popen(
        [sys.executable, "-m", "proca_sync", "run", "--url", url, "--queue", deliver_queue(org),
         "--crm", console.crm_url, "--parked", console.parked_url,
         "--metrics-port", str(metrics_port)],
        env={**base_env, **credentials}, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=consumer_log,
    )  # fmt: skip
    org_queue = ConsumerOrg(org, amqp_url, topology)
    try:
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        with (
            web_process(console, tmp_path, metrics_url) as base,
            chromium(base, tmp_path) as browser,
        ):
            driver, wait = browser.driver, browser.wait
            browser.sign_in("rosa")
            wait.until(ec.text_to_be_present_in_element((By.ID, "acked"), "0"))
            charts = driver.find_element(By.ID, "charts")
            marker = driver.find_element(By.TAG_NAME, "h1")
            wait.until(lambda _d: charts.get_attribute("data-draws") not in (None, "0"))
            published = 0
            for batch in range(3):  # three bursts: the rate chart shows three peaks
                bodies = [
                    dumps(action(
                        700_000 + published + k, ref=f"r{published + k:06d}".ljust(43, "x"),
                        email=f"walker{published + k}@example.org",
                        created="2024-05-01T10:00:00Z",
                    ))
                    for k in range(15)
                ]  # fmt: skip
                if batch == 1:
                    bodies.append(b"this is not json {")
                published += len(bodies)
                asyncio.run(org_queue.publish(bodies))
                acked = 15 * (batch + 1)
                wait.until(lambda _d, n=acked: driver.find_element(By.ID, "acked").text == str(n))
            wait.until(ec.text_to_be_present_in_element((By.ID, "parked"), "1"))
            points = int(charts.get_attribute("data-points") or 0)
            wait.until(lambda _d: int(charts.get_attribute("data-points") or 0) > points)
            assert marker.is_displayed()  # the same document all along: no reload
            wait.until(ec.text_to_be_present_in_element((By.ID, "lags"), "brevo lag"))
            assert driver.find_elements(By.CSS_SELECTOR, "#chart-rate canvas")
            assert driver.find_elements(By.CSS_SELECTOR, "#chart-lag canvas")
            rate = driver.execute_script(
                "return fetch('/dashboard/history').then(r => r.json())"
                ".then(h => Math.max(...h.rate.filter(v => v !== null)))"
            )
            assert rate > 0
            browser.shot("dashboard")
            # No script error and nothing refused by the Content-Security-Policy (uPlot's
            # styles are set through the CSSOM, which the policy allows).
            severe = [
                e["message"] for e in driver.get_log("browser")
                if e["level"] == "SEVERE" and "/favicon.ico" not in e["message"]
            ]  # fmt: skip
            assert severe == []
    finally:
        consumer.terminate()
        consumer.wait(15)
        consumer_log.close()
        asyncio.run(delete_org(amqp_url, topology))
    assert_clean_log(tmp_path)


def test_retry_a_parked_message_and_see_it_synced(
    served: tuple[Console, str], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec

    console, base = served
    assert console.crm().find_contact(PERSONAL[0]) is None
    with chromium(base, tmp_path) as browser:
        driver, wait = browser.driver, browser.wait
        browser.sign_in("mo")  # a moderator may retry
        driver.get(base + "/parked?reason=crm_rejected")
        parked_id = console.parked_ids[0]
        driver.find_element(By.CSS_SELECTOR, f"input[name=ids][value='{parked_id}']").click()
        driver.find_element(By.CSS_SELECTOR, "button[formaction='/parked/retry']").click()
        result = wait.until(ec.presence_of_element_located((By.ID, "retry-results")))
        assert "synced" in result.text
        driver.get(base + "/parked")
        rows = driver.find_elements(By.CSS_SELECTOR, "#parked-list tbody tr")
        assert [r for r in rows if "crm_rejected" in r.text] == []  # the row is gone
        assert len(rows) == 1
        search = driver.find_element(By.CSS_SELECTOR, "nav a[href='/contacts']")
        search.click()
        box = wait.until(ec.presence_of_element_located((By.NAME, "q")))
        box.send_keys(PERSONAL[0], Keys.ENTER)  # the contact is in the CRM now
        found = wait.until(
            ec.presence_of_element_located((By.CSS_SELECTOR, "#contact-list a[href^='/contacts/']"))
        )
        found.click()  # the person's page lists the e-mail among their keys
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "main"), PERSONAL[0]))
    assert console.crm().find_contact(PERSONAL[0]) is not None
    assert_clean_log(tmp_path)


def test_forget_a_contact_after_confirming(served: tuple[Console, str], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    console, base = served
    email = "another.test@example.org"
    assert console.crm().find_contact(email) is not None
    with chromium(base, tmp_path) as browser:
        driver, wait = browser.driver, browser.wait
        browser.sign_in("rosa")
        driver.get(base + "/contacts?q=" + email)
        driver.find_element(By.CSS_SELECTOR, "#contact-list a[href='/contacts/1']").click()
        wait.until(ec.url_to_be(base + "/contacts/1"))
        driver.find_element(By.CSS_SELECTOR, "a.danger[href='/contacts/1/forget']").click()
        confirm = wait.until(ec.presence_of_element_located((By.ID, "confirm")))
        browser.shot("forget")
        confirm.send_keys("2")  # the wrong number: nothing happens
        driver.find_element(By.ID, "forget").click()
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "p.error[role=alert]")))
        assert console.crm().find_contact(email) is not None
        driver.find_element(By.ID, "confirm").send_keys("1")
        driver.find_element(By.ID, "forget").click()
        wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "erased"))
        driver.get(base + "/contacts?q=" + email)
        listed = driver.find_element(By.ID, "contact-list").text
        assert "No contact matches." in listed
        driver.get(base + "/contacts/1")
        assert "no contact 1" in driver.find_element(By.TAG_NAME, "main").text
    assert console.crm().find_contact(email) is None
    assert_clean_log(tmp_path)
