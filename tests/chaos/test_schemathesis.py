"""Schemathesis (pinned in the ``dev`` extra) against a real server, once per token scope.

Every operation of ``/v1/openapi.json``, ``--checks all``, a fixed seed. Asserted: no server
error (ST101), no undocumented status (ST103) and no response that breaks its documented
schema, media type or headers (ST104–ST110). What else schemathesis reports (requests it
thinks should have been accepted or refused) is printed for a human to read.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import ADMIN, TOKENS, spec
from live import LiveServer

from hpo_service.config import Settings

pytestmark = pytest.mark.slow

ST = Path(sys.executable).parent / "st"
ASSERTED = re.compile(r"\bST1(0[1-9]|10)\b")


@pytest.mark.parametrize("token", ["admin-token", "worker-token", "viewer-token"])
def test_schemathesis_finds_no_server_error_or_undocumented_answer(
    tmp_path: Path, token: str
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'st.db'}",
        tokens=TOKENS,  # type: ignore[arg-type]
        heartbeat_interval_s=1,
        lease_timeout_s=30,
        run_reaper=False,
        run_scheduler=False,
        db_connect_retries=0,
    )
    with LiveServer(settings) as server:
        # A study with room for every lease schemathesis asks for, so no lease long-polls.
        roomy = spec(name="roomy", budget={"n_trials": 100_000, "max_concurrent": 1024})
        assert httpx.post(f"{server.url}/v1/studies", json=roomy, headers=ADMIN).status_code == 201
        run = subprocess.run(
            [
                str(ST), "run", f"{server.url}/v1/openapi.json",
                "-H", f"Authorization: Bearer {token}",
                "--checks", "all",
                "--seed", "0",
                "--generation-deterministic",
                "--max-examples", "3",
                "--phases", "examples,coverage,fuzzing",
                "--workers", "1",
                "--request-timeout", "70",
                "--suppress-health-check", "all",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=280,
            cwd=tmp_path,  # its cache and reports stay out of the repository
        )  # fmt: skip
    output = run.stdout + run.stderr
    summary = output[output.rfind("SUMMARY") :]
    print(summary)
    assert "Tested: " in summary, output[-3000:]
    flagged = sorted(set(ASSERTED.findall(summary)))
    assert not flagged, output[-8000:]
