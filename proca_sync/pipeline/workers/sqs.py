"""The SQS worker (``wrk.N.sqs``): actions **and events** forwarded to an SQS queue with
``SendMessageBatch`` (processing.md §11), without the Proca server's faults.

Up to 10 messages per call (the batch waits at most ``batch_wait`` s to fill). Each entry
carries the message JSON byte for byte as ``MessageBody`` and String attributes
``Schema``, ``Stage``, ``CampaignName``, ``ActionType`` (and ``EventType`` for events);
an attribute without a value is left out (SQS refuses empty ones). Events need no
``orgId`` (the server's worker cannot forward ``email_status`` / ``confirm_created``).
Entry ids are ``<position>_<actionId>`` (``<position>_event`` without one), unique in
the call. A FIFO queue (``….fifo``) gets ``MessageGroupId`` = the contact ref (else the
org id) and ``MessageDeduplicationId`` = a digest of the body.

``event_delay`` (seconds, standard queues only) delays events, so that an
``email_status`` event does not overtake the delivery of its action (§12).

Failures: entries SQS reports as failed are re-sent **alone** (the others are done),
with backoff, up to ``attempts`` tries; then a failure with ``SenderFault`` is permanent
(parked, ``destination_rejected``) and any other goes to the retry circuit. A whole call
refused as the client's fault is split into single entries, so one bad message cannot
hold back the others. Throttling, 5xx, network errors: the batch is retried (transient).

Configuration as boto3 users expect: ``endpoint_url``, ``region`` (else ``AWS_REGION`` /
``AWS_DEFAULT_REGION``), credentials from the environment, a ``profile`` or any source of
boto3's default chain. boto3 calls run in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions
from pydantic import BaseModel, ConfigDict, Field

from proca_sync.errors import (
    ConfigError,
    DecodeError,
    PermanentError,
    Reason,
    TransientError,
)
from proca_sync.messages.decode import parse_json
from proca_sync.pipeline.workers.base import Done, Result

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient

__all__ = ["SqsHandler", "SqsSettings", "entry_for"]

log = logging.getLogger("proca_sync.worker")

_KNOWN_SCHEMAS = frozenset({"proca:action:1", "proca:action:2", "proca:event:2"})
_THROTTLING = frozenset({"Throttling", "ThrottlingException", "RequestThrottled",
                         "ServiceUnavailable", "InternalError", "KmsThrottled",
                         "KMS.ThrottlingException"})
_CONFIGURATION = frozenset({"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist",
                            "AccessDenied", "AccessDeniedException", "InvalidClientTokenId",
                            "SignatureDoesNotMatch", "UnrecognizedClientException",
                            "ExpiredToken", "RequestExpired"})


class SqsSettings(BaseModel):
    """``[worker.sqs]`` of the TOML file and CLI options; credentials never come from it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    queue_url: str = Field(min_length=1)
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    event_delay: int = Field(default=0, ge=0, le=900)
    attempts: int = Field(default=4, ge=1, le=20)
    backoff: float = Field(default=0.5, gt=0)
    batch_wait: float = Field(default=1.0, ge=0)


@dataclass(frozen=True, slots=True)
class _Item:
    position: int
    entry: dict[str, Any]


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def entry_for(position: int, body: bytes, *, fifo: bool, event_delay: int) -> dict[str, Any]:
    """The ``SendMessageBatch`` entry of one body. Raises :class:`DecodeError` for a body
    that is not a Proca message (not JSON, not an object, unknown schema)."""
    doc = parse_json(body)
    if not isinstance(doc, dict):
        raise DecodeError("message is not a JSON object", reason=Reason.NOT_AN_OBJECT)
    schema = doc.get("schema")
    if schema not in _KNOWN_SCHEMAS:
        raise DecodeError("unknown schema", reason=Reason.UNKNOWN_SCHEMA)
    action = doc.get("action") if isinstance(doc.get("action"), dict) else {}
    campaign = doc.get("campaign")
    campaign_name = campaign.get("name") if isinstance(campaign, dict) else campaign
    is_event = schema == "proca:event:2"
    stage = doc.get("stage")
    if stage is None and schema == "proca:action:1":
        stage = "deliver"
    attributes = {
        "Schema": _text(schema),
        "Stage": _text(stage),
        "CampaignName": _text(campaign_name),
        "ActionType": _text((action or {}).get("actionType")),
        "EventType": _text(doc.get("eventType")),
    }
    action_id = doc.get("actionId")
    suffix = str(action_id) if isinstance(action_id, int) and not isinstance(action_id, bool) \
        else "event"
    entry: dict[str, Any] = {
        "Id": f"{position}_{suffix}",
        "MessageBody": body.decode("utf-8"),
        "MessageAttributes": {
            name: {"DataType": "String", "StringValue": value}
            for name, value in attributes.items() if value is not None
        },
    }
    if is_event and event_delay:
        entry["DelaySeconds"] = event_delay
    if fifo:
        entry["MessageGroupId"] = _group(doc)
        entry["MessageDeduplicationId"] = hashlib.sha256(body).hexdigest()
    return entry


def _group(doc: Mapping[str, Any]) -> str:
    contact = doc.get("contact")
    if not isinstance(contact, dict):
        supporter = doc.get("supporter")
        contact = supporter.get("contact") if isinstance(supporter, dict) else None
    ref = contact.get("contactRef") if isinstance(contact, dict) else None
    if isinstance(ref, str) and ref:
        return ref[:128]
    org = doc.get("orgId")
    return f"org-{org}" if org is not None else "proca"


class SqsHandler:
    """Forwards bodies to one SQS queue in batches of up to 10."""

    name = "sqs"
    batch_size = 10

    def __init__(self, settings: SqsSettings) -> None:
        self.settings = settings
        self.batch_wait = settings.batch_wait
        self.fifo = settings.queue_url.rstrip("/").endswith(".fifo")
        self._client: SQSClient | None = None
        self.call_sizes: list[int] = []
        """Entries of each SendMessageBatch call (observed by tests and the bench)."""

    async def open(self) -> None:
        def make() -> SQSClient:
            try:
                session = boto3.session.Session(profile_name=self.settings.profile)
            except botocore.exceptions.ProfileNotFound:
                raise ConfigError(f"AWS profile {self.settings.profile!r} not found") from None
            if session.region_name is None and self.settings.region is None:
                raise ConfigError("no AWS region: give --region or set AWS_REGION")
            return session.client(
                "sqs",
                region_name=self.settings.region,
                endpoint_url=self.settings.endpoint_url,
                config=botocore.config.Config(
                    retries={"mode": "standard", "max_attempts": 3},
                    connect_timeout=10, read_timeout=30,
                ),
            )

        self._client = await asyncio.to_thread(make)

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None

    async def handle(self, bodies: Sequence[bytes]) -> Sequence[Result]:
        results: list[Result | None] = [None] * len(bodies)
        pending: list[_Item] = []
        for position, body in enumerate(bodies):
            try:
                entry = entry_for(position, body, fifo=self.fifo,
                                  event_delay=self.settings.event_delay)
            except PermanentError as exc:
                results[position] = exc
            else:
                pending.append(_Item(position, entry))
        if pending:
            try:
                await self._send(pending, results)
            except TransientError as exc:  # the whole call failed: every entry retries
                for item in pending:
                    if results[item.position] is None:
                        results[item.position] = exc
        return [r if r is not None else TransientError("not sent") for r in results]

    async def _send(self, items: list[_Item], results: list[Result | None]) -> None:
        for attempt in range(1, self.settings.attempts + 1):
            try:
                response = await self._call([i.entry for i in items])
            except _CallRefusedError as exc:
                if len(items) == 1:
                    results[items[0].position] = PermanentError(
                        f"SQS refused the message ({exc.code})",
                        reason=Reason.DESTINATION_REJECTED,
                    )
                    return
                for item in items:  # find the bad one: each entry alone
                    await self._send([item], results)
                return
            by_id = {i.entry["Id"]: i for i in items}
            for ok in response.get("Successful", []):
                if ok["Id"] in by_id:
                    item = by_id.pop(ok["Id"])
                    action = item.entry["Id"].split("_", 1)[1]
                    results[item.position] = Done("sent", int(action) if action.isdigit()
                                                  else None)
            failed = {f["Id"]: f for f in response.get("Failed", [])}
            items = [i for i in by_id.values()]
            if not items:
                return
            for item in items:
                failure = failed.get(item.entry["Id"], {})
                log.warning(
                    "SQS refused entry %s (%s, sender fault %s), try %d",
                    item.entry["Id"], failure.get("Code"), failure.get("SenderFault"), attempt,
                    extra={"fields": {"event": "sqs_entry_failed", "entry": item.entry["Id"],
                                      "code": failure.get("Code"),
                                      "sender_fault": failure.get("SenderFault"),
                                      "attempt": attempt}},
                )
            if attempt < self.settings.attempts:
                await asyncio.sleep(  # sleep-ok: backoff between tries of failed entries
                    self.settings.backoff * 2 ** (attempt - 1) * (1 + random.random() / 4)
                )
        for item in items:
            failure = failed.get(item.entry["Id"], {})
            code = failure.get("Code", "unknown")
            if failure.get("SenderFault"):
                results[item.position] = PermanentError(
                    f"SQS refused the entry ({code})", reason=Reason.DESTINATION_REJECTED
                )
            else:
                results[item.position] = TransientError(f"SQS failed the entry ({code})")

    async def _call(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        assert self._client is not None, "open() first"
        client = self._client
        self.call_sizes.append(len(entries))

        def call() -> dict[str, Any]:
            answer: Any = client.send_message_batch(
                QueueUrl=self.settings.queue_url, Entries=entries,  # type: ignore[arg-type]
            )
            return dict(answer)

        try:
            return await asyncio.to_thread(call)
        except botocore.exceptions.ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "unknown"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if status >= 500 or code in _THROTTLING or code in _CONFIGURATION or status == 0:
                raise TransientError(f"SQS call failed ({code})") from None
            raise _CallRefusedError(code) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise TransientError(f"SQS unreachable ({type(exc).__name__})") from None


class _CallRefusedError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code
