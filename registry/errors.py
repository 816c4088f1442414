"""Registry errors: one base class, one subclass per way a request can fail."""


class RegistryError(Exception):
    """Base class of every registry error; its message is meant for the user."""


class NotFound(RegistryError):
    """A named row (base model, task, artifact) does not exist."""


class AlreadyExists(RegistryError):
    """A unique name or key is already taken."""


class SchemaOutOfDate(RegistryError):
    """The database was made by an older (or unknown) schema revision."""


class IntegrityFailure(RegistryError):
    """Stored content does not match its recorded hash, or a file is missing."""


class NoRegistry(NotFound):
    """There is no registry at the given place yet (and the caller asked not to create one)."""


class StoreError(RegistryError):
    """An artifact file could not be written, read or removed: an OS error on the store's path."""


class StoreUnreachable(StoreError):
    """The artifact store did not answer (refused or dropped connection, timeout): nothing is
    known about the file asked for, unlike a missing or corrupt one (IntegrityFailure)."""


class StoreMismatch(RegistryError):
    """The artifact store named is not the one the registry recorded (or belongs to another)."""


class RunLost(RegistryError):
    """The row a ``task add`` run began is gone or was altered; the run records nothing."""
