"""Pure CRM modelling: message → facts, and the joins that merge them. No I/O."""

from proca_sync.sync.consent import is_subscribed
from proca_sync.sync.contacts import ContactState, normalise_email
from proca_sync.sync.model import Options, body_digest, model_message
from proca_sync.sync.records import (
    ActionRecord,
    CampaignFact,
    ContactFacts,
    Ignored,
    IgnoreReason,
    Mode,
    SyncRecord,
)

__all__ = [
    "ActionRecord",
    "CampaignFact",
    "ContactFacts",
    "ContactState",
    "IgnoreReason",
    "Ignored",
    "Mode",
    "Options",
    "SyncRecord",
    "body_digest",
    "is_subscribed",
    "model_message",
    "normalise_email",
]
