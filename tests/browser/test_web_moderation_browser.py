"""Two moderators at once, each in their own Chromium, against the real ``proca-sync web``
over the state of a real ``proca-sync pipeline serve`` publishing to RabbitMQ: one
accepts A, the other rejects B, then tries A and is told it was taken — and only A
reaches the org's deliver queue. With PROCA_WEB_SCREENSHOTS=DIR it saves
DIR/web-moderation.png (how docs/web-moderation.png is made)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select

from proca_sync.pipeline.state import outbox
from proca_sync.pipeline.topology import deliver_queue
from proca_sync.web.accounts import AccountStore, Role
from tests.browser.test_web_browser import (
    CHROMEDRIVER,
    CHROMIUM,
    FLAGS,
    free_port,
    require_chromium,
    wait_listening,
)
from tests.conftest import require_service
from tests.support.pipeline import ROOT, Pipeline, bodies, submission
from tests.support.web import CHEAP, PASSWORD

pytestmark = pytest.mark.slow

AMQP_URL = os.environ.get("PROCA_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PERSONAL = [f"person{n}@example.org" for n in range(3)] + [f"Last{n}" for n in range(3)]


@pytest.fixture
def pipeline(tmp_path: Path) -> Iterator[Pipeline]:
    """``pipeline serve`` with its outbox publisher on the test broker; the org moderates
    every action (custom_action_confirm) and reads its deliveries from cus.N.deliver."""
    parts = urlsplit(AMQP_URL)
    require_service("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)
    service = Pipeline(tmp_path, AMQP_URL)
    try:
        service.setup(custom_action_confirm=True, custom_action_deliver=True)
        service.start()
        yield service
    finally:
        asyncio.run(service.cleanup())


@pytest.fixture
def console(tmp_path: Path, pipeline: Pipeline) -> Iterator[str]:
    """``proca-sync web --pipeline`` on the pipeline's state, two moderator accounts."""
    users = f"sqlite:///{tmp_path / 'web.db'}"
    accounts = AccountStore(users, cost=CHEAP)
    accounts.open_sync()
    for name in ("mia", "noor"):
        accounts.set_user(name, Role.MODERATOR, PASSWORD)
    accounts.close()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCA_")}
    env["PROCA_WEB_SECRET"] = "browser moderation test"
    log = (tmp_path / "web.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "proca_sync", "web", "--users", users,
         "--pipeline", pipeline.db, "--pipeline-secrets", str(pipeline.secrets_path),
         "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_listening(port, process)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(15)
        log.close()


def unpublished(pipeline: Pipeline) -> int:
    with pipeline.engine.connect() as conn:
        query = select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
        return int(conn.execute(query).scalar() or 0)


def test_two_moderators_at_once(pipeline: Pipeline, console: str, tmp_path: Path) -> None:
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    async def submit() -> list[int]:
        ids = []
        for n in range(3):
            body = submission(pipeline.page, n)
            body["action"]["customFields"] = {"comment": f"please publish remark {n}"}
            status, answer = await pipeline.post("/api/actions", body)
            assert status == 200, answer
            ids.append(int(answer["actionId"]))
        return ids

    a, b, c = asyncio.run(submit())
    drivers: list[Any] = []
    profiles = []
    shots = os.environ.get("PROCA_WEB_SCREENSHOTS")

    def browser(name: str) -> tuple[Any, WebDriverWait[Any]]:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        profile = tmp_path / f"chromium-{name}"
        profiles.append(profile)
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        drivers.append(driver)
        wait = WebDriverWait(driver, 20)
        driver.get(console + "/login")
        driver.find_element(By.ID, "username").send_keys(name)
        driver.find_element(By.ID, "password").send_keys(PASSWORD)
        driver.find_element(By.ID, "sign-in").click()
        wait.until(ec.url_to_be(console + "/"))
        driver.get(console + "/moderation")
        rows = wait.until(
            ec.presence_of_all_elements_located((By.CSS_SELECTOR, "#inbox tbody tr[data-action]"))
        )
        assert [int(r.get_attribute("data-action")) for r in rows] == [a, b, c]
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#inbox tr.current")))
        return driver, wait

    def keys(driver: Any, *pressed: str) -> None:
        for key in pressed:
            ActionChains(driver).send_keys(key).perform()

    def outcome(action_id: int) -> tuple[str, str]:
        return (By.CSS_SELECTOR, f"#action-{action_id} td.decide")

    try:
        # Both inboxes are open before either moderator decides anything.
        mia, mia_wait = browser("mia")
        noor, noor_wait = browser("noor")
        keys(mia, "a")  # the first row is selected: A
        mia_wait.until(ec.text_to_be_present_in_element(outcome(a), "Accepted by you"))
        keys(noor, "j", "r")  # B
        noor_wait.until(ec.text_to_be_present_in_element(outcome(b), "Rejected by you"))
        # Noor's page still offers A; her decision comes second and is refused.
        assert noor.find_elements(By.CSS_SELECTOR, f"#action-{a} button.accept")
        keys(noor, "k", "k", "a")
        noor_wait.until(ec.text_to_be_present_in_element(outcome(a), "Already decided by mia"))
        assert "accepted" in noor.find_element(*outcome(a)).text
        # The heading follows everyone's decisions: only C waits now.
        noor_wait.until(ec.text_to_be_present_in_element((By.ID, "waiting-total"), "1"))
        assert noor.find_elements(By.CSS_SELECTOR, f"#action-{c} button.accept")  # C waits
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            noor.save_screenshot(str(Path(shots) / "web-moderation.png"))
        noor.get(console + "/moderation/history")
        history = noor.find_element(By.ID, "decisions").text
        assert f"mia {a} accept" in history and f"noor {b} reject" in history
    finally:
        for driver in drivers:
            driver.quit()
        for profile in profiles:
            shutil.rmtree(profile, ignore_errors=True)

    # Store-then-publish: once serve's publisher has sent every committed row, the org's
    # deliver queue holds A and nothing else (B rejected, C still waiting).
    deadline = time.monotonic() + 20
    while unpublished(pipeline) and time.monotonic() < deadline:
        time.sleep(0.05)  # sleep-ok: polling the outbox with a deadline
    assert unpublished(pipeline) == 0
    delivered = bodies(asyncio.run(pipeline.drain(deliver_queue(pipeline.org), expect=1)))
    assert [m["actionId"] for m in delivered] == [a]
    assert asyncio.run(pipeline.depth(deliver_queue(pipeline.org))) == 0
    server_log = (tmp_path / "web.log").read_text(errors="replace")
    assert "action moderated" in server_log
    for value in PERSONAL:
        assert value not in server_log
