"""Servers the tests start themselves (PostgreSQL), and the rule for when they are missing.

`require_or_skip` is the one place that decides: a test that needs a server skips with a clear
reason where it cannot be had, unless TAPS_CL_REQUIRE_SERVERS=1 (CI), where it fails instead.

`db_url` runs a registry test on both databases: ids ``sqlite`` (None: the home's default
registry.db file) and ``postgres`` (a fresh database on the session's PostgreSQL server), so
``pytest -k postgres`` selects the PostgreSQL runs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Optional

import pytest

from tests.pgserver import PostgresServer, ServerUnavailable, start_postgres

REQUIRE_ENV = "TAPS_CL_REQUIRE_SERVERS"
DATABASES = ("sqlite", "postgres")

_database_numbers = itertools.count(1)


def require_or_skip(reason: str) -> None:
    """Skip the test for ``reason``; fail it instead when TAPS_CL_REQUIRE_SERVERS=1 (CI)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: server-backed tests may not skip)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the test session, stopped (and its directory removed) at the end."""
    try:
        import psycopg  # noqa: F401  # the driver SQLAlchemy's postgresql+psycopg URLs use
    except ImportError:
        require_or_skip("PostgreSQL tests need psycopg (pip install 'taps-cl[postgres]')")
    try:
        server = start_postgres()
    except ServerUnavailable as exc:
        require_or_skip(f"PostgreSQL tests need a local server: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def postgres_url(postgres_server: PostgresServer) -> str:
    """URL of a new, empty database on the session's server (one per test)."""
    return postgres_server.create_database(f"t{os.getpid()}_{next(_database_numbers)}")


@pytest.fixture(params=DATABASES)
def db_url(request: pytest.FixtureRequest) -> Optional[str]:
    """The registry's database: None on ``sqlite`` (the home's registry.db), else a PG URL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")


def db_option(db_url: Optional[str]) -> list[str]:
    """The CLI's ``--db`` option for ``db_url``; none for None (the home's registry.db)."""
    return ["--db", db_url] if db_url else []


def cli_home(home: object, db_url: Optional[str]) -> list[str]:
    """The CLI's global options for a registry at ``home`` on ``db_url``."""
    return ["--home", str(home), *db_option(db_url)]
