"""The one error tree of proca-sync.

Every failure that can happen while handling a message is one of these classes, so
that the outcome policy (``consumer/policy.py``) can decide ack / retry / park from
the class alone::

    ProcaSyncError
    ├── TransientError          retry later, within a budget
    │   └── BackendUnavailableError   CRM down, timeout, 5xx, 429, database locked
    ├── PermanentError          never succeeds as it is: park it, with a reason code
    │   ├── DecodeError              not JSON, unknown schema, missing / invalid fields
    │   ├── DecryptError             no key, bad MAC, malformed ciphertext
    │   └── BackendRejectedError     the CRM refused the record (validation, 4xx)
    └── ConfigError             the process cannot work at all (bad key store, bad URL):
                                refuse to start; never raised per message

Messages carry ids and reason codes only — never e-mails, names or payloads.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BackendRejectedError",
    "BackendUnavailableError",
    "ConfigError",
    "DecodeError",
    "DecryptError",
    "PermanentError",
    "ProcaSyncError",
    "Reason",
    "TransientError",
]


class Reason(StrEnum):
    """Why a message was rejected (parked). Stable strings: they are stored and printed."""

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_SCHEMA = "unknown_schema"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    NO_KEYSTORE = "no_keystore"
    UNKNOWN_KEY = "unknown_key"
    MALFORMED_CIPHERTEXT = "malformed_ciphertext"
    DECRYPT_FAILED = "decrypt_failed"
    INVALID_PLAINTEXT = "invalid_plaintext"
    CRM_REJECTED = "crm_rejected"
    RETRIES_EXHAUSTED = "retries_exhausted"
    # Delivery workers (proca_sync/pipeline/workers/).
    TEMPLATE_ERROR = "template_error"
    SMTP_REJECTED = "smtp_rejected"
    DESTINATION_REJECTED = "destination_rejected"


class ProcaSyncError(Exception):
    """Base of every error raised on purpose by proca-sync."""


class TransientError(ProcaSyncError):
    """A failure that may pass by itself: retry the message later.

    ``retry_after`` (seconds) is kept when the other side said how long to wait
    (HTTP ``Retry-After``).
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BackendUnavailableError(TransientError):
    """The CRM could not be reached or asked us to slow down."""


class PermanentError(ProcaSyncError):
    """A failure that will repeat on every attempt: the message must be parked."""

    reason: Reason = Reason.INVALID_FIELD

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.args[0] if self.args else ''}"


class DecodeError(PermanentError):
    """The body is not a message we understand (not JSON, unknown schema, bad shape)."""


class DecryptError(PermanentError):
    """``personalInfo`` could not be decrypted (no key, bad MAC, malformed fields)."""


class BackendRejectedError(PermanentError):
    """The CRM refused the record for good (a validation error, a 4xx other than 429)."""

    reason = Reason.CRM_REJECTED


class ConfigError(ProcaSyncError):
    """Configuration that makes all work impossible; reported at start-up, exit code 2."""
