"""Fault-injection tests: real processes, real signals, a private PostgreSQL cluster, full and
read-only filesystems. Each test bounds every wait; none asserts a duration."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Reuse the service tests' helpers (tokens, spec builders, the in-thread uvicorn server).
sys.path.insert(0, str(Path(__file__).parent.parent / "service"))

import private_pg


@pytest.fixture
def private_cluster() -> Iterator[private_pg.PrivateCluster]:
    reason = private_pg.available()
    if reason:
        pytest.skip(reason)
    with private_pg.PrivateCluster() as cluster:
        yield cluster
