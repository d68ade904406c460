"""proca-sync: Proca action and event messages into a CRM, and a Proca-compatible pipeline."""

from proca_sync.crypto import Keystore
from proca_sync.engine import Engine, Summary
from proca_sync.errors import PermanentError, ProcaSyncError, Reason, TransientError
from proca_sync.messages import decode
from proca_sync.sync import Mode, Options

__all__ = [
    "Engine",
    "Keystore",
    "Mode",
    "Options",
    "PermanentError",
    "ProcaSyncError",
    "Reason",
    "Summary",
    "TransientError",
    "decode",
]
__version__ = "0.1.0"
