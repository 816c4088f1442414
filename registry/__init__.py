"""Persistence for taps-cl: SQL registry (SQLAlchemy + Alembic) and artifact store. Imports no torch."""

from registry.errors import (
    AlreadyExists,
    IntegrityFailure,
    NotFound,
    RegistryError,
    SchemaOutOfDate,
)
from registry.repository import Registry

__all__ = [
    "AlreadyExists",
    "IntegrityFailure",
    "NotFound",
    "Registry",
    "RegistryError",
    "SchemaOutOfDate",
]
