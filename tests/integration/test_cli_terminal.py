"""``proca-sync run`` on a real terminal (a pseudo-terminal read by a terminal emulator):
log lines print whole above the one live status line, never over it (issue 10, point 5)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.integration.conftest import (
    ROOT,
    ConsumerOrg,
    poison_bodies,
    split_credentials,
)

pyte = pytest.importorskip("pyte")

pytestmark = [pytest.mark.rabbitmq]

COLUMNS, ROWS = 120, 200  # tall enough that nothing scrolls off the captured screen
STATUS = re.compile(r"msg/s\s+acked \d+")
LOG = re.compile(r"WARNING\s+park [a-z_]+")
WHOLE_LOG = re.compile(r"^(\[[^\]]+\])?\s*WARNING\s+park [a-z_]+$")


class Terminal:
    """A child process on a pseudo-terminal, its output fed to a VT100 emulator."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT,
            close_fds=True, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        os.set_blocking(self.master, False)

    def pump(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except BlockingIOError:
                return
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            self.stream.feed(chunk)

    def lines(self) -> list[str]:
        self.pump()
        return [line.rstrip() for line in self.screen.display if line.strip()]

    async def until(self, what: str, check: object, within: float = 30) -> list[str]:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            lines = self.lines()
            if check(lines):  # type: ignore[operator]
                return lines
            await asyncio.sleep(0.05)  # sleep-ok: poll interval inside a deadline
        pytest.fail(f"timed out waiting for {what}; screen:\n" + "\n".join(self.lines()))

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(timeout=30)
        os.close(self.master)
        return code


async def test_log_lines_print_above_one_status_line(
    consumer_org: ConsumerOrg, tmp_path: Path
) -> None:
    url, credentials = split_credentials(consumer_org.url)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCA_", "COLUMNS", "LINES"))}
    env.update(credentials, TERM="xterm-256color")
    env.pop("CI", None)  # rich draws no live display when it believes it runs in CI
    terminal = Terminal(
        [sys.executable, "-m", "proca_sync", "run", "--url", url, "--queue", consumer_org.queue,
         "--crm", f"sqlite:///{tmp_path / 'crm.db'}",
         "--parked", f"sqlite:///{tmp_path / 'parked.db'}"],
        env,
    )  # fmt: skip
    try:
        await terminal.until("the status line", lambda ls: any(STATUS.search(x) for x in ls))
        poison = poison_bodies()
        await consumer_org.publish(poison)
        # Each parked message is logged (a warning naming its reason) while the status
        # line keeps redrawing below.
        screen = await terminal.until(
            "the parked messages' log lines",
            lambda ls: sum(bool(LOG.search(x)) for x in ls) >= len(poison)
            and any(f"parked {len(poison)}" in x for x in ls),
        )
        status_lines = [x for x in screen if STATUS.search(x)]
        assert len(status_lines) == 1, "\n".join(screen)
        assert STATUS.search(screen[-1]), "the status line is not the last line:\n" + "\n".join(
            screen
        )
        logs = [x for x in screen if LOG.search(x)]
        for line in logs:
            # Whole: time, level and message and nothing else — no piece of the status
            # line drawn over it, nothing of it left over a status line.
            assert WHOLE_LOG.match(line), "\n".join(screen)
        terminal.proc.send_signal(signal.SIGTERM)
        await terminal.until("the exit summary", lambda ls: any("proca-sync run" in x for x in ls))
        deadline = time.monotonic() + 30
        while terminal.proc.poll() is None and time.monotonic() < deadline:
            terminal.pump()  # keep the terminal drained so the child can exit
            await asyncio.sleep(0.05)  # sleep-ok: poll interval inside a deadline
    finally:
        code = terminal.close()
    assert code == 0
