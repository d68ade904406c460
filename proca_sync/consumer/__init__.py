"""The queue consumer (``proca-sync run``): intake, lanes, outcome policy, breaker, parking.

See :mod:`proca_sync.consumer.runner` for the flow of a delivery.
"""

from proca_sync.consumer.breaker import Breaker, BreakerState
from proca_sync.consumer.intake import AckBook, Intake, IntakeError
from proca_sync.consumer.lanes import Lanes
from proca_sync.consumer.parking import ParkedMessage, ParkingStore
from proca_sync.consumer.policy import Decision, Outcome, attempts_of, decide
from proca_sync.consumer.runner import Consumer, ExitStatus, serve
from proca_sync.consumer.status import HealthServer, Stats

__all__ = [
    "AckBook",
    "Breaker",
    "BreakerState",
    "Consumer",
    "Decision",
    "ExitStatus",
    "HealthServer",
    "Intake",
    "IntakeError",
    "Lanes",
    "Outcome",
    "ParkedMessage",
    "ParkingStore",
    "Stats",
    "attempts_of",
    "decide",
    "serve",
]
