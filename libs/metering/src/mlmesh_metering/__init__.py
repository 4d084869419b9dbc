"""Metering every service uses: per-key limits, usage events, one ledger.

See ``mlmesh_metering.metering`` for the API in a few lines.
"""

from mlmesh_metering.events import UsageEvent, check_request_id
from mlmesh_metering.metering import (
    MeteredCall,
    Metering,
    MeteringSettings,
    over_limit,
    status_of,
    subject,
)
from mlmesh_metering.throttle import Decision, Limits, Throttle

__all__ = [
    "Decision",
    "Limits",
    "MeteredCall",
    "Metering",
    "MeteringSettings",
    "Throttle",
    "UsageEvent",
    "check_request_id",
    "over_limit",
    "status_of",
    "subject",
]
