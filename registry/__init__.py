"""Persistence for taps-cl: SQL registry (SQLAlchemy + Alembic) and artifact store. Imports no torch."""

from registry.errors import (
    AlreadyExists,
    IntegrityFailure,
    NoRegistry,
    NotFound,
    RegistryError,
    RunLost,
    SchemaOutOfDate,
    StoreError,
    StoreMismatch,
)
from registry.repository import TEMP_GRACE_SECONDS, Registry
from registry.runs import (
    HEARTBEAT_INTERVAL_SECONDS,
    HEARTBEAT_STALE_SECONDS,
    run_is_alive,
    this_host,
)

__all__ = [
    "HEARTBEAT_INTERVAL_SECONDS",
    "HEARTBEAT_STALE_SECONDS",
    "TEMP_GRACE_SECONDS",
    "AlreadyExists",
    "IntegrityFailure",
    "NoRegistry",
    "NotFound",
    "Registry",
    "RegistryError",
    "RunLost",
    "SchemaOutOfDate",
    "StoreError",
    "StoreMismatch",
    "run_is_alive",
    "this_host",
]
