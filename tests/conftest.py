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
        # A commit returns without waiting for its WAL flush: on a busy disk that wait was most of
        # a PostgreSQL test's time (8-9 ms a commit against 0.3-0.5 ms, at load 10). Atomicity,
        # isolation and every lock stay as they are; only a crash of this shared server could
        # lose the last commits, and no test crashes it (the chaos tests crash a private cluster,
        # which keeps full durability).
        connection.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit TO off'))
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
    slowest_first(items)


# --- The slowest tests start first ---------------------------------------------------------------
# Under pytest-xdist a run lasts as long as its busiest worker: a minute-long test that starts
# last is a minute-long tail with the other workers idle. ``slow_tests.txt`` lists the tests that
# took longest (seconds and node id, from ``--durations``); they run first, longest first, and
# everything else keeps pytest's order after them. Under ``-n`` without a ``--dist`` of its own the
# run is ``--dist loadgroup`` (below): each worker is handed one test (or one ``xdist_group``) at a
# time in this order, so the long ones spread over the workers and the short ones fill in around
# them; xdist's default ``load`` hands out chunks of a hundred tests, which would queue the slow
# ones on one worker. Only the order changes: the same tests run, and an id that no longer exists
# is ignored.

SLOW_TESTS = Path(__file__).with_name("slow_tests.txt")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # Before xdist turns "no --dist given" into "load"; an explicit --dist is left alone, and
    # without xdist loaded (PYTEST_DISABLE_PLUGIN_AUTOLOAD) there is no such option at all.
    if getattr(config.option, "dist", None) == "no" and getattr(config.option, "numprocesses", 0):
        config.option.dist = "loadgroup"


def _slow_test_seconds() -> dict[str, float]:
    seconds: dict[str, float] = {}
    for line in SLOW_TESTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            value, node_id = line.split(maxsplit=1)
            seconds[node_id.strip()] = float(value)
    return seconds


def slowest_first(items: list[pytest.Item]) -> None:
    """Sort ``items`` in place: listed tests longest first, then the rest in their order. A test
    listed without parameters (``path::name``) weighs for each of its parametrisations."""
    seconds = _slow_test_seconds()

    def weight(item: pytest.Item) -> float:
        return seconds.get(item.nodeid, seconds.get(item.nodeid.split("[", 1)[0], 0.0))

    items.sort(key=lambda item: -weight(item))  # stable: unlisted tests keep their order


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
