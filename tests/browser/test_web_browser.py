"""The console in Debian's Chromium (Selenium, no browser download): the real
``proca-sync web`` process, an account made by ``proca-sync web user add``, a login and
the parked list. With PROCA_WEB_SCREENSHOTS=DIR it also saves each page as DIR/web-*.png
(how docs/web-*.png are made)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proca_sync.consumer.policy import Outcome
from tests.support.web import (
    PASSWORD,
    PERSONAL,
    Console,
    MetricsEndpoint,
    make_console,
    serve_metrics,
)

pytestmark = pytest.mark.slow

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


@pytest.fixture
def served(tmp_path: Path, metrics: MetricsEndpoint) -> Iterator[tuple[Console, str]]:
    console = make_console(tmp_path)
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
         "--metrics", metrics.url, "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(port, process)
        yield console, f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(15)
        log.close()


def test_log_in_and_see_the_parked_list(
    served: tuple[Console, str], metrics: MetricsEndpoint, tmp_path: Path
) -> None:
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    console, base = served
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    options.add_argument(f"--user-data-dir={profile}")
    shots = os.environ.get("PROCA_WEB_SCREENSHOTS")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    wait = WebDriverWait(driver, 20)

    def shot(name: str) -> None:
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(Path(shots) / f"web-{name}.png"))

    try:
        driver.get(base + "/parked")
        wait.until(ec.url_to_be(base + "/login"))  # anonymous: sent to the login form
        shot("login")
        driver.find_element(By.ID, "username").send_keys("rosa")
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "sign-in").click()
        wait.until(ec.url_to_be(base + "/"))
        wait.until(ec.text_to_be_present_in_element((By.ID, "acked"), "0"))
        # The consumer's figures move: htmx refreshes them without reloading the page.
        metrics.settle(Outcome.ACK, 41)
        metrics.settle(Outcome.RETRY, 2)
        metrics.settle(Outcome.PARK, 2)
        marker = driver.find_element(By.TAG_NAME, "h1")
        wait.until(ec.text_to_be_present_in_element((By.ID, "acked"), "41"))
        assert driver.find_element(By.ID, "parked").text == "2"
        assert marker.is_displayed()  # the same document: no reload
        shot("dashboard")
        driver.get(base + "/parked")
        rows = wait.until(
            ec.presence_of_all_elements_located((By.CSS_SELECTOR, "#parked-list tbody tr"))
        )
        texts = [row.text for row in rows]
        assert len(texts) == 2
        assert any("crm_rejected" in t for t in texts)
        assert any("invalid_json" in t for t in texts)
        assert "1732850" in " ".join(texts)  # the action id, from the body's summary
        shot("parked")
        if shots:
            driver.get(f"{base}/parked/{console.parked_ids[0]}")
            shot("parked-message")
            driver.get(base + "/destinations")
            shot("destinations")
            driver.get(base + "/contacts")
            shot("contacts")
            driver.get(base + "/contacts/1")
            shot("contact")
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    server_log = (tmp_path / "web.log").read_text(errors="replace")
    assert "console on http://127.0.0.1" in server_log
    for value in PERSONAL:
        assert value not in server_log
