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
