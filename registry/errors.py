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


class RunLost(RegistryError):
    """The row a ``task add`` run began is gone or was altered; the run records nothing."""


class EarlierChanged(RegistryError):
    """Tasks became ready while a run trained; it must check them before it can be recorded.

    ``missing`` names the ready tasks of the base that the run's ``earlier`` cells lack, in
    sequence order.
    """

    def __init__(self, missing: list[str]) -> None:
        self.missing = list(missing)
        super().__init__(
            f"{len(self.missing)} task(s) of this base became ready while this run trained "
            f"({', '.join(self.missing)}); check them and record the task again"
        )
