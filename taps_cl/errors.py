"""Errors the learner raises for bad input; the CLI shows them as one line."""


class TapsError(Exception):
    """Base class of every user-facing learner error (bad spec, bad data, bad weights …)."""


class BackboneError(TapsError):
    """A model spec, weights file or architecture that cannot be used."""


class DataError(TapsError):
    """A data spec or dataset that cannot be read or is inconsistent."""


class MethodError(TapsError):
    """An unknown method or an invalid method configuration."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 500 characters), for one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__
