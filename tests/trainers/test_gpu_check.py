"""``scripts/gpu-check`` dry-run on the CPU (``--quick``), so a GPU slot is never spent on a
broken script: it runs its tests and benchmark, writes the logs and the JSON, prints the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
POPULATION = REPO / "benchmarks" / "population_throughput.py"  # another engineer's; run when there


@pytest.mark.cpu_only  # on a GPU the real run is the check
@pytest.mark.timeout(1900)  # the subprocess has its own bound below
def test_gpu_check_quick_dry_run_writes_logs_figures_and_a_final_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu-check"), "--device", "cpu", "--quick",
         "--no-wheels", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=1800,  # a bound, not a speed check
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["ok"] is True and report["device"] == "cpu" and report["quick"] is True
    assert report["machine"]["torch"].startswith("2.")
    names = [step["step"] for step in report["steps"]]
    assert names[:3] == ["machine", "tests", "trainer_throughput"]
    assert names[3:] == (["population_throughput"] if POPULATION.exists() else [])
    for step in report["steps"]:
        assert step["rc"] == 0 and (out / step["log"]).stat().st_size > 0, step

    tests = report["tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["failures"] == []
    assert tests["passed"] >= 1
    assert tests["skipped"] >= 8  # every test of test_cuda.py is CUDA-only

    figures = report["trainer_throughput"]
    assert figures["device_type"] == "cpu" and figures["torch"] == report["machine"]["torch"]
    rows = figures["rows"]
    assert set(rows) == {"baseline", "ours", "gemm-floor"}
    assert all(row["samples_per_sec"] > 0 for row in rows.values())
    assert rows["baseline"]["x_baseline"] == 1.0
    assert figures["ours_over_gemm_floor"] == pytest.approx(
        rows["ours"]["samples_per_sec"] / rows["gemm-floor"]["samples_per_sec"]
    )
    # The table comes last, with the figures the JSON holds.
    tail = proc.stdout.strip().splitlines()
    assert tail[-1].startswith("logs and gpu-check.json in")
    assert any(line.startswith("gpu-check (quick, --device cpu): OK") for line in tail[-15:])
    ours_line = next(line for line in tail if line.strip().startswith("ours "))
    assert f"{rows['ours']['samples_per_sec']:,.0f}" in ours_line
