"""Wire messages: models, legacy upgrade and decoding (pure, no I/O)."""

from proca_sync.messages.decode import decode, decode_document, parse_json
from proca_sync.messages.schemas import (
    ActionMessage,
    CampaignUpdatedEvent,
    ConfirmCreatedEvent,
    EmailStatusEvent,
    Message,
    Stage,
    UnknownEvent,
    to_wire,
)
from proca_sync.messages.upgrade import upgrade_v1

__all__ = [
    "ActionMessage",
    "CampaignUpdatedEvent",
    "ConfirmCreatedEvent",
    "EmailStatusEvent",
    "Message",
    "Stage",
    "UnknownEvent",
    "decode",
    "decode_document",
    "parse_json",
    "to_wire",
    "upgrade_v1",
]
