"""Shared fixtures: every storage-touching test runs on a SQLite file and on PostgreSQL.

PostgreSQL comes from ``HPO_TEST_POSTGRES`` (default: the local server at 127.0.0.1:5432, trust
auth). Each test gets a fresh database, dropped afterwards. When ``CI`` is set and PostgreSQL is
unreachable the run fails: it never silently skips half the backends.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

POSTGRES_ADMIN_URL = os.environ.get(
    "HPO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _admin_engine():  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture(scope="session")
def postgres_available() -> bool:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    try:
        engine = _admin_engine()
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
        return True
    except OperationalError as error:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI and unreachable: {error}")
        return False


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hpo.db'}"
        return
    if not request.getfixturevalue("postgres_available"):
        pytest.skip("PostgreSQL not reachable (set CI=1 to make this a failure)")
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"hpo_test_{uuid.uuid4().hex[:12]}"
    engine = _admin_engine()
    with engine.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        engine.dispose()


# --- The device the trainer tests train on -------------------------------------------------------
# ``pytest --device cuda`` (or ``HPO_TEST_DEVICE=cuda``) runs every test that trains on that device
# (through the ``train_device`` fixture); tests marked ``cpu_only`` are skipped there and tests
# marked ``cuda_only`` are skipped everywhere else. The default is ``cpu``, which is what CI has.


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default=os.environ.get("HPO_TEST_DEVICE", "cpu"),
        help="torch device the trainer tests train on (default: $HPO_TEST_DEVICE or cpu)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cpu_only: skipped when the tests train on another device")
    config.addinivalue_line("markers", "cuda_only: runs only with --device cuda")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device = str(config.getoption("--device"))
    on_cuda = device.startswith("cuda")
    for item in items:
        if on_cuda and item.get_closest_marker("cpu_only"):
            item.add_marker(pytest.mark.skip(reason=f"CPU-only test; training on {device}"))
        if not on_cuda and item.get_closest_marker("cuda_only"):
            item.add_marker(pytest.mark.skip(reason="needs --device cuda"))


@pytest.fixture(scope="session")
def train_device(pytestconfig: pytest.Config) -> str:
    """The device name every training test puts in its config's ``device``."""
    return str(pytestconfig.getoption("--device"))


# --- torch's structured-trace logger stays out of failure reports --------------------------------
# torch.compile logs hundreds of DEBUG records per compile to "torch.__trace"; the logger does not
# propagate, but pytest attaches its capture handlers to it as well, so every compiling test that
# failed printed them. torch tests ``isEnabledFor`` against the logger's own level only.


def pytest_runtest_setup(item: pytest.Item) -> None:
    torch = sys.modules.get("torch")
    if torch is not None:
        logging.getLogger("torch.__trace").setLevel(logging.INFO)
