"""A fault-injection suite for the proca-sync queue consumer: nothing lost, nothing leaked.

Each scenario drives the real consumer (``python -m proca_sync run`` in a subprocess)
against the local RabbitMQ and a real CRM backend, injects faults (SIGKILL, broker
restarts, a TCP proxy that drops, stalls and slows, a PostgreSQL outage, an HTTP CRM that
fails), then compares the consumer's CRM with the state ``proca_sync replay`` reaches
from the very same bodies. Run it with ``python -m reliability [--quick|--full]``; the
results go to ``RELIABILITY.md``.

Modules: ``harness`` (processes, captured output, orgs, polling), ``traffic`` (streams
and extra poison builders), ``oracle`` (replay and comparison), ``proxy`` (asyncio TCP
proxy), ``pgprivate`` (a PostgreSQL instance owned by the run), ``tls`` (a self-made CA
and a RabbitMQ TLS listener), ``scan`` (the privacy scanner), ``scenarios``, ``report``.
"""

from __future__ import annotations

__all__: list[str] = []
