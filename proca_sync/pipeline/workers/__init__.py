"""Proca's delivery workers, reproduced: e-mail (``wrk.N.email.supporter``), webhook
(``wrk.N.webhook``) and SQS (``wrk.N.sqs``). Each is a :class:`~.base.Handler` run by the
shared :class:`~.base.WorkerRunner` (the consumer's intake, policy and parking store).

The handlers import their optional libraries (aiosmtplib, pystache, boto3: the
``workers`` extra), so import them from their modules, not from here.
"""

from proca_sync.pipeline.workers.base import Done, Handler, Result, WorkerRunner, serve_worker

__all__ = ["Done", "Handler", "Result", "WorkerRunner", "serve_worker"]
