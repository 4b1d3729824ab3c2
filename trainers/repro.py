"""The reproducibility record of a training run (issue 14): what a rerun must match beyond the
config — the code (package version and git commit), the libraries (Python, torch, Optuna), the
device and its name, the precision actually used, and the seed.

The worker sends it when it starts a trial (``POST /v1/trials/{id}/record``); the server keeps
it as the trial's ``repro`` attribute. Optuna's version is read from the installed metadata: the
trainers never import optuna (the import-linter contracts in pyproject.toml).
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hpo_service.schemas import ReproRecord
from trainers.precision import uses_bf16
from trainers.run_setup import parse_config, resolve_device

DISTRIBUTION = "vae-hpo"
#: The checkout this package runs from: the folder above ``trainers/``.
_CHECKOUT = Path(__file__).resolve().parent.parent


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(_CHECKOUT), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None  # no git on this machine
    return done.stdout.strip() if done.returncode == 0 else None


def git_checkout() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout the trainers run from, or (None, None) when they were
    installed from a wheel. A site-packages folder that happens to sit inside some other git
    work tree (a virtualenv in a project) is not taken for a checkout: the work tree's top must
    be the folder that holds ``trainers/``."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != _CHECKOUT:
        return None, None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


@functools.cache
def environment() -> dict[str, Any]:
    """The process's code and library versions (read once: they do not change while it runs)."""
    commit, dirty = git_checkout()
    return {
        "package_version": _version(DISTRIBUTION),
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": _version("optuna"),
        "platform": platform.platform(),
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def reproducibility_record(config: Mapping[str, Any]) -> ReproRecord:
    """The record of training ``config`` here. Raises ``ConfigError`` for a config the trainer
    refuses (the run would fail with the same error)."""
    cfg = parse_config(config)
    device = resolve_device(cfg.device)
    # The same decision ``train`` makes (precision.amp_context), so it is what the run uses.
    precision = "bf16 autocast" if uses_bf16(cfg, device) else "fp32"
    return ReproRecord.model_validate(
        {
            **environment(),
            "device": str(device),
            "device_name": device_name(device),
            "precision": precision,
            "seed": cfg.seed,
        }
    )
