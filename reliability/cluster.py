"""A 3-node RabbitMQ cluster on loopback, and the full mode's scenario on it.

:class:`RabbitCluster` starts three nodes of the Debian ``rabbitmq-server`` already
installed, each with its own node name, AMQP port, distribution port, data and log
directories and no plugins (``RABBITMQ_NODENAME``, ``RABBITMQ_NODE_PORT``,
``RABBITMQ_DIST_PORT``, ``RABBITMQ_MNESIA_BASE``, ``RABBITMQ_LOG_BASE``,
``RABBITMQ_ENABLED_PLUGINS_FILE``…), joins the second and third to the first, and
removes everything on exit. The machine's own broker (``rabbit@localhost``) is not
touched; the nodes share its Erlang cookie and ``epmd``.

``cluster`` (full mode only): the org's queues are declared as quorum queues (what
``topology declare --quorum`` declares), two consumer processes run — one connected to
node 1, one to node 2 — and node 1, where the queues were declared, is stopped
mid-stream (``stop_app``) and started again later. Nothing may be lost or applied twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aio_pika

from reliability.harness import ConsumerProcess, Context, Org, ScenarioFailure
from reliability.pgprivate import free_port

if TYPE_CHECKING:
    from reliability.scenarios import ScenarioResult

__all__ = ["RabbitCluster", "scenario_cluster"]

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


@dataclass(frozen=True)
class Node:
    name: str
    amqp_port: int
    dist_port: int
    base: Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"


class RabbitCluster:
    """``with RabbitCluster() as cluster:`` three clustered nodes, removed on exit."""

    def __init__(self, size: int = 3) -> None:
        ctl = shutil.which("rabbitmqctl")
        if ctl is None or not Path(SERVER).exists():
            raise ScenarioFailure("rabbitmq-server is not installed")
        self.rabbitmqctl = ctl
        self.root = Path(tempfile.mkdtemp(prefix="reliability-cluster-"))
        tag = secrets.token_hex(3)
        self.nodes = [
            Node(f"proca{i}-{tag}@localhost", free_port(), free_port(), self.root / f"n{i}")
            for i in range(1, size + 1)
        ]
        self._as: list[str] = []
        if os.geteuid() == 0:  # the broker runs as its own user, like the system one
            self._as = ["runuser", "-u", "rabbitmq", "--"]

    def _env(self, node: Node) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": "/var/lib/rabbitmq",  # its Erlang cookie, shared by every node
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",  # loopback only (guest may log in)
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_MNESIA_BASE": str(node.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(node.base / "log"),
            "RABBITMQ_PID_FILE": str(node.base / "node.pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(node.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(node.base / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(node.base / "advanced.config"),
        }

    def ctl(self, node: Node, *args: str, timeout: float = 180) -> str:
        """``rabbitmqctl -n NODE ARGS``; its stdout. Raises :class:`ScenarioFailure`."""
        result = subprocess.run(  # noqa: S603 - fixed program, our own arguments
            [self.rabbitmqctl, "-n", node.name, *args], capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise ScenarioFailure(
                f"rabbitmqctl -n {node.name} {args[0]} failed: {result.stderr.strip()[:300]}"
            )
        return result.stdout

    def start(self) -> None:
        for node in self.nodes:
            (node.base / "log").mkdir(parents=True)
            (node.base / "mnesia").mkdir()
            (node.base / "enabled_plugins").write_text("[].\n")
            (node.base / "rabbitmq.conf").write_text("# a node of the reliability suite\n")
            (node.base / "advanced.config").write_text("[].\n")
        if self._as:
            for path in [self.root, *self.root.rglob("*")]:
                shutil.chown(path, user="rabbitmq", group="rabbitmq")
        for node in self.nodes:
            subprocess.run(  # noqa: S603 - the installed server, our own arguments
                [*self._as, SERVER, "-detached"], env=self._env(node), cwd=self.root,
                capture_output=True, timeout=120, check=False,
            )  # fmt: skip
        for node in self.nodes:
            self.wait_up(node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
            self.wait_up(node)

    def wait_up(self, node: Node, within: float = 180) -> None:
        """Until the node has booted. ``await_startup`` fails at once while the node is
        not yet known to epmd, so it is asked again until ``within`` seconds."""
        deadline = time.monotonic() + within
        while True:
            try:
                self.ctl(node, "await_startup", "--timeout", "60", timeout=90)
                return
            except ScenarioFailure:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1.0)  # sleep-ok: a poll interval inside a deadline

    def stop(self) -> None:
        for node in self.nodes:
            try:
                self.ctl(node, "stop", timeout=120)
            except (ScenarioFailure, subprocess.TimeoutExpired):
                pid = node.base / "node.pid"
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pid.read_text().strip()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


async def scenario_cluster(ctx: Context, result: ScenarioResult) -> None:
    from proca_sync.pipeline.topology import declare_test_org
    from reliability.scenarios import (
        Setup,
        cleanup,
        drain,
        finish_sql,
        publish_stream,
        sized,
        sqlite_applied,
        wait_progress,
    )
    from reliability.traffic import build_stream

    cluster = await asyncio.to_thread(RabbitCluster().__enter__)
    consumers: list[ConsumerProcess] = []
    org: Org | None = None
    try:
        one, two = cluster.nodes[0], cluster.nodes[1]
        result.note(f"3 nodes clustered on 127.0.0.1 ports "
                    f"{', '.join(str(n.amqp_port) for n in cluster.nodes)}")  # fmt: skip
        org_id = random.randint(10_000_000, 2_000_000_000)
        connection = await aio_pika.connect(one.url)
        try:
            topology = await declare_test_org(
                await connection.channel(), org_id, retry_delay_ms=500, quorum=True
            )
        finally:
            await connection.close()
        org = Org(org_id, one.url, topology)
        directory = ctx.scratch("cluster")
        stream = build_stream(org_id, directory, actions=sized(ctx, 400, 2500), seed=501,
                              poison_rounds=1, extra_rounds=1)  # fmt: skip
        ctx.keystores.append(stream.keys_path)
        s = Setup("cluster", directory, org, stream, f"sqlite:///{directory / 'crm.db'}",
                  f"sqlite:///{directory / 'parked.db'}")  # fmt: skip
        await publish_stream(ctx, s)
        args = s.consumer_args("--concurrency", "2", "--prefetch", "20", "--batch-size", "10",
                               "--exit-when-idle")  # fmt: skip
        consumers = [
            await ConsumerProcess(ctx, f"cluster: consumer on node {i + 1}", url=node.url,
                                  queue=org.queue, args=args).start()
            for i, node in enumerate((one, two))
        ]  # fmt: skip
        crm_file = directory / "crm.db"
        mark = int(stream.records * 0.3)
        await wait_progress(lambda: sqlite_applied(crm_file), mark, consumers[1], within=180,
                            what=f"{mark} applied")  # fmt: skip
        await asyncio.to_thread(cluster.ctl, one, "stop_app")
        at = sqlite_applied(crm_file)
        # Node 2's consumer goes on (the queues' leader moves to a surviving node).
        await wait_progress(lambda: sqlite_applied(crm_file), at + 50, consumers[1],
                            within=120, what="progress with node 1 down")  # fmt: skip
        await asyncio.to_thread(cluster.ctl, one, "start_app")
        await asyncio.to_thread(cluster.wait_up, one)
        result.note(f"node 1 stopped (stop_app) at {at} applied, started again after "
                    f"{sqlite_applied(crm_file) - at} more were applied through node 2")
        for consumer in consumers:
            await drain(consumer, result, within=sized(ctx, 180, 400))
        await finish_sql(ctx, result, s)
    finally:
        await cleanup(org, *consumers)
        await asyncio.to_thread(cluster.stop)
